"""Shared fixtures: real Hydra composition of the installed config tree, and the `medexp` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
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
