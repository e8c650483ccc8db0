"""The evaluation report (medexp.reports) and temperature scaling, on tiny synthetic runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from medexp.train import train
from tests.conftest import QUIET, compose_config

FAST = [*QUIET, "trainer.max_epochs=2", "data.num_samples={train: 128, val: 64, test: 64}", "data.batch_size=32"]
FILES = (
    "report.md",
    "report.html",
    "report.json",
    "confusion_matrix.png",
    "roc.png",
    "precision_recall.png",
    "reliability.png",
)


def read_report(run) -> dict:
    return json.loads((run / "report" / "report.json").read_text())


def read_metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("binary") / "run"
    train(compose_config(FAST, output_dir=run))
    return run


def check_classification_report(report: dict, test: dict, n: int) -> None:
    """The report's numbers agree with metrics.json's test metrics and with each other."""
    for name in ("accuracy", "auroc"):
        value = report["metrics"][name]
        assert value["value"] == pytest.approx(test[f"test/{name}"], abs=1e-6), name
        assert value["ci_low"] <= value["value"] <= value["ci_high"], name
        assert value["ci_high"] - value["ci_low"] > 0, name
    assert report["agreement"]["auroc"]["abs_diff"] < 1e-6
    assert report["n"] == n
    support = [row["support"] for row in report["per_class"]]
    matrix = np.asarray(report["confusion_matrix"])
    if report["task"] == "multilabel":
        assert support == matrix[:, 1, :].sum(axis=1).tolist()  # FN + TP: the positives of each label
        assert (matrix.sum(axis=(1, 2)) == n).all()
    else:
        assert sum(support) == n  # the per-class table covers the test split
        assert matrix.sum(axis=1).tolist() == support
        assert report["metrics"]["balanced_accuracy"] == pytest.approx(test["test/balanced_accuracy"], abs=1e-6)
    assert report["metrics"]["f1_macro"] == pytest.approx(test["test/f1"], abs=1e-6)
    calibration = report["calibration"]
    assert 0 <= calibration["ece"] <= 1 and calibration["n_bins"] == 15
    assert sum(calibration["reliability"]["count"]) == n * (len(support) if report["task"] == "multilabel" else 1)


def test_train_writes_a_report_that_agrees_with_metrics_json(binary_run):
    for name in FILES:
        assert (binary_run / "report" / name).is_file(), name
    report, metrics = read_report(binary_run), read_metrics(binary_run)
    check_classification_report(report, metrics["test"], n=64)
    assert report["task"] == "binary" and report["calibration"]["ece_kind"] == "top-label"
    assert report["bootstrap"] == {
        "n_resamples": 1000,
        "seed": 0,
        "method": "percentile, cases resampled with replacement",
    }
    assert report["checkpoint"] == metrics["best_checkpoint"]
    # self-contained: every picture is embedded, nothing is fetched
    page = (binary_run / "report" / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 4 and all(src.startswith("data:image/png;base64,") for src in sources)
    markdown = (binary_run / "report" / "report.md").read_text()
    assert "![reliability diagram](reliability.png)" in markdown and "| 0 |" in markdown


def test_eval_report_equals_the_training_report(binary_run, tmp_path):
    from medexp.eval import evaluate

    ckpt = binary_run / "checkpoints" / "best.ckpt"
    results = evaluate(compose_config([f"ckpt_path={ckpt}", "report=true"], "eval", output_dir=tmp_path))
    trained, evaluated = read_report(binary_run), read_report(tmp_path)
    for key in ("metrics", "per_class", "confusion_matrix", "calibration", "n"):
        assert evaluated[key] == trained[key], key
    check_classification_report(evaluated, results["test"], n=64)
    assert {path.name for path in (tmp_path / "report").iterdir()} >= set(FILES)


@pytest.mark.parametrize(
    ("overrides", "n_classes"),
    [
        (["data.task=multiclass", "data.num_classes=3", "model.calibrate=true"], 3),
        (["data.task=multilabel", "data.num_classes=2"], 2),
    ],
    ids=["multiclass-calibrated", "multilabel"],
)
def test_multiclass_and_multilabel_reports(tmp_path, overrides, n_classes):
    metrics = train(compose_config([*FAST, *overrides], output_dir=tmp_path))
    report = read_report(tmp_path)
    assert len(report["per_class"]) == n_classes
    check_classification_report(report, metrics["test"], n=64)
    if "model.calibrate=true" in overrides:
        fit = metrics["calibration"]
        state = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        # the temperature is in the tested checkpoint, and the test metrics used it
        assert float(state["temperature"]) == pytest.approx(fit["temperature"])
        assert report["calibration"]["temperature"] == pytest.approx(fit["temperature"])
        assert report["calibration"]["fit"] == fit
        assert fit["split"] == "val" and fit["n"] == 64 and fit["nll_after"] <= fit["nll_before"] + 1e-9
    else:
        assert report["calibration"]["ece_kind"] == "per-label mean"
        assert report["calibration"]["temperature"] == 1.0 and "calibration" not in metrics


def test_temperature_scaling_calibrates_an_overconfident_model(binary_run, tmp_path):
    """Logits multiplied by 25: far too confident; a fitted temperature brings ECE and NLL down,
    and eval (with report=true) applies the temperature stored in the checkpoint."""
    from medexp.checkpoints.checkpoint import Checkpoint
    from medexp.eval import evaluate
    from medexp.reports.calibration import calibrate_checkpoint

    loaded = Checkpoint(binary_run / "checkpoints" / "best.ckpt")
    checkpoint = loaded.contents
    for name in ("net.head.1.weight", "net.head.1.bias"):
        checkpoint["state_dict"][name] = checkpoint["state_dict"][name] * 25
    overconfident = tmp_path / "overconfident.ckpt"
    torch.save(checkpoint, overconfident)
    datamodule, model = loaded.build()
    fit = calibrate_checkpoint(None, model, datamodule, overconfident)
    assert fit["temperature"] > 3
    assert fit["ece_after"] < fit["ece_before"] and fit["nll_after"] < fit["nll_before"]
    stored = torch.load(overconfident, map_location="cpu", weights_only=True)
    assert float(stored["state_dict"]["temperature"]) == pytest.approx(fit["temperature"])

    results = evaluate(
        compose_config([f"ckpt_path={overconfident}", "report=true"], "eval", output_dir=tmp_path / "eval")
    )
    calibration = read_report(tmp_path / "eval")["calibration"]
    assert calibration["temperature"] == pytest.approx(fit["temperature"]) and calibration["fit"] == fit
    # on the test split too
    assert calibration["ece"] < calibration["ece_uncalibrated"]
    assert calibration["nll"] < calibration["nll_uncalibrated"]
    assert read_report(tmp_path / "eval")["metrics"]["accuracy"]["value"] == pytest.approx(
        results["test"]["test/accuracy"]
    )
    assert "T = 1 (uncalibrated)" in (tmp_path / "eval" / "report" / "report.md").read_text()


def test_fit_temperature_recovers_a_known_temperature():
    from medexp.reports.calibration import calibration_record, fit_temperature

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 4, generator=generator) * 2
    targets = torch.multinomial(logits.softmax(dim=1), 1, generator=generator)[:, 0]  # calibrated at T = 1
    temperature = fit_temperature(logits * 5, targets, "multiclass")
    assert temperature == pytest.approx(5, rel=0.1)
    record = calibration_record(logits * 5, targets, "multiclass", temperature)
    assert record["ece_after"] < record["ece_before"] / 3
    labels = (torch.rand(4000, 3, generator=generator) < logits[:, :3].sigmoid()).long()
    assert fit_temperature(logits[:, :3] / 4, labels, "multilabel") == pytest.approx(0.25, rel=0.1)


def test_bootstrap_auroc_equals_torchmetrics_with_ties():
    import torchmetrics.functional.classification as tmf

    from medexp.reports.evaluation import _macro_auroc, bootstrap_classification

    generator = torch.Generator().manual_seed(1)
    probs = ((torch.randn(300, 4, generator=generator) * 2).round() / 2).softmax(dim=1)  # many ties
    targets = torch.randint(0, 4, (300,), generator=generator)
    truth = np.eye(4, dtype=bool)[targets.numpy()]
    assert _macro_auroc(probs.double().numpy(), truth, np.ones((1, 300)))[0] == pytest.approx(
        float(tmf.multiclass_auroc(probs, targets, 4)), abs=1e-6
    )
    first = bootstrap_classification(probs, targets, "multiclass", n_boot=200, seed=3)
    assert first == bootstrap_classification(probs, targets, "multiclass", n_boot=200, seed=3)  # fixed seed
    low, high = first["auroc"]
    assert low < float(tmf.multiclass_auroc(probs, targets, 4)) < high


def test_report_figures_reach_loggers_under_the_privacy_rule(binary_run, tmp_path):
    """TensorBoard (local) gets the figures; a remote logger only with logger.log_images=true."""
    import lightning.pytorch as L
    from lightning.pytorch.loggers import Logger, TensorBoardLogger

    from medexp.checkpoints.checkpoint import Checkpoint
    from medexp.reports import write_report

    class Remote(Logger):  # a logger medexp does not know counts as remote
        name, version = "remote", "0"
        experiment = None

        def __init__(self):
            super().__init__()
            self.images = []

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params):
            pass

        def log_image(self, key, images, step=None):
            self.images.append(key)

    datamodule, model = Checkpoint(binary_run / "checkpoints" / "best.ckpt").build()
    for remote_images in (False, True):
        remote = Remote()
        tensorboard = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=str(remote_images))
        trainer = L.Trainer(logger=[tensorboard, remote], accelerator="cpu", enable_progress_bar=False)
        report = write_report(
            trainer, model, datamodule, tmp_path / f"report_{remote_images}", remote_images=remote_images
        )
        assert remote.images == ([f"report/{Path(name).stem}" for name in report["figures"]] if remote_images else [])
        assert list((tmp_path / "tb" / str(remote_images)).glob("events.out.tfevents.*"))


def test_segmentation_report_has_per_case_dice_and_worst_cases(tmp_path):
    metrics = train(
        compose_config(
            [
                *QUIET,
                "data=synthetic_seg",
                "model=unet",
                "trainer.max_epochs=2",
                "data.num_samples={train: 64, val: 16, test: 24}",
                "model.net.channels=[8,16,32]",
                "model.net.strides=[2,2]",
                "model.net.num_res_units=1",
            ],
            output_dir=tmp_path,
        )
    )
    report = read_report(tmp_path)
    assert report["task"] == "segmentation" and report["n"] == 24 and len(report["per_case"]) == 24
    dice = np.array([math.nan if row["dice"] is None else row["dice"] for row in report["per_case"]])
    assert np.nanmean(dice) == pytest.approx(metrics["test"]["test/dice"], abs=1e-5)
    assert report["metrics"]["hd95"] == pytest.approx(metrics["test"]["test/hd95"], rel=1e-5)
    worst = report["worst_cases"]
    assert len(worst) == 4 and [case["dice"] for case in worst] == sorted(case["dice"] for case in worst)
    assert worst[-1]["dice"] <= np.sort(dice[np.isfinite(dice)])[3] + 1e-9  # the four lowest
    for name in ("case_metrics.png", "worst_cases.png", "report.md", "report.html"):
        assert (tmp_path / "report" / name).is_file(), name
    assert "Worst cases" in (tmp_path / "report" / "report.md").read_text()
