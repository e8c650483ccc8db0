"""Sweeps through the submitit launchers: hydra/launcher=local (run here) and =slurm (composed)."""

from __future__ import annotations

import json
import os

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from tests.conftest import QUIET, run_cli

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
submitit = pytest.importorskip("submitit")

TINY = [*QUIET, "data.image_size=16", "data.num_samples={train:64,val:32,test:32}", "trainer.max_epochs=1"]


def compose_with_hydra(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="medexp.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def test_local_launcher_runs_each_job_in_its_own_process_and_directory(tmp_path):
    # Each job is a submitit worker process; with trainer=ddp_sim, Lightning starts its rank 1 as
    # `python -m medexp.train <the job's overrides>` (not submitit's worker) in the job's directory.
    # cpus_per_task is ignored by submitit's local executor; OMP_NUM_THREADS=1 (run_cli) holds.
    run_cli(
        "train",
        "-m",
        "hydra/launcher=local",
        "hydra.launcher.timeout_min=5",
        "hydra.launcher.cpus_per_task=1",
        *TINY,
        "trainer=ddp_sim",
        "seed=1,2",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [".submitit", "0", "1"]
    for job, seed in (("0", 1), ("1", 2)):
        run = sweep / job
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["seed"] == seed and "test/auroc" in metrics["test"]
        assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        assert f"Seed set to {seed}" in (run / "train_ddp_process_1.log").read_text()
        # the command that reproduces this job, not submitit's worker
        command = json.loads((run / "run_info.json").read_text())["command"]
        assert command[:3] == ["python", "-m", "medexp.train"] and f"seed={seed}" in command
        assert "-m" not in command[3:] and "seed=1,2" not in command
    # submitit's own logs of the jobs stay inside the sweep directory
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 2


def test_slurm_launcher_asks_for_one_task_and_gpu_per_device(tmp_path, monkeypatch):
    cfg = compose_with_hydra(
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    launcher = instantiate(cfg.hydra.launcher)
    params = launcher.params
    assert (params["tasks_per_node"], params["nodes"], params["gpus_per_node"]) == (4, 2, 4)
    assert params["submitit_folder"] == f"{tmp_path / 'sweep'}/.submitit/%j"

    # the sbatch script submitit would submit (a stand-in srun: submitit looks for one)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    scripts = []

    def capture(executor, function, *args):
        scripts.append(executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid"))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    launcher.config = cfg
    launcher.launch([["seed=1"]], initial_job_idx=0)
    for line in ("--ntasks-per-node=4", "--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--time=240"):
        assert f"#SBATCH {line}" in scripts[0]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [([], (1, 1, None)), (["trainer=gpu"], (1, 1, 1)), (["trainer=ddp_sim"], (2, 1, None))],
    ids=["default-trainer", "one-gpu", "ddp-on-cpu"],
)
def test_slurm_launcher_follows_the_trainer(overrides, expected):
    launcher = compose_with_hydra("hydra/launcher=slurm", *overrides).hydra.launcher
    assert (launcher.tasks_per_node, launcher.nodes, launcher.gpus_per_node) == expected


def test_the_plugins_own_launcher_configs_still_compose():
    for name, target in (("submitit_slurm", "SlurmLauncher"), ("submitit_local", "LocalLauncher")):
        launcher = compose_with_hydra(f"hydra/launcher={name}", "trainer=ddp").hydra.launcher
        assert launcher._target_.endswith(target)
        assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.timeout_min) == (1, None, 60)


def test_local_launcher_shows_jobs_the_gpus_a_run_here_would_use():
    import torch

    local = compose_with_hydra("hydra/launcher=local", "trainer=ddp").hydra.launcher
    # Lightning starts the DDP workers of a local job itself; submitit shows the job the GPUs
    assert (local.tasks_per_node, local.gpus_per_node, local.timeout_min) == (1, 2, 1440)
    # accelerator=auto: a GPU when this machine has one (submitit would hide it otherwise)
    auto = compose_with_hydra("hydra/launcher=local").hydra.launcher
    assert auto.gpus_per_node == (1 if torch.cuda.is_available() else None)
    assert compose_with_hydra("hydra/launcher=local", "trainer=cpu").hydra.launcher.gpus_per_node is None
