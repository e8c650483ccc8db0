"""Series of 2D images over time held in memory (one per patient), and the dataset that serves them
(see :mod:`medexp.data.longitudinal`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from medexp.utils.errors import MedexpError


@dataclass
class Series:
    """The series of one split, padded to ``T`` steps.

    Attributes:
        images: ``(N, T, C, H, W)``; ``uint8`` (scaled to [0, 1] when served) or float32.
            Steps ``>= lengths[n]`` are zeros.
        lengths: ``(N,)`` int64 valid steps, in ``[1, T]``.
        times: ``(N, T)`` float32 time of each step, ascending over the valid steps; 0 where padded.
        labels: ``(N,)`` int64 class indices, one per series (patient).
        ids: ``N`` patient names, as messages and CSV files name them.
    """

    images: np.ndarray
    lengths: np.ndarray
    times: np.ndarray
    labels: np.ndarray
    ids: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def take(self, rows: np.ndarray) -> Series:
        """The series ``rows`` (positions or a boolean mask), in that order."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        return Series(
            self.images[rows], self.lengths[rows], self.times[rows], self.labels[rows], [self.ids[i] for i in rows]
        )


class SequenceDataset(Dataset):
    """Padded series served as ``{"image": (T, C, H, W), "length": (), "time": (T,), "label": ()}``.

    ``transform`` (MONAI dictionary transforms, see :meth:`ArrayDataModule.transform`) sees the
    valid frames of a series stacked along the channel axis, ``{"image": (L*C, H, W), "label"}``
    with ``L = length``: spatial transforms (flips, rotations, resizing, random crops) apply the
    same geometry to every visit, so a series stays aligned; intensity transforms treat the
    series as one image (``channel_wise=True`` makes them per frame when ``C == 1``). Padding is
    added after the transforms, so it stays zero and never enters their statistics. Transforms
    must keep the ``L*C`` channels (they may change the spatial size).

    Args:
        series: the split (see :class:`Series`).
        transform: applied to each series as above.
    """

    def __init__(self, series: Series, transform: Callable | None = None) -> None:
        self.series = series
        self.images = series.images
        self.labels = torch.as_tensor(series.labels)
        self.lengths = torch.as_tensor(series.lengths)
        self.times = torch.as_tensor(series.times, dtype=torch.float32)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        length = int(self.lengths[index])
        steps, channels = self.images.shape[1:3]
        frames = torch.from_numpy(self.images[index, :length])
        # a copy either way: a transform working in place must not change the series held in memory
        frames = frames.float().div_(255) if frames.dtype == torch.uint8 else frames.float().clone()
        sample = {"image": frames.reshape(length * channels, *frames.shape[2:]), "label": self.labels[index]}
        if self.transform is not None:
            sample = self.transform(sample)
        stacked = sample["image"]
        if stacked.shape[0] != length * channels:
            raise MedexpError(
                f"data.transforms turned a series of {length} visit(s) x {channels} channel(s), stacked as "
                f"{length * channels} channels, into {stacked.shape[0]} channels; on sequences the transforms see the "
                "valid frames stacked along the channel axis and must keep the channels (resizing, flips and "
                "intensity transforms do)"
            )
        image = stacked.new_zeros((steps, channels, *stacked.shape[1:]))
        image[:length] = stacked.reshape(length, channels, *stacked.shape[1:])
        return {"image": image, "length": self.lengths[index], "time": self.times[index], "label": sample["label"]}
