"""Shuffling that depends only on (seed, epoch), so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import Sampler


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for ``epoch`` of a run seeded with ``seed``; runs with nearby seeds do not share
    streams (as ``seed + epoch`` would: seed 1 epoch 1 = seed 2 epoch 0)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of the dataset per epoch, drawn from ``(seed, epoch)``.

    PyTorch's ``RandomSampler`` draws from torch's global generator when its iterator starts,
    and Lightning starts the first epoch's iterator before the epoch's hooks but later epochs'
    after them; a run resumed from a checkpoint would then shuffle differently from an
    uninterrupted one. Lightning calls :meth:`set_epoch` before every epoch, and
    :class:`medexp.callbacks.faults.FaultTolerance` calls :meth:`skip_next` when a run resumes in
    the middle of an epoch.

    Args:
        data: the dataset (only its length is used).
        seed: the run's seed.
    """

    def __init__(self, data: Sized, seed: int) -> None:
        self.data, self.seed, self.epoch = data, seed, 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, samples: int) -> None:
        """Leave out the first ``samples`` indices of the next pass only: the rest of an epoch
        that was interrupted after ``samples`` samples, in the same order."""
        self._skip = samples

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[int]:
        # the epoch (and a skip) is read when the first index is requested, after Lightning's
        # set_epoch; __len__ stays the whole epoch's, as Lightning counts batches from it
        skip, self._skip = self._skip, 0
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        yield from torch.randperm(len(self.data), generator=generator)[skip:].tolist()
