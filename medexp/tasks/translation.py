"""Image-to-image translation (one modality into another, e.g. MRI -> CT): pix2pix on paired
data, CycleGAN on paired or unpaired data; both on :class:`~medexp.tasks.adversarial.GANBase`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from medexp.tasks.adversarial import GANBase, ImagePool, check_range
from medexp.utils.errors import MedexpError

# validation metrics that need true targets (data.truth)
TRUTH_MONITORS = ("val/mae", "val/psnr", "val/ssim", "val/ms_ssim")


class TranslationTask(GANBase):
    """Translate source images (``batch["image"]``, ``(B, C_in, *spatial)``) into the target
    modality (``batch["target"]``, ``(B, C_out, *spatial)``); see :class:`Pix2PixTask` and
    :class:`CycleGANTask` for the losses.

    Metrics (validation and test, where ``truth``: the targets are the true translations):
    ``mae``, ``psnr``, ``ssim`` (and ``ms_ssim`` for images of 160 pixels or more; see
    :mod:`medexp.metrics.translation`) of translated against target images and, where source
    and target share channels and value range, of the source against the target as the
    baseline (``mae_source``, ...); the adversarial ``d_loss``, ``d_real``, ``d_fake``; with
    ``feature_ckpt``, ``domain_fid``/``domain_kid`` of translated against target images.

    Args:
        net: the generator, ``(B, C_in, *spatial)`` -> ``(B, C_out, *spatial)`` raw outputs,
            mapped into ``target_intensity_range`` by a sigmoid.
        discriminator: a patch discriminator; a list of feature maps whose last are the logits
            (MONAI's ``PatchDiscriminator``) or a tensor of logits.
        paired: the training pairs are aligned (``data.paired``).
        truth: validation and test targets are true translations (``data.truth``).
        in_channels, out_channels: source and target channels (``data.in_channels``,
            ``data.out_channels``).
        intensity_range: the sources' ``[low, high]``; target_intensity_range: the targets'.
        image_size: the images' side where known (``ms_ssim`` from 160 pixels); None: unknown.
        monitor: ``val/mae`` (the default, where ``truth``) or ``val/loss``, ...
        **kwargs: ``adversarial_loss``, ``gp_weight``, ``n_critic``, ``d_optimizer``,
            ``real_label``, ``feature_ckpt``, ``kid_subset_size`` (see
            :class:`~medexp.tasks.adversarial.GANBase`), ``optimizer``, ``scheduler``, ...
    """

    data_tasks = ("translation",)
    input_key = "image"
    target_key = "target"
    # the generator makes target images: as many outputs as the targets have channels
    net_outputs = "out_channels"
    # what it does besides training (see BaseTask): `medexp predict` writes translated images
    prediction_writer = "images"
    report_kind = "translation"
    # the generator would export as one graph, but the export's sidecar (medexp.inference.artifacts)
    # describes class probabilities, not images
    not_exported = (
        "cannot export a {name} yet: the exported model's description covers class probabilities, not translated "
        "images; translate images with: medexp predict ckpt_path=... input=... output=... Exportable: {supported}"
    )

    def __init__(
        self,
        net: nn.Module,
        discriminator: nn.Module,
        paired: bool = True,
        truth: bool = True,
        in_channels: int = 1,
        out_channels: int = 1,
        intensity_range: Sequence[float] = (0.0, 1.0),
        target_intensity_range: Sequence[float] = (0.0, 1.0),
        image_size: int | None = None,
        monitor: str = "val/mae",
        **kwargs: Any,
    ) -> None:
        problem = monitor_problem(monitor, truth)
        if problem:
            raise MedexpError(problem)
        self.source_low, self.source_high = check_range(intensity_range, "model.intensity_range")
        self.low, self.high = check_range(target_intensity_range, "model.target_intensity_range")
        self.paired, self.truth = bool(paired), bool(truth)
        # the source measured against the target: only where both are images of the same kind
        self.baseline = in_channels == out_channels and (self.source_low, self.source_high) == (self.low, self.high)
        super().__init__(net, discriminator, monitor=monitor, **kwargs)

    def configure_metrics(self) -> MetricCollection:
        metrics = super().configure_metrics()
        if self.truth:
            from medexp.metrics.translation import translation_metrics

            size = self.hparams.image_size
            built = translation_metrics(self.high - self.low, size, self.baseline)
            metrics.add_metrics(dict(built.items(keep_base=True)))
        return metrics

    def forward(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *spatial)`` sources -> ``(B, C_out, *spatial)`` translations in the
        target's intensity range."""
        return self.low + (self.high - self.low) * torch.sigmoid(super().forward(x, **extra))

    def compute_loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The L1 error of translations ``(B, C_out, *spatial)`` against targets (what callers of
        :meth:`~medexp.tasks.base.BaseTask.batch_loss` get; training uses the GAN objectives)."""
        return F.l1_loss(outputs, target)

    def postprocess(self, outputs: torch.Tensor) -> torch.Tensor:
        """The translated images as they are: ``(B, C_out, *spatial)`` in ``target_intensity_range``."""
        return outputs

    @staticmethod
    def logits(outputs: Any) -> torch.Tensor:
        """A discriminator's logits: the last of a ``PatchDiscriminator``'s feature maps."""
        return outputs[-1] if isinstance(outputs, list | tuple) else outputs

    def update_quality(
        self, name: str, metric: Any, batch: dict[str, torch.Tensor], generated: dict[str, torch.Tensor]
    ) -> None:
        target = batch[self.target_key]
        if name in ("domain_fid", "domain_kid"):
            metric.update(target, real=True)
            metric.update(generated["fake"], real=False)
        elif name.endswith("_source"):
            metric.update(batch[self.input_key], target)
        else:
            metric.update(generated["fake"], target)

    @classmethod
    def config_problems(cls, config: dict[str, Any]) -> list[str]:
        """Settings of a resolved run config that do not fit this task, found before anything is
        built (called by :func:`medexp.utils.validation.check_combinations`)."""
        model, data = config.get("model") or {}, config.get("data") or {}
        problem = monitor_problem(model.get("monitor", "val/mae"), data.get("truth", True))
        return [problem] if problem else []


def monitor_problem(monitor: str, truth: bool) -> str | None:
    """Why ``monitor`` cannot be logged without true targets, or None."""
    if truth or monitor not in TRUTH_MONITORS:
        return None
    return (
        f"model.monitor={monitor} compares translations with true targets, but data.truth=false (unpaired data: "
        "no true targets); set model.monitor=val/loss (or val/domain_kid with model.feature_ckpt)"
    )


class Pix2PixTask(TranslationTask):
    """pix2pix (Isola et al. 2017): a generator (a U-Net) trained on aligned pairs with
    ``l1_weight * L1(G(x), y)`` plus the adversarial loss of a patch discriminator that judges
    ``concat(source, target or translation)``: each patch real or translated, given its source.

    Args:
        l1_weight: the weight of the L1 loss against the target.
        **kwargs: see :class:`TranslationTask` (``paired`` must be true).
    """

    def __init__(self, net: nn.Module, discriminator: nn.Module, l1_weight: float = 100.0, **kwargs: Any) -> None:
        problem = _pairing_problem(kwargs.get("paired", True))
        if problem:
            raise MedexpError(problem)
        if not l1_weight >= 0:
            raise MedexpError(f"model.l1_weight={l1_weight}; expected a number >= 0")
        super().__init__(net, discriminator, **kwargs)

    @classmethod
    def config_problems(cls, config: dict[str, Any]) -> list[str]:
        problem = _pairing_problem((config.get("data") or {}).get("paired", True))
        return [*super().config_problems(config), *([problem] if problem else [])]

    def discriminate(self, source: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *spatial)`` sources and ``(B, C_out, *spatial)`` targets or translations
        -> patch logits ``(B, 1, *patches)``."""
        return self.logits(self.discriminator(torch.cat([source, image], dim=1)))

    def generate(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        return {"fake": self(batch[self.input_key])}

    def discriminator_objective(
        self, batch: dict[str, torch.Tensor], generated: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = batch[self.input_key]
        return self.critic_loss(
            lambda x: self.discriminate(source, x), batch[self.target_key], generated["fake"], stage
        )

    def generator_objective(
        self, batch: dict[str, torch.Tensor], generated: dict[str, torch.Tensor], stage: str
    ) -> torch.Tensor:
        source, fake = batch[self.input_key], generated["fake"]
        adversarial = self.adversarial_term(lambda x: self.discriminate(source, x), fake)
        return adversarial + self.hparams.l1_weight * F.l1_loss(fake, batch[self.target_key])


def _pairing_problem(paired: Any) -> str | None:
    if paired is False:
        return (
            "model=pix2pix learns from aligned pairs, but data.paired=false; use model=cyclegan for unpaired data "
            "(or data.paired=true if the pairs are aligned)"
        )
    return None


class CycleGANTask(TranslationTask):
    """CycleGAN (Zhu et al. 2017): generators both ways, ``net`` (source -> target) and
    ``net_back`` (target -> source), each judged by a patch discriminator of its output domain
    (``discriminator``: target images, ``discriminator_back``: source images), tied by the
    cycle loss ``cycle_weight * (L1(F(G(x)), x) + L1(G(F(y)), y))`` and the identity loss
    ``identity_weight * (L1(G(y), y) + L1(F(x), x))``. The discriminators judge generated
    images drawn from pools of earlier ones (``pool_size``). Alignment of the training pairs is
    never used, so paired and unpaired data train alike. ``d_loss`` is the mean of both
    discriminators' losses; ``d_real``/``d_fake`` are the target discriminator's.

    Args:
        net_back: target -> source generator, ``(B, C_out, *spatial)`` -> ``(B, C_in, *spatial)``
            raw outputs, mapped into ``intensity_range``.
        discriminator_back: the source domain's patch discriminator.
        cycle_weight: the weight of the cycle loss.
        identity_weight: the weight of the identity loss; None: half of ``cycle_weight`` where
            source and target have as many channels, else 0 (non-zero is refused then).
        pool_size: generated images kept per pool (0: the discriminators see the newest only).
        **kwargs: see :class:`TranslationTask`.
    """

    injected = (*TranslationTask.injected, "net_back", "discriminator_back")
    generator_nets = ("net", "net_back")
    discriminator_nets = ("discriminator", "discriminator_back")

    def __init__(
        self,
        net: nn.Module,
        discriminator: nn.Module,
        net_back: nn.Module,
        discriminator_back: nn.Module,
        cycle_weight: float = 10.0,
        identity_weight: float | None = None,
        pool_size: int = 50,
        **kwargs: Any,
    ) -> None:
        same = kwargs.get("in_channels", 1) == kwargs.get("out_channels", 1)
        problem = _identity_problem(identity_weight, kwargs.get("in_channels", 1), kwargs.get("out_channels", 1))
        if problem:
            raise MedexpError(problem)
        if not cycle_weight >= 0:
            raise MedexpError(f"model.cycle_weight={cycle_weight}; expected a number >= 0")
        self.identity_weight = (0.5 * cycle_weight if same else 0.0) if identity_weight is None else identity_weight
        super().__init__(net, discriminator, **kwargs)
        self.net_back, self.discriminator_back = net_back, discriminator_back
        self.pools = (ImagePool(pool_size), ImagePool(pool_size))

    @classmethod
    def config_problems(cls, config: dict[str, Any]) -> list[str]:
        model, data = config.get("model") or {}, config.get("data") or {}
        problem = _identity_problem(model.get("identity_weight"), data.get("in_channels"), data.get("out_channels"))
        return [*super().config_problems(config), *([problem] if problem else [])]

    def back(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, C_out, *spatial)`` targets -> ``(B, C_in, *spatial)`` sources in their range."""
        return self.source_low + (self.source_high - self.source_low) * torch.sigmoid(self.net_back(y))

    def generate(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        source, target = batch[self.input_key], batch[self.target_key]
        fake, fake_back = self(source), self.back(target)
        generated = {"fake": fake, "fake_back": fake_back, "cycle": self.back(fake), "cycle_back": self(fake_back)}
        if self.identity_weight > 0:
            generated.update(same=self(target), same_back=self.back(source))
        # what the discriminators judge: from the pools of generated images in training
        pooled = (fake.detach(), fake_back.detach())
        if stage == "train":
            pooled = tuple(pool.query(images) for pool, images in zip(self.pools, pooled))
        return {**generated, "pooled": pooled[0], "pooled_back": pooled[1]}

    def discriminator_objective(
        self, batch: dict[str, torch.Tensor], generated: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, real, fake = self.critic_loss(self._judge, batch[self.target_key], generated["pooled"], stage)
        loss_back, _, _ = self.critic_loss(self._judge_back, batch[self.input_key], generated["pooled_back"], stage)
        return 0.5 * (loss + loss_back), real, fake

    def generator_objective(
        self, batch: dict[str, torch.Tensor], generated: dict[str, torch.Tensor], stage: str
    ) -> torch.Tensor:
        source, target = batch[self.input_key], batch[self.target_key]
        loss = self.adversarial_term(self._judge, generated["fake"])
        loss = loss + self.adversarial_term(self._judge_back, generated["fake_back"])
        cycle = F.l1_loss(generated["cycle"], source) + F.l1_loss(generated["cycle_back"], target)
        loss = loss + self.hparams.cycle_weight * cycle
        if self.identity_weight > 0:
            same = F.l1_loss(generated["same"], target) + F.l1_loss(generated["same_back"], source)
            loss = loss + self.identity_weight * same
        return loss

    def _judge(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.discriminator(images))

    def _judge_back(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.discriminator_back(images))


def _identity_problem(weight: float | None, in_channels: Any, out_channels: Any) -> str | None:
    if weight is not None and weight < 0:
        return f"model.identity_weight={weight}; expected a number >= 0 (or null: half of model.cycle_weight)"
    if weight and in_channels != out_channels:
        return (
            f"model.identity_weight={weight}: the identity loss feeds target images to the source's generator, but "
            f"data.in_channels={in_channels} and data.out_channels={out_channels} differ; set model.identity_weight=0"
        )
    return None
