"""Small files that tests write themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_medmnist_npz(
    path: Path,
    sizes: dict[str, int],
    num_classes: int,
    channels: int = 1,
    size: int = 28,
    multilabel: bool = False,
    label_shape_n1: bool = True,
    seed: int = 0,
) -> Path:
    """A MedMNIST-format ``.npz`` with random images whose mean intensity depends on the label."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes.items():
        if multilabel:
            labels = rng.integers(0, 2, size=(n, num_classes))
            signal = labels[:, 0]
        else:
            labels = rng.integers(0, num_classes, size=n)
            signal = labels
        shape = (n, size, size) if channels == 1 else (n, size, size, channels)
        images = rng.integers(0, 120, size=shape) + (signal * (100 // max(1, num_classes - 1))).reshape(-1, *[1] * (len(shape) - 1))
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None] if (label_shape_n1 and not multilabel) else labels
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path
