"""Generative adversarial networks: a generator and a discriminator trained against each other."""

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


# model overrides that rebuild a GAN for generating alone: without the classifier that measured
# its samples (which may not be on this machine) and the metric that selected its checkpoints
GENERATE_ONLY = {"feature_ckpt": None, "monitor": "val/loss"}


class AdversarialTask(BaseTask):
    """A GAN: ``net`` (the generator) maps latent codes to images, ``discriminator`` tells
    real images from generated ones; both are trained with Lightning's manual optimisation,
    one discriminator step then one generator step per batch (non-saturating BCE losses).

    Class-conditional (``conditional=True``, binary or multi-class data): a one-hot class code is
    appended to the latent code, and to the discriminator's input as constant channels, so
    :meth:`sample` can generate images of a chosen class (e.g. for GAN-augmented training, see
    :mod:`medexp.data.generated`).

    Metrics of every stage: ``loss`` (the generator's), ``d_loss``, and the discriminator's mean
    output probability on real images ``d_real`` (D(x)) and on generated ones ``d_fake``
    (D(G(z))), the signal of the usual failure: a discriminator that wins outright (D(x) -> 1,
    D(G(z)) -> 0) leaves the generator no gradient; two such validation epochs in a row log a
    warning. Validation and test generate from a fixed seed. With ``feature_ckpt`` (a medexp
    classifier checkpoint), validation and test also compute ``domain_fid`` and ``domain_kid``
    between real and generated images on that classifier's features (see
    :mod:`medexp.metrics.domain`).

    Args:
        net: the generator, ``(B, latent_size [+ num_classes])`` -> ``(B, C, *spatial)`` raw
            outputs, mapped into ``intensity_range`` by a sigmoid.
        discriminator: ``(B, C [+ num_classes], *spatial)`` -> ``(B, 1)`` logits.
        latent_size: width of the latent code.
        conditional: condition both nets on the class.
        num_classes: the data's classes (used when ``conditional``).
        intensity_range: ``[low, high]`` of the data's image values.
        d_optimizer: the discriminator's partial optimiser; None uses ``optimizer`` for both.
        real_label: the discriminator's target for real images (< 1: one-sided label smoothing).
        feature_ckpt: a classifier checkpoint whose features measure sample quality, or None.
        kid_subset_size: images per KID subset (at most the validation and test split sizes).
        **kwargs: ``optimizer``, ``scheduler`` (stepped per epoch, for both nets), ``monitor``;
            see :class:`~medexp.tasks.base.BaseTask`.
    """

    data_tasks = ("binary", "multiclass", "multilabel")
    # the generator makes images: as many output channels as the data have
    net_outputs = "in_channels"
    injected = (*BaseTask.injected, "discriminator", "d_optimizer")
    # two backward passes per batch, each reaching one net: DDP must look for unused parameters
    ddp_strategy = "ddp_find_unused_parameters_true"
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
        d_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        real_label: float = 1.0,
        feature_ckpt: str | None = None,
        kid_subset_size: int = 50,
        monitor: str = "val/loss",
        **kwargs: Any,
    ) -> None:
        if latent_size < 1:
            raise MedexpError(f"model.latent_size={latent_size}; expected a positive integer")
        if not 0.5 < real_label <= 1.0:
            raise MedexpError(f"model.real_label={real_label}; expected a value in (0.5, 1]")
        low, high = (float(v) for v in intensity_range)
        if not high > low:
            raise MedexpError(f"model.intensity_range={list(intensity_range)}; expected [low, high] with high > low")
        if kid_subset_size < 2:
            raise MedexpError(f"model.kid_subset_size={kid_subset_size}; expected at least 2")
        self.conditional, self.num_classes, self.latent_size = conditional, num_classes, latent_size
        self.low, self.high = low, high
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

    # ------------------------------------------------------------------ steps
    def _labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return batch.get(self.target_key) if self.conditional else None

    def _adversarial_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        real = batch[self.input_key]
        size = real.shape[0]
        code = self.condition(self._labels(batch), real.device)
        generator = None if stage == "train" else self.eval_rng(real.device)
        z = torch.randn(size, self.latent_size, device=real.device, generator=generator)
        fake = self(z, code)
        real_logits, fake_logits = self.discriminate(real, code), self.discriminate(fake.detach(), code)
        d_loss = F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, self.hparams.real_label))
        d_loss = d_loss + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        if stage == "train":
            g_optimizer, d_optimizer = self.optimizers()
            # toggling: each backward reaches only the stepping net's parameters (DDP counts on it)
            self.toggle_optimizer(d_optimizer)
            d_optimizer.zero_grad()
            self.manual_backward(d_loss)
            d_optimizer.step()
            self.untoggle_optimizer(d_optimizer)
            self.toggle_optimizer(g_optimizer)
        # non-saturating: the generator maximises log D(G(z)) (in training through the updated D)
        gen_logits = self.discriminate(fake, code) if stage == "train" else fake_logits
        g_loss = F.binary_cross_entropy_with_logits(gen_logits, torch.ones_like(gen_logits))
        if stage == "train":
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
                    metric.update(torch.sigmoid(real_logits.detach()))
                case "d_fake":
                    metric.update(torch.sigmoid(fake_logits.detach()))
                case _:  # domain_fid, domain_kid
                    metric.update(real, real=True)
                    metric.update(fake.detach(), real=False)
        return g_loss.detach()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._adversarial_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._adversarial_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._adversarial_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        raise MedexpError("a GAN generates images rather than predicting on them: use `medexp sample ckpt_path=...`")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.hparams.feature_ckpt is None or datamodule is None or not hasattr(datamodule, "datasets"):
            return
        datamodule.setup(stage)
        sizes = {split: len(datamodule.datasets[split]) for split in ("val", "test") if split in datamodule.datasets}
        small = {split: size for split, size in sizes.items() if size < self.hparams.kid_subset_size}
        if small:
            raise MedexpError(
                f"model.kid_subset_size={self.hparams.kid_subset_size} but the split(s) {small} hold fewer images; "
                f"set model.kid_subset_size to at most {min(small.values())}"
            )

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return
        real, fake = (float(self.trainer.callback_metrics[f"val/{name}"]) for name in ("d_real", "d_fake"))
        self._collapsed_epochs = self._collapsed_epochs + 1 if real > COLLAPSE_REAL and fake < COLLAPSE_FAKE else 0
        if self._collapsed_epochs == COLLAPSE_EPOCHS and self.trainer.is_global_zero:
            log.warning(
                "the discriminator wins outright (val D(x)=%.3f, D(G(z))=%.3f for %d epochs): the generator gets "
                "almost no gradient; try a lower discriminator learning rate (model.d_optimizer), "
                "model.real_label=0.9, or a smaller discriminator",
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
        g_optimizer = self.optimizer_factory(params=self.finetuning.groups(self.net, prefix=""))
        self.finetuning.scale_groups(g_optimizer)
        d_optimizer = (self.d_optimizer_factory or self.optimizer_factory)(params=self.discriminator.parameters())
        if self.scheduler_factory is None:
            return [g_optimizer, d_optimizer]
        schedulers = [self.scheduler_factory(optimizer=g_optimizer), self.scheduler_factory(optimizer=d_optimizer)]
        if isinstance(schedulers[0], torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise MedexpError(
                "scheduler=plateau does not fit a GAN (no single loss to watch); use cosine, multistep or none"
            )
        return [g_optimizer, d_optimizer], schedulers
