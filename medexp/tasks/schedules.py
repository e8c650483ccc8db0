"""Learning-rate schedules that know the run's budget: its optimiser steps and its wall-clock limit."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from medexp.utils.errors import MedexpError

SHAPES = ("cosine", "linear")


class BudgetSchedule(LRScheduler):
    """Warm up, then anneal, over the whole budget of a run, stepped after every optimiser step.

    Progress is the larger of the share of optimiser steps taken (of the Trainer's
    ``estimated_stepping_batches``: ``max_epochs``/``max_steps``, ``limit_train_batches`` and
    gradient accumulation counted) and the share of ``trainer.max_time`` spent training, so a run
    stopped by its time limit ends its schedule when the time does, whatever the machine's speed.
    The multiplier of each group's initial learning rate at progress ``p``:

    - ``p < warmup``: linear from ``start`` to 1;
    - after: ``cosine`` (half a cosine) or ``linear`` decay from 1 to ``final``.

    ``warmup=0.25, shape=linear`` is a one-cycle (triangular) schedule, ``warmup=0.05, shape=cosine``
    the usual warm-up + cosine. The task calls :meth:`attach_budget` (once the Trainer exists);
    until then progress is 0.

    Args:
        optimizer: the optimiser.
        warmup: the share of the budget spent warming up, in [0, 1).
        shape: ``cosine`` or ``linear``.
        start: the multiplier at step 0 (> 0).
        final: the multiplier at the end of the budget.
    """

    # the Lightning interval this schedule is stepped at
    interval = "step"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup: float = 0.05,
        shape: str = "cosine",
        start: float = 0.1,
        final: float = 0.0,
    ) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int | float) or not 0 <= warmup < 1:
            raise MedexpError(f"scheduler.warmup={warmup!r}; expected a share of the budget in [0, 1)")
        if shape not in SHAPES:
            raise MedexpError(f"scheduler.shape={shape!r}; expected one of {list(SHAPES)}")
        for key, value in (("start", start), ("final", final)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise MedexpError(f"scheduler.{key}={value!r}; expected a multiplier of the learning rate >= 0")
        self.warmup, self.shape, self.start, self.final = float(warmup), shape, float(start), float(final)
        self.total_steps = math.inf
        self._timer: Any = None
        super().__init__(optimizer)

    def attach_budget(self, trainer: Any) -> None:
        """Read the budget from ``trainer``: its estimated optimiser steps and its ``Timer``.

        Raises:
            MedexpError: when the Trainer has neither a finite number of steps nor ``max_time``.
        """
        from lightning.pytorch.callbacks import Timer

        self.total_steps = float(trainer.estimated_stepping_batches)
        self._timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if not math.isfinite(self.total_steps) and self._timer is None:
            raise MedexpError(
                f"scheduler={type(self).__name__} spreads its schedule over the run's budget, but the run has no "
                "end: set trainer.max_epochs, trainer.max_steps or trainer.max_time"
            )
        # the multipliers of step 0 now that the budget is known
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        # the Timer is the Trainer's (re-attached on resume), not state of the schedule
        return {key: value for key, value in super().state_dict().items() if key != "_timer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        timer = self._timer
        super().load_state_dict(state_dict)
        self._timer = timer

    def progress(self) -> float:
        """The share of the budget used, in [0, 1]."""
        shares = [self.last_epoch / self.total_steps if math.isfinite(self.total_steps) else 0.0]
        if self._timer is not None:
            elapsed = self._timer.time_elapsed("train")
            remaining = self._timer.time_remaining("train")
            if remaining is not None and elapsed + remaining > 0:
                shares.append(elapsed / (elapsed + remaining))
        return min(max(shares), 1.0)

    def multiplier(self, progress: float) -> float:
        """The learning rate's multiplier at ``progress`` (see the class)."""
        if progress < self.warmup:
            return self.start + (1 - self.start) * progress / self.warmup
        rest = (progress - self.warmup) / (1 - self.warmup)
        decay = 0.5 * (1 + math.cos(math.pi * rest)) if self.shape == "cosine" else 1 - rest
        return self.final + (1 - self.final) * decay

    def get_lr(self) -> list[float]:
        factor = self.multiplier(self.progress())
        return [base * factor for base in self.base_lrs]
