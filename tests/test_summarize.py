"""`medexp summarize`: tables and plots of sweeps, CV pooling, and the statistics behind it."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from medexp.summarize import axis
from medexp.utils.stats import pool
from tests.conftest import ENV, QUIET, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def fake_job(folder: Path, overrides: list[str], metrics: dict | None, optimized_metric="val/auroc_best") -> Path:
    """A run directory as `medexp train` leaves it: overrides, resolved config, metrics.json
    (none: the run failed or is still running)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / "resolved_config.yaml").write_text(yaml.safe_dump({"optimized_metric": optimized_metric, "seed": 1}))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def result(auroc: float, loss: float, test_auroc: float, status: str = "complete") -> dict:
    return {
        "status": status,
        "fit": {"val/auroc_best": auroc, "val/loss": loss, "train/loss": 0.5},
        "val": {"val/auroc": auroc, "val/loss": loss},
        "test": {"test/auroc": test_auroc},
    }


# --- pool: the statistics of folds ---


def test_pool_gives_mean_std_and_a_bootstrap_interval():
    stats = pool([0.70, 0.80, 0.75, 0.90, 0.85])
    assert stats["n"] == 5
    assert stats["mean"] == pytest.approx(0.80)
    assert stats["std"] == pytest.approx(np.std([0.70, 0.80, 0.75, 0.90, 0.85], ddof=1))
    assert 0.70 <= stats["ci_low"] < 0.80 < stats["ci_high"] <= 0.90
    # the percentile bootstrap of the mean: about mean -+ 1.96 sd sqrt((n-1)/n) / sqrt(n)
    half = 1.96 * stats["std"] * math.sqrt(4 / 5) / math.sqrt(5)
    assert stats["ci_high"] - stats["ci_low"] == pytest.approx(2 * half, rel=0.15)
    values = np.random.default_rng(0).uniform(size=6).tolist()
    assert pool(values) == pool(values)  # a fixed seed: the same interval
    assert pool(values, seed=1)["ci_low"] != pool(values)["ci_low"]


def test_pool_of_many_values_matches_the_normal_interval():
    values = np.random.default_rng(0).normal(10.0, 2.0, size=400)
    stats = pool(values, n_boot=4000)
    half = 1.96 * values.std(ddof=1) / math.sqrt(400)
    assert stats["ci_low"] == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert stats["ci_high"] == pytest.approx(values.mean() + half, abs=0.1 * half)


def test_pool_of_one_value_and_of_none():
    one = pool([0.8])
    assert one["n"] == 1 and one["mean"] == 0.8 and math.isnan(one["std"]) and math.isnan(one["ci_low"])
    constant = pool([0.5, 0.5, 0.5])
    assert constant["std"] == 0.0 and constant["ci_low"] == constant["ci_high"] == 0.5
    with pytest.raises(ValueError, match="at least one value"):
        pool([])


def test_summarize_and_stats_import_without_torch():
    code = (
        "import sys, medexp.summarize, medexp.utils.stats; "
        "heavy = {'torch', 'lightning', 'monai', 'matplotlib'} & set(sys.modules); assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- the axes of summary.png ---


def test_plot_axes_follow_the_values():
    assert axis(["1e-4", "1e-3", "1e-2"]) == ("log", [1e-4, 1e-3, 1e-2], [])
    assert axis(["0.001", "0.01"]) == ("linear", [0.001, 0.01], [])  # one decade
    assert axis(["0", "1", "2"]) == ("linear", [0.0, 1.0, 2.0], [])
    assert axis(["resnet18", "cnn", None]) == ("category", [2.0, 1.0, 0.0], ["(unset)", "cnn", "resnet18"])
    assert axis(["true", "false"])[0] == "category"


# --- summarize on run directories written here ---


@pytest.fixture
def grid(tmp_path):
    """A sweep over optimizer.lr (4 decades) with one failed and one pruned run, nested a level deeper."""
    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    shared = ["trainer.max_epochs=3", "model=cnn"]
    fake_job(sweep / "0", ["optimizer.lr=1e-4", *shared], result(0.70, 0.60, 0.68))
    fake_job(sweep / "1", ["optimizer.lr=1e-3", *shared], result(0.90, 0.30, 0.88))
    fake_job(sweep / "2", ["optimizer.lr=1e-2", *shared], result(0.80, 0.20, 0.79))
    fake_job(sweep / "3", ["optimizer.lr=1e-1", *shared], None)
    pruned = result(0.60, 0.70, 0.0, status="pruned")
    del pruned["val"], pruned["test"]
    fake_job(sweep / "10", ["optimizer.lr=3e-1", *shared], pruned)
    return tmp_path / "multiruns"


def test_summary_ranks_the_runs_by_their_objective(grid):
    proc = run_cli("summarize", str(grid), cwd=grid)
    rows = read_csv(grid / "summary.csv")
    assert list(rows[0]) == ["job", "status", "optimizer.lr", "val/auroc_best", "val/auroc", "val/loss", "test/auroc"]
    sweep = "2026-01-01_00-00-00"
    assert [row["job"] for row in rows] == [f"{sweep}/{j}" for j in ("1", "2", "0", "10", "3")]
    assert [row["status"] for row in rows] == ["complete"] * 3 + ["pruned", "failed/unfinished"]
    assert [row["val/auroc_best"] for row in rows] == ["0.9", "0.8", "0.7", "0.6", ""]
    assert rows[0]["optimizer.lr"] == "1e-3" and rows[0]["test/auroc"] == "0.88"
    markdown = (grid / "summary.md").read_text()
    assert "`val/auroc_best` (higher is better)" in markdown
    assert "shared overrides: `trainer.max_epochs=3` `model=cnn`" in markdown
    assert f"| {sweep}/1 | complete | 1e-3 | 0.9 | 0.9 | 0.3 | 0.88 |" in proc.stdout
    assert "1 failed/unfinished" in proc.stdout and "1 pruned" in proc.stdout
    assert (grid / "summary.png").read_bytes()[:8] == PNG_MAGIC
    assert not (grid / "cv_summary.csv").exists()


def test_a_loss_is_ranked_lowest_first(grid, tmp_path):
    run_cli("summarize", str(grid), "--metric", "val/loss", "--output", "out", cwd=tmp_path)
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert [row["val/loss"] for row in rows] == ["0.2", "0.3", "0.6", "0.7", ""]
    assert "val/auroc_best" not in rows[0]  # only the objective and the val/test metrics
    assert "(lower is better)" in (tmp_path / "out" / "summary.md").read_text()
    assert not (grid / "summary.csv").exists()


def test_cv_groups_are_pooled_over_their_folds(tmp_path):
    sweep = tmp_path / "sweep"
    aurocs = {"cnn": [0.70, 0.74, 0.78], "resnet18": [0.80, 0.90, 0.85]}
    job = 0
    for model, values in aurocs.items():
        for fold, value in enumerate(values):
            fake_job(
                sweep / str(job),
                [f"model={model}", f"data.fold={fold}", "data.num_folds=3"],
                result(value, 1 - value, value - 0.05),
            )
            job += 1
    fake_job(sweep / str(job), ["model=cnn", "data.fold=3", "data.num_folds=3"], None)  # a failed fold
    proc = run_cli("summarize", "sweep", cwd=tmp_path)
    rows = read_csv(sweep / "cv_summary.csv")
    assert list(rows[0]) == ["model", "metric", "n", "mean", "std", "ci_low", "ci_high"]
    objective = [row for row in rows if row["metric"] == "val/auroc_best"]
    assert [row["model"] for row in objective] == ["resnet18", "cnn"]  # best mean first
    for row in objective:
        values = aurocs[row["model"]]
        assert int(row["n"]) == 3  # the failed fold does not count
        assert float(row["mean"]) == pytest.approx(np.mean(values))
        assert float(row["std"]) == pytest.approx(np.std(values, ddof=1))
        low, high = float(row["ci_low"]), float(row["ci_high"])
        assert min(values) - 1e-9 <= low < float(row["mean"]) < high <= max(values) + 1e-9
    test = {row["model"]: float(row["mean"]) for row in rows if row["metric"] == "test/auroc"}
    assert test["cnn"] == pytest.approx(np.mean(aurocs["cnn"]) - 0.05)
    assert "| resnet18 | val/auroc_best | 3 | 0.85 ± 0.05 |" in proc.stdout
    summary = read_csv(sweep / "summary.csv")
    assert list(summary[0])[:4] == ["job", "status", "model", "data.fold"] and len(summary) == 7


def test_one_run_directory(tmp_path):
    run = fake_job(tmp_path / "run", ["seed=3"], result(0.75, 0.4, 0.7))
    proc = run_cli("summarize", "run", cwd=tmp_path)
    rows = read_csv(run / "summary.csv")
    assert len(rows) == 1 and rows[0]["job"] == "run" and rows[0]["val/auroc_best"] == "0.75"
    assert "shared overrides: `seed=3`" in proc.stdout


@pytest.mark.parametrize(
    ("setup", "args", "expected"),
    [
        (lambda root: None, ["missing"], "medexp: error: missing: no such directory; expected a multirun directory"),
        (lambda root: (root / "empty" / "0").mkdir(parents=True), ["empty"], "medexp: error: empty: no runs found"),
        (
            lambda root: fake_job(root / "sweep" / "0", ["seed=1"], result(0.7, 0.5, 0.6)),
            ["sweep", "--metric", "val/aucroc"],
            "medexp: error: --metric='val/aucroc' is not a metric of these runs; expected one of "
            "['test/auroc', 'train/loss', 'val/auroc', 'val/auroc_best', 'val/loss']",
        ),
    ],
    ids=["missing-dir", "no-jobs", "unknown-metric"],
)
def test_bad_input_gives_a_short_clear_error(tmp_path, setup, args, expected):
    setup(tmp_path)
    proc = run_cli("summarize", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# --- a real grid sweep ---


def test_a_real_grid_sweep(tmp_path):
    run_cli(
        "train",
        "-m",
        "optimizer.lr=1e-3,1e-2",
        "data.image_size=16",
        "data.num_samples={train:60,val:20,test:20}",
        "trainer.max_epochs=1",
        "logger=csv",
        *QUIET,
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    proc = run_cli("summarize", "sweep", cwd=tmp_path)
    rows = read_csv(tmp_path / "sweep" / "summary.csv")
    recorded = {}
    for job in ("0", "1"):
        recorded[job] = json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["fit"]["val/auroc_best"]
    assert [row["job"] for row in rows] == sorted(recorded, key=lambda job: -recorded[job])
    assert [float(row["val/auroc_best"]) for row in rows] == sorted(recorded.values(), reverse=True)
    assert {row["optimizer.lr"] for row in rows} == {"0.001", "0.01"}
    assert "data.image_size" not in rows[0]  # shared, not swept
    assert "| job | status | optimizer.lr | val/auroc_best |" in proc.stdout
    assert (tmp_path / "sweep" / "summary.png").read_bytes()[:8] == PNG_MAGIC
