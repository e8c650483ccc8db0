"""Image classification: binary, multi-class and multi-label."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassSpecificity,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
    MultilabelSpecificity,
)
from torchmetrics.wrappers import LambdaInputTransformer

from medexp.tasks.base import BaseTask
from medexp.utils.errors import MedexpError

TASKS = ("binary", "multiclass", "multilabel")


def positive_class(probs: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` class probabilities -> ``(B,)`` probability of class 1."""
    return probs[:, 1]


class ClassificationTask(BaseTask):
    """Classify images into classes (softmax over ``num_classes`` outputs, also for binary
    tasks, as in MedMNIST v2) or into independent labels (sigmoid, multi-label).

    Temperature scaling: :meth:`postprocess` divides the logits by the buffer ``temperature``
    (a scalar, 1 unless fitted; one for all classes or labels), which checkpoints keep, so the
    probabilities of validation, test and ``medexp predict`` are the calibrated ones. Accuracy
    does not change with it (nor, for binary and multi-label tasks, AUROC).

    Metrics: accuracy, balanced accuracy (macro recall; binary/multi-class), AUROC (one-vs-rest,
    macro), F1, precision, recall and specificity (macro), and for binary tasks the positive
    class's ``sensitivity``, ``specificity`` and ``precision``.

    Args:
        net: ``(B, C, *spatial)`` -> ``(B, num_classes)`` logits.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        num_classes: classes (2 for binary) or labels (multi-label).
        class_weights: None, ``"auto"`` (inverse class frequency of the training labels,
            ``n / (num_classes * n_c)``; for multi-label the positive weight ``negatives / positives``)
            or one weight per class.
        label_smoothing: in [0, 1).
        calibrate: after training, fit a temperature on the validation set (``medexp train``
            does it; see :func:`medexp.reports.calibration.calibrate_checkpoint`).
        **kwargs: ``optimizer``, ``scheduler``, ``monitor``; see :class:`~medexp.tasks.base.BaseTask`.
    """

    # the data.task values this task trains on (checked before anything is built)
    data_tasks = ("binary", "multiclass", "multilabel")

    def __init__(
        self,
        net: torch.nn.Module,
        task: str,
        num_classes: int,
        class_weights: str | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        calibrate: bool = False,
        monitor: str = "val/auroc",
        **kwargs: Any,
    ) -> None:
        if task == "segmentation":
            raise MedexpError("data.task=segmentation needs a segmentation model, e.g. model=unet; this model classifies")
        if task not in TASKS:
            raise MedexpError(f"model.task={task!r}; expected one of {list(TASKS)}")
        if num_classes < 2 or (task == "binary" and num_classes != 2):
            raise MedexpError(f"model.num_classes={num_classes} does not fit task={task!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise MedexpError(f"model.label_smoothing={label_smoothing}; expected a value in [0, 1)")
        if isinstance(class_weights, str) and class_weights != "auto":
            raise MedexpError(f"model.class_weights={class_weights!r}; expected null, auto or a list of numbers")
        if class_weights is not None and not isinstance(class_weights, str) and len(class_weights) != num_classes:
            raise MedexpError(f"model.class_weights has {len(class_weights)} values; expected {num_classes}")
        self.task, self.num_classes = task, num_classes
        super().__init__(net, monitor=monitor, **kwargs)
        # set in setup(): "auto" needs the training labels; not part of the checkpoint's weights
        self.register_buffer("class_weight", None, persistent=False)
        # temperature scaling (Guo et al., 2017): fitted after training when calibrate=true
        self.register_buffer("temperature", torch.ones(()))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints from before temperature scaling existed have no temperature: 1
        state_dict.setdefault(f"{prefix}temperature", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def configure_metrics(self) -> MetricCollection:
        n = self.num_classes
        if self.task == "multilabel":
            return MetricCollection(
                {
                    "accuracy": MultilabelAccuracy(n),
                    "auroc": MultilabelAUROC(n),
                    "f1": MultilabelF1Score(n),
                    "precision": MultilabelPrecision(n),
                    "recall": MultilabelRecall(n),
                    "specificity": MultilabelSpecificity(n),
                }
            )
        metrics = {
            "accuracy": MulticlassAccuracy(n, average="micro"),
            "balanced_accuracy": MulticlassRecall(n, average="macro"),
            "auroc": MulticlassAUROC(n),
            "f1": MulticlassF1Score(n, average="macro"),
            "precision": MulticlassPrecision(n, average="macro"),
            "recall": MulticlassRecall(n, average="macro"),
            "specificity": MulticlassSpecificity(n, average="macro"),
        }
        if self.task == "binary":
            # clinicians read these for the positive class; binary AUROC equals the 2-class macro AUROC
            metrics["sensitivity"] = LambdaInputTransformer(BinaryRecall(), transform_pred=positive_class)
            metrics["specificity"] = LambdaInputTransformer(BinarySpecificity(), transform_pred=positive_class)
            metrics["precision"] = LambdaInputTransformer(BinaryPrecision(), transform_pred=positive_class)
            del metrics["recall"]
        return MetricCollection(metrics)

    def setup(self, stage: str) -> None:
        weights = self.hparams.class_weights
        if weights == "auto":
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "label_counts"):
                raise MedexpError("model.class_weights=auto needs a medexp DataModule that can count training labels")
            counts, total = datamodule.label_counts()
            counts = torch.as_tensor(counts, dtype=torch.float32)
            if (counts == 0).any():
                raise MedexpError(
                    f"model.class_weights=auto: classes {torch.nonzero(counts == 0).flatten().tolist()} have no "
                    "training samples; give explicit weights instead"
                )
            if self.task == "multilabel":
                weights = (total - counts) / counts
            else:
                weights = total / (self.num_classes * counts)
        if weights is not None:
            self.class_weight = torch.as_tensor(weights, dtype=torch.float32, device=self.device)

    def compute_loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        smoothing = self.hparams.label_smoothing
        if self.task == "multilabel":
            target = target.float() * (1 - smoothing) + 0.5 * smoothing
            return F.binary_cross_entropy_with_logits(outputs, target, pos_weight=self.class_weight)
        return F.cross_entropy(outputs, target, weight=self.class_weight, label_smoothing=smoothing)

    def postprocess(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(B, num_classes)`` logits -> probabilities (sigmoid for multi-label, softmax otherwise),
        of the logits divided by :attr:`temperature`."""
        outputs = outputs / self.temperature.to(outputs.dtype)
        return outputs.sigmoid() if self.task == "multilabel" else outputs.softmax(dim=1)
