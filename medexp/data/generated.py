"""Generated-data augmentation: images from a class-conditional generative model (a GAN, a
diffusion model) mixed into the training split."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medexp.utils.errors import MedexpError

log = logging.getLogger("medexp")

LABELS = ("train", "balanced")


class GeneratedDataset(Dataset):
    """Generated images served like real samples: ``{"image": (C, *spatial), "label": ()}``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images.float(), labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


@dataclass
class GeneratedImages:
    """``data.generated``: how many generated images join the training split, and from where.

    The generator (a medexp ``model=gan`` or ``model=ddpm`` checkpoint with
    ``model.conditional=true``) must have been trained on images like these after their
    transforms (same shape, channels, classes and intensity range): its samples skip the data's
    augmentations and transforms. Images are generated once, at the
    first training epoch, from ``seed``, so every run (and every DDP process) mixes in the same
    ones; they count in the data fingerprint, not in ``class_weights=auto``.

    Args:
        ckpt: the generative model's checkpoint.
        ratio: generated images per real training image (0: none; 1: as many as real ones).
        labels: the classes to generate: ``train`` (drawn with the training split's class
            frequencies) or ``balanced`` (every class equally often: oversampling rare classes).
        seed: the seed of the classes drawn and of the latent codes.
        allowed_targets: exact ``_target_`` names trusted in the GAN checkpoint's stored config
            besides what medexp builds (see :mod:`medexp.checkpoints.allowlist`).
    """

    ckpt: str
    ratio: float
    labels: str = "train"
    seed: int = 0
    allowed_targets: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._dataset: GeneratedDataset | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> GeneratedImages | None:
        """The settings of ``data.generated``, or None when nothing is generated.

        Raises:
            MedexpError: for unknown keys, a negative ratio, an unknown ``labels`` value, or a
                checkpoint that does not exist.
        """
        if not config:
            return None
        known = {name for name in cls.__dataclass_fields__}
        unknown = sorted(set(config) - known)
        if unknown:
            raise MedexpError(f"data.generated has unknown key(s) {unknown}; it takes {sorted(known)}")
        ratio = config.get("ratio", 0)
        if not isinstance(ratio, (int, float)) or ratio < 0:
            raise MedexpError(f"data.generated.ratio={ratio!r}; expected a number >= 0 (generated per real image)")
        if ratio == 0:
            return None
        if config.get("labels", "train") not in LABELS:
            raise MedexpError(f"data.generated.labels={config['labels']!r}; expected one of {list(LABELS)}")
        ckpt = config.get("ckpt")
        if not ckpt or not Path(str(ckpt)).expanduser().is_file():
            raise MedexpError(
                f"data.generated.ckpt={ckpt!r}: no such file; give a class-conditional generative model's checkpoint (model=gan or model=ddpm, model.conditional=true)"
            )
        return cls(**{**config, "ckpt": str(Path(str(ckpt)).expanduser())})

    def dataset(self, datamodule: Any) -> GeneratedDataset:
        """The generated images for ``datamodule``'s training split (made on the first call)."""
        if self._dataset is None:
            self._dataset = self._generate(datamodule)
        return self._dataset

    def _generate(self, datamodule: Any) -> GeneratedDataset:
        from medexp.checkpoints.checkpoint import Checkpoint

        if datamodule.task not in ("binary", "multiclass"):
            raise MedexpError(
                f"data.generated needs binary or multi-class data (class-conditional GANs); data.task={datamodule.task!r}"
            )
        checkpoint = Checkpoint(self.ckpt, self.allowed_targets, name="data.generated.ckpt")
        where = checkpoint.where
        gan = checkpoint.build_generator()
        kind = getattr(gan, "generator_kind", "GAN")
        if not gan.conditional:
            raise MedexpError(
                f"{where}: an unconditional {kind}; expected a class-conditional {kind} (model.conditional=true)"
            )
        if gan.num_classes != datamodule.num_classes:
            raise MedexpError(
                f"{where}: the {kind} generates {gan.num_classes} classes; data.num_classes={datamodule.num_classes}"
            )
        trained = checkpoint.get("data.intensity_range")
        if datamodule.intensity_range is not None and [gan.low, gan.high] != datamodule.intensity_range:
            raise MedexpError(
                f"{where}: the {kind} makes images in {[gan.low, gan.high]} (its data.intensity_range={trained}); these data "
                f"are in {datamodule.intensity_range}: train the {kind} on the same data and transforms"
            )
        counts, _ = datamodule.label_counts()
        n = round(self.ratio * int(np.sum(counts)))
        rng = np.random.default_rng(self.seed)
        if self.labels == "balanced":
            labels = rng.permutation(np.arange(n) % datamodule.num_classes)
        else:
            labels = rng.choice(datamodule.num_classes, size=n, p=np.asarray(counts) / np.sum(counts))
        images, _ = gan.sample(n, torch.as_tensor(labels), torch.Generator().manual_seed(self.seed))
        real_shape = tuple(datamodule.datasets["train"][0]["image"].shape)
        if tuple(images.shape[1:]) != real_shape:
            raise MedexpError(
                f"{where}: the {kind} makes images of shape {tuple(images.shape[1:])}; the training images are {real_shape} "
                "after data.transforms"
            )
        log.info(
            "generated-data augmentation: %d images from a %s (%s classes, ratio %g) join %d real ones, from %s",
            n,
            kind,
            self.labels,
            self.ratio,
            int(np.sum(counts)),
            self.ckpt,
        )
        return GeneratedDataset(images, torch.as_tensor(labels))

    def fingerprint(self, digest: Any, datamodule: Any) -> None:
        """Add the generated images and classes to a data fingerprint (``hashlib`` digest)."""
        dataset = self.dataset(datamodule)
        digest.update(b"generated")
        digest.update(hashlib.sha256(dataset.images.numpy().tobytes()).digest())
        digest.update(dataset.labels.numpy().tobytes())
