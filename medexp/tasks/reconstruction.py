"""Image reconstruction: autoencoders and VAEs, denoising, and anomaly detection by
reconstruction error."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.regression import MeanSquaredError

from medexp.metrics.classification import BinaryDefinedAUROC
from medexp.tasks.base import BaseTask
from medexp.utils.errors import MedexpError

LOSSES = ("mse", "l1")
NOISES = (None, "gaussian", "poisson", "speckle", "blur")


def corrupt(
    image: torch.Tensor, noise: str | None, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A corrupted copy of ``(B, C, *spatial)`` images.

    ``gaussian``: ``x + std * n``; ``speckle``: ``x + x * std * n`` (multiplicative);
    ``poisson``: photon counts at a peak of ``1 / std**2`` per unit intensity, so an intensity of
    1 has a relative standard deviation of ``std`` (negative intensities count as 0);
    ``blur``: a Gaussian blur of ``std`` pixels (deterministic: deblurring).
    """

    def normal() -> torch.Tensor:
        return torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)

    match noise:
        case None:
            return image
        case "gaussian":
            return image + std * normal()
        case "speckle":
            return image + image * std * normal()
        case "poisson":
            peak = 1.0 / std**2
            return torch.poisson(image.clamp(min=0) * peak, generator=generator) / peak
        case "blur":
            from monai.networks.layers import GaussianFilter

            # edges replicated first: the filter pads with zeros, which would darken the borders
            radius = math.ceil(4.0 * std)  # where GaussianFilter truncates its kernel
            spatial = image.ndim - 2
            padded = F.pad(image, (radius,) * 2 * spatial, mode="replicate")
            blurred = GaussianFilter(spatial, sigma=std, truncated=4.0).to(image.device)(padded)
            return blurred[(..., *(slice(radius, -radius),) * spatial)]
        case _:
            raise MedexpError(f"model.noise={noise!r}; expected one of {list(NOISES)}")


class ReconstructionTask(BaseTask):
    """Reconstruct the clean input image: an autoencoder, a VAE, or a denoiser.

    The target is always the clean image. With ``noise`` set, the input is corrupted on the fly
    (training: from the run's random state; validation and test: from a fixed seed, so their
    metrics are deterministic), and ``psnr_input`` (the corrupted input against the clean image)
    shows what the network gained. Metrics: ``psnr``, ``ssim``, ``mse``, ``psnr_input``; for a VAE
    also ``kl``.

    Anomaly detection: with ``normal_classes`` set, the loss counts only images whose label is
    one of them (training on normal images alone), and every image's reconstruction error (mean
    squared error) is its anomaly score: ``anomaly_auroc`` with abnormal images as positives.

    Args:
        net: ``(B, C, *spatial)`` -> ``(B, C, *spatial)``, or a MONAI ``VarAutoEncoder``'s
            ``(reconstruction, mu, logvar, z)``.
        loss: ``mse`` or ``l1``, between reconstruction and clean image.
        kl_weight: weight of the KL divergence of a VAE (mean over latent units and samples).
        noise: None, ``gaussian``, ``poisson``, ``speckle`` or ``blur`` (see :func:`corrupt`).
        noise_std: the strength of the noise (for ``blur``: the Gaussian's sigma in pixels).
        data_range: the range of intensities for PSNR and SSIM (1.0 for images in [0, 1], 2.0
            for [-1, 1]).
        normal_classes: class indices of normal images, or None (no anomaly detection). For
            multi-label data, an image is abnormal when a label outside them is positive.
        residual: the net predicts the correction to its input (output = input + s * net(input),
            the scale ``s`` learned from 0), so an untrained denoiser starts as the identity
            rather than as noise (DnCNN's residual learning, ReZero's initialisation).
        **kwargs: ``optimizer``, ``scheduler``, ``monitor``; see :class:`~medexp.tasks.base.BaseTask`.
    """

    # any labelled image data (the labels are used only by anomaly detection)
    data_tasks = ("binary", "multiclass", "multilabel")

    # the net reconstructs the image: as many outputs as input channels
    net_outputs = "in_channels"
    # prepare_batch keeps the clean image here and puts the corrupted one under "image"
    target_key = "clean"
    # what it does besides training (see BaseTask)
    not_predicted = (
        "medexp predict writes class probabilities and masks; it does not write reconstructions yet. "
        "Evaluate the reconstruction model with: medexp eval ckpt_path={ckpt}"
    )
    not_exported = (
        "cannot export a reconstruction model ({name}: autoencoder, VAE, denoiser) yet; exportable: {supported}"
    )

    def __init__(
        self,
        net: nn.Module,
        loss: str = "mse",
        kl_weight: float = 1e-3,
        noise: str | None = None,
        noise_std: float = 0.1,
        data_range: float = 1.0,
        normal_classes: Sequence[int] | None = None,
        residual: bool = False,
        monitor: str = "val/psnr",
        **kwargs: Any,
    ) -> None:
        if loss not in LOSSES:
            raise MedexpError(f"model.loss={loss!r}; expected one of {list(LOSSES)}")
        if noise not in NOISES:
            raise MedexpError(f"model.noise={noise!r}; expected one of {list(NOISES)}")
        if noise is not None and not noise_std > 0:
            raise MedexpError(f"model.noise_std={noise_std}; expected a number > 0")
        if kl_weight < 0:
            raise MedexpError(f"model.kl_weight={kl_weight}; expected a number >= 0")
        if normal_classes is not None and len(normal_classes) == 0:
            raise MedexpError("model.normal_classes=[]; expected null or a list of class indices")
        self.normal_classes = None if normal_classes is None else [int(c) for c in normal_classes]
        self.data_range, self.noise = data_range, noise
        # not in hparams: BaseTask leaves "loss" out (other tasks inject loss modules there)
        self.loss_kind = loss
        super().__init__(net, monitor=monitor, **kwargs)
        # residual: output = input + scale * net(input), the scale learned from 0 (as ReZero), so
        # training starts from the identity whatever the net's last layers are
        self.residual_scale = nn.Parameter(torch.zeros(())) if residual else None

    def forward(self, x: torch.Tensor, **extra: torch.Tensor) -> Any:
        outputs = self.net(x, **extra)
        if self.hparams.residual:
            if isinstance(outputs, tuple):
                raise MedexpError("model.residual=true needs a net that returns an image, not a VAE's tuple")
            return x + self.residual_scale * outputs
        return outputs

    def configure_metrics(self) -> MetricCollection:
        r = self.data_range
        metrics = {
            "psnr": PeakSignalNoiseRatio(data_range=r),
            "ssim": StructuralSimilarityIndexMeasure(data_range=r),
            "mse": MeanSquaredError(),
        }
        if self.noise is not None:  # without noise the input is the target: infinite PSNR
            metrics["psnr_input"] = PeakSignalNoiseRatio(data_range=r)
        if self._is_vae():  # the net is set before the metrics are built
            metrics["kl"] = MeanMetric()
        if self.normal_classes is not None:
            metrics["anomaly_auroc"] = BinaryDefinedAUROC()
        # update_metrics feeds metrics different inputs
        return MetricCollection(metrics, compute_groups=False)

    def prepare_batch(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """Keep the clean image as the target and corrupt the input (not when predicting: the
        inputs are then real images, noisy as they come)."""
        clean = batch["image"]
        if stage == "predict":
            return {**batch, "clean": clean}
        generator = None if stage == "train" else self.eval_rng(clean.device)
        noisy = corrupt(clean, self.noise, self.hparams.noise_std, generator)
        return {**batch, "image": noisy, "clean": clean}

    def normal_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` class indices or ``(B, L)`` indicators -> ``(B,)`` True for normal images."""
        normal = torch.as_tensor(self.normal_classes, device=labels.device)
        if labels.ndim == 1:
            return torch.isin(labels, normal)
        others = torch.ones(labels.shape[1], dtype=torch.bool, device=labels.device)
        others[normal] = False
        return ~labels[:, others].bool().any(dim=1)

    def per_sample_loss(self, outputs: Any, clean: torch.Tensor) -> torch.Tensor:
        """``(B,)`` reconstruction error (plus the weighted KL for a VAE)."""
        recon = self.postprocess(outputs)
        error = F.mse_loss(recon, clean, reduction="none") if self.loss_kind == "mse" else (recon - clean).abs()
        loss = error.flatten(1).mean(dim=1)
        if isinstance(outputs, tuple):
            loss = loss + self.hparams.kl_weight * kl_divergence(outputs[1], outputs[2])
        return loss

    def compute_loss(self, outputs: Any, target: torch.Tensor) -> torch.Tensor:
        return self.per_sample_loss(outputs, target).mean()

    def batch_loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean loss of the batch's normal images (all images without ``normal_classes``);
        zero, with gradients, when a batch holds none."""
        loss = self.per_sample_loss(outputs, batch[self.target_key])
        if self.normal_classes is None:
            return loss.mean()
        weight = self.normal_mask(batch["label"]).to(loss.dtype)
        return (loss * weight).sum() / weight.sum().clamp(min=1)

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        """Reconstruction against the clean image; ``psnr_input``: the corrupted input against it;
        ``anomaly_auroc``: each image's mean squared error as its score, abnormal = 1."""
        recon, clean = self.postprocess(outputs), batch[self.target_key]
        for name, metric in metrics.items(keep_base=True):
            match name:
                case "psnr_input":
                    metric.update(batch["image"], clean)
                case "kl":
                    metric.update(kl_divergence(outputs[1], outputs[2]))
                case "anomaly_auroc":
                    score = (recon - clean).pow(2).flatten(1).mean(dim=1)
                    metric.update(score, (~self.normal_mask(batch["label"])).long())
                case _:
                    metric.update(recon, clean)

    def _is_vae(self) -> bool:
        # other nets returning (reconstruction, mu, logvar, ...) still get the KL term in their loss
        from monai.networks.nets import VarAutoEncoder

        return isinstance(self.net, VarAutoEncoder)

    def postprocess(self, outputs: Any) -> torch.Tensor:
        """The reconstruction ``(B, C, *spatial)`` (the first output of a VAE)."""
        return outputs[0] if isinstance(outputs, tuple) else outputs


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``(B,)`` KL divergence of ``N(mu, exp(logvar))`` from ``N(0, 1)``, mean over latent units."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).mean(dim=1)
