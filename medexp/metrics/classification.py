"""AUROC that is undefined where it is undefined.

torchmetrics scores the one-vs-rest AUROC of a class without positives (or without negatives)
in the evaluated cases as 0 and averages that 0 into the macro AUROC: a class absent from a test
split pulls the reported AUROC down (an empty third class: 0.667 for perfect predictions) and
reads as a real score. Here such a class's AUROC is NaN, the macro AUROC is the mean over the
classes where it is defined (NaN when there is none, e.g. a binary split of one class), and
:attr:`undefined` names the classes left out of the last :meth:`compute`, for a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torchmetrics.classification import BinaryAUROC, MulticlassAUROC, MultilabelAUROC


class _DefinedAUROC:
    """What the multi-class and multi-label versions share: counts of positives per column."""

    num_columns: int

    def _add_count_states(self, num_columns: int) -> None:
        self.num_columns = num_columns
        # summed across DDP processes in compute(), like the predictions themselves
        self.add_state("positives", torch.zeros(num_columns), dist_reduce_fx="sum")
        self.add_state("cases", torch.zeros(()), dist_reduce_fx="sum")
        # per column: the AUROC of the last compute(), NaN where undefined; and the columns that
        # were undefined, with why ("no case has it" / "every case has it")
        self.per_class: torch.Tensor | None = None
        self.undefined: dict[int, str] = {}

    def _count(self, target: torch.Tensor) -> None:
        raise NotImplementedError

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds, target)
        self._count(target)

    def compute(self) -> torch.Tensor:
        with warnings.catch_warnings():
            # torchmetrics warns and scores 0; the task warns once, naming the class and split
            warnings.filterwarnings("ignore", message="No (positive|negative) samples in targets")
            per_class = super().compute().float()
        defined = (self.positives > 0) & (self.positives < self.cases)
        per_class = torch.where(defined, per_class, torch.full_like(per_class, float("nan")))
        self.per_class = per_class
        self.undefined = {
            int(c): "no case has it" if self.positives[c] == 0 else "every case has it"
            for c in torch.nonzero(~defined).flatten().tolist()
        }
        if not defined.any():
            return per_class.new_tensor(float("nan"))
        return per_class[defined].mean()


class MulticlassDefinedAUROC(_DefinedAUROC, MulticlassAUROC):
    """Macro one-vs-rest AUROC over the classes that have both positives and negatives.

    Args:
        num_classes: classes; predictions ``(B, num_classes)`` probabilities, targets ``(B,)``.
        **kwargs: as :class:`~torchmetrics.classification.MulticlassAUROC` (not ``average``).
    """

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(num_classes, average="none", **kwargs)
        self._add_count_states(num_classes)

    def _count(self, target: torch.Tensor) -> None:
        target = target.long().flatten()
        self.positives += torch.bincount(target.clamp(0, self.num_columns - 1), minlength=self.num_columns)[
            : self.num_columns
        ].to(self.positives.dtype)
        self.cases += target.numel()


class MultilabelDefinedAUROC(_DefinedAUROC, MultilabelAUROC):
    """Macro AUROC over the labels that have both positives and negatives.

    Args:
        num_labels: labels; predictions and 0/1 targets ``(B, num_labels)``.
        **kwargs: as :class:`~torchmetrics.classification.MultilabelAUROC` (not ``average``).
    """

    def __init__(self, num_labels: int, **kwargs: Any) -> None:
        super().__init__(num_labels, average="none", **kwargs)
        self._add_count_states(num_labels)

    def _count(self, target: torch.Tensor) -> None:
        self.positives += (target.reshape(-1, self.num_columns) > 0).sum(dim=0).to(self.positives.dtype)
        self.cases += target.reshape(-1, self.num_columns).shape[0]


class BinaryDefinedAUROC(BinaryAUROC):
    """Binary AUROC that is NaN, not torchmetrics' 0, when the evaluated cases (pixels of a
    segmentation, images of an anomaly detector) hold no positive or no negative.

    Args:
        **kwargs: as :class:`~torchmetrics.classification.BinaryAUROC` (e.g. ``thresholds``).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("positives", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("cases", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds, target)
        self.positives += (target > 0).sum().to(self.positives.dtype)
        self.cases += target.numel()

    def compute(self) -> torch.Tensor:
        if self.positives == 0 or self.positives == self.cases:
            return torch.tensor(float("nan"), device=self.positives.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No (positive|negative) samples in targets")
            return super().compute()
