"""An exponential moving average of the weights (Lightning's weight averaging) that validation,
test and the saved checkpoints use."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import WeightAveraging

from medexp.utils.errors import MedexpError


def warmed_ema(decay: float, warmup: bool) -> Any:
    """The ``avg_fn`` of torch's ``AveragedModel``: ``avg <- d * avg + (1 - d) * current`` with
    ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates when ``warmup`` (as TensorFlow's
    ``num_updates``), so a short run's average is not dominated by its random initial weights."""

    def average(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged))) if warmup else decay
        return averaged + (current - averaged) * (1 - d)

    return average


class EMA(WeightAveraging):
    """Keep an exponential moving average (EMA) of the model's weights and buffers, updated after
    every ``every_n_steps`` optimiser steps.

    Validation runs on the averaged weights (so ``best.ckpt`` is chosen by them), every checkpoint
    stores them as its weights (the raw ones under ``current_model_state``, for resuming), and the
    model holds them once training ends: test, ``medexp eval``/``predict``/``export`` all use them.

    Args:
        decay: the EMA's decay per update; None: off (the callback does nothing). About
            ``1 - 1/(steps of the last tenth of training)`` suits a run; 0.99-0.999 is usual.
        every_n_steps: optimiser steps between updates.
        warmup: cap the decay at ``(1 + n) / (10 + n)`` after ``n`` updates.
    """

    def __init__(self, decay: float | None = None, every_n_steps: int = 1, warmup: bool = True) -> None:
        if decay is not None and (isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay < 1):
            raise MedexpError(
                f"callbacks.ema.decay={decay!r}; expected a number in (0, 1) (e.g. 0.99), or null for off"
            )
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise MedexpError(f"callbacks.ema.every_n_steps={every_n_steps!r}; expected a whole number >= 1")
        super().__init__(avg_fn=warmed_ema(decay or 0.0, warmup), use_buffers=True)
        self.decay, self.every_n_steps = decay, every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.every_n_steps == 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.decay is not None:
            super().setup(trainer, pl_module, stage)

    # with decay=None there is no average: Lightning's hooks assert that there is one
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._average_model is not None:
            super().on_train_batch_end(trainer, pl_module, *args)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None:
            super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None:
            super().on_train_end(trainer, pl_module)
        # the average has served: a validate/test after fit (ckpt_path="best") must run on the
        # checkpoint it loads, which Lightning's validation hooks would swap for the last average
        self._average_model = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # without an average (off, or after fit) the checkpoint is the model's own, as without EMA
        if self._average_model is not None:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # test/validate after fit (ckpt_path="best") must keep the averaged weights the checkpoint
        # holds as its state_dict; only a resumed fit restores the raw ones beside the average
        if self._average_model is not None and trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
