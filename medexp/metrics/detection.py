"""Scores of box detections: mean average precision and FROC sensitivities, 2D and 3D.

Boxes are in MONAI's standard mode: ``[min_0, min_1, max_0, max_1]`` (2D) or
``[min_0, min_1, min_2, max_0, max_1, max_2]`` (3D), in the index space of the image tensor's
spatial axes (see :mod:`medexp.data.detection`). A detection matches a true box of its class
when their IoU reaches a threshold; each true box is matched at most once, the highest-scoring
detections first (MONAI's COCO-style ``matching_batch``).

- ``map_<iou>``: average precision (COCO's 101-point interpolation, MONAI's ``COCOMetric``) at
  IoU ``<iou>`` (``map_10``: 0.1, ``map_50``: 0.5), averaged over the classes that have true
  boxes. torchmetrics' ``MeanAveragePrecision`` is not used: it needs pycocotools (or
  faster-coco-eval) and is 2D only.
- ``froc``: the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per image
  (the lung-nodule convention of LUNA16's CPM score), a hit being IoU >= ``froc_iou``;
  ``sens_fp<rate>`` the sensitivity at each rate. A rate is reached by the highest score
  threshold whose false positives per image do not exceed it; sensitivity is not interpolated
  between operating points (conservative, where LUNA16 interpolates).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def map_name(iou: float) -> str:
    """The metric name of AP at IoU ``iou``: 0.1 -> ``map_10``, 0.5 -> ``map_50``."""
    return f"map_{round(iou * 100):02d}"


def rate_name(rate: float) -> str:
    """The metric name of the sensitivity at ``rate`` false positives per image: ``sens_fp0.125``, ``sens_fp8``."""
    return f"sens_fp{rate:g}"


def froc_curve(
    scores: np.ndarray, hits: np.ndarray, num_targets: int, num_images: int
) -> tuple[np.ndarray, np.ndarray]:
    """Operating points of a FROC curve, one per distinct score threshold, from high to low.

    Args:
        scores: ``(D,)`` scores of every detection of the evaluated images.
        hits: ``(D,)`` whether each detection matched a true box (true positive).
        num_targets: true boxes in those images; num_images: how many images.

    Returns:
        false positives per image ``(P,)`` and sensitivity ``(P,)``, both non-decreasing, starting
        at the point before any detection is accepted (0, 0).
    """
    order = np.argsort(-scores, kind="stable")
    scores, hits = scores[order], hits[order].astype(bool)
    tp, fp = np.cumsum(hits), np.cumsum(~hits)
    # detections with equal scores are accepted together: keep the last of each run of ties
    last = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, dtype=bool)
    fps = np.r_[0.0, fp[last] / max(num_images, 1)]
    sensitivity = np.r_[0.0, tp[last] / num_targets] if num_targets else np.full(int(last.sum()) + 1, np.nan)
    return fps, sensitivity


def sensitivity_at(fps: np.ndarray, sensitivity: np.ndarray, rates: Sequence[float]) -> np.ndarray:
    """The sensitivity of the best operating point with at most ``rate`` false positives per
    image, for each rate (see :func:`froc_curve`)."""
    return np.array([sensitivity[fps <= rate].max() for rate in rates])


class DetectionMetrics(Metric):
    """mAP at several IoUs and FROC sensitivities of box detections over a whole split.

    ``update`` takes each image's detections and true boxes; ``compute`` returns a dict
    ``{map_10, map_50, froc, sens_fp0.125, ..., sens_fp8}`` (names from ``map_iou`` and
    ``froc_rates``). Images without true boxes count: their detections are false positives.
    AP is NaN when no image of the split has a true box (FROC too), and a class without true
    boxes is left out of the mean over classes.

    States are rows of flat tensors concatenated across DDP processes: per detection
    ``[image, label, score, *box]``, per true box ``[image, label, *box]``, with image keys
    unique across processes.

    Args:
        num_classes: lesion classes (labels ``0..num_classes-1``; no background class).
        spatial_dims: 2 or 3 (boxes of 4 or 6 numbers).
        map_iou: IoU thresholds of the reported APs.
        froc_iou: the IoU a detection needs to count as a hit for FROC.
        froc_rates: false positives per image at which sensitivity is read.
        max_detections: detections per image evaluated (the highest scoring).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        num_classes: int,
        spatial_dims: int,
        map_iou: Sequence[float] = (0.1, 0.5),
        froc_iou: float = 0.1,
        froc_rates: Sequence[float] = FROC_RATES,
        max_detections: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not map_iou or not all(0 < iou <= 1 for iou in [*map_iou, froc_iou]):
            raise ValueError(f"IoU thresholds must lie in (0, 1]; got map_iou={list(map_iou)}, froc_iou={froc_iou}")
        if not froc_rates or min(froc_rates) <= 0:
            raise ValueError(f"froc_rates must be positive false-positive rates; got {list(froc_rates)}")
        self.num_classes, self.spatial_dims = num_classes, spatial_dims
        self.map_iou, self.froc_iou = [float(v) for v in map_iou], float(froc_iou)
        self.froc_rates, self.max_detections = [float(v) for v in froc_rates], max_detections
        width = 2 * spatial_dims
        self.add_state("detections", torch.zeros(0, 3 + width, dtype=torch.float64), dist_reduce_fx="cat")
        self.add_state("targets", torch.zeros(0, 2 + width, dtype=torch.float64), dist_reduce_fx="cat")
        self.add_state("images", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, detections: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]]) -> None:
        """Add a batch of images.

        Args:
            detections: per image ``boxes`` ``(D, 2*dims)``, ``labels`` ``(D,)`` and
                ``labels_scores`` ``(D,)`` (the keys MONAI's RetinaNetDetector returns).
            targets: per image ``boxes`` ``(G, 2*dims)`` and ``labels`` ``(G,)``.
        """
        if len(detections) != len(targets):
            raise ValueError(f"{len(detections)} images of detections but {len(targets)} of targets")
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        start = int(self.images)
        rows_d, rows_t = [self.detections], [self.targets]
        for offset, (found, truth) in enumerate(zip(detections, targets)):
            key = float((start + offset) * world + rank)
            rows_d.append(self._rows(key, found["labels"], found["boxes"], found["labels_scores"]))
            rows_t.append(self._rows(key, truth["labels"], truth["boxes"]))
        self.detections = torch.cat(rows_d)
        self.targets = torch.cat(rows_t)
        self.images += len(detections)

    def _rows(
        self, key: float, labels: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        columns = [torch.full_like(labels, key, dtype=torch.float64), labels.to(torch.float64)]
        if scores is not None:
            columns.append(scores.to(torch.float64))
        head = torch.stack(columns, dim=1).to(self.device)
        return torch.cat([head, boxes.reshape(-1, 2 * self.spatial_dims).to(self.device, torch.float64)], dim=1)

    def compute(self) -> dict[str, torch.Tensor]:
        values, _, _ = self.evaluate()
        return {name: torch.tensor(value, dtype=torch.float32) for name, value in values.items()}

    def evaluate(self) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        """The values :meth:`compute` returns, and the FROC curve: false positives per image and
        sensitivity at every score threshold (see :func:`froc_curve`)."""
        from monai.apps.detection.metrics.coco import COCOMetric
        from monai.apps.detection.metrics.matching import matching_batch
        from monai.data.box_utils import box_iou

        found, truth = self.detections.cpu().numpy(), self.targets.cpu().numpy()
        keys = np.union1d(found[:, 0], truth[:, 0])
        thresholds = sorted({*self.map_iou, self.froc_iou})
        # COCOMetric evaluates the union of its iou_list and iou_range: make both our thresholds
        low, high = thresholds[0], thresholds[-1]
        coco = COCOMetric(
            classes=[str(c) for c in range(self.num_classes)],
            iou_list=thresholds,
            iou_range=(low, high, (high - low) or 1.0),
            max_detection=(self.max_detections,),
            per_class=True,
            verbose=False,
        )
        iou_thresholds = list(coco.get_iou_thresholds())

        def per_image(rows: np.ndarray, key: float) -> np.ndarray:
            return rows[rows[:, 0] == key]

        pred = [per_image(found, key) for key in keys]
        gt = [per_image(truth, key) for key in keys]
        width = 2 * self.spatial_dims
        matched = matching_batch(
            iou_fn=box_iou,
            iou_thresholds=iou_thresholds,
            pred_boxes=[p[:, 3 : 3 + width] for p in pred],
            pred_classes=[p[:, 1].astype(int) for p in pred],
            pred_scores=[p[:, 2] for p in pred],
            gt_boxes=[g[:, 2 : 2 + width] for g in gt],
            gt_classes=[g[:, 1].astype(int) for g in gt],
            max_detections=self.max_detections,
        )
        values: dict[str, float] = {}
        stats = coco(matched)[0] if len(truth) else {}
        for iou in self.map_iou:
            suffix = f"AP_IoU_{iou:.2f}_MaxDet_{self.max_detections}"
            # MONAI scores a class without true boxes -1: leave it out of the mean
            per_class = [stats[f"{c}_{suffix}"] for c in range(self.num_classes) if stats.get(f"{c}_{suffix}", -1) >= 0]
            values[map_name(iou)] = float(np.mean(per_class)) if per_class else float("nan")
        froc_index = iou_thresholds.index(self.froc_iou)
        scores, hits = [], []
        for image in matched:
            for result in image.values():
                counted = ~result["dtIgnore"][froc_index].astype(bool)
                scores.append(result["dtScores"][counted])
                hits.append(result["dtMatches"][froc_index][counted].astype(bool))
        fps, sensitivity = froc_curve(
            np.concatenate(scores) if scores else np.zeros(0),
            np.concatenate(hits) if hits else np.zeros(0, bool),
            len(truth),
            int(self.images),
        )
        at_rates = sensitivity_at(fps, sensitivity, self.froc_rates)
        values["froc"] = float(at_rates.mean())
        values.update({rate_name(rate): float(s) for rate, s in zip(self.froc_rates, at_rates)})
        return values, fps, sensitivity


def count_matches(
    found: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], iou: float, min_score: float = 0.0
) -> dict[str, int]:
    """One image's true boxes, hits and false positives among its detections scoring at least
    ``min_score``, matched as :class:`DetectionMetrics` matches them at IoU ``iou``.

    Returns:
        ``{"lesions", "found", "missed", "false_positives"}``.
    """
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou

    keep = found["labels_scores"] >= min_score
    result = matching_batch(
        iou_fn=box_iou,
        iou_thresholds=[iou],
        pred_boxes=[found["boxes"][keep].double().cpu().numpy()],
        pred_classes=[found["labels"][keep].cpu().numpy()],
        pred_scores=[found["labels_scores"][keep].double().cpu().numpy()],
        gt_boxes=[truth["boxes"].double().cpu().numpy()],
        gt_classes=[truth["labels"].cpu().numpy()],
        max_detections=int(keep.sum()) or 1,
    )[0]
    hits = int(sum((r["dtMatches"][0] > 0).sum() for r in result.values()))
    lesions = len(truth["labels"])
    return {"lesions": lesions, "found": hits, "missed": lesions - hits, "false_positives": int(keep.sum()) - hits}
