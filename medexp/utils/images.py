"""Image grids as PNG files: generated samples, for people to look at."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def grid(images: torch.Tensor, value_range: tuple[float, float], pad: int = 2) -> np.ndarray:
    """``(N, C, H, W)`` images with values in ``value_range`` -> one ``uint8`` picture of
    ``ceil(sqrt(N))`` columns, ``(rows * (H + pad) + pad, columns * (W + pad) + pad)`` for grey
    images (``..., 3)`` for RGB), the images row by row on a black background. 3D volumes ``(N, C, D, H, W)`` show their middle slice."""
    if images.ndim == 5:
        images = images[:, :, images.shape[2] // 2]
    n, channels, height, width = images.shape
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    low, high = value_range
    scaled = ((images.float().cpu() - low) / (high - low)).clamp(0, 1).mul(255).round().byte().numpy()
    shown = 3 if channels == 3 else 1
    picture = np.zeros((rows * (height + pad) + pad, columns * (width + pad) + pad, shown), dtype=np.uint8)
    for index, image in enumerate(scaled):
        top, left = pad + (index // columns) * (height + pad), pad + (index % columns) * (width + pad)
        picture[top : top + height, left : left + width] = np.moveaxis(image[:shown], 0, -1)
    return picture[..., 0] if shown == 1 else picture


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    """Write a ``uint8`` picture (``(H, W)`` or ``(H, W, 3)``) as a PNG file."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
    return path
