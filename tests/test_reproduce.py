"""`medexp reproduce` and resuming an interrupted run, end to end through the CLI."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
import yaml

from tests.conftest import QUIET, medexp_main, run_cli, start_cli
from tests.helpers import signal_when

# deterministic CPU runs; small enough to be quick, long enough per epoch to be killed mid-run
RUN = [
    *QUIET,
    "data.image_size=16",
    "data.num_samples={train: 256, val: 64, test: 64}",
    "data.batch_size=32",
    "trainer.deterministic=true",
    "logger=csv",
]


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_reproduce_gives_identical_metrics_and_records_the_comparison(tmp_path):
    run = tmp_path / "run"
    # seed=null: the drawn seed must be found in run_info.json, not taken from the config
    run_cli("train", *RUN, "trainer.max_epochs=2", "seed=null", f"hydra.run.dir={run}", cwd=tmp_path)
    out = tmp_path / "again"
    proc = medexp_main("reproduce", str(run), "--output", str(out), "--strict", cwd=tmp_path)
    assert "reproduction: identical" in proc.stdout
    recorded, reproduced = _metrics(run), _metrics(out)
    assert reproduced["seed"] == recorded["seed"]
    assert reproduced["test"] == recorded["test"] and reproduced["best_score"] == recorded["best_score"]
    report = json.loads((out / "reproduction.json").read_text())
    assert report["identical"] and report["same_data"] is True
    assert report["metrics"]["test/auroc"] == {
        "recorded": recorded["test"]["test/auroc"],
        "reproduced": reproduced["test"]["test/auroc"],
    }
    assert (
        json.loads((out / "run_info.json").read_text())["data_fingerprint"]
        == json.loads((run / "run_info.json").read_text())["data_fingerprint"]
    )

    # from the checkpoint alone (its stored, resolved config), with an override: another seed differs
    other = tmp_path / "other"
    proc = medexp_main(
        "reproduce",
        str(run / "checkpoints" / "best.ckpt"),
        "--output",
        str(other),
        "--strict",
        "seed=3",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _metrics(other)["seed"] == 3 and "DIFFERENT" in proc.stdout
    resolved = yaml.safe_load((other / "resolved_config.yaml").read_text())
    assert resolved["paths"]["output_dir"] == str(other) and resolved["callbacks"]["model_checkpoint"][
        "dirpath"
    ] == str(other / "checkpoints")


def test_reproduce_names_a_missing_source(tmp_path):
    proc = medexp_main("reproduce", str(tmp_path / "nowhere"), cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "nowhere: no such run directory or checkpoint" in proc.stderr


def test_a_killed_run_resumed_from_last_ckpt_ends_like_an_uninterrupted_one(tmp_path):
    # augmentation, dropout-free shuffling and a scheduler: every source of randomness per epoch
    args = [*RUN, "trainer.max_epochs=4", "scheduler=cosine", "data/augmentations=basic", "seed=5"]
    whole = tmp_path / "whole"
    medexp_main("train", *args, f"hydra.run.dir={whole}", cwd=tmp_path)

    killed = tmp_path / "killed"
    proc = start_cli("train", *args, f"hydra.run.dir={killed}", cwd=tmp_path)
    last = killed / "checkpoints" / "last.ckpt"
    # killed once a complete checkpoint (not one being written) loads
    signal_when(proc, lambda: torch.load(last, map_location="cpu", weights_only=True) is not None, signal.SIGKILL)
    proc.wait()
    epoch = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "metrics.json").exists() and epoch < 3

    # only ckpt_path: the run's own overrides and directory are found from the checkpoint
    medexp_main("train", f"ckpt_path={last}", cwd=tmp_path)
    resumed, uninterrupted = _metrics(killed), _metrics(whole)
    assert resumed["test"] == uninterrupted["test"]
    assert resumed["best_score"] == uninterrupted["best_score"]
    assert resumed["fit"]["train/loss"] == uninterrupted["fit"]["train/loss"]
    # one continuous CSV log, as if never interrupted
    assert (killed / "csv" / "metrics.csv").read_text() == (whole / "csv" / "metrics.csv").read_text()
    info = json.loads((killed / "run_info.json").read_text())
    assert info["resumed_from"] == [str(last)]
    overrides = yaml.safe_load((killed / ".hydra" / "overrides.yaml").read_text())
    assert "seed=5" in overrides and f"ckpt_path={last}" in overrides
