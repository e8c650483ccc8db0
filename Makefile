# Two commands from a fresh clone to a result: `make train` and `make test`. Each first sets up
# what it needs: a virtual environment (.venv), the CPU build of torch, medexp with its extras.
# Later calls reuse it; pip runs again only when pyproject.toml or TORCH changed.
#
#   make train                                 # the default experiment (synthetic data, CPU)
#   make train ARGS="model=resnet18 trainer.max_epochs=1"
#   make test                                  # the README's test command (python -m pytest)
#   make test PYTEST_ARGS=tests/test_cli.py    # a part of it (any pytest arguments)
#   make lint                                  # what CI checks besides the tests
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"   # a CUDA build
#
# The manual steps (for an environment you manage yourself) are in the README, "Set up".

PYTHON ?= python3
VENV ?= .venv
# pinned first: an unpinned torch pulls a multi-GB CUDA build (see the README's Set up)
TORCH ?= torch==2.13.0
# overrides for `medexp train`
ARGS ?=
# arguments of `python -m pytest` (default: pyproject's testpaths and addopts)
PYTEST_ARGS ?=

BIN := $(VENV)/bin
# as `source .venv/bin/activate` would: the environment's tools first on PATH
ACTIVATE := PATH="$(abspath $(BIN)):$$PATH" VIRTUAL_ENV="$(abspath $(VENV))"
# written once medexp is installed; newer than pyproject.toml and the torch spec while they hold
INSTALLED := $(VENV)/.medexp-installed
TORCH_SPEC := $(VENV)/.torch-spec

.PHONY: train test lint setup clean-venv FORCE

train: $(INSTALLED)
	$(ACTIVATE) $(BIN)/medexp train $(ARGS)

test: $(INSTALLED)
	$(ACTIVATE) $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(ACTIVATE) $(BIN)/ruff check .
	$(ACTIVATE) $(BIN)/ruff format --check .
	$(ACTIVATE) $(BIN)/lint-imports

setup: $(INSTALLED)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# rewritten (and so newer) only when TORCH differs from what was installed
$(TORCH_SPEC): FORCE | $(BIN)/python
	@echo '$(TORCH)' | cmp -s - $@ || echo '$(TORCH)' > $@

$(INSTALLED): pyproject.toml $(TORCH_SPEC) | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

clean-venv:
	rm -rf $(VENV)

FORCE:
