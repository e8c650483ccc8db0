"""Class imbalance beyond class weights: the focal loss, the balanced sampler, imbalanced data."""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import lightning.pytorch as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import get_class

from medexp.data.base import BalancedSampler
from medexp.tasks.classification import focal_loss
from medexp.train import train
from medexp.utils.config import build, check_config
from medexp.utils.errors import MedexpError
from medexp.utils.validation import validate_config
from tests.conftest import QUIET, compose_config
from tests.test_tasks import make_task

IMBALANCED = ["data.class_fractions=[0.85,0.15]", "data.image_size=16"]
FAST = [
    *QUIET,
    "logger=none",
    "report=false",
    "trainer.max_epochs=1",
    "data.batch_size=32",
    "data.num_samples={train: 128, val: 48, test: 48}",
    *IMBALANCED,
]


def logits_and_targets(task: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, 3, generator=generator) * 3
    if task == "multilabel":
        return logits, torch.randint(0, 2, (16, 3), generator=generator)
    return logits, torch.randint(0, 3, (16,), generator=generator)


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
@pytest.mark.parametrize(
    ("weights", "smoothing"), [(None, 0.0), ([1.0, 2.0, 5.0], 0.0), (None, 0.1), ([1.0, 2.0, 5.0], 0.1)]
)
def test_focal_loss_is_the_task_cross_entropy_at_gamma_zero(task, weights, smoothing):
    """Class weights, label smoothing and the reduction included, loss and gradients alike."""
    logits, target = logits_and_targets(task)
    ce, focal = (
        make_task(task=task, num_classes=3, label_smoothing=smoothing, loss=loss, focal_gamma=0.0)
        for loss in ("ce", "focal")
    )
    values, grads = [], []
    for module in (ce, focal):
        module.class_weight = None if weights is None else torch.tensor(weights)
        x = logits.clone().requires_grad_(True)
        values.append(module.compute_loss(x, target))
        grads.append(torch.autograd.grad(values[-1], x)[0])
    assert values[1].item() == pytest.approx(values[0].item(), rel=1e-6)
    torch.testing.assert_close(grads[1], grads[0])


def test_focal_loss_equals_monai_and_down_weights_easy_samples():
    from monai.losses import FocalLoss

    logits, target = logits_and_targets("multiclass")
    monai_softmax = FocalLoss(gamma=2.0, use_softmax=True, to_onehot_y=True, reduction="none")
    # MONAI averages over samples x classes; the cross-entropy's scale is per sample
    expected = monai_softmax(logits, target[:, None]).sum(dim=1).mean()
    assert focal_loss(logits, target, False, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)
    logits, target = logits_and_targets("multilabel")
    expected = FocalLoss(gamma=2.0, reduction="mean")(logits, target.float())
    assert focal_loss(logits, target, True, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)

    # an easy sample (p_true 0.95) loses almost all its weight, a hard one (p_true 0.1) little
    probs = torch.tensor([[0.95, 0.05], [0.1, 0.9]])
    logits, target = probs.log(), torch.tensor([0, 0])
    ratio = focal_loss(logits, target, False, 2.0) / F.cross_entropy(logits, target)
    per_sample = [(1 - 0.95) ** 2 * -np.log(0.95), (1 - 0.1) ** 2 * -np.log(0.1)]
    assert ratio.item() == pytest.approx(sum(per_sample) / -(np.log(0.95) + np.log(0.1)), rel=1e-5)
    assert (1 - 0.95) ** 2 < 0.01 and (1 - 0.1) ** 2 > 0.8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "dice"}, r"model.loss='dice'; expected one of \['ce', 'focal'\]"),
        ({"loss": "focal", "focal_gamma": -1.0}, r"model.focal_gamma=-1.0; expected a number >= 0"),
    ],
)
def test_bad_loss_options(kwargs, message):
    with pytest.raises(MedexpError, match=message):
        make_task(**kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.sampler=weighted"], r"data.sampler='weighted'; expected one of \['balanced'\]"),
        (["model.focal_gamma=-2"], r"model.focal_gamma=-2; expected a number >= 0"),
    ],
)
def test_bad_options_are_caught_before_anything_is_built(compose_cfg, overrides, message):
    with pytest.raises(MedexpError, match=message):
        validate_config(check_config(compose_cfg(*overrides)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.class_fractions=[0.5,0.2]"],
            r"data.class_fractions=\[0.5, 0.2\]; expected 2 positive numbers summing to 1",
        ),
        (["data.task=multilabel", "data.class_fractions=[0.5,0.5]"], "for binary or multiclass data"),
        (["data=synthetic_seg", "data.sampler=balanced"], "data.sampler=balanced balances the classes of images"),
    ],
)
def test_bad_data_options(compose_cfg, overrides, message):
    with pytest.raises(MedexpError, match=message):
        build(compose_cfg(*overrides).data)


def epoch_labels(datamodule: Any) -> list[int]:
    return [int(label) for batch in datamodule.train_dataloader() for label in batch["label"]]


def test_balanced_sampler_balances_an_imbalanced_training_split(compose_cfg):
    cfg = compose_cfg(*FAST, "data.num_samples={train: 512, val: 16, test: 16}", "data.sampler=balanced")
    datamodule = build(cfg.data)
    datamodule.setup()
    stored = Counter(datamodule.datasets["train"].labels.tolist())
    assert stored[1] / 512 == pytest.approx(0.15, abs=0.04)  # the split is imbalanced...
    torch.manual_seed(7)
    drawn = epoch_labels(datamodule)
    assert len(drawn) == 512 and Counter(drawn)[1] / 512 == pytest.approx(0.5, abs=0.07)  # ...its epochs are not
    datamodule.sampler = None
    assert Counter(epoch_labels(datamodule))[1] == stored[1]  # the plain shuffle serves the split as it is


def test_balanced_sampler_draws_from_seed_and_epoch_and_skips_like_the_shuffle():
    strata = np.array([0] * 90 + [1] * 10)
    sampler = BalancedSampler(range(100), strata, seed=3)
    first = list(sampler)
    assert first == list(BalancedSampler(range(100), strata, seed=3))  # a resumed run draws the same
    assert first != list(BalancedSampler(range(100), strata, seed=4))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and len(second) == len(sampler) == 100
    sampler.skip_next(40)  # what FaultTolerance asks of a run resumed after 40 samples
    assert list(sampler) == second[40:] and list(sampler) == second  # only the next pass is shortened
    assert sampler.weights[strata == 1].sum() == pytest.approx(0.5) and sampler.weights.sum() == pytest.approx(1.0)


class LabelCounter(L.Callback):
    """Records the labels of every training batch (added to runs as ``+callbacks.label_counter``)."""

    seen: ClassVar[list[int]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        type(self).seen += batch["label"].tolist()


def test_imbalance_options_train_end_to_end(tmp_path):
    """Through ``medexp train``: focal with gamma=0 trains exactly as cross-entropy does (same
    seed, same metrics), gamma=2 scores the test split with the focal loss; the balanced
    sampler's batches are balanced in training; balanced accuracy is logged for binary tasks."""
    target = "tests.test_imbalance.LabelCounter"
    # the class Hydra builds: pytest may have imported this file under another module name
    counter = get_class(target)
    results = {}
    for name, overrides in {
        "ce": ["model.loss=ce"],
        "focal0": ["model.loss=focal", "model.focal_gamma=0"],
        "focal2": [
            "model.loss=focal",
            "model.focal_gamma=2",
            "data.sampler=balanced",
            f"+callbacks.label_counter._target_={target}",
        ],
    }.items():
        counter.seen = []
        results[name] = train(compose_config([*FAST, *overrides], output_dir=tmp_path / name))
        if name == "focal2":
            assert len(counter.seen) == 128 and Counter(counter.seen)[1] / 128 == pytest.approx(0.5, abs=0.12)
    assert results["focal0"]["test"] == pytest.approx(results["ce"]["test"], rel=1e-5)
    # focal <= cross-entropy per sample; after 4 steps from the same start, p_true is near 0.5
    # for most test images, where the focal factor is about 1/4
    assert results["focal2"]["test"]["test/loss"] < 0.6 * results["ce"]["test"]["test/loss"]
    for metrics in results.values():
        assert {"test/balanced_accuracy", "test/sensitivity", "test/specificity"} <= set(metrics["test"])
        assert "val/balanced_accuracy" in metrics["val"]
