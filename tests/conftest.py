"""Shared fixtures: real Hydra composition of the installed config tree, and the `medexp` CLI."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from medexp.resolvers import register_resolvers

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# Quiet, single-threaded runs: a busy 2-core machine slows multi-threaded training many times over.
QUIET = [
    "callbacks.rich_progress_bar=null",
    "callbacks.rich_model_summary=null",
    "trainer.enable_progress_bar=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}

torch.set_num_threads(1)
register_resolvers()


def compose_config(overrides: list[str] = (), config_name: str = "train", output_dir: Path | None = None) -> DictConfig:
    """Compose a config the way `medexp train` does, with the run's outputs in ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="medexp.conf", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir / "logs")
    return cfg


def run_cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed `medexp` console script as a user would."""
    medexp = Path(sys.executable).with_name("medexp")
    proc = subprocess.run([str(medexp), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"medexp {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def medexp_main(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """The ``medexp`` console script's ``main`` in this process, its stdout and stderr captured:
    the same entry point as `run_cli` without paying torch's, Lightning's and MONAI's imports
    again (about 5 s a call). Tests that signal a run, start DDP workers or parallel jobs, or
    read what the console shows keep `run_cli`, as do the main runs of test_cli, test_first_hour
    and the shared fixtures (GAN, fast recipe, CV sweep), so the installed script is still run
    end to end; everything else may use this. A run refused
    inside its job exits before Hydra's end-of-run callbacks: its directory stays locked until
    this process ends (as the command's process would end), so give each such call its own."""
    from medexp.cli import main

    argv, cwd_before, environ = sys.argv, Path.cwd(), dict(os.environ)
    # process-wide settings a run may change (trainer.deterministic), restored for the next test
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.argv = ["medexp", *args]
    os.environ.update(ENV)  # as run_cli's: one thread in the processes a command starts (reproduce)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            # runpy's note that the command's module was imported before (by this test session)
            warnings.filterwarnings("ignore", "'medexp[.]", RuntimeWarning)
            main()
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except Exception:  # what Python does with an uncaught exception (--verbose lets it through)
        stderr.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = argv
        os.chdir(cwd_before)
        os.environ.clear()
        os.environ.update(environ)  # (--verbose sets HYDRA_FULL_ERROR)
        GlobalHydra.instance().clear()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    proc = subprocess.CompletedProcess(["medexp", *args], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"medexp {' '.join(args)} failed ({code}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start_cli(*args: str, cwd: Path, capture: bool = False) -> subprocess.Popen:
    """Start the `medexp` console script without waiting for it (to signal it mid-run)."""
    medexp = Path(sys.executable).with_name("medexp")
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen([str(medexp), *args], cwd=cwd, env=ENV, stdout=out, stderr=out, text=True)


@pytest.fixture
def compose_cfg(tmp_path):
    def _compose(*overrides: str, config_name: str = "train") -> DictConfig:
        return compose_config(overrides, config_name, output_dir=tmp_path)

    return _compose


@pytest.fixture(scope="session")
def shared_medmnist() -> Path:
    path = SHARED_DATA / "medmnist"
    if not path.is_dir():
        pytest.skip("../shared/data/medmnist is absent")
    return path
