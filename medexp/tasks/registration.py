"""Deformable (and affine) image registration: align a moving image to a fixed one."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection

from medexp.metrics.registration import PairMean, folding_fraction, pair_dice, pair_mse, pair_ncc
from medexp.tasks.base import BaseTask
from medexp.utils.errors import MedexpError

SIMILARITIES = ("lncc", "mse", "mi")
REGULARIZATIONS = ("bending", "diffusion")
OUTPUTS = ("ddf", "dvf")


def similarity_loss(name: str, spatial_dims: int, kernel_size: int, num_bins: int) -> nn.Module:
    """The image dissimilarity minimised between the warped moving and the fixed image.

    ``lncc``: MONAI's local normalised cross-correlation (negated, in [-1, 0]) over windows of
    ``kernel_size`` voxels, robust to intensity differences that vary across the image; ``mse``:
    mean squared error, for images whose intensities match; ``mi``: MONAI's global mutual
    information (negated) with ``num_bins`` Parzen bins, for different contrasts or modalities
    (intensities expected in [0, 1]).

    Raises:
        MedexpError: for an unknown name or a kernel size that is not an odd integer >= 3.
    """
    from monai.losses import GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss

    match name:
        case "lncc":
            if kernel_size < 3 or kernel_size % 2 == 0:
                raise MedexpError(f"model.kernel_size={kernel_size}; expected an odd integer >= 3 (the LNCC window)")
            return LocalNormalizedCrossCorrelationLoss(spatial_dims=spatial_dims, kernel_size=kernel_size)
        case "mse":
            return nn.MSELoss()
        case "mi":
            if num_bins < 2:
                raise MedexpError(f"model.num_bins={num_bins}; expected an integer >= 2 (histogram bins of MI)")
            return GlobalMutualInformationLoss(num_bins=num_bins)
        case _:
            raise MedexpError(f"model.similarity={name!r}; expected one of {list(SIMILARITIES)}")


def regularizer(name: str) -> nn.Module:
    """The smoothness penalty of the displacement field: ``bending`` (MONAI's bending energy,
    second derivatives: penalises curvature, lets affine motion through) or ``diffusion``
    (MONAI's diffusion loss, first derivatives: penalises any change of the displacement).

    Raises:
        MedexpError: for an unknown name.
    """
    from monai.losses import BendingEnergyLoss, DiffusionLoss

    match name:
        case "bending":
            return BendingEnergyLoss()
        case "diffusion":
            return DiffusionLoss()
        case _:
            raise MedexpError(f"model.regularization={name!r}; expected one of {list(REGULARIZATIONS)}")


class RegistrationTask(BaseTask):
    """Learn to register pairs: the net maps a moving and a fixed image to a dense displacement
    field (DDF) that warps the moving image onto the fixed one (MONAI ``Warp``).

    Batches hold ``fixed`` and ``moving`` ``(B, C, *spatial)`` images and, optionally,
    ``fixed_label`` and ``moving_label`` ``(B, 1, *spatial)`` masks (foreground where nonzero).
    The net sees the pair stacked on the channel axis, moving first, ``(B, 2C, *spatial)``
    (:meth:`prepare_batch` puts it under ``image``), and outputs ``(B, spatial_dims, *spatial)``:
    the DDF in voxels, or with ``output="dvf"`` a stationary velocity field integrated into a
    DDF by scaling and squaring (MONAI ``DVF2DDF``), which keeps the transform smooth and
    invertible. An affine net (MONAI ``GlobalNet``) outputs the DDF of its affine map.

    Loss: ``similarity(warped moving, fixed) + reg_weight * regularization(DDF)``, plus
    ``label_weight`` times the Dice loss of the warped moving mask against the fixed mask when
    the data have masks (weakly supervised registration).

    Metrics (per pair, averaged over the epoch): ``ncc`` and ``mse`` of the warped moving image
    against the fixed image, with ``ncc_before`` and ``mse_before`` of the unregistered pair;
    ``dice`` of the warped moving mask against the fixed mask and ``dice_before`` (pairs with
    masks only, both empty ones left out; NaN when no pair has masks); ``folding``, the share of
    voxels where the Jacobian determinant of the transform is at or below 0 (lower is better).

    Args:
        net: ``(B, 2C, *spatial)`` -> ``(B, spatial_dims, *spatial)``.
        spatial_dims: 2 or 3, the data's.
        similarity: ``lncc``, ``mse`` or ``mi`` (see :func:`similarity_loss`).
        kernel_size: the LNCC window in voxels (odd).
        num_bins: histogram bins of ``mi``.
        regularization: ``bending`` or ``diffusion`` (see :func:`regularizer`).
        reg_weight: weight of the regularisation (>= 0).
        label_weight: weight of the Dice loss of the warped masks (>= 0; 0: unsupervised).
        output: ``ddf`` (the net's output is the displacement) or ``dvf`` (a velocity field).
        integration_steps: scaling-and-squaring steps of ``output="dvf"``.
        **kwargs: ``optimizer``, ``scheduler``, ``monitor``; see :class:`~medexp.tasks.base.BaseTask`.
    """

    # the data.task values this task trains on (checked before anything is built)
    data_tasks = ("registration",)
    # the net outputs one displacement channel per spatial axis
    net_outputs = "spatial_dims"
    # what it does besides training (see BaseTask)
    prediction_writer = "registration"
    prediction_inputs = "pairs"
    # images stacked into the net's input (moving, fixed): its in_channels = 2 * data.in_channels
    net_input_images = 2
    # prepare_batch stacks the pair here; the fixed image is what the warped moving one must match
    input_key = "image"
    target_key = "fixed"

    def __init__(
        self,
        net: nn.Module,
        spatial_dims: int,
        similarity: str = "lncc",
        kernel_size: int = 9,
        num_bins: int = 23,
        regularization: str = "bending",
        reg_weight: float = 1.0,
        label_weight: float = 0.0,
        output: str = "ddf",
        integration_steps: int = 7,
        monitor: str = "val/ncc",
        **kwargs: Any,
    ) -> None:
        from monai.losses import DiceLoss
        from monai.networks.blocks import DVF2DDF, Warp

        if spatial_dims not in (2, 3):
            raise MedexpError(f"data.spatial_dims={spatial_dims}; registration works on 2D or 3D images")
        if output not in OUTPUTS:
            raise MedexpError(f"model.output={output!r}; expected one of {list(OUTPUTS)}")
        for key, value in (("reg_weight", reg_weight), ("label_weight", label_weight)):
            if not value >= 0:
                raise MedexpError(f"model.{key}={value}; expected a number >= 0")
        if output == "dvf" and integration_steps < 1:
            raise MedexpError(
                f"model.integration_steps={integration_steps}; expected an integer >= 1 with model.output=dvf"
            )
        super().__init__(net, monitor=monitor, **kwargs)
        self.image_loss = similarity_loss(similarity, spatial_dims, kernel_size, num_bins)
        self.regularizer = regularizer(regularization)
        self.label_loss = DiceLoss()
        # border padding: a voxel displaced past the edge takes the edge's value, not a black frame;
        # medexp predict warps the images as read with the same module
        with warnings.catch_warnings():
            # MONAI notes that it uses torch's grid_sample, its compiled extension being optional
            warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample", category=UserWarning)
            self.warp = Warp(mode="bilinear", padding_mode="border")
            self.integrate = (
                DVF2DDF(num_steps=integration_steps, mode="bilinear", padding_mode="zeros") if output == "dvf" else None
            )

    def configure_metrics(self) -> MetricCollection:
        names = ("ncc", "ncc_before", "mse", "mse_before", "dice", "dice_before", "folding")
        # no compute groups: update_metrics feeds each metric its own values
        return MetricCollection({name: PairMean() for name in names}, compute_groups=False)

    def prepare_batch(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """Add the net's input ``image``: ``moving`` and ``fixed`` stacked on the channel axis."""
        moving, fixed = batch["moving"], batch["fixed"]
        if moving.shape != fixed.shape:
            raise MedexpError(
                f"moving images of shape {tuple(moving.shape)} and fixed images of shape {tuple(fixed.shape)}; a pair "
                "must share channels and spatial size (resample them to one grid, e.g. data.image_size)"
            )
        return {**batch, "image": torch.cat([moving, fixed], dim=1)}

    def forward(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """``(B, 2C, *spatial)`` pairs -> ``(B, spatial_dims, *spatial)`` displacement fields."""
        field = self.net(x, **extra)
        expected = (x.shape[0], self.hparams.spatial_dims, *x.shape[2:])
        if tuple(field.shape) != expected:
            raise MedexpError(
                f"the net ({type(self.net).__name__}) outputs shape {tuple(field.shape)} for inputs {tuple(x.shape)}; "
                f"registration needs {expected}, one displacement per spatial axis at every voxel (check "
                "model.net.out_channels, and model.net.image_size for GlobalNet, against the data)"
            )
        return field if self.integrate is None else self.integrate(field)

    def postprocess(self, outputs: torch.Tensor) -> torch.Tensor:
        """The DDF as it is: what :meth:`predict_step` returns and ``medexp predict`` writes."""
        return outputs

    def has_labels(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether the batch holds masks of both images."""
        return "fixed_label" in batch and "moving_label" in batch

    def batch_loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Similarity of the warped moving image to the fixed one, plus the weighted smoothness
        penalty of the DDF ``outputs`` ``(B, D, *spatial)`` and, with masks, their Dice loss."""
        warped = self.warp(batch["moving"], outputs)
        loss = self.image_loss(warped, batch[self.target_key]) + self.hparams.reg_weight * self.regularizer(outputs)
        if self.hparams.label_weight > 0:
            if not self.has_labels(batch):
                raise MedexpError(
                    f"model.label_weight={self.hparams.label_weight} needs masks (fixed_label, moving_label), but these "
                    "data have none; set model.label_weight=0 or add mask columns to the manifest"
                )
            # masks are warped like images (bilinear), so the Dice loss has a gradient
            warped_label = self.warp((batch["moving_label"] > 0).float(), outputs)
            fixed_label = (batch["fixed_label"] > 0).float()
            loss = loss + self.hparams.label_weight * self.label_loss(warped_label, fixed_label)
        return loss

    def update_metrics(self, metrics: MetricCollection, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Per-pair similarity before and after warping, Dice of the masks (warped masks
        thresholded at 0.5), and folding of the DDF ``outputs``."""
        moving, fixed = batch["moving"], batch[self.target_key]
        warped = self.warp(moving, outputs)
        values = {
            "ncc": pair_ncc(warped, fixed),
            "ncc_before": pair_ncc(moving, fixed),
            "mse": pair_mse(warped, fixed),
            "mse_before": pair_mse(moving, fixed),
            "folding": folding_fraction(outputs),
        }
        if self.has_labels(batch):
            moving_label, fixed_label = (batch["moving_label"] > 0).float(), batch["fixed_label"] > 0
            values["dice"] = pair_dice(self.warp(moving_label, outputs) > 0.5, fixed_label)
            values["dice_before"] = pair_dice(moving_label, fixed_label)
        for name, metric in metrics.items(keep_base=True):
            if name in values:
                metric.update(values[name])
