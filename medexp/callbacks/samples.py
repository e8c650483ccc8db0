"""Grids of a generative model's samples from fixed latent codes (noise), to watch it learn."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import torch

from medexp.utils.images import grid, save_png
from medexp.utils.loggers import send_picture


class SampleGrids(L.Callback):
    """Every ``every_n_epochs`` validation epochs, generate ``num_samples`` images from the same
    latent codes (drawn from ``seed``; a conditional GAN's classes in blocks, class 0 first),
    save the grid as ``<run>/samples/epoch_<n>.png`` and send it to the loggers:
    TensorBoard and a local MLflow store, remote loggers only with ``remote_images``
    (``logger.log_images=true``; a GAN can reproduce its training images).

    Acts on tasks that generate images (a ``generator_overrides``: GANs, diffusion models), with
    the weights validation uses (``callbacks.ema``'s average when it is on).
    """

    def __init__(
        self,
        num_samples: int = 64,
        every_n_epochs: int = 1,
        seed: int = 0,
        dirname: str = "samples",
        remote_images: bool = False,
    ) -> None:
        if num_samples < 1 or every_n_epochs < 1:
            raise ValueError(f"num_samples and every_n_epochs should be >= 1, got {num_samples}, {every_n_epochs}.")
        self.num_samples, self.every_n_epochs, self.seed = num_samples, every_n_epochs, seed
        self.dirname, self.remote_images = dirname, remote_images
        self._withheld_noted = False

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # after the first batch rather than at the epoch's end: the model holds the weights validation
        # runs on (callbacks.ema's average) whichever order the callbacks' epoch-end hooks run in
        if (
            batch_idx != 0
            or dataloader_idx != 0
            or getattr(pl_module, "generator_overrides", None) is None  # a task that generates images
            or trainer.sanity_checking
            or trainer.state.fn != "fit"
            or not trainer.is_global_zero
            or trainer.current_epoch % self.every_n_epochs
        ):
            return
        n = self.num_samples
        # a conditional GAN's classes in blocks, in order: class 0 first
        labels = torch.arange(n) * pl_module.num_classes // n if pl_module.conditional else None
        images, _ = pl_module.sample(n, labels, generator=torch.Generator().manual_seed(self.seed))
        picture = grid(images, (pl_module.low, pl_module.high))
        path = save_png(
            picture, Path(trainer.default_root_dir) / self.dirname / f"epoch_{trainer.current_epoch:03d}.png"
        )
        self._withheld_noted = send_picture(trainer, "val/samples", path, self.remote_images, self._withheld_noted)
