"""DDP under Hydra (trainer=ddp_sim: 2 CPU processes, gloo): one run directory per run, written once.

Lightning starts rank 1 by running the command again with ``hydra.run.dir=<the run's directory>``;
rank 1 leaves only its console log, ``train_ddp_process_1.log``, in that directory.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.conftest import QUIET, run_cli

TINY = [*QUIET, "trainer=ddp_sim", "data.image_size=16", "data.num_samples={train:64,val:32,test:32}"]


def epochs_logged(metrics_csv: Path, column: str) -> Counter:
    """How many rows of ``metrics_csv`` hold ``column``, per epoch."""
    return Counter(row["epoch"] for row in csv.DictReader(metrics_csv.open()) if row.get(column))


def assert_written_once(run: Path, top: Path) -> None:
    """Rank 0 wrote the run's files into ``run``; rank 1 added its log only."""
    for name in ("metrics.json", "run_info.json", "resolved_config.yaml"):
        assert [p.parent for p in top.rglob(name)] == [run], name
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    # rank 0 also writes the config tree it printed (config_tree.log); rank 1 only its console log
    assert sorted(p.name for p in run.glob("*.log")) == ["config_tree.log", "train.log", "train_ddp_process_1.log"]
    assert [p.name for p in run.glob(".*")] == [".hydra"]
    assert "GLOBAL_RANK: 1" in (run / "train_ddp_process_1.log").read_text()
    assert "GLOBAL_RANK: 1" not in (run / "train.log").read_text()


def test_ddp_run_makes_one_run_directory(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = run_cli("train", *TINY, "trainer.max_epochs=2", "logger=[csv,tensorboard]", cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in log and "MEMBER: 2/2" in log
    # the default run directory, logs/train/runs/<timestamp>: rank 1 made no second one
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert [p.name for p in (tmp_path / "logs" / "train").iterdir()] == ["runs"]
    assert_written_once(run, tmp_path)
    assert "test/auroc" in json.loads((run / "metrics.json").read_text())["test"]
    # one row per epoch: 2 training epochs, then the best checkpoint validated (epoch 2) and tested
    assert epochs_logged(run / "csv" / "metrics.csv", "val/auroc") == {"0": 1, "1": 1, "2": 1}
    assert epochs_logged(run / "csv" / "metrics.csv", "train/loss") == {"0": 1, "1": 1}
    assert sum(epochs_logged(run / "csv" / "metrics.csv", "test/auroc").values()) == 1
    # event files (one per fit/validate/test) are named ...tfevents.<time>.<host>.<pid>.<n>: one process
    assert len({p.name.split(".")[-2] for p in (run / "tensorboard").glob("events.out.tfevents.*")}) == 1
    assert len(EventAccumulator(str(run / "tensorboard")).Reload().Scalars("val/auroc")) == 3


def test_ddp_multirun_workers_join_their_job(tmp_path):
    run_cli("train", "-m", *TINY, "trainer.max_epochs=1", "seed=1,2", cwd=tmp_path)
    # one sweep directory; no sweep or run directory of rank 1's own
    assert [p.name for p in (tmp_path / "logs" / "train").iterdir()] == ["multiruns"]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    assert len(list(sweep.rglob("metrics.json"))) == 2
    for job, seed in (("0", 1), ("1", 2)):
        run = sweep / job
        assert_written_once(run, run)
        assert json.loads((run / "metrics.json").read_text())["seed"] == seed
        # rank 1 ran this job: its seed, in this directory, as member 2 of 2
        rank1 = (run / "train_ddp_process_1.log").read_text()
        assert f"Seed set to {seed}" in rank1 and "MEMBER: 2/2" in rank1
        assert epochs_logged(run / "csv" / "metrics.csv", "val/auroc") == {"0": 1, "1": 1}


def test_an_ensemble_trains_under_ddp(tmp_path):
    """model.ensemble under 2 processes: one run directory, members drawn apart and trained, and
    the checkpoint's ensemble reproduces the run's test metric under medexp eval."""
    from medexp.checkpoints.checkpoint import Checkpoint

    run = tmp_path / "run"
    run_cli("train", *TINY, "trainer.max_epochs=1", "model.ensemble=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert_written_once(run, tmp_path)
    state = Checkpoint(run / "checkpoints" / "best.ckpt").contents["state_dict"]
    weights = [n for n in state if n.startswith("net.members.0.") and n.endswith("weight") and state[n].ndim > 1]
    assert weights and all(not torch.equal(state[n], state[n.replace(".0.", ".1.", 1)]) for n in weights)
    tested = json.loads((run / "metrics.json").read_text())["test"]["test/auroc"]
    run_cli("eval", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", "hydra.run.dir=eval", cwd=tmp_path)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]["test/auroc"] == pytest.approx(
        tested, abs=1e-6
    )
