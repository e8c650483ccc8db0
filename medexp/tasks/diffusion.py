"""Denoising diffusion models: a U-Net learns to undo Gaussian noise; sampling runs the chain
from pure noise back to an image (DDPM, all steps) or jumps along it (DDIM, a few steps)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from medexp.tasks.base import BaseTask
from medexp.utils.errors import MedexpError

log = logging.getLogger("medexp")

PREDICTION_TYPES = ("epsilon", "v_prediction")
SAMPLERS = ("ddim", "ddpm")

# model overrides that rebuild a diffusion model for generating alone: without the classifier that
# measured its samples (which may not be on this machine) and the metric that selected its checkpoints
GENERATE_ONLY = {"feature_ckpt": None, "monitor": "val/loss"}


class DiffusionTask(BaseTask):
    """A denoising diffusion probabilistic model (DDPM, Ho et al. 2020) on MONAI's
    ``DiffusionModelUNet`` and noise schedulers.

    Training: images are mapped from ``intensity_range`` to [-1, 1], noised to a random
    timestep ``t`` by ``noise_scheduler`` (``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e``), and the
    net learns, by mean squared error, the noise ``e`` (``prediction_type=epsilon``) or the
    velocity ``v = sqrt(a_t) e - sqrt(1 - a_t) x_0`` (``v_prediction``). Validation and test
    draw their noise and timesteps from a fixed seed, so ``val/loss`` is deterministic.

    Class-conditional (``conditional=True``): the net's class embedding holds ``num_classes + 1``
    entries, the last a "null" class that replaces the true one with probability
    ``cond_drop_prob`` in training, so the same net also learns unconditional generation and
    sampling can apply classifier-free guidance: ``out = uncond + guidance_scale * (cond - uncond)``
    (1 = plain conditional sampling, > 1 = more typical images of the class, less diversity). An
    unconditional model always gets the null class.

    Sampling (:meth:`sample`, ``medexp sample``, ``data.generated``, sample grids): ``sampler=ddim``
    (deterministic, ``sample_steps`` evenly spaced steps ending at the last training timestep)
    or ``ddpm`` (every training timestep, stochastic). With ``feature_ckpt`` (a medexp classifier
    checkpoint) validation and test also sample a batch per real batch (DDIM, ``val_sample_steps``)
    and log ``domain_fid`` and ``domain_kid`` (see :mod:`medexp.metrics.domain`). With
    ``callbacks.ema.decay`` set, validation, test, the checkpoints and therefore every sampling
    from a checkpoint use the averaged weights.

    Args:
        net: ``(B, C, *spatial)`` noisy images, ``(B,)`` timesteps and ``(B,)`` classes ->
            ``(B, C, *spatial)`` predicted noise or velocity; its ``num_class_embeds`` must be
            ``num_classes + 1``.
        noise_scheduler: a MONAI ``DDPMScheduler``: the noise schedule of training, and the
            ``ddpm`` sampler.
        ddim_scheduler: a MONAI ``DDIMScheduler`` on the same schedule: the ``ddim`` sampler.
        prediction_type: ``epsilon`` or ``v_prediction`` (the schedulers' must agree).
        image_size: pixels (voxels) per side of the images to generate.
        conditional: condition the net on the class.
        num_classes: the data's classes.
        cond_drop_prob: probability of training with the null class instead of the true one.
        guidance_scale: classifier-free guidance at sampling (conditional only; 1 = off).
        sampler: ``ddim`` or ``ddpm``.
        sample_steps: DDIM steps of :meth:`sample`.
        val_sample_steps: DDIM steps of the samples that validation and test measure.
        intensity_range: ``[low, high]`` of the data's image values.
        feature_ckpt: a classifier checkpoint whose features measure sample quality, or None.
        kid_subset_size: images per KID subset (at most the validation and test split sizes).
        **kwargs: ``optimizer``, ``scheduler`` (the learning rate's), ``monitor``; see
            :class:`~medexp.tasks.base.BaseTask`.
    """

    data_tasks = ("binary", "multiclass", "multilabel")
    # the net predicts noise (velocity) of the images: as many output channels as the data have
    net_outputs = "in_channels"
    injected = (*BaseTask.injected, "noise_scheduler", "ddim_scheduler")
    generator_overrides = GENERATE_ONLY
    # the name messages use (`medexp sample`, data.generated)
    generator_kind = "diffusion model"
    not_predicted = (
        "a diffusion model generates images rather than predicting on them: use `medexp sample ckpt_path=...`"
    )
    not_exported = (
        "cannot export a diffusion model ({target}): it generates images from noise over many steps and has no "
        "image input to predict on; generate images with: medexp sample ckpt_path=... Exportable: {supported}"
    )

    def __init__(
        self,
        net: nn.Module,
        noise_scheduler: nn.Module,
        ddim_scheduler: nn.Module,
        prediction_type: str = "epsilon",
        image_size: int = 32,
        conditional: bool = False,
        num_classes: int = 2,
        cond_drop_prob: float = 0.1,
        guidance_scale: float = 1.0,
        sampler: str = "ddim",
        sample_steps: int = 50,
        val_sample_steps: int = 10,
        intensity_range: Sequence[float] = (0.0, 1.0),
        feature_ckpt: str | None = None,
        kid_subset_size: int = 50,
        monitor: str = "val/loss",
        **kwargs: Any,
    ) -> None:
        problems = option_problems(
            {
                "prediction_type": prediction_type,
                "sampler": sampler,
                "conditional": conditional,
                "cond_drop_prob": cond_drop_prob,
                "guidance_scale": guidance_scale,
            }
        )
        if problems:
            raise MedexpError(problems[0])
        low, high = (float(v) for v in intensity_range)
        if not high > low:
            raise MedexpError(f"model.intensity_range={list(intensity_range)}; expected [low, high] with high > low")
        steps = noise_scheduler.num_train_timesteps
        for name, scheduler in (("noise_scheduler", noise_scheduler), ("ddim_scheduler", ddim_scheduler)):
            if scheduler.prediction_type != prediction_type:
                raise MedexpError(
                    f"model.{name}.prediction_type={scheduler.prediction_type!r} but model.prediction_type="
                    f"{prediction_type!r}; they must agree (the YAML interpolates ${{model.prediction_type}})"
                )
        if ddim_scheduler.num_train_timesteps != steps or not torch.allclose(
            ddim_scheduler.alphas_cumprod, noise_scheduler.alphas_cumprod
        ):
            raise MedexpError(
                "model.ddim_scheduler has another noise schedule than model.noise_scheduler; give it the same "
                "num_train_timesteps, schedule and beta range"
            )
        for name, value in (("sample_steps", sample_steps), ("val_sample_steps", val_sample_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= steps:
                raise MedexpError(
                    f"model.{name}={value!r}; expected a whole number of DDIM steps in 1..{steps} "
                    "(the noise scheduler's num_train_timesteps)"
                )
        embeds = getattr(net, "num_class_embeds", None)
        if embeds != num_classes + 1:
            raise MedexpError(
                f"model.net.num_class_embeds={embeds}; expected data.num_classes + 1 = {num_classes + 1} "
                "(the classes and the null class of classifier-free guidance)"
            )
        if kid_subset_size < 2:
            raise MedexpError(f"model.kid_subset_size={kid_subset_size}; expected at least 2")
        self.conditional, self.num_classes, self.low, self.high = conditional, num_classes, low, high
        super().__init__(net, monitor=monitor, **kwargs)
        # modules without weights or buffers (nothing in the checkpoints): their tables are moved
        # to the images' device on use
        self.noise_scheduler, self.ddim_scheduler = noise_scheduler, ddim_scheduler
        # training has no fixed set of samples to compare: its loss only
        self.train_metrics = MetricCollection({}, prefix="train/")

    @classmethod
    def config_problems(cls, config: dict[str, Any]) -> list[str]:
        """The options checked before anything is built (MONAI's schedulers would refuse an
        unknown prediction type with a longer message; the net a size it cannot halve)."""
        model, data = config.get("model") or {}, config.get("data") or {}
        problems = option_problems(model)
        total = (model.get("noise_scheduler") or {}).get("num_train_timesteps")
        for name in ("sample_steps", "val_sample_steps"):
            value = model.get(name)
            if isinstance(total, int) and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= total
            ):
                problems.append(
                    f"model.{name}={value!r}; expected a whole number of DDIM steps in 1..{total} "
                    "(model.noise_scheduler.num_train_timesteps)"
                )
        channels = (model.get("net") or {}).get("channels")
        size = data.get("image_size")
        if isinstance(channels, list) and isinstance(size, int):
            factor = 2 ** (len(channels) - 1)
            if size % factor:
                problems.append(
                    f"data.image_size={size}; the net (model.net.channels={channels}) halves the images "
                    f"{len(channels) - 1}x: use a multiple of {factor}, or fewer levels"
                )
        if model.get("conditional") and data.get("task") == "multilabel":
            problems.append("model.conditional=true needs binary or multi-class data (one class per image)")
        return problems

    def configure_metrics(self) -> MetricCollection:
        metrics = MetricCollection({})
        if self.hparams.feature_ckpt is not None:
            from medexp.metrics.domain import DomainFeatures, quality_metrics

            features = DomainFeatures.from_checkpoint(self.hparams.feature_ckpt, self.low, self.high)
            metrics.add_metrics(quality_metrics(features, self.hparams.kid_subset_size))
        return metrics

    # ------------------------------------------------------------------ scaling
    def to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        """Images in ``intensity_range`` -> [-1, 1], the range the noise schedule assumes."""
        return (images - self.low) * (2.0 / (self.high - self.low)) - 1.0

    def to_data_range(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> ``intensity_range`` (clipped)."""
        return (self.low + (x + 1.0) * (0.5 * (self.high - self.low))).clamp(self.low, self.high)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the net learns to predict for ``(B, C, *spatial)`` clean images ``x0`` noised with
        ``noise`` to ``(B,)`` timesteps: the noise, or the velocity."""
        if self.hparams.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, timesteps)
        return noise

    def class_labels(
        self, labels: torch.Tensor | None, size: int, device: torch.device, drop: bool = False
    ) -> torch.Tensor:
        """``(B,)`` class indices for the net: the null class (``num_classes``) when unconditional,
        and, with ``drop``, in place of a fraction ``cond_drop_prob`` of the classes."""
        null = torch.full((size,), self.num_classes, dtype=torch.long, device=device)
        if not self.conditional:
            return null
        if labels is None:
            raise MedexpError("this diffusion model is class-conditional: give the classes of the images to generate")
        labels = labels.to(device)
        if labels.ndim != 1:
            raise MedexpError(
                f"model.conditional=true needs one class per image; the labels have shape {tuple(labels.shape)}"
            )
        labels = labels.long()
        if drop and self.hparams.cond_drop_prob > 0:
            labels = torch.where(torch.rand(size, device=device) < self.hparams.cond_drop_prob, null, labels)
        return labels

    # ------------------------------------------------------------------ generation
    def predict_output(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float) -> torch.Tensor:
        """The net's prediction for ``(B, C, *spatial)`` noisy images at ``(B,)`` timesteps, with
        classifier-free guidance when ``guidance != 1``."""
        if guidance == 1.0 or not self.conditional:
            return self(x, timesteps=t, class_labels=labels)
        null = torch.full_like(labels, self.num_classes)
        both = self(torch.cat([x, x]), timesteps=torch.cat([t, t]), class_labels=torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    def generate(
        self,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """Run the reverse chain for ``(B,)`` net class indices (see :meth:`class_labels`) on
        this model's device: ``(B, C, *spatial)`` images in [-1, 1].

        Args:
            generator: the source of the starting noise (and of DDPM's noise per step): on the CPU
                or on this model's device.
            sampler, steps, guidance: override ``sampler``, ``sample_steps``, ``guidance_scale``.
        """
        sampler = sampler or self.hparams.sampler
        guidance = self.hparams.guidance_scale if guidance is None else guidance
        device = self.device
        shape = (labels.shape[0], self.net.in_channels, *(self.hparams.image_size,) * self.spatial_dims)
        on_device = generator is not None and generator.device == device
        x = torch.randn(shape, generator=generator, device=device if on_device else "cpu").to(device)
        if sampler == "ddpm":
            scheduler = self.noise_scheduler
            scheduler.set_timesteps(scheduler.num_train_timesteps)
            timesteps = scheduler.timesteps.tolist()
            # each step adds noise on the device: from a generator there, seeded by the given one
            step_generator = generator if on_device or generator is None else torch.Generator(device)
            if step_generator is not generator:
                step_generator.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        else:
            scheduler = self.ddim_scheduler
            total = scheduler.num_train_timesteps
            steps = steps or self.hparams.sample_steps
            scheduler.set_timesteps(steps)
            # evenly spaced from the last training timestep, each step the scheduler's stride
            # (T // steps); the last step's prediction of the clean image is the sample
            timesteps = list(range(total - 1, -1, -(total // steps)))[:steps]
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
        predicted = x
        for t in timesteps:
            output = self.predict_output(
                x, torch.full((shape[0],), t, device=device, dtype=torch.long), labels, guidance
            )
            if sampler == "ddpm":
                x, predicted = scheduler.step(output, t, x, generator=step_generator)
            else:
                x, predicted = scheduler.step(output, t, x)
        return x if sampler == "ddpm" else predicted.clamp(-1.0, 1.0)

    @property
    def spatial_dims(self) -> int:
        """2 or 3, from the net's first convolution."""
        return self.net.conv_in.conv.weight.ndim - 2

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 64,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` generated images ``(n, C, *spatial)`` in ``intensity_range`` on the CPU, and their
        classes (as :meth:`medexp.tasks.adversarial.AdversarialTask.sample`).

        Args:
            labels: ``(n,)`` classes of a conditional model; None cycles through the classes.
            generator: a CPU generator: the same seed gives the same images.
            batch_size: images generated together.
        """
        if self.conditional and labels is None:
            labels = torch.arange(n) % self.num_classes
        was_training = self.training
        self.eval()
        images = []
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            part = None if labels is None else labels[start : start + count]
            net_labels = self.class_labels(part, count, self.device)
            images.append(self.to_data_range(self.generate(net_labels, generator)).cpu())
        self.train(was_training)
        return torch.cat(images), labels

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        real = batch[self.input_key]
        size, device = real.shape[0], real.device
        x0 = self.to_model_range(real)
        generator = None if stage == "train" else self.eval_rng(device)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        total = self.noise_scheduler.num_train_timesteps
        t = torch.randint(0, total, (size,), generator=generator, device=device)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        labels = batch.get(self.target_key) if self.conditional else None
        output = self(noisy, timesteps=t, class_labels=self.class_labels(labels, size, device, drop=stage == "train"))
        loss = F.mse_loss(output.float(), self.target(x0, noise, t).float())
        if stage == "train" and self.sharpness_pass:
            return loss  # SAM's second pass (medexp.tasks.sharpness): counted once, in the first
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=size)
        metrics = getattr(self, f"{stage}_metrics")
        if stage != "train" and len(metrics):  # domain_fid, domain_kid of a batch of samples
            net_labels = self.class_labels(labels, size, device)
            fake = self.to_data_range(
                self.generate(net_labels, generator, sampler="ddim", steps=self.hparams.val_sample_steps)
            )
            for metric in metrics.values():
                metric.update(real, real=True)
                metric.update(fake, real=False)
        return loss

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        raise MedexpError(self.not_predicted)

    def setup(self, stage: str) -> None:
        if self.hparams.feature_ckpt is not None:
            from medexp.metrics.domain import check_kid_subsets

            check_kid_subsets(self.trainer, stage, self.hparams.kid_subset_size)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        from lightning.pytorch.callbacks import WeightAveraging

        # callbacks.ema (medexp.callbacks.averaging.EMA) is off with decay=None
        averaging = [c for c in self.trainer.callbacks if isinstance(c, WeightAveraging)]
        if not any(getattr(c, "decay", True) is not None for c in averaging):
            log.info(
                "model=ddpm without callbacks.ema.decay: samples come from the raw weights; an exponential moving "
                "average (callbacks.ema.decay=0.999, or experiment=breast_ddpm) usually gives cleaner samples"
            )


def option_problems(model: dict[str, Any]) -> list[str]:
    """The string and number options of ``model`` (a diffusion model's config) that are wrong."""
    problems = []
    prediction_type = model.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        problems.append(f"model.prediction_type={prediction_type!r}; expected one of {list(PREDICTION_TYPES)}")
    sampler = model.get("sampler", "ddim")
    if sampler not in SAMPLERS:
        problems.append(f"model.sampler={sampler!r}; expected one of {list(SAMPLERS)}")
    drop = model.get("cond_drop_prob", 0.1)
    if isinstance(drop, bool) or not isinstance(drop, int | float) or not 0 <= drop < 1:
        problems.append(f"model.cond_drop_prob={drop!r}; expected a probability in [0, 1)")
    guidance = model.get("guidance_scale", 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, int | float) or guidance < 0:
        problems.append(f"model.guidance_scale={guidance!r}; expected a number >= 0 (1 = no guidance)")
    elif guidance != 1 and not model.get("conditional", False):
        problems.append(f"model.guidance_scale={guidance}: classifier-free guidance needs model.conditional=true")
    elif guidance != 1 and drop == 0:
        problems.append(
            f"model.guidance_scale={guidance} with model.cond_drop_prob=0: the unconditional mode guidance needs is "
            "never trained; set model.cond_drop_prob (e.g. 0.1)"
        )
    return problems
