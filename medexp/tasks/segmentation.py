"""Semantic segmentation of 2D images and 3D volumes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.segmentation import DiceScore, MeanIoU
from torchmetrics.wrappers import ClasswiseWrapper, LambdaInputTransformer

from medexp.metrics.classification import BinaryDefinedAUROC
from medexp.tasks.base import BaseTask
from medexp.utils.errors import MedexpError


def class_indices(probs: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` probabilities -> ``(B, *spatial)`` predicted classes."""
    return probs.argmax(dim=1)


def drop_channel(target: torch.Tensor) -> torch.Tensor:
    """``(B, 1, *spatial)`` masks -> ``(B, *spatial)``."""
    return target[:, 0]


def foreground(probs: torch.Tensor) -> torch.Tensor:
    """``(B, 2, *spatial)`` probabilities -> ``(B, *spatial)`` foreground probability."""
    return probs[:, 1]


class HausdorffDistance95(Metric):
    """95th-percentile Hausdorff distance in pixels (voxels), averaged over cases and foreground
    classes, computed with MONAI.

    Empty masks, explicitly: a class absent from both truth and prediction is left out (the
    distance is undefined); a class present in only one of them (a missed or a phantom lesion)
    counts as the image diagonal, the largest distance possible, rather than being dropped.

    Inputs: predicted classes and true classes, both ``(B, *spatial)``.
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        from monai.metrics import compute_hausdorff_distance

        def one_hot(x: torch.Tensor) -> torch.Tensor:
            return F.one_hot(x.long(), self.num_classes).movedim(-1, 1)

        # MONAI computes surface distances on the CPU (scipy); so does the rest of this update
        pred_1h, true_1h = one_hot(preds.cpu()), one_hot(target.cpu())
        distance = compute_hausdorff_distance(pred_1h, true_1h, include_background=False, percentile=95)
        spatial = tuple(range(2, pred_1h.ndim))
        in_pred, in_true = pred_1h[:, 1:].any(dim=spatial), true_1h[:, 1:].any(dim=spatial)
        diagonal = float(torch.tensor(preds.shape[1:], dtype=torch.float64).norm())
        distance = torch.where(in_pred ^ in_true, diagonal, distance.to(torch.float64))
        counted = in_pred | in_true
        self.total += distance[counted].sum().to(self.total.device)
        self.count += counted.sum().to(self.count.device)

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(float("nan"))


class SegmentationTask(BaseTask):
    """Assign a class to every pixel (voxel); binary (background/foreground) or multi-class.

    Metrics: ``dice`` (mean over foreground classes, per case, cases with an empty truth and an
    empty prediction left out), ``dice_<class>`` per foreground class when there are several,
    ``iou``, ``hd95`` (see :class:`HausdorffDistance95`) and, for binary masks, pixel ``auroc``.

    Validation, test and prediction run on whole images or volumes, through MONAI sliding-window
    inference when ``roi_size`` is set (train on patches, infer on the full extent). A batch may
    carry a ``roi`` mask: metrics then count only the pixels inside it (:meth:`update_metrics`).

    Args:
        net: ``(B, C_in, *spatial)`` -> ``(B, num_classes, *spatial)`` logits.
        loss: a MONAI loss taking logits and ``(B, 1, *spatial)`` masks, e.g.
            ``DiceCELoss(to_onehot_y=True, softmax=True)``.
        num_classes: classes including background.
        roi_size: sliding-window size for inference, or None for one pass over the whole input.
        overlap: overlap of neighbouring windows, in [0, 1).
        sw_batch_size: windows per forward pass.
        tta_flips: average the logits over flips along each spatial axis at inference.
        **kwargs: ``optimizer``, ``scheduler``, ``monitor``; see :class:`~medexp.tasks.base.BaseTask`.
    """

    # the data.task values this task trains on (checked before anything is built)
    data_tasks = ("segmentation",)
    # what it does besides training (see BaseTask)
    prediction_writer = "masks"
    report_kind = "segmentation"
    not_exported = None
    pixel_classes = True
    ensemble_combine = "softmax"

    roi_key = "roi"

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        num_classes: int,
        roi_size: Sequence[int] | None = None,
        overlap: float = 0.25,
        sw_batch_size: int = 4,
        tta_flips: bool = False,
        monitor: str = "val/dice",
        **kwargs: Any,
    ) -> None:
        if num_classes < 2:
            raise MedexpError(f"model.num_classes={num_classes}; segmentation needs background and at least one class")
        if not 0.0 <= overlap < 1.0:
            raise MedexpError(f"model.overlap={overlap}; expected a value in [0, 1)")
        self.num_classes = num_classes
        super().__init__(net, monitor=monitor, **kwargs)
        self.loss = loss

    def configure_metrics(self) -> MetricCollection:
        n = self.num_classes

        def on_classes(metric: Metric) -> LambdaInputTransformer:
            return LambdaInputTransformer(metric, transform_pred=class_indices, transform_target=drop_channel)

        metrics = {
            "dice": on_classes(DiceScore(n, include_background=False, average="macro", input_format="index")),
            "iou": on_classes(MeanIoU(n, include_background=False, input_format="index")),
            "hd95": on_classes(HausdorffDistance95(n)),
        }
        if n == 2:
            # binned, so memory stays bounded on large images
            metrics["auroc"] = LambdaInputTransformer(
                BinaryDefinedAUROC(thresholds=200), transform_pred=foreground, transform_target=drop_channel
            )
        else:
            per_class = DiceScore(n, include_background=False, average="none", input_format="index")
            labels = [str(c) for c in range(1, n)]
            metrics["dice_per_class"] = on_classes(ClasswiseWrapper(per_class, labels=labels, prefix="dice_"))
        # no compute groups: update_metrics may feed metrics different inputs
        return MetricCollection(metrics, compute_groups=False)

    def logged_metrics(self) -> list[str]:
        # dice_per_class is logged as one value per foreground class: dice_1, dice_2, ...
        per_class = [f"{stage}/dice_{c}" for stage in ("train", "val") for c in range(1, self.num_classes)]
        return sorted({*super().logged_metrics(), *(per_class if self.num_classes > 2 else [])})

    def update_metrics(self, metrics: MetricCollection, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """With a ``roi`` mask ``(B, 1, *spatial)`` in the batch (e.g. DRIVE's field of view), count
        only the pixels inside it: outside, prediction and truth both become background, which
        no metric counts, and pixel AUROC takes the inside pixels alone."""
        probs, target = self.postprocess(outputs), batch[self.target_key]
        roi = batch.get(self.roi_key)
        if roi is None:
            metrics.update(probs, target)
            return
        inside = roi.bool()
        background = torch.zeros_like(probs)
        background[:, 0] = 1
        probs_in = torch.where(inside, probs, background)
        target_in = torch.where(inside, target, torch.zeros_like(target))
        pixels = inside[:, 0]
        for name, metric in metrics.items(keep_base=True):
            if name == "auroc":  # (N, C) probabilities and (N, 1) truths of the inside pixels
                metric.update(probs.movedim(1, -1)[pixels], target[:, 0][pixels][:, None])
            else:
                metric.update(probs_in, target_in)

    def compute_loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs, target)

    def export_problem(self) -> str | None:
        """Sliding windows (``roi_size``) and their blending live outside the network."""
        roi_size = self.hparams.get("roi_size")
        if roi_size is not None and not self.extra_inputs:
            return (
                f"cannot export a segmentation model that infers by sliding windows (model.roi_size={list(roi_size)}): "
                "the windows and their blending are not part of the network; segmentation models are exported with "
                "model.roi_size=null (one pass over the whole image)"
            )
        return super().export_problem()

    def postprocess(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` logits -> class probabilities."""
        return outputs.softmax(dim=1)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for whole inputs ``(B, C_in, *spatial)``: sliding window and flips as configured."""
        from monai.inferers import sliding_window_inference

        roi_size = self.hparams.roi_size

        def predict(inputs: torch.Tensor) -> torch.Tensor:
            if roi_size is None:
                return self.net(inputs)
            if len(roi_size) != inputs.ndim - 2:
                raise MedexpError(
                    f"model.roi_size={list(roi_size)} has {len(roi_size)} dims; the data have {inputs.ndim - 2}"
                )
            return sliding_window_inference(
                inputs, roi_size, self.hparams.sw_batch_size, self.net, overlap=self.hparams.overlap
            )

        logits = predict(x)
        if self.hparams.tta_flips:
            axes = range(2, x.ndim)
            logits = (logits + sum(predict(x.flip(a)).flip(a) for a in axes)) / (1 + len(axes))
        return logits
