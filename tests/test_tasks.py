"""ClassificationTask: losses, class weights, metrics per task type, and option checks."""

from __future__ import annotations

import json

import lightning.pytorch as L
import pytest
import torch

from medexp.tasks.classification import ClassificationTask
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET

FAST = [
    *QUIET,
    "logger=csv",
    "trainer.max_epochs=1",
    "data.num_samples={train: 96, val: 48, test: 48}",
    "data.batch_size=32",
]


def make_task(**kwargs) -> ClassificationTask:
    defaults = dict(
        net=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(kwargs.get("num_classes", 2))),
        optimizer=torch.optim.SGD,
        task="binary",
        num_classes=2,
    )
    return ClassificationTask(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    ("task", "num_classes", "expected"),
    [
        ("binary", 2, {"accuracy", "auroc", "balanced_accuracy", "f1", "precision", "sensitivity", "specificity"}),
        ("multiclass", 5, {"accuracy", "auroc", "balanced_accuracy", "f1", "precision", "recall", "specificity"}),
        ("multilabel", 14, {"accuracy", "auroc", "f1", "precision", "recall", "specificity"}),
    ],
)
def test_metric_names(task, num_classes, expected):
    module = make_task(task=task, num_classes=num_classes)
    assert set(module.configure_metrics().keys()) == expected


def test_binary_metrics_match_definitions():
    module = make_task()
    metrics = module.configure_metrics()
    target = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0])
    p1 = torch.tensor([0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.4, 0.05])
    values = {k: float(v) for k, v in metrics(torch.stack([1 - p1, p1], dim=1), target).items()}
    assert values["sensitivity"] == pytest.approx(2 / 3)
    assert values["specificity"] == pytest.approx(4 / 5)
    assert values["precision"] == pytest.approx(2 / 3)
    assert values["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # AUROC: 13 of the 15 positive/negative pairs are ranked correctly
    assert values["auroc"] == pytest.approx(13 / 15)


class CountingData(L.LightningDataModule):
    def __init__(self, counts, total):
        super().__init__()
        self.counts, self.total = counts, total

    def label_counts(self):
        return torch.tensor(self.counts), self.total


@pytest.mark.parametrize(
    ("task", "counts", "total", "expected"),
    [
        ("multiclass", [60, 30, 10], 100, [100 / 180, 100 / 90, 100 / 30]),
        ("multilabel", [20, 50], 100, [80 / 20, 50 / 50]),
    ],
)
def test_auto_class_weights(task, counts, total, expected):
    module = make_task(task=task, num_classes=len(counts), class_weights="auto")
    trainer = L.Trainer(logger=False, enable_checkpointing=False)
    trainer.datamodule = CountingData(counts, total)
    module.trainer = trainer
    module.setup("fit")
    torch.testing.assert_close(module.class_weight, torch.tensor(expected))
    # the weights are derived data, not weights of the model: checkpoints stay loadable without them
    assert "class_weight" not in module.state_dict()


def test_class_weights_and_smoothing_change_the_loss():
    logits, target = torch.tensor([[2.0, -1.0], [0.5, 0.2]]), torch.tensor([0, 1])
    plain = make_task().compute_loss(logits, target)
    weighted = make_task(class_weights=[1.0, 3.0])
    weighted.setup("fit")
    assert weighted.compute_loss(logits, target) > plain
    assert make_task(label_smoothing=0.2).compute_loss(logits, target) != plain


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "regression"}, r"model.task='regression'; expected one of \['binary', 'multiclass', 'multilabel'\]"),
        ({"num_classes": 3}, "model.num_classes=3 does not fit task='binary'"),
        ({"label_smoothing": 1.5}, r"label_smoothing=1.5; expected a value in \[0, 1\)"),
        ({"class_weights": "balanced"}, "class_weights='balanced'; expected null, auto or a list"),
        ({"class_weights": [1.0, 2.0, 3.0]}, "class_weights has 3 values; expected 2"),
        ({"monitor": "val/aurocc"}, r"model.monitor='val/aurocc'; ClassificationTask logs \[.*'val/auroc'"),
    ],
)
def test_bad_task_options(kwargs, message):
    with pytest.raises(MedexpError, match=message):
        make_task(**kwargs)


@pytest.mark.parametrize(("task", "num_classes"), [("multiclass", 3), ("multilabel", 2)])
def test_train_multiclass_and_multilabel(compose_cfg, tmp_path, task, num_classes):
    cfg = compose_cfg(*FAST, f"data.task={task}", f"data.num_classes={num_classes}", "model.class_weights=auto")
    metrics = train(cfg)
    assert set(metrics["test"]) >= {"test/auroc", "test/f1", "test/loss", "test/accuracy"}
    assert json.loads((tmp_path / "metrics.json").read_text())["test"] == pytest.approx(metrics["test"])


def test_overfit_debug_mode_drives_the_loss_down(compose_cfg):
    cfg = compose_cfg(*FAST, "debug=overfit", "trainer.max_epochs=40", "data.batch_size=16", "model.net.dropout=0")
    metrics = train(cfg)
    assert metrics["fit"]["train/loss"] < 0.1
