"""Augmentations of whole batches: one vectorised operation per batch instead of a MONAI
transform per sample, each sample drawing its own flip and shift.

On a CPU a per-sample MONAI chain of a flip and a 2-pixel shift costs about 1.7 ms per 28x28 image
(one thread), in the one process that also trains; the same on whole batches
costs about 10 microseconds per image (``scripts/benchmark_medmnist_fast.py throughput``). So a
fast recipe augments the batch after it is collated (``data.batch_augmentations``, applied in the
DataModule's ``on_after_batch_transfer`` to training batches only, on the batch's device).
The same shift serves test-time augmentation (:func:`shift`).

Spatial axes are numbered as in MONAI's transforms (``spatial_axis``): 0 is the first axis after
the channels (rows, "up-down"), 1 the next (columns, "left-right"), 2 a volume's third.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medexp.utils.errors import MedexpError


def check_axes(axes: Sequence[int], spatial_dims: int, key: str) -> list[int]:
    """``axes`` as a list of distinct spatial axes below ``spatial_dims``.

    Raises:
        MedexpError: naming ``key`` and the valid axes.
    """
    axes = [axes] if isinstance(axes, int) else list(axes or [])
    valid = list(range(spatial_dims))
    if any(isinstance(a, bool) or not isinstance(a, int) or a not in valid for a in axes) or len(set(axes)) != len(
        axes
    ):
        raise MedexpError(f"{key}={axes}; expected distinct spatial axes from {valid} (0: rows, 1: columns)")
    return axes


def shift(x: torch.Tensor, offsets: torch.Tensor, pixels: int, mode: str = "reflect") -> torch.Tensor:
    """Translate each image of ``x`` by its own offset, filling the border by ``mode`` padding.

    Args:
        x: ``(B, C, *spatial)`` batch.
        offsets: ``(B, spatial_dims)`` integer shifts in ``[-pixels, pixels]`` per sample and axis.
        pixels: the largest shift (the padding).
        mode: ``reflect``, ``replicate`` or ``constant`` (zeros), as ``torch.nn.functional.pad``.

    Returns:
        A tensor shaped like ``x``: sample ``b`` is ``x[b]`` moved by ``offsets[b]``.
    """
    if pixels == 0:
        return x
    dims = x.ndim - 2
    padded = nn.functional.pad(x, [pixels] * (2 * dims), mode=mode)
    batch = torch.arange(x.shape[0], device=x.device)
    index: list[torch.Tensor] = [batch.view(-1, *[1] * (dims + 1)), torch.arange(x.shape[1], device=x.device)]
    index[1] = index[1].view(1, -1, *[1] * dims)
    for axis in range(dims):
        size = x.shape[2 + axis]
        # output position i reads padded position i + pixels - offset
        positions = torch.arange(size, device=x.device)[None, :] + pixels - offsets[:, axis : axis + 1]
        shape = [x.shape[0], 1] + [1] * dims
        shape[2 + axis] = size
        index.append(positions.view(shape))
    return padded[tuple(index)]


class BatchFlip(nn.Module):
    """Mirror each sample along each of ``axes`` with probability ``prob`` (drawn per sample and
    axis). Leave out axes along which the anatomy is not symmetric (a chest X-ray's left and
    right; MedMNIST's ``data.flip_axes`` names the safe ones per dataset).

    Args:
        axes: spatial axes (0: rows, 1: columns, 2: depth); empty: nothing is flipped.
        prob: probability of each flip.
    """

    def __init__(self, axes: Sequence[int] = (1,), prob: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise MedexpError(f"BatchFlip prob={prob}; expected a probability in [0, 1]")
        self.axes = [axes] if isinstance(axes, int) else [int(a) for a in axes or []]
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_axes(self.axes, x.ndim - 2, "BatchFlip axes")
        for axis in self.axes:
            chosen = torch.rand(x.shape[0], device=x.device) < self.prob
            x = torch.where(chosen.view(-1, *[1] * (x.ndim - 1)), x.flip(2 + axis), x)
        return x


class BatchTranslate(nn.Module):
    """Shift each sample by a whole number of pixels drawn uniformly from ``[-pixels, pixels]``
    per axis (random crop after padding), the border filled by ``mode``.

    Args:
        pixels: the largest shift; 0 leaves batches unchanged.
        mode: ``reflect``, ``replicate`` or ``constant``.
    """

    MODES = ("reflect", "replicate", "constant")

    def __init__(self, pixels: int = 2, mode: str = "reflect") -> None:
        super().__init__()
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
            raise MedexpError(f"BatchTranslate pixels={pixels!r}; expected a whole number >= 0")
        if mode not in self.MODES:
            raise MedexpError(f"BatchTranslate mode={mode!r}; expected one of {list(self.MODES)}")
        self.pixels, self.mode = pixels, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pixels == 0:
            return x
        if any(size <= self.pixels for size in x.shape[2:]):
            raise MedexpError(
                f"BatchTranslate pixels={self.pixels} is not smaller than the images {tuple(x.shape[2:])}"
            )
        offsets = torch.randint(-self.pixels, self.pixels + 1, (x.shape[0], x.ndim - 2), device=x.device)
        return shift(x, offsets, self.pixels, self.mode)


def mix(x: torch.Tensor, mixup_alpha: float, cutmix_alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al., 2018) or CutMix (Yun et al., 2019) of a batch with a shuffled copy of
    itself; with both alphas above 0 one of the two is drawn per batch, evenly.

    Mixup blends the images, ``lam * x + (1 - lam) * x[perm]``; CutMix pastes a box of
    ``x[perm]`` covering ``1 - lam`` of the image (``lam`` is then the area actually kept). The
    loss is ``lam * loss(y) + (1 - lam) * loss(y[perm])``.

    Args:
        x: ``(B, C, *spatial)`` images.
        mixup_alpha, cutmix_alpha: ``lam ~ Beta(alpha, alpha)``; 0 turns that kind off.

    Returns:
        The mixed images, ``perm`` and ``lam``.
    """
    kinds = [(kind, alpha) for kind, alpha in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if alpha > 0]
    kind, alpha = kinds[int(torch.randint(len(kinds), ()))] if len(kinds) > 1 else kinds[0]
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    if kind == "mixup":
        return lam * x + (1 - lam) * x[perm], perm, lam
    # a box whose sides are the images' times (1 - lam) ** (1 / dims), centred anywhere, clipped
    spatial = x.shape[2:]
    side = (1 - lam) ** (1 / len(spatial))
    box = []
    for size in spatial:
        centre, half = int(torch.randint(size, ())), int(size * side) // 2
        box.append(slice(max(centre - half, 0), min(centre + half, size)))
    mixed = x.clone()
    mixed[(slice(None), slice(None), *box)] = x[perm][(slice(None), slice(None), *box)]
    kept = 1.0
    for cut, size in zip(box, spatial, strict=True):
        kept *= (cut.stop - cut.start) / size
    return mixed, perm, 1.0 - kept


def tta_views(x: torch.Tensor, flips: Sequence[int], pixels: int) -> list[torch.Tensor]:
    """The views test-time augmentation averages: ``x`` mirrored along every combination of
    ``flips`` (the identity included) and, with ``pixels`` > 0, each of those also shifted by
    ``+pixels`` and by ``-pixels`` along every axis (reflect padding): ``2**len(flips)`` views,
    times 3 with shifts."""
    views = [x]
    for axis in flips:
        views += [view.flip(2 + axis) for view in views]
    if pixels:
        dims = x.ndim - 2
        shifted = []
        for sign in (1, -1):
            offsets = torch.full((x.shape[0], dims), sign * pixels, dtype=torch.long, device=x.device)
            shifted += [shift(view, offsets, pixels) for view in views]
        views += shifted
    return views
