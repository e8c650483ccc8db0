"""`train()` as the entry point calls it: seeding, determinism and what a run records."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from medexp.train import train
from medexp.utils.run_info import lookup_metric
from tests.conftest import QUIET, compose_config

FAST = [*QUIET, "trainer.max_epochs=2", "data.num_samples={train: 128, val: 64, test: 64}", "data.batch_size=32"]


def test_a_drawn_seed_is_recorded(compose_cfg, tmp_path):
    metrics = train(compose_cfg(*FAST, "seed=null"))
    assert isinstance(metrics["seed"], int)
    info = json.loads((tmp_path / "run_info.json").read_text())
    resolved = yaml.safe_load((tmp_path / "resolved_config.yaml").read_text())
    assert info["seed"] == resolved["seed"] == metrics["seed"]


def test_same_seed_gives_identical_metrics(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = compose_config([*FAST, "trainer.deterministic=true", "seed=7"], output_dir=tmp_path / name)
        runs.append(train(cfg))
    assert runs[0]["test"] == runs[1]["test"]
    assert runs[0]["fit"]["train/loss"] == runs[1]["fit"]["train/loss"]


def test_the_sweep_objective_is_the_best_monitored_value(compose_cfg):
    cfg = compose_cfg(*FAST)
    metrics = train(cfg)
    assert cfg.optimized_metric == "val/auroc_best"
    assert lookup_metric(metrics, cfg.optimized_metric) == pytest.approx(metrics["best_score"])


def test_early_stopping_stops_a_run_that_does_not_improve(compose_cfg, tmp_path):
    # a vanishing lr: the monitored metric never improves by min_delta, so patience 1 stops at epoch 2 of 20
    train(
        compose_cfg(
            *FAST,
            "callbacks=early_stopping",
            "callbacks.early_stopping.patience=1",
            "callbacks.early_stopping.min_delta=0.01",
            "optimizer.lr=1e-12",
            "trainer.max_epochs=20",
        )
    )
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    trained_epochs = {row["epoch"] for row in rows if row.get("train/loss")}
    assert trained_epochs == {"0", "1"}


def test_eval_applies_data_overrides_that_fit_the_checkpoint(tmp_path):
    from medexp.eval import evaluate
    from medexp.utils.errors import MedexpError

    train(compose_config(FAST, output_dir=tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    results = evaluate(compose_config([f"ckpt_path={ckpt}", "data.batch_size=7"], "eval", output_dir=tmp_path / "e1"))
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    assert results["test"]["test/auroc"] == pytest.approx(recorded["test/auroc"], abs=1e-6)
    with pytest.raises(MedexpError, match="data.root='elsewhere' does not apply"):
        evaluate(compose_config([f"ckpt_path={ckpt}", "data.root=elsewhere"], "eval", output_dir=tmp_path / "e2"))


def test_test_checkpoint_last_validates_and_tests_the_final_weights(tmp_path):
    """``medexp train test_checkpoint=last``: validation, test and the report use last.ckpt, not
    best.ckpt. Monitored by validation loss, which rises over these 3 epochs, "best" is the first."""
    from tests.conftest import medexp_main, run_cli

    run_cli(
        "train",
        *FAST,
        "trainer.max_epochs=3",
        "model.monitor=val/loss",
        "test_checkpoint=last",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    losses = [float(r["val/loss"]) for r in csv.DictReader((run / "csv" / "metrics.csv").open()) if r.get("val/loss")]
    fit_losses = losses[:3]  # then one validation of the tested checkpoint
    assert min(fit_losses) != fit_losses[-1]  # best and last differ
    assert metrics["best_checkpoint"].endswith("best.ckpt") and metrics["best_score"] == pytest.approx(min(fit_losses))
    assert metrics["tested_checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    assert metrics["val"]["val/loss"] == pytest.approx(fit_losses[-1], abs=1e-6)
    assert json.loads((run / "report" / "report.json").read_text())["checkpoint"].endswith("last.ckpt")
    # refused in one line: an unknown choice, and last without the callback that writes last.ckpt
    for run_dir, overrides, message in (
        ("bad1", ["test_checkpoint=final"], "test_checkpoint='final'; expected one of ['best', 'last']"),
        ("bad2", ["test_checkpoint=last", "callbacks.last_checkpoint=null"], "but that callback is off"),
    ):
        result = medexp_main("train", *FAST, *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
