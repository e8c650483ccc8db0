"""Metrics that must not lie (issue 17): an AUROC that is undefined is reported as undefined, a
mask threshold that empties every mask is refused, and a loss that explodes without becoming NaN
stops the run. Every case goes through ``medexp.train.train`` on tiny data written here.

The cases are one table (:data:`CASES`), so the count of bad inputs tried is visible.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medexp.callbacks.faults import TrainingDiverged
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config

SIZE = 16
FAST = [*QUIET, "trainer.max_epochs=2", "data.batch_size=8", "logger=csv"]
TINY_UNET = ["model=unet", "model.net.channels=[4,8]", "model.net.strides=[2]", "model.net.num_res_units=0"]


# --------------------------------------------------------------------------------------------
# data written here


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "cases.csv"
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def classification_files(folder: Path, labels: dict[str, list[int]]) -> list[str]:
    """Grey PNGs whose brightness tells their class, with ``labels[split]`` per split."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for split, values in labels.items():
        for k, label in enumerate(values):
            name = f"{split}{k}.png"
            image = rng.integers(0, 60, size=(SIZE, SIZE)) + 60 * label
            Image.fromarray(image.astype(np.uint8)).save(folder / name)
            rows.append({"image": name, "label": label, "split": split})
    return ["data=files", f"data.manifest={write_manifest(folder, rows)}"]


def segmentation_files(folder: Path, foreground: int, lesion_free_test: bool = False) -> list[str]:
    """Six PNG images with square masks whose foreground value is ``foreground`` (1: saved as 0/1);
    with ``lesion_free_test``, the test image has no lesion and its mask is empty."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for k, split in enumerate(["train"] * 4 + ["val", "test"]):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        if not (lesion_free_test and split == "test"):
            mask[3 + k % 4 : 9 + k % 4, 4:10] = foreground
        image = rng.integers(0, 60, size=(SIZE, SIZE)).astype(np.uint8)
        image[mask > 0] = 200
        Image.fromarray(image).save(folder / f"i{k}.png")
        Image.fromarray(mask).save(folder / f"m{k}.png")
        rows.append({"image": f"i{k}.png", "label": f"m{k}.png", "split": split})
    return ["data=files", f"data.manifest={write_manifest(folder, rows)}", "data.task=segmentation", *TINY_UNET]


def strict_json(path: Path) -> dict:
    """A JSON file as a strict parser reads it: NaN or Infinity is not JSON."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# --------------------------------------------------------------------------------------------
# what the model predicted, computed here without medexp's metrics


def predictions_of(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(N, C)`` probabilities and ``(N,)`` labels of the best checkpoint on the test split."""
    from medexp.checkpoints.checkpoint import Checkpoint

    datamodule, model = Checkpoint(run / "checkpoints" / "best.ckpt").build()
    datamodule.setup("test")
    model.eval()
    probs, labels = [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            probs.append(model.postprocess(model(batch["image"])))
            labels.append(batch["label"])
    return torch.cat(probs).numpy().astype(np.float64), torch.cat(labels).numpy()


def mann_whitney(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUROC as the share of (positive, negative) pairs ranked right, ties a half; NaN if undefined."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def expected_aurocs(run: Path, num_classes: int) -> tuple[list[float], float]:
    """Per class one-vs-rest AUROC (NaN where undefined) and their mean over the defined ones."""
    probs, labels = predictions_of(run)
    per_class = [mann_whitney(probs[:, c], labels == c) for c in range(num_classes)]
    defined = [value for value in per_class if not math.isnan(value)]
    return per_class, (float(np.mean(defined)) if defined else math.nan)


# --------------------------------------------------------------------------------------------
# the table


@dataclass
class Case:
    """A bad input: the overrides it needs (given the case's folder) and how to check the answer."""

    overrides: Callable[[Path], list[str]]
    check: Callable[[Path, pytest.LogCaptureFixture, BaseException | None], None]
    raises: type[BaseException] | None = None


def check_test_lacks_class_2(run: Path, caplog, error) -> None:
    metrics = strict_json(run / "metrics.json")
    test = metrics["test"]
    assert metrics["status"] == "complete"
    assert test["test/class_2/auroc"] is None, test  # undefined, not 0.0
    per_class, macro = expected_aurocs(run, 3)
    assert math.isnan(per_class[2])
    for c in (0, 1):
        assert test[f"test/class_{c}/auroc"] == pytest.approx(per_class[c], abs=1e-5)
    assert test["test/auroc"] == pytest.approx(macro, abs=1e-5)  # the mean over classes 0 and 1
    assert metrics["val"]["val/auroc"] is not None  # the validation split has every class
    report = strict_json(run / "report" / "report.json")
    assert report["per_class"][2]["auroc"] is None and report["per_class"][2]["average_precision"] is None
    assert report["metrics"]["auroc"]["value"] == pytest.approx(macro, abs=1e-5)
    assert "| 2 |" in (markdown := (run / "report" / "report.md").read_text()) and "undefined" in markdown
    warned = [r.getMessage() for r in caplog.records if "AUROC is undefined" in r.getMessage()]
    assert any(m.startswith("the test split: AUROC is undefined for class 2 (no case has it)") for m in warned), warned
    assert not any("report: auroc is" in r.getMessage() for r in caplog.records)  # report and metrics agree


def check_empty_class(run: Path, caplog, error) -> None:
    metrics = strict_json(run / "metrics.json")
    per_class, macro = expected_aurocs(run, 3)
    assert metrics["test"]["test/class_2/auroc"] is None
    assert metrics["test"]["test/auroc"] == pytest.approx(macro, abs=1e-5)
    # the empty class no longer pulls the validation AUROC down: the best is a real score
    assert metrics["fit"]["val/auroc_best"] is not None and metrics["best_score"] == pytest.approx(
        metrics["fit"]["val/auroc_best"], abs=1e-6
    )
    warned = " ".join(r.getMessage() for r in caplog.records)
    for split in ("train", "val", "test"):
        assert f"the {split} split: AUROC is undefined for class 2 (no case has it)" in warned


def check_binary_test_of_one_class(run: Path, caplog, error) -> None:
    metrics = strict_json(run / "metrics.json")
    test = metrics["test"]
    assert test["test/auroc"] is None and test["test/class_0/auroc"] is None and test["test/class_1/auroc"] is None
    assert test["test/accuracy"] is not None  # accuracy is defined
    report = strict_json(run / "report" / "report.json")
    auroc = report["metrics"]["auroc"]
    assert auroc == {"value": None, "ci_low": None, "ci_high": None}  # no 0.0 - 0.0 interval
    markdown = (run / "report" / "report.md").read_text()
    assert "| auroc | undefined | undefined | undefined |" in markdown, markdown
    assert "0.0000 - 0.0000" not in markdown
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "the test split: AUROC is undefined for class 0 (every case has it), class 1 (no case has it)" in warned
    assert "test/auroc is undefined (NaN)" in warned
    assert "report: auroc is" not in warned  # undefined in both: they agree


def check_binary_val_of_one_class(run: Path, caplog, error) -> None:
    from medexp.checkpoints.checkpoint import load_checkpoint

    metrics = strict_json(run / "metrics.json")
    assert metrics["status"] == "complete"
    assert metrics["val"]["val/auroc"] is None and metrics["fit"]["val/auroc_best"] is None  # never a best
    assert metrics.get("best_score") is None
    assert metrics["test"]["test/auroc"] is not None
    # early stopping counted the undefined epochs as no improvement instead of stopping at the first
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 1
    (history,) = run.rglob("metrics.csv")  # the CSV logger's
    rows = list(csv.DictReader(history.open()))
    logged = [row["val/auroc"] for row in rows if row.get("val/auroc")]
    assert logged and all(value == "nan" for value in logged), logged  # NaN in the logger, not 0.0


def check_mask_threshold(top: str, file: str) -> Callable:
    def check(run: Path, caplog, error) -> None:
        message = str(error)
        assert "\n" not in message
        assert "data.mask_threshold=" in message and "empties every mask" in message, message
        assert "the largest mask value in the" in message and f" is {top} (" in message and file in message, message
        assert not (run / "metrics.json").exists() and not list(run.rglob("*.ckpt"))

    return check


def check_exploded(run: Path, caplog, error) -> None:
    message = str(error)
    assert "\n" not in message
    assert message.startswith("training diverged: the loss exploded to "), message
    assert "optimizer.lr; 1e+06 at this step" in message and "gradient_clip_val" in message
    metrics = strict_json(run / "metrics.json")
    assert metrics["status"] == "diverged" and metrics["error"] == message
    assert not (run / "checkpoints" / "best.ckpt").exists()  # stopped in the first epoch: nothing saved


BINARY = ["data.task=binary", "data.num_classes=2"]
MULTICLASS = ["data.task=multiclass", "data.num_classes=3"]


def check_pixel_auroc_undefined(run: Path, caplog, error) -> None:
    metrics = strict_json(run / "metrics.json")
    assert metrics["test"]["test/auroc"] is None, metrics["test"]  # undefined, not 0.0
    assert metrics["val"]["val/auroc"] is not None and 0.0 <= metrics["val"]["val/auroc"] <= 1.0


CASES = {
    # a class of the set is absent from the test split
    "auroc-test-split-lacks-a-class": Case(
        lambda d: [
            *classification_files(d, {"train": [0, 1, 2] * 4, "val": [0, 1, 2] * 2, "test": [0, 1] * 3}),
            *MULTICLASS,
        ],
        check_test_lacks_class_2,
    ),
    # data.num_classes=3 but no sample anywhere is of class 2
    "auroc-empty-class-in-a-multiclass-set": Case(
        lambda d: [*classification_files(d, {"train": [0, 1] * 6, "val": [0, 1] * 3, "test": [0, 1] * 3}), *MULTICLASS],
        check_empty_class,
    ),
    # a binary test split of one class: AUROC (and its interval) is undefined
    "auroc-binary-test-split-of-one-class": Case(
        lambda d: [*classification_files(d, {"train": [0, 1] * 6, "val": [0, 1] * 3, "test": [0] * 6}), *BINARY],
        check_binary_test_of_one_class,
    ),
    # the monitored val/auroc is undefined every epoch: checkpointing and early stopping cope
    "auroc-binary-val-split-of-one-class-monitored": Case(
        lambda d: [
            *classification_files(d, {"train": [0, 1] * 6, "val": [1] * 4, "test": [0, 1] * 3}),
            *BINARY,
            "callbacks=early_stopping",
            "callbacks.early_stopping.patience=5",
        ],
        check_binary_val_of_one_class,
    ),
    # a test split without lesions: pixel AUROC has no positive pixel to rank
    "pixel-auroc-test-split-without-lesions": Case(
        lambda d: [*segmentation_files(d, 255, lesion_free_test=True), "data.mask_threshold=127", "report=false"],
        check_pixel_auroc_undefined,
    ),
    # masks saved as 0/1 with the 0/255 setting
    "mask-threshold-127-on-0-1-masks": Case(
        lambda d: [*segmentation_files(d, 1), "data.mask_threshold=127"],
        check_mask_threshold("1", "m0.png"),
        MedexpError,
    ),
    # 0/255 masks and a threshold above every value
    "mask-threshold-above-every-value": Case(
        lambda d: [*segmentation_files(d, 255), "data.mask_threshold=255"],
        check_mask_threshold("255", "m0.png"),
        MedexpError,
    ),
    # a learning rate that blows the loss up without it becoming NaN
    "loss-explodes-with-lr-1e6": Case(
        lambda d: ["optimizer.lr=1e6", "data.image_size=16", "data.num_samples={train: 64, val: 16, test: 16}"],
        check_exploded,
        TrainingDiverged,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_answered_clearly(name, tmp_path, caplog):
    case = CASES[name]
    run = tmp_path / "run"
    cfg = compose_config([*FAST, *case.overrides(tmp_path / "data")], output_dir=run)
    caplog.set_level(logging.INFO, logger="medexp")
    error = None
    if case.raises is None:
        train(cfg)
    else:
        with pytest.raises(case.raises) as info:
            train(cfg)
        error = info.value
    case.check(run, caplog, error)


def test_a_threshold_that_keeps_foreground_is_accepted(tmp_path):
    # the control of the mask cases: 0/255 masks with the 0/255 setting train
    run = tmp_path / "run"
    cfg = compose_config(
        [
            *FAST,
            *segmentation_files(tmp_path / "data", 255),
            "data.mask_threshold=127",
            "trainer.max_epochs=1",
            "report=false",
        ],
        output_dir=run,
    )
    assert train(cfg)["test"]["test/dice"] > 0
