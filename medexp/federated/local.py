"""A site's local update: the global weights trained on the site's own samples for a few epochs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import seed_everything


class FedProx(L.Callback):
    """FedProx's proximal term (Li et al., 2020): local training minimises
    ``loss(w) + mu / 2 * ||w - w_global||^2``, which keeps a site's weights near the global ones
    and damps the drift of sites whose data differ (non-IID).

    The task's loss is left as it is: the term enters through its gradient, ``mu * (w - w_global)``,
    added to every trained parameter's gradient before the optimiser step. That is exactly the
    gradient of the penalised loss, for any task and optimiser, and Lightning calls the hook
    after gradients are accumulated and unscaled (mixed precision) and before they are clipped,
    as they would be for a penalty inside the loss.

    Args:
        mu: weight of the proximal term (0: FedAvg).
    """

    def __init__(self, mu: float) -> None:
        self.mu = float(mu)
        self.anchor: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the weights this local update starts from are the global model of the round
        self.anchor = {name: p.detach().clone() for name, p in pl_module.named_parameters() if p.requires_grad}

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # only the parameters this optimiser steps (a GAN has two optimisers, stepped in turn)
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                if p.grad is not None and id(p) in stepped and name in self.anchor:
                    p.grad.add_(p.detach() - self.anchor[name], alpha=self.mu)

    def penalty(self, pl_module: L.LightningModule) -> torch.Tensor:
        """``mu / 2 * ||w - w_global||^2`` of the current weights."""
        total = torch.zeros(())
        for name, p in pl_module.named_parameters():
            if name in self.anchor:
                total = total + (p.detach() - self.anchor[name]).pow(2).sum().cpu()
        return self.mu / 2 * total


def local_seed(seed: int, round_: int, site: int) -> int:
    """The seed of one site's update in one round: its shuffling, augmentation and dropout differ
    from every other site's and round's, and depend only on the run's seed."""
    return int(np.random.SeedSequence([seed, round_, site]).generate_state(1)[0])


def local_update(
    model: L.LightningModule,
    make_trainer: Callable[[list[L.Callback]], L.Trainer],
    loader: Callable[[], Any],
    seed: int,
    mu: float | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on one site's samples.

    The optimiser and LR scheduler start afresh in every round (``configure_optimizers`` of a new
    Trainer), as FedAvg's clients keep no state between rounds; a scheduler therefore spans
    ``local_epochs``, not the whole run.

    Args:
        model: the task, holding the global weights; it holds the site's weights afterwards.
        make_trainer: a fresh Trainer for ``local_epochs`` epochs, without checkpoints or
            loggers, given its callbacks.
        loader: builds the site's training DataLoader (called after seeding, so its shuffling
            follows ``seed``).
        seed: see :func:`local_seed`.
        mu: FedProx's ``mu``; None for FedAvg's plain local training.

    Returns:
        The metrics of the last local epoch (e.g. ``train/loss``) as floats; with FedProx also
        ``train/prox``, the proximal term at the end (how far the site drifted from the global model).
    """
    seed_everything(seed, workers=True, verbose=False)
    prox = FedProx(mu) if mu is not None else None
    callbacks: list[L.Callback] = [prox] if prox is not None else []
    trainer = make_trainer(callbacks)
    train_loader = loader()
    # MONAI's random transforms draw from their own generator (see ArrayDataModule.transform)
    transform = getattr(getattr(train_loader.dataset, "dataset", None), "transform", None)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed % 2**32)
    trainer.fit(model, train_dataloaders=train_loader)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("train/")}
    if prox is not None:
        metrics["train/prox"] = float(prox.penalty(model))
    return metrics
