"""Shuffling that depends only on (seed, epoch), so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

from medexp.callbacks.seed import epoch_seed


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of the dataset per epoch, drawn from ``(seed, epoch)``.

    PyTorch's ``RandomSampler`` draws from torch's global generator when its iterator starts,
    and Lightning starts the first epoch's iterator before the epoch's hooks but later epochs'
    after them; a run resumed from a checkpoint would then shuffle differently from an
    uninterrupted one. Lightning calls :meth:`set_epoch` before every epoch.

    Args:
        data: the dataset (only its length is used).
        seed: the run's seed.
    """

    def __init__(self, data: Sized, seed: int) -> None:
        self.data, self.seed, self.epoch = data, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[int]:
        # the epoch is read when the first index is requested, after Lightning's set_epoch
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        yield from torch.randperm(len(self.data), generator=generator).tolist()
