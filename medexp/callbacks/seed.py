"""Reseed every random number generator at the start of each training epoch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
from lightning.fabric.utilities.seed import seed_everything

from medexp.data.sampling import epoch_seed


class SeedEachEpoch(L.Callback):
    """Make each epoch's randomness (shuffling, augmentation, dropout) a function of (seed, epoch).

    Lightning checkpoints do not hold the random generators' states, so without this a run
    resumed from ``last.ckpt`` would shuffle and augment differently from an uninterrupted one.
    Shuffling is seeded per epoch by :class:`medexp.data.sampling.EpochShuffleSampler`. With ``data.num_workers > 0`` workers keep their own generators
    across epochs (persistent workers), and resumed runs then match only statistically.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before the epoch's first batch is loaded: MONAI's random transforms keep their own generator
        datasets = getattr(trainer.datamodule, "datasets", {})
        transform = getattr(datasets.get("train"), "transform", None)
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=epoch_seed(self.seed, trainer.current_epoch))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Torch's generator (dropout, ...) only now: starting a DataLoader iterator draws from it,
        # which Lightning does before the epoch's hooks in a resumed epoch and after them otherwise.
        if batch_idx == 0:
            seed_everything(epoch_seed(self.seed, trainer.current_epoch), workers=True, verbose=False)
