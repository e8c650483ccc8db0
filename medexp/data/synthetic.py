"""Built-in phantom images with lesions: offline data that an image model has to learn.

Each image is a body-like ellipse with two darker "lungs" and a bright "spine" under a smooth
bias field and noise. Lesions are small round blobs inside the body; the label says whether,
how many, or which kind are present.
"""

from __future__ import annotations

import numpy as np

from medexp.data.base import SPLITS, ArrayDataModule
from medexp.utils.errors import MedexpError


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy, cx, ry, rx, soft: float = 0.04) -> np.ndarray:
    """Soft-edged ellipse masks. ``yy, xx``: ``(H, W)`` grids in [-1, 1]; centres/radii ``(N, 1, 1)``."""
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return 1.0 / (1.0 + np.exp(np.minimum((r - 1.0) / soft, 50.0)))


def make_phantoms(
    n: int, size: int, task: str, num_classes: int, rng: np.random.Generator, lesion_contrast: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``n`` phantom images.

    Args:
        n: number of images; size: height and width in pixels.
        task: ``binary`` (a bright lesion present or not), ``multiclass`` (number of bright
            lesions, 0..num_classes-1) or ``multilabel`` (bright lesion present, dark lesion present).
        num_classes: classes, or labels for ``multilabel`` (must then be 2).
        rng: the source of randomness; the same generator state gives the same images.
        lesion_contrast: scales the lesions' intensity difference; lower is harder to learn.

    Returns:
        images ``(n, 1, size, size)`` uint8, labels (``(n,)`` int64, or ``(n, 2)`` for multi-label)
        and lesion masks ``(n, 1, size, size)`` uint8 (1 inside a lesion).
    """
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")

    def draw(low, high):
        return rng.uniform(low, high, size=(n, 1, 1)).astype(np.float32)

    body_cy, body_cx = draw(-0.05, 0.05), draw(-0.05, 0.05)
    body_ry, body_rx = draw(0.6, 0.75), draw(0.75, 0.9)
    body = _ellipse(yy, xx, body_cy, body_cx, body_ry, body_rx)
    image = 0.05 + body * draw(0.4, 0.5)
    for side in (-1.0, 1.0):
        lung = _ellipse(yy, xx, body_cy - 0.05, body_cx + side * draw(0.35, 0.42), draw(0.3, 0.4), draw(0.2, 0.26))
        image -= lung * draw(0.15, 0.22)
    image += _ellipse(yy, xx, body_cy + body_ry * 0.7, body_cx, draw(0.08, 0.12), draw(0.08, 0.12)) * 0.35
    image += draw(-0.05, 0.05) * yy + draw(-0.05, 0.05) * xx  # smooth bias field

    if task == "binary":
        bright = rng.integers(0, 2, size=n)
        dark = np.zeros(n, dtype=np.int64)
        labels = bright
    elif task == "multiclass":
        bright = rng.integers(0, num_classes, size=n)
        dark = np.zeros(n, dtype=np.int64)
        labels = bright
    elif task == "multilabel":
        bright, dark = rng.integers(0, 2, size=n), rng.integers(0, 2, size=n)
        labels = np.stack([bright, dark], axis=1)
    else:
        raise MedexpError(f"data.task={task!r}; expected one of ['binary', 'multiclass', 'multilabel']")

    mask = np.zeros((n, size, size), dtype=np.float32)
    for count, contrast in ((bright, (0.12, 0.3)), (dark, (-0.3, -0.12))):
        for k in range(int(count.max(initial=0))):
            # lesions lie inside the body: polar position within 60% of its radii
            angle, radius = draw(0, 2 * np.pi), np.sqrt(draw(0, 1)) * 0.6
            cy = body_cy + radius * body_ry * np.sin(angle)
            cx = body_cx + radius * body_rx * np.cos(angle)
            r = draw(0.1, 0.17)
            blob = _ellipse(yy, xx, cy, cx, r, r, soft=0.08) * (k < count)[:, None, None]
            image += blob * draw(*contrast) * lesion_contrast
            mask = np.maximum(mask, blob > 0.5)

    image += rng.normal(0.0, 0.05, size=image.shape).astype(np.float32)
    images = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)[:, None]
    return images, labels.astype(np.int64), mask.astype(np.uint8)[:, None]


class SyntheticDataModule(ArrayDataModule):
    """Phantom images generated deterministically from ``seed`` (see :func:`make_phantoms`).

    Args:
        image_size: height and width in pixels.
        num_samples: images per split, e.g. ``{"train": 2000, "val": 500, "test": 500}``.
        lesion_contrast: difficulty knob, see :func:`make_phantoms`.
        seed: data seed, independent of the training seed so sweeps over seeds see the same data.
        **kwargs: see :class:`~medexp.data.base.ArrayDataModule`.
    """

    def __init__(
        self,
        image_size: int = 32,
        num_samples: dict | None = None,
        lesion_contrast: float = 1.0,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        num_samples = dict(num_samples or {"train": 2000, "val": 500, "test": 500})
        if sorted(num_samples) != sorted(SPLITS) or min(num_samples.values()) < 1:
            raise MedexpError(f"data.num_samples={num_samples}; expected positive counts for {list(SPLITS)}")
        if self.task == "multilabel" and self.num_classes != 2:
            raise MedexpError("data.num_classes must be 2 for synthetic multilabel data (bright, dark lesion)")
        if self.in_channels != 1 or self.spatial_dims != 2:
            raise MedexpError("synthetic data are 2D grey images: data.in_channels=1, data.spatial_dims=2")
        if image_size < 16:
            raise MedexpError(f"data.image_size={image_size}; expected at least 16 pixels")
        self.image_size = image_size
        self.num_samples = num_samples
        self.lesion_contrast = lesion_contrast
        self.seed = seed

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, SPLITS.index(split)])
        images, labels, _ = make_phantoms(
            self.num_samples[split], self.image_size, self.task, self.num_classes, rng, self.lesion_contrast
        )
        return images, labels

    def describe(self) -> str:
        return f"synthetic {self.task} data"
