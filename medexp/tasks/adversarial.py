"""Generative adversarial networks: a generator and a discriminator trained against each other.

:class:`GANBase` holds what every GAN shares (the manual optimisation loop: discriminator
step(s) then a generator step, the adversarial losses, the discriminator's optimiser, per-epoch
schedulers, the collapse warning); :class:`AdversarialTask` (a DCGAN, images from latent codes)
and the image-to-image translation tasks of :mod:`medexp.tasks.translation` extend it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from medexp.tasks.base import BaseTask
from medexp.utils.errors import MedexpError

log = logging.getLogger("medexp")


# validation epochs in a row with D(x) above and D(G(z)) below these before a collapse warning
COLLAPSE_REAL, COLLAPSE_FAKE, COLLAPSE_EPOCHS = 0.95, 0.05, 2

# model.adversarial_loss: non-saturating BCE, hinge, Wasserstein critic with gradient penalty
ADVERSARIAL_LOSSES = ("bce", "hinge", "wgan_gp")


# model overrides that rebuild a GAN for generating alone: without the classifier that measured
# its samples (which may not be on this machine) and the metric that selected its checkpoints
GENERATE_ONLY = {"feature_ckpt": None, "monitor": "val/loss"}


def discriminator_loss(
    kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor, real_label: float = 1.0
) -> torch.Tensor:
    """The discriminator's (critic's) loss on ``(B,)`` outputs for real and generated images.

    ``bce``: ``BCE(D(x), real_label) + BCE(D(G(z)), 0)``; ``hinge``: ``mean(relu(1 - D(x))) +
    mean(relu(1 + D(G(z))))``; ``wgan_gp``: ``mean(D(G(z))) - mean(D(x))`` (the gradient penalty
    is added by the caller, see :func:`gradient_penalty`).
    """
    match kind:
        case "bce":
            real = F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, real_label))
            return real + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        case "hinge":
            return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
        case "wgan_gp":
            return fake_logits.mean() - real_logits.mean()
        case _:
            raise MedexpError(f"model.adversarial_loss={kind!r}; expected one of {list(ADVERSARIAL_LOSSES)}")


def generator_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss on the discriminator's ``(B,)`` outputs for its images:
    ``bce``: non-saturating ``BCE(D(G(z)), 1)``; ``hinge`` and ``wgan_gp``: ``-mean(D(G(z)))``."""
    match kind:
        case "bce":
            return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
        case "hinge" | "wgan_gp":
            return -fake_logits.mean()
        case _:
            raise MedexpError(f"model.adversarial_loss={kind!r}; expected one of {list(ADVERSARIAL_LOSSES)}")


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WGAN-GP's penalty ``mean((||grad critic(x_hat)||_2 - 1)^2)`` at random points ``x_hat``
    between ``(B, C, *spatial)`` real and generated images (one mixing weight per sample), so
    the critic stays 1-Lipschitz (Gulrajani et al. 2017). Differentiable (for the critic's step).
    """
    shape = (real.shape[0],) + (1,) * (real.ndim - 1)
    weight = torch.rand(shape, device=real.device, dtype=real.dtype, generator=generator)
    mixed = (weight * real.detach() + (1 - weight) * fake.detach()).requires_grad_(True)
    with torch.enable_grad():
        scores = critic(mixed)
        (grads,) = torch.autograd.grad(scores.sum(), mixed, create_graph=torch.is_grad_enabled())
    return (grads.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


class ImagePool:
    """A history of generated images for the discriminator (Shrivastava et al. 2017, as in
    CycleGAN): it sees earlier generators' images too, which damps oscillation.

    Each query returns, per image, the new one or (with probability 1/2 once the pool is full)
    a stored one that the new image replaces. ``size`` 0: the new images unchanged.
    """

    def __init__(self, size: int) -> None:
        if size < 0:
            raise MedexpError(f"model.pool_size={size}; expected an integer >= 0")
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` new images (detached) -> ``(B, C, *spatial)`` images to judge."""
        if self.size == 0:
            return images
        served = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                served.append(image)
            elif torch.rand(()) < 0.5:
                index = int(torch.randint(len(self.images), ()))
                served.append(self.images[index])
                self.images[index] = image.clone()
            else:
                served.append(image)
        return torch.stack(served)


class GANBase(BaseTask):
    """What every GAN task shares: Lightning's manual optimisation of a generator and its
    discriminator(s), one batch = ``n_critic`` discriminator steps then one generator step,
    each backward reaching only the stepping nets (optimiser toggling, which DDP counts on).

    Subclasses implement :meth:`generate` (the generator's images of a batch, computed once),
    :meth:`discriminator_objective` and :meth:`generator_objective` (losses on them), and
    :meth:`update_quality` (their own metrics), and name their nets in :attr:`generator_nets`
    and :attr:`discriminator_nets`: the generator optimiser (``optimizer``) steps the first,
    the discriminator optimiser (``d_optimizer``) the second.

    Metrics of every stage: ``loss`` (the generator's total), ``d_loss``, and the
    discriminator's mean output on real images ``d_real`` and on generated ones ``d_fake``:
    probabilities for ``bce`` (two validation epochs in a row with D(x) > 0.95 and D(G(z)) <
    0.05 log a warning: the generator then gets no gradient), raw critic scores for ``hinge``
    and ``wgan_gp``. Validation and test leave the gradient penalty out of ``d_loss`` (it needs
    gradients). With ``feature_ckpt`` (a medexp classifier checkpoint), validation and test
    also log ``domain_fid`` and ``domain_kid`` of generated against real images on that
    classifier's features (see :mod:`medexp.metrics.domain`); subclasses set ``self.low`` and
    ``self.high`` (the generated images' range) before calling this constructor.

    Args:
        net: the generator.
        discriminator: ``(B, C, *spatial)`` -> logits ``(B, 1)`` or a map of patch logits.
        adversarial_loss: ``bce`` (non-saturating), ``hinge`` or ``wgan_gp`` (see
            :func:`discriminator_loss`, :func:`generator_loss`).
        gp_weight: the weight of the gradient penalty of ``wgan_gp``.
        n_critic: discriminator steps per generator step (WGAN-GP's usual 5); on the same batch.
        d_optimizer: the discriminator's partial optimiser; None uses ``optimizer`` for both.
        real_label: the ``bce`` discriminator's target for real images (< 1: one-sided smoothing).
        feature_ckpt: a classifier checkpoint whose features measure generated images, or None.
        kid_subset_size: images per KID subset (at most the validation and test split sizes).
        **kwargs: ``optimizer``, ``scheduler`` (stepped per epoch, for both optimisers),
            ``monitor``; see :class:`~medexp.tasks.base.BaseTask`.
    """

    injected = (*BaseTask.injected, "discriminator", "d_optimizer")
    # two backward passes per batch, each reaching some nets: DDP must look for unused parameters
    ddp_strategy = "ddp_find_unused_parameters_true"
    # attribute names of the nets each optimiser steps
    generator_nets: tuple[str, ...] = ("net",)
    discriminator_nets: tuple[str, ...] = ("discriminator",)
    low, high = 0.0, 1.0

    def __init__(
        self,
        net: nn.Module,
        discriminator: nn.Module,
        adversarial_loss: str = "bce",
        gp_weight: float = 10.0,
        n_critic: int = 1,
        d_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        real_label: float = 1.0,
        feature_ckpt: str | None = None,
        kid_subset_size: int = 50,
        monitor: str = "val/loss",
        **kwargs: Any,
    ) -> None:
        if adversarial_loss not in ADVERSARIAL_LOSSES:
            raise MedexpError(
                f"model.adversarial_loss={adversarial_loss!r}; expected one of {list(ADVERSARIAL_LOSSES)}"
            )
        if not gp_weight >= 0:
            raise MedexpError(f"model.gp_weight={gp_weight}; expected a number >= 0")
        if isinstance(n_critic, bool) or not isinstance(n_critic, int) or n_critic < 1:
            raise MedexpError(
                f"model.n_critic={n_critic!r}; expected a positive integer (discriminator steps per batch)"
            )
        if not 0.5 < real_label <= 1.0:
            raise MedexpError(f"model.real_label={real_label}; expected a value in (0.5, 1]")
        if kid_subset_size < 2:
            raise MedexpError(f"model.kid_subset_size={kid_subset_size}; expected at least 2")
        self.adversarial_loss = adversarial_loss
        super().__init__(net, monitor=monitor, **kwargs)
        self.automatic_optimization = False  # two optimisers, stepped in turn
        self.discriminator = discriminator
        self.d_optimizer_factory = d_optimizer
        # training has no fixed set of generated images to compare: adversarial metrics only
        self.train_metrics = self._adversarial_metrics().clone(prefix="train/")
        self._collapsed_epochs = 0

    @staticmethod
    def _adversarial_metrics() -> MetricCollection:
        return MetricCollection({"d_loss": MeanMetric(), "d_real": MeanMetric(), "d_fake": MeanMetric()})

    def configure_metrics(self) -> MetricCollection:
        metrics = self._adversarial_metrics()
        if self.hparams.feature_ckpt is not None:
            from medexp.metrics.domain import DomainFeatures, quality_metrics

            features = DomainFeatures.from_checkpoint(self.hparams.feature_ckpt, self.low, self.high)
            metrics.add_metrics(quality_metrics(features, self.hparams.kid_subset_size))
        return metrics

    # ------------------------------------------------------------------ what subclasses define
    def generate(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """The generator's images of a batch (with their graph in training), computed once."""
        raise NotImplementedError

    def discriminator_objective(
        self, batch: dict[str, torch.Tensor], generated: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The discriminators' loss, and their ``(B,)`` outputs on real and generated images
        (for ``d_real``, ``d_fake``); see :meth:`critic_loss`."""
        raise NotImplementedError

    def generator_objective(
        self, batch: dict[str, torch.Tensor], generated: dict[str, torch.Tensor], stage: str
    ) -> torch.Tensor:
        """The generators' total loss (adversarial, see :meth:`adversarial_term`, plus any other)."""
        raise NotImplementedError

    def update_quality(
        self, name: str, metric: Any, batch: dict[str, torch.Tensor], generated: dict[str, torch.Tensor]
    ) -> None:
        """Feed metric ``name`` (other than the adversarial ones) with a batch's images."""
        raise NotImplementedError

    # ------------------------------------------------------------------ losses
    def critic_loss(
        self,
        critic: Callable[[torch.Tensor], torch.Tensor],
        real: torch.Tensor,
        fake: torch.Tensor,
        stage: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One discriminator's loss on real and (detached) generated inputs, with the gradient
        penalty of ``wgan_gp`` in training; and its ``(B,)`` mean outputs on each.

        Args:
            critic: ``(B, C, *spatial)`` -> logits of any shape ``(B, ...)`` (patch maps too).
        """
        real_logits, fake_logits = critic(real), critic(fake.detach())
        loss = discriminator_loss(self.adversarial_loss, real_logits, fake_logits, self.hparams.real_label)
        if self.adversarial_loss == "wgan_gp" and stage == "train" and self.hparams.gp_weight > 0:
            loss = loss + self.hparams.gp_weight * gradient_penalty(critic, real, fake)
        return loss, _per_sample(real_logits), _per_sample(fake_logits)

    def adversarial_term(self, critic: Callable[[torch.Tensor], torch.Tensor], fake: torch.Tensor) -> torch.Tensor:
        """The generator's adversarial loss against ``critic`` on its images ``fake``."""
        return generator_loss(self.adversarial_loss, critic(fake))

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Discriminator outputs as logged in ``d_real``/``d_fake``: probabilities for ``bce``,
        raw critic scores otherwise (they have no probability meaning)."""
        return torch.sigmoid(logits) if self.adversarial_loss == "bce" else logits

    # ------------------------------------------------------------------ steps
    def _adversarial_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        train = stage == "train"
        size = batch[self.input_key].shape[0]
        generated = self.generate(batch, stage)
        if train:
            g_optimizer, d_optimizer = self.optimizers()
        for _ in range(self.hparams.n_critic if train else 1):
            d_loss, real_logits, fake_logits = self.discriminator_objective(batch, generated, stage)
            if train:
                # toggling: each backward reaches only the stepping nets' parameters (DDP counts on it)
                self.toggle_optimizer(d_optimizer)
                d_optimizer.zero_grad()
                self.manual_backward(d_loss)
                d_optimizer.step()
                self.untoggle_optimizer(d_optimizer)
        if train:
            self.toggle_optimizer(g_optimizer)
        # in training through the updated discriminator
        g_loss = self.generator_objective(batch, generated, stage)
        if train:
            g_optimizer.zero_grad()
            self.manual_backward(g_loss)
            g_optimizer.step()
            self.untoggle_optimizer(g_optimizer)
        getattr(self, f"{stage}_loss").update(g_loss.detach(), weight=size)
        metrics = getattr(self, f"{stage}_metrics")
        for name, metric in metrics.items(keep_base=True):
            match name:
                case "d_loss":
                    metric.update(d_loss.detach(), weight=size)
                case "d_real":
                    metric.update(self.score(real_logits.detach()))
                case "d_fake":
                    metric.update(self.score(fake_logits.detach()))
                case _:
                    self.update_quality(name, metric, batch, {k: v.detach() for k, v in generated.items()})
        return g_loss.detach()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._adversarial_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._adversarial_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._adversarial_step(batch, "test")

    def setup(self, stage: str) -> None:
        if self.hparams.feature_ckpt is not None:
            from medexp.metrics.domain import check_kid_subsets

            check_kid_subsets(self.trainer, stage, self.hparams.kid_subset_size)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking or self.trainer.state.fn != "fit" or self.adversarial_loss != "bce":
            return
        real, fake = (float(self.trainer.callback_metrics[f"val/{name}"]) for name in ("d_real", "d_fake"))
        self._collapsed_epochs = self._collapsed_epochs + 1 if real > COLLAPSE_REAL and fake < COLLAPSE_FAKE else 0
        if self._collapsed_epochs == COLLAPSE_EPOCHS and self.trainer.is_global_zero:
            log.warning(
                "the discriminator wins outright (val D(x)=%.3f, D(G(z))=%.3f for %d epochs): the generator gets "
                "almost no gradient; try a lower discriminator learning rate (model.d_optimizer), "
                "model.real_label=0.9, model.adversarial_loss=hinge, or a smaller discriminator",
                real,
                fake,
                COLLAPSE_EPOCHS,
            )

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # manual optimisation: schedulers are stepped here, once per epoch
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()

    def configure_optimizers(self) -> Any:
        main, *others = (getattr(self, name) for name in self.generator_nets)
        params = self.finetuning.groups(main, prefix="")
        if others:  # further generators (CycleGAN's way back) join the generator optimiser
            extra = [p for module in others for p in module.parameters()]
            params = [*params, {"params": extra}] if isinstance(params, list) else [*params, *extra]
        g_optimizer = self.optimizer_factory(params=params)
        self.finetuning.scale_groups(g_optimizer)
        d_params = [p for name in self.discriminator_nets for p in getattr(self, name).parameters()]
        d_optimizer = (self.d_optimizer_factory or self.optimizer_factory)(params=d_params)
        if self.scheduler_factory is None:
            return [g_optimizer, d_optimizer]
        schedulers = [self.scheduler_factory(optimizer=g_optimizer), self.scheduler_factory(optimizer=d_optimizer)]
        if isinstance(schedulers[0], torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise MedexpError(
                "scheduler=plateau does not fit a GAN (no single loss to watch); use cosine, multistep or none"
            )
        return [g_optimizer, d_optimizer], schedulers


def _per_sample(logits: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` logits (a PatchDiscriminator's map) -> ``(B,)`` their means."""
    return logits.reshape(logits.shape[0], -1).mean(dim=1)


class AdversarialTask(GANBase):
    """A GAN: ``net`` (the generator) maps latent codes to images, ``discriminator`` tells
    real images from generated ones (see :class:`GANBase` for the training loop, the losses
    and the metrics).

    Class-conditional (``conditional=True``, binary or multi-class data): a one-hot class code is
    appended to the latent code, and to the discriminator's input as constant channels, so
    :meth:`sample` can generate images of a chosen class (e.g. for GAN-augmented training, see
    :mod:`medexp.data.generated`). Validation and test generate from a fixed seed.

    Args:
        net: the generator, ``(B, latent_size [+ num_classes])`` -> ``(B, C, *spatial)`` raw
            outputs, mapped into ``intensity_range`` by a sigmoid.
        discriminator: ``(B, C [+ num_classes], *spatial)`` -> ``(B, 1)`` logits.
        latent_size: width of the latent code.
        conditional: condition both nets on the class.
        num_classes: the data's classes (used when ``conditional``).
        intensity_range: ``[low, high]`` of the data's image values.
        **kwargs: ``adversarial_loss``, ``gp_weight``, ``n_critic``, ``d_optimizer``,
            ``real_label``, ``feature_ckpt``, ``kid_subset_size`` (see :class:`GANBase`),
            ``optimizer``, ``scheduler``, ``monitor`` (see :class:`~medexp.tasks.base.BaseTask`).
    """

    data_tasks = ("binary", "multiclass", "multilabel")
    # the generator makes images: as many output channels as the data have
    net_outputs = "in_channels"
    generator_overrides = GENERATE_ONLY
    # what it does besides training (see BaseTask): it generates images, it has none to predict on
    not_predicted = "a GAN generates images rather than predicting on them: use `medexp sample ckpt_path=...`"
    not_exported = (
        "cannot export a GAN ({target}): it generates images from random codes and has no image input to predict "
        "on; generate images with: medexp sample ckpt_path=... Exportable: {supported}"
    )

    def __init__(
        self,
        net: nn.Module,
        discriminator: nn.Module,
        latent_size: int = 64,
        conditional: bool = False,
        num_classes: int = 2,
        intensity_range: Sequence[float] = (0.0, 1.0),
        **kwargs: Any,
    ) -> None:
        if latent_size < 1:
            raise MedexpError(f"model.latent_size={latent_size}; expected a positive integer")
        self.low, self.high = check_range(intensity_range, "model.intensity_range")
        self.conditional, self.num_classes, self.latent_size = conditional, num_classes, latent_size
        super().__init__(net, discriminator, **kwargs)

    # ------------------------------------------------------------------ generation
    def condition(self, labels: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """``(B,)`` class indices -> ``(B, num_classes)`` one-hot codes; None when unconditional."""
        if not self.conditional:
            return None
        if labels is None:
            raise MedexpError("this GAN is class-conditional: give the classes of the images to generate")
        return F.one_hot(labels.long().to(device), self.num_classes).float()

    def forward(self, z: torch.Tensor, code: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, latent_size)`` latent codes (and ``(B, num_classes)`` class codes) -> ``(B, C,
        *spatial)`` images in ``intensity_range``."""
        inputs = z if code is None else torch.cat([z, code], dim=1)
        return self.low + (self.high - self.low) * torch.sigmoid(self.net(inputs))

    def discriminate(self, images: torch.Tensor, code: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, *spatial)`` images -> ``(B,)`` logits of being real."""
        if code is not None:  # class code as constant channels
            maps = code.reshape(*code.shape, *(1,) * (images.ndim - 2)).expand(-1, -1, *images.shape[2:])
            images = torch.cat([images, maps], dim=1)
        return self.discriminator(images).reshape(images.shape[0])

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` generated images ``(n, C, *spatial)`` on the CPU, and their classes.

        Args:
            labels: ``(n,)`` classes of a conditional GAN; None cycles through the classes.
            generator: the source of the latent codes (CPU), for reproducible samples.
        """
        if self.conditional and labels is None:
            labels = torch.arange(n) % self.num_classes
        was_training = self.training
        self.eval()
        images = []
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            z = torch.randn(count, self.latent_size, generator=generator).to(self.device)
            part = None if labels is None else labels[start : start + count]
            images.append(self(z, self.condition(part, self.device)).cpu())
        self.train(was_training)
        return torch.cat(images), labels

    # ------------------------------------------------------------------ the GAN's parts
    def generate(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        real = batch[self.input_key]
        code = self.condition(batch.get(self.target_key) if self.conditional else None, real.device)
        generator = None if stage == "train" else self.eval_rng(real.device)
        z = torch.randn(real.shape[0], self.latent_size, device=real.device, generator=generator)
        return {"fake": self(z, code), **({"code": code} if code is not None else {})}

    def discriminator_objective(
        self, batch: dict[str, torch.Tensor], generated: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        code = generated.get("code")
        return self.critic_loss(lambda x: self.discriminate(x, code), batch[self.input_key], generated["fake"], stage)

    def generator_objective(
        self, batch: dict[str, torch.Tensor], generated: dict[str, torch.Tensor], stage: str
    ) -> torch.Tensor:
        code = generated.get("code")
        return self.adversarial_term(lambda x: self.discriminate(x, code), generated["fake"])

    def update_quality(
        self, name: str, metric: Any, batch: dict[str, torch.Tensor], generated: dict[str, torch.Tensor]
    ) -> None:
        # domain_fid, domain_kid
        metric.update(batch[self.input_key], real=True)
        metric.update(generated["fake"], real=False)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        raise MedexpError("a GAN generates images rather than predicting on them: use `medexp sample ckpt_path=...`")


def check_range(values: Sequence[float], key: str) -> tuple[float, float]:
    """``[low, high]`` of a config key, checked."""
    low, high = (float(v) for v in values)
    if not high > low:
        raise MedexpError(f"{key}={list(values)}; expected [low, high] with high > low")
    return low, high
