"""Sharpness-aware minimisation (`model.sam_rho`): a step's gradient is the one at the weights moved
rho uphill, the second pass counts in no metric and moves no BatchNorm statistics, and the switch
reaches the optimiser through Hydra's overrides."""

from __future__ import annotations

import copy
from functools import partial

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from medexp.checkpoints.checkpoint import Checkpoint
from medexp.tasks.classification import ClassificationTask
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import compose_config
from tests.test_fast_recipe import FAST, breast  # noqa: F401  (the fixture)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def one_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"image": torch.randn(16, 1, 2, 2, generator=generator), "label": torch.arange(16) % 2}


def loader() -> torch.utils.data.DataLoader:
    batch = one_batch()
    samples = [{"image": image, "label": label} for image, label in zip(batch["image"], batch["label"])]
    return torch.utils.data.DataLoader(samples, batch_size=len(samples))


def fit_one_step(net: nn.Module, rho: float | None, lr: float = 0.5) -> tuple[ClassificationTask, L.Trainer]:
    task = ClassificationTask(
        net=net, optimizer=partial(torch.optim.SGD, lr=lr), task="multiclass", num_classes=2, sam_rho=rho
    )
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(task, train_dataloaders=loader())
    return task, trainer


def test_a_step_takes_the_gradient_at_the_weights_moved_rho_uphill():
    rho, lr = 0.3, 0.5
    net = small_net()
    start = copy.deepcopy(net)
    task, trainer = fit_one_step(net, rho, lr)

    # by hand: the gradient g at w, then the gradient at w + rho g/|g|, applied from w
    batch = one_batch()
    expected = copy.deepcopy(start).train()
    first = nn.functional.cross_entropy(expected(batch["image"]), batch["label"])
    grads = torch.autograd.grad(first, list(expected.parameters()))
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    moved = copy.deepcopy(expected)
    with torch.no_grad():
        for p, g in zip(moved.parameters(), grads):
            p.add_(g * rho / norm)
    second = nn.functional.cross_entropy(moved(batch["image"]), batch["label"])
    ascent = torch.autograd.grad(second, list(moved.parameters()))
    with torch.no_grad():
        for p, g in zip(expected.parameters(), ascent):
            p.sub_(lr * g)
    for (name, got), want in zip(task.net.named_parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, msg=name)
    # and not the plain step, nor the moved weights left behind
    plain, _ = fit_one_step(copy.deepcopy(start), None, lr)
    assert not torch.allclose(plain.net[1].weight, task.net[1].weight)

    # BatchNorm's running statistics moved once, by the first pass (at w), as the by-hand net's
    norm_layer, want = task.net[2], expected[2]
    torch.testing.assert_close(norm_layer.running_mean, want.running_mean)
    torch.testing.assert_close(norm_layer.running_var, want.running_var)
    assert int(norm_layer.num_batches_tracked) == 1
    # the epoch's training loss is the first pass's, counted once
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(first.item(), rel=1e-5)
    assert task.sharpness_pass is False


def test_sam_through_hydra_overrides_trains_an_ensemble_and_records_the_radius(breast):  # noqa: F811
    """`model.sam_rho=0.05` on the fast recipe with two networks: the run trains, its checkpoint
    records the radius, and its weights differ from the same run without SAM."""
    runs = {}
    for rho in ("0.05", "null"):
        out = breast / f"sam_{rho}"
        overrides = [*FAST, f"data.root={breast}", "trainer.max_epochs=1", "model.ensemble=2", f"model.sam_rho={rho}"]
        metrics = train(compose_config(overrides, output_dir=out))
        assert 0.0 <= metrics["test"]["test/auroc"] <= 1.0
        runs[rho] = Checkpoint(out / "checkpoints" / "last.ckpt").contents
    assert runs["0.05"]["hyper_parameters"]["sam_rho"] == 0.05
    assert runs["null"]["hyper_parameters"]["sam_rho"] is None
    name = next(k for k in runs["null"]["state_dict"] if k.startswith("net.members.1.") and k.endswith("weight"))
    assert not torch.equal(runs["0.05"]["state_dict"][name], runs["null"]["state_dict"][name])


def test_a_task_with_its_own_optimisers_refuses_sam():
    from medexp.tasks.sharpness import check_rho

    assert check_rho(None) is None and check_rho(1) == 1.0
    for bad in (0, -0.1, True, "0.05", float("inf")):
        with pytest.raises(MedexpError, match="model.sam_rho=.*; expected a radius > 0"):
            check_rho(bad)
    task = ClassificationTask(
        net=small_net(), optimizer=partial(torch.optim.SGD, lr=0.1), task="multiclass", num_classes=2, sam_rho=0.1
    )
    task.automatic_optimization = False
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.raises(MedexpError, match="steps its own optimisers, which SAM does not wrap; set model.sam_rho=null"):
        trainer.fit(task, train_dataloaders=loader())
