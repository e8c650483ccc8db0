"""Image-to-image translation metrics: translated images against their true targets, and the
source images against the same targets as the baseline a translation must beat."""

from __future__ import annotations

from torchmetrics import Metric, MetricCollection
from torchmetrics.image import (
    MultiScaleStructuralSimilarityIndexMeasure,
    PeakSignalNoiseRatio,
    StructuralSimilarityIndexMeasure,
)
from torchmetrics.regression import MeanAbsoluteError

# MS-SSIM (torchmetrics' defaults: an 11-pixel Gaussian window, 5 scales) halves the images 4
# times and still needs a whole window at the coarsest scale: (11 - 1) * 2**4 = 160 pixels per
# side at least (torchmetrics refuses smaller images). Below that it is left out rather than
# computed with fewer scales, which would make it a different metric from the published one.
MS_SSIM_MIN_SIZE = 160
# the metrics of translated images against targets; with the baseline also "<name>_source"
NAMES = ("mae", "psnr", "ssim")


def translation_metrics(data_range: float, image_size: int | None = None, baseline: bool = False) -> MetricCollection:
    """``mae``, ``psnr``, ``ssim`` (and ``ms_ssim`` for images of at least
    :data:`MS_SSIM_MIN_SIZE` pixels per side) of translated images against their targets, fed
    ``update(translated, target)`` with ``(B, C, *spatial)`` images (2D or 3D); with
    ``baseline``, also ``mae_source``, ``psnr_source``, ``ssim_source``, fed
    ``update(source, target)`` by the caller (only meaningful when source and target share
    channels and value range).

    Args:
        data_range: the span of the targets' values (PSNR's peak, SSIM's dynamic range).
        image_size: the smallest side of the images where known; None: no ``ms_ssim``.
    """

    def measures() -> dict[str, Metric]:
        return {
            "mae": MeanAbsoluteError(),
            "psnr": PeakSignalNoiseRatio(data_range=data_range),
            "ssim": StructuralSimilarityIndexMeasure(data_range=data_range),
        }

    metrics: dict[str, Metric] = measures()
    if image_size is not None and image_size >= MS_SSIM_MIN_SIZE:
        metrics["ms_ssim"] = MultiScaleStructuralSimilarityIndexMeasure(data_range=data_range)
    if baseline:
        metrics.update({f"{name}_source": metric for name, metric in measures().items()})
    # the baseline metrics take other inputs than the rest: no shared state
    return MetricCollection(metrics, compute_groups=False)
