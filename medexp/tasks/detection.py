"""Lesion detection with boxes, 2D and 3D: a RetinaNet trained and decoded by MONAI's detection app.

MONAI's :class:`~monai.apps.detection.networks.retinanet_detector.RetinaNetDetector` wraps the
network with everything around it: anchors, the ATSS matcher of anchors to true boxes, hard
negative sampling, the box coder, its losses, and box selection (score threshold, top-k, NMS) at
inference. It computes its own losses, so :class:`DetectionTask` builds it from config values
around ``net`` (the RetinaNet network, a ``_target_`` under ``model.net``) and adapts it to
:class:`~medexp.tasks.base.BaseTask`'s contract, which keeps the optimiser, logging and
checkpoints shared with the other tasks.

Nothing here needs torchvision: the detector's torchvision-backed defaults (``Matcher``,
``BalancedPositiveNegativeSampler``, ``resnet_fpn_feature_extractor``) are replaced by MONAI's
ATSS matcher, hard negative sampler and :class:`medexp.nets.feature_pyramid.ResNetFeaturePyramid`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection

from medexp.metrics.detection import FROC_RATES, DetectionMetrics, map_name
from medexp.tasks.base import BaseTask
from medexp.utils.errors import MedexpError


@dataclass
class DetectorOutputs:
    """What the detector computes for a batch of ``B`` images, with ``A`` anchors per image.

    Attributes:
        head: the network's maps, flattened over levels and anchors: ``classification``
            ``(B, A, num_classes)`` logits and ``box_regression`` ``(B, A, 2 * spatial_dims)``.
        anchors: ``B`` tensors ``(A, 2 * spatial_dims)``.
        anchors_per_level: anchor locations of each pyramid level (H*W(*D) per level).
        image_sizes: the spatial size of each image before padding to ``size_divisible``.
        detections: at evaluation, per image ``boxes`` ``(D, 2 * spatial_dims)``, ``labels``
            ``(D,)`` and ``labels_scores`` ``(D,)`` after score threshold and NMS; None in training.
    """

    head: dict[str, torch.Tensor]
    anchors: list[torch.Tensor]
    anchors_per_level: list[int]
    image_sizes: list[list[int]]
    detections: list[dict[str, torch.Tensor]] | None = None

    def detach(self) -> DetectorOutputs:
        """A copy without gradients (as :meth:`BaseTask._shared_step` detaches network outputs)."""
        detections = None
        if self.detections is not None:
            detections = [{key: value.detach() for key, value in d.items()} for d in self.detections]
        return replace(self, head={key: value.detach() for key, value in self.head.items()}, detections=detections)


class DetectionTask(BaseTask):
    """Find lesions as boxes with their class and a score, in 2D images or 3D volumes.

    Batches are dicts: ``image`` ``(B, C, *spatial)``, and per image (lists of length ``B``)
    ``boxes`` ``(N_i, 2 * spatial_dims)`` in MONAI's standard mode (see
    :mod:`medexp.data.detection`) and ``labels`` ``(N_i,)`` class indices ``0..num_classes-1``.

    Training runs the network once per batch and MONAI's losses on its maps (classification: BCE
    on the anchors the hard negative sampler picks; box regression: smooth L1 on the encoded
    boxes of matched anchors); ``loss`` is their sum. Validation and test also decode boxes and
    score them (:class:`~medexp.metrics.detection.DetectionMetrics`): ``map_10``, ``map_50``,
    ``froc`` and ``sens_fp<rate>``; ``train/`` logs only the loss, since decoding boxes there
    would cost time without steering training.

    Args:
        net: the RetinaNet network, ``(B, C, *spatial)`` -> ``{"classification": [maps],
            "box_regression": [maps]}``, with attributes ``spatial_dims``, ``num_classes``,
            ``num_anchors``, ``size_divisible`` (e.g. ``monai.apps.detection.networks.retinanet_network.RetinaNet``).
        num_classes: lesion classes (no background class), as the data's ``num_classes``.
        anchor_shapes: the anchors at each location of the first pyramid level: a number (a
            square/cube of that side, in pixels) or one size per spatial axis; ``net.num_anchors`` of them.
        feature_map_scales: per pyramid level, the factor applied to ``anchor_shapes`` (the
            level's stride relative to the first level's, typically ``1, 2, 4``).
        atss_candidates: anchors per level closest to a true box's centre that ATSS considers
            for it (fewer: a stricter match).
        center_in_gt: ATSS also requires an anchor's centre to lie in the box (off for small lesions).
        sampled_anchors: anchors per image in the classification loss (hard negative sampling).
        positive_fraction: the share of them that are matched (positive) anchors, at most.
        min_negatives: negatives sampled per image at least.
        pool_size: negatives are drawn from the ``pool_size`` times as many highest-scoring ones.
        score_threshold: detections scoring below this are dropped at inference.
        nms_threshold: IoU above which non-maximum suppression drops the lower-scoring box.
        topk_per_level: candidates per level kept before NMS.
        detections_per_image: the highest-scoring detections kept per image.
        map_iou: IoU thresholds of the reported APs (``map_10`` for 0.1).
        froc_iou: the IoU a detection needs to count as a hit in FROC.
        froc_rates: false positives per image at which sensitivity is read.
        **kwargs: ``optimizer``, ``scheduler``, ``monitor``; see :class:`~medexp.tasks.base.BaseTask`.

    Raises:
        MedexpError: naming the key, when anchors and network disagree or a threshold is out of range.
    """

    data_tasks = ("detection",)
    # what it does besides training (see BaseTask)
    prediction_writer = "boxes"
    report_kind = "detection"
    # the batch entries of the true boxes and their classes (lists, one tensor per image)
    target_keys = ("boxes", "labels")

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        anchor_shapes: Sequence[float | Sequence[float]] = (8, 12),
        feature_map_scales: Sequence[float] = (1, 2),
        atss_candidates: int = 4,
        center_in_gt: bool = False,
        sampled_anchors: int = 64,
        positive_fraction: float = 0.3,
        min_negatives: int = 16,
        pool_size: float = 20,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.2,
        topk_per_level: int = 1000,
        detections_per_image: int = 30,
        map_iou: Sequence[float] = (0.1, 0.5),
        froc_iou: float = 0.1,
        froc_rates: Sequence[float] = FROC_RATES,
        monitor: str = "val/map_10",
        **kwargs: Any,
    ) -> None:
        self.num_classes = num_classes
        self.spatial_dims = int(getattr(net, "spatial_dims", 0))
        self._check_arguments(net, locals())
        super().__init__(net, monitor=monitor, **kwargs)
        # decoding boxes in training would cost time without steering it: train/ logs the loss only
        self.train_metrics = MetricCollection({}, prefix="train/")
        self.detector = self._build_detector(anchor_shapes, feature_map_scales)

    def _check_arguments(self, net: nn.Module, args: dict[str, Any]) -> None:
        missing = [
            name for name in ("spatial_dims", "num_classes", "num_anchors", "size_divisible") if not hasattr(net, name)
        ]
        if missing:
            raise MedexpError(
                f"model.net ({type(net).__name__}) lacks {missing}; DetectionTask takes a RetinaNet network "
                "(monai.apps.detection.networks.retinanet_network.RetinaNet)"
            )
        if net.num_classes != self.num_classes:
            raise MedexpError(
                f"model.net.num_classes={net.num_classes} but model.num_classes={self.num_classes}; they must match"
            )
        problems = []
        shapes, scales = list(args["anchor_shapes"]), list(args["feature_map_scales"])
        if len(shapes) != net.num_anchors:
            problems.append(
                f"model.anchor_shapes has {len(shapes)} shape(s) but model.net.num_anchors={net.num_anchors}; they must match"
            )
        for shape in shapes:
            sides = [shape] if isinstance(shape, (int, float)) else list(shape)
            if len(sides) not in (1, self.spatial_dims) or min(sides) <= 0:
                problems.append(
                    f"model.anchor_shapes entry {shape!r}; expected a positive side or {self.spatial_dims} positive sides"
                )
        extractor = getattr(net, "feature_extractor", None)
        levels = getattr(extractor, "num_levels", None)
        if levels is not None and len(scales) != levels:
            problems.append(
                f"model.feature_map_scales={scales} has {len(scales)} level(s) but the net's feature pyramid has {levels} "
                "(model.net.feature_extractor.returned_layers); give one scale per level"
            )
        if min(scales, default=0) <= 0:
            problems.append(f"model.feature_map_scales={scales}; expected positive factors, one per pyramid level")
        coarsest = getattr(extractor, "size_divisible", None)
        divisible = list(net.size_divisible)
        if coarsest is not None and any(d % c for d, c in zip(divisible, coarsest)):
            problems.append(
                f"model.net.size_divisible={divisible} is not a multiple of the feature pyramid's coarsest stride "
                f"{list(coarsest)}; set model.net.size_divisible={max(coarsest)}"
            )
        ranges = {
            "positive_fraction": (0.0, 1.0),
            "score_threshold": (0.0, 1.0),
            "nms_threshold": (0.0, 1.0),
            "froc_iou": (0.0, 1.0),
        }
        for name, (low, high) in ranges.items():
            if not low < args[name] <= high:
                problems.append(f"model.{name}={args[name]}; expected a value in ({low:g}, {high:g}]")
        for iou in args["map_iou"]:
            if not 0 < iou <= 1:
                problems.append(f"model.map_iou entry {iou}; expected IoU thresholds in (0, 1]")
        names = [map_name(iou) for iou in args["map_iou"]]
        if not names or len(set(names)) < len(names):
            problems.append(
                f"model.map_iou={list(args['map_iou'])}; expected distinct IoUs in steps of 0.01 (names {names})"
            )
        if not args["froc_rates"] or min(args["froc_rates"]) <= 0:
            problems.append(f"model.froc_rates={list(args['froc_rates'])}; expected positive false-positive rates")
        for name in ("atss_candidates", "sampled_anchors", "min_negatives", "topk_per_level", "detections_per_image"):
            if isinstance(args[name], bool) or not isinstance(args[name], int) or args[name] < 1:
                problems.append(f"model.{name}={args[name]!r}; expected a positive integer")
        if args["pool_size"] < 1:
            problems.append(f"model.pool_size={args['pool_size']}; expected at least 1")
        if problems:
            raise MedexpError("; ".join(problems))

    def _build_detector(self, anchor_shapes: Sequence[Any], feature_map_scales: Sequence[float]) -> Any:
        from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
        from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

        dims = self.spatial_dims
        shapes = [[float(s)] * dims if isinstance(s, (int, float)) else [float(v) for v in s] for s in anchor_shapes]
        shapes = [s * dims if len(s) == 1 else s for s in shapes]
        anchors = AnchorGeneratorWithAnchorShape(feature_map_scales=list(feature_map_scales), base_anchor_shapes=shapes)
        detector = RetinaNetDetector(network=self.net, anchor_generator=anchors)
        hp = self.hparams
        detector.set_atss_matcher(num_candidates=hp.atss_candidates, center_in_gt=hp.center_in_gt)
        detector.set_hard_negative_sampler(
            batch_size_per_image=hp.sampled_anchors,
            positive_fraction=hp.positive_fraction,
            min_neg=hp.min_negatives,
            pool_size=hp.pool_size,
        )
        detector.set_box_selector_parameters(
            score_thresh=hp.score_threshold,
            topk_candidates_per_level=hp.topk_per_level,
            nms_thresh=hp.nms_threshold,
            detections_per_img=hp.detections_per_image,
        )
        # kept off the module tree: the detector holds self.net, whose weights would otherwise be
        # stored twice in every checkpoint (net.* and detector.network.*)
        return _Unregistered(detector)

    def configure_metrics(self) -> MetricCollection:
        hp = self.hparams
        metrics = DetectionMetrics(
            self.num_classes,
            self.spatial_dims,
            map_iou=hp.map_iou,
            froc_iou=hp.froc_iou,
            froc_rates=hp.froc_rates,
            max_detections=hp.detections_per_image,
        )
        # one metric computing several values: MetricCollection flattens its dict under the stage prefix
        return _ValuesCollection({"detection": metrics}, names=self.metric_names())

    def metric_names(self) -> list[str]:
        """The names this task logs per evaluation stage (besides ``loss``)."""
        from medexp.metrics.detection import rate_name

        hp = self.hparams
        return [*(map_name(iou) for iou in hp.map_iou), "froc", *(rate_name(rate) for rate in hp.froc_rates)]

    def forward(self, x: torch.Tensor) -> DetectorOutputs:
        """The network's maps and the anchors for ``x`` ``(B, C, *spatial)`` (see :class:`DetectorOutputs`)."""
        from monai.apps.detection.utils.detector_utils import preprocess_images
        from monai.apps.detection.utils.predict_utils import ensure_dict_value_to_list_

        detector = self.detector.module
        if detector.anchors is not None and detector.anchors[0].device != x.device:
            detector.anchors = None  # cached for inputs of this shape on another device
        images, image_sizes = preprocess_images(x, detector.spatial_dims, detector.size_divisible)
        head = self.net(images)
        if isinstance(head, (list, tuple)):  # a network with use_list_output=True: classification maps first
            head = {detector.cls_key: list(head[: len(head) // 2]), detector.box_reg_key: list(head[len(head) // 2 :])}
        ensure_dict_value_to_list_(head)
        detector.generate_anchors(images, head)
        per_level = [m.shape[2:].numel() for m in head[detector.cls_key]]
        # the detector's own flattening: (B, A*K, *level) maps -> (B, sum over levels of H*W*A, K)
        flat = {key: detector._reshape_maps(head[key]) for key in (detector.cls_key, detector.box_reg_key)}
        return DetectorOutputs(flat, list(detector.anchors), per_level, image_sizes)

    def infer(self, x: torch.Tensor) -> DetectorOutputs:
        """:meth:`forward` plus each image's boxes after score threshold, top-k and NMS."""
        outputs = self(x)
        detector = self.detector.module
        detections = detector.postprocess_detections(
            dict(outputs.head), outputs.anchors, outputs.image_sizes, outputs.anchors_per_level
        )
        return replace(outputs, detections=detections)

    def targets(self, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """The batch's true boxes per image, as the detector and the metrics take them."""
        boxes, labels = self.target_keys
        return [{"boxes": b.float(), "labels": labels_.long()} for b, labels_ in zip(batch[boxes], batch[labels])]

    def batch_loss(self, outputs: DetectorOutputs, batch: dict[str, Any]) -> torch.Tensor:
        """Classification plus box-regression loss, as MONAI's detector computes them."""
        from monai.apps.detection.utils.detector_utils import check_training_targets

        detector = self.detector.module
        targets = check_training_targets(
            list(batch[self.input_key]),
            self.targets(batch),
            detector.spatial_dims,
            detector.target_label_key,
            detector.target_box_key,
        )
        matched = self._match(outputs.anchors, targets, outputs.anchors_per_level)
        cls_loss = detector.compute_cls_loss(outputs.head[detector.cls_key], targets, matched)
        box_loss = detector.compute_box_loss(outputs.head[detector.box_reg_key], targets, outputs.anchors, matched)
        return cls_loss + box_loss.to(cls_loss.device)  # MONAI's box loss is a CPU 0 when nothing matched

    def _match(
        self, anchors: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], anchors_per_level: list[int]
    ) -> list[torch.Tensor]:
        """Per image ``(A,)``: the true box each anchor is matched to by ATSS, or -1.

        The detector's own ``compute_anchor_matched_idxs`` first asks whether its matcher is
        torchvision's, which fails where torchvision is absent; this is its ATSS path.
        """
        detector = self.detector.module
        matched = []
        for anchors_i, target in zip(anchors, targets):
            boxes = target[detector.target_box_key].to(anchors_i.device)
            if boxes.numel() == 0:  # every anchor is background
                matched.append(torch.full((len(anchors_i),), -1, dtype=torch.int64, device=anchors_i.device))
                continue
            _, index = detector.proposal_matcher(boxes, anchors_i, anchors_per_level, detector.num_anchors_per_loc)
            matched.append(index)
        return matched

    def update_metrics(self, metrics: MetricCollection, outputs: DetectorOutputs, batch: dict[str, Any]) -> None:
        if outputs.detections is not None:
            metrics.update(outputs.detections, self.targets(batch))

    def postprocess(self, outputs: DetectorOutputs) -> torch.Tensor:
        """Image-level scores ``(B, num_classes)``: per class, the highest score among an image's
        detections (0 without any), i.e. how sure the detector is that the image holds such a lesion."""
        scores = outputs.head[self.detector.module.cls_key].new_zeros(len(outputs.image_sizes), self.num_classes)
        for image, found in enumerate(outputs.detections or []):
            if len(found["labels"]):
                scores[image].scatter_reduce_(0, found["labels"].long(), found["labels_scores"].float(), reduce="amax")
        return scores

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, torch.Tensor]]:
        """Each image's ``boxes``, ``labels`` and ``labels_scores`` (see :class:`DetectorOutputs`)."""
        batch = self.prepare_batch(batch, "predict")
        return self.infer(batch[self.input_key]).detections


class _Unregistered:
    """Holds a module outside its owner's module tree (not in ``state_dict``, ``.to()`` or ``.train()``)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module


class _ValuesCollection(MetricCollection):
    """A collection of one metric whose ``compute`` returns a dict of named values, which
    torchmetrics logs flat as ``<prefix><name>``; :meth:`keys` gives those names (what
    ``BaseTask`` checks ``monitor`` against) instead of the metric's own."""

    def __init__(self, metrics: dict[str, Any], names: list[str], **kwargs: Any) -> None:
        super().__init__(metrics, **kwargs)
        self._names = list(names)

    def keys(self, keep_base: bool = False) -> Any:
        return super().keys(keep_base=True) if keep_base else [self._set_name(name) for name in self._names]
