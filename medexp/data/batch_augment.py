"""Augmentations of whole batches: one vectorised operation per batch instead of a MONAI
transform per sample, each sample drawing its own flip and shift.

On a CPU a per-sample MONAI chain of a flip and a 2-pixel shift costs about 1.7 ms per 28x28 image
(one thread), in the one process that also trains; the same on whole batches
costs about 10 microseconds per image (``scripts/benchmark_medmnist_fast.py throughput``). So a
fast recipe augments the batch after it is collated (``data.batch_augmentations``, applied in the
DataModule's ``on_after_batch_transfer`` to training batches only, on the batch's device).
The same shift serves test-time augmentation (:func:`shift`). :class:`BatchAffine` rotates and
zooms each sample in one resampling of the batch (about 45 microseconds per 3x28x28 image);
:class:`BatchIntensity` jitters each sample's contrast and brightness (or colours; about 1 and
9 microseconds per grey and colour 28x28 image on 2 threads); :class:`BatchErase` blanks a square
of each chosen sample (Cutout).

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

    # a label mask can travel in the same call: pixels move, values are never mixed
    moves_masks = True

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
    # a label mask can travel in the same call: pixels move, values are never mixed
    moves_masks = True

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


def rotation(angles: torch.Tensor) -> torch.Tensor:
    """``(B, d, d)`` rotation matrices: ``d = 2`` from ``(B, 1)`` angles in radians, ``d = 3`` from
    ``(B, 3)`` angles about the three spatial axes, applied in axis order."""
    cos, sin = angles.cos(), angles.sin()
    if angles.shape[1] == 1:
        return torch.stack([torch.cat([cos, -sin], 1), torch.cat([sin, cos], 1)], 1)
    eye = torch.eye(3, dtype=angles.dtype, device=angles.device).expand(angles.shape[0], 3, 3)
    matrix = eye
    for axis in range(3):
        # the rotation in the plane of the other two axes
        a, b = [i for i in range(3) if i != axis]
        step = eye.clone()
        step[:, a, a], step[:, b, b] = cos[:, axis], cos[:, axis]
        step[:, a, b], step[:, b, a] = -sin[:, axis], sin[:, axis]
        matrix = step @ matrix
    return matrix


def affine(x: torch.Tensor, matrices: torch.Tensor, mode: str = "reflection") -> torch.Tensor:
    """Resample each image of ``x`` through its own linear map about the image centre.

    Args:
        x: ``(B, C, *spatial)`` batch, 2 or 3 spatial axes.
        matrices: ``(B, d, d)`` maps in pixel units over the spatial axes in order (rows,
            columns[, depth]): output position ``p`` (from the centre) reads input position
            ``matrices[b] @ p``, bilinearly, so non-square images rotate without shearing.
        mode: border fill, as ``torch.nn.functional.grid_sample``'s ``padding_mode``.

    Returns:
        A tensor shaped like ``x``.
    """
    # not MONAI's AffineTransform(normalized=False, zero_centered=True): with either align_corners,
    # its quarter turn of a 4x8 image does not land pixels on pixels (it shears oblong images)
    sizes = torch.tensor(x.shape[2:], dtype=x.dtype, device=x.device)
    # normalised coordinates (-1..1 over each axis) from pixels and back; grid_sample orders the
    # axes last to first (x: columns, y: rows[, z])
    normalised = matrices * sizes[None, None, :] / sizes[None, :, None]
    normalised = normalised.flip(1, 2)
    theta = torch.cat([normalised, normalised.new_zeros(x.shape[0], x.ndim - 2, 1)], 2)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode=mode, align_corners=False)


class BatchAffine(nn.Module):
    """Rotate and zoom each sample about its centre by its own random amounts, in one resampling
    of the whole batch (bilinear). Rotations suit images with no fixed orientation (fundus,
    ultrasound, dermoscopy, pathology); a volume is rotated about each of its three axes.

    Args:
        degrees: the largest rotation, drawn uniformly from ``[-degrees, degrees]`` per sample
            (and per axis of a volume); 0: none.
        scale: ``(low, high)`` zoom factors, drawn log-uniformly per sample (1.1 enlarges the
            content by 10%); ``(1, 1)``: none.
        prob: the fraction of samples transformed (drawn per sample); the rest pass unchanged.
        mode: border fill, ``reflection``, ``border`` or ``zeros``.
    """

    MODES = ("reflection", "border", "zeros")
    # bilinear resampling mixes neighbouring label values: images only (see ArrayDataModule)
    moves_masks = False

    def __init__(
        self, degrees: float = 15.0, scale: Sequence[float] = (1.0, 1.0), prob: float = 1.0, mode: str = "reflection"
    ) -> None:
        super().__init__()
        if isinstance(degrees, bool) or not isinstance(degrees, int | float) or not 0 <= degrees <= 180:
            raise MedexpError(f"BatchAffine degrees={degrees!r}; expected a number of degrees in [0, 180]")
        scale = list(scale) if isinstance(scale, Sequence) and not isinstance(scale, str) else [scale]
        if len(scale) != 2 or not all(isinstance(s, int | float) and s > 0 for s in scale) or scale[0] > scale[1]:
            raise MedexpError(f"BatchAffine scale={scale!r}; expected [low, high] zoom factors with 0 < low <= high")
        if not 0.0 <= prob <= 1.0:
            raise MedexpError(f"BatchAffine prob={prob}; expected a probability in [0, 1]")
        if mode not in self.MODES:
            raise MedexpError(f"BatchAffine mode={mode!r}; expected one of {list(self.MODES)}")
        self.degrees, self.scale, self.prob, self.mode = float(degrees), [float(s) for s in scale], prob, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = x.ndim - 2
        if dims not in (2, 3):
            raise MedexpError(f"BatchAffine takes 2D or 3D images; got a batch shaped {tuple(x.shape)}")
        if (self.degrees == 0 and self.scale == [1.0, 1.0]) or self.prob == 0:
            return x
        batch, dtype = x.shape[0], x.dtype if x.is_floating_point() else torch.float32
        angles = (torch.rand(batch, 1 if dims == 2 else 3, device=x.device, dtype=dtype) * 2 - 1) * self.degrees
        low, high = torch.tensor(self.scale, dtype=dtype).log().tolist()
        zoom = torch.exp(low + (high - low) * torch.rand(batch, device=x.device, dtype=dtype))
        # the output reads the input at (rotation / zoom) @ p: the content turns by the angle and grows by the zoom
        matrices = rotation(torch.deg2rad(angles)).transpose(1, 2) / zoom[:, None, None]
        chosen = torch.rand(batch, device=x.device) < self.prob
        eye = torch.eye(dims, dtype=dtype, device=x.device).expand_as(matrices)
        matrices = torch.where(chosen[:, None, None], matrices, eye)
        return affine(x.to(dtype), matrices, self.mode).to(x.dtype)


class BatchIntensity(nn.Module):
    """Jitter each sample's contrast and brightness: ``(x - m) * c + m + b``, ``m`` the sample's
    mean, ``c`` drawn uniformly from ``[1 - contrast, 1 + contrast]`` and ``b`` from
    ``[-brightness, brightness]`` (in the units of the normalised images: MedMNIST's span
    ``[-1, 1]``), per sample or, with ``per_channel``, per sample and channel (a colour jitter
    for RGB images such as fundus photographs and dermoscopy).

    Args:
        brightness: the largest offset, >= 0.
        contrast: the largest relative change of contrast, in ``[0, 1)``.
        per_channel: draw ``c`` and ``b`` (and take ``m``) per channel.
    """

    # values change, pixels do not move: a segmentation mask stays as it is (see ArrayDataModule)
    moves_masks = False
    image_only = True

    def __init__(self, brightness: float = 0.1, contrast: float = 0.1, per_channel: bool = False) -> None:
        super().__init__()
        if isinstance(brightness, bool) or not isinstance(brightness, int | float) or brightness < 0:
            raise MedexpError(f"BatchIntensity brightness={brightness!r}; expected a number >= 0 (0: none)")
        if isinstance(contrast, bool) or not isinstance(contrast, int | float) or not 0 <= contrast < 1:
            raise MedexpError(f"BatchIntensity contrast={contrast!r}; expected a number in [0, 1) (0: none)")
        if not isinstance(per_channel, bool):
            raise MedexpError(f"BatchIntensity per_channel={per_channel!r}; expected true or false")
        self.brightness, self.contrast, self.per_channel = float(brightness), float(contrast), per_channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.brightness == 0 and self.contrast == 0:
            return x
        dtype = x.dtype if x.is_floating_point() else torch.float32
        x = x.to(dtype)
        shape = (x.shape[0], x.shape[1] if self.per_channel else 1, *[1] * (x.ndim - 2))
        factor = 1 + (torch.rand(shape, device=x.device, dtype=dtype) * 2 - 1) * self.contrast
        offset = (torch.rand(shape, device=x.device, dtype=dtype) * 2 - 1) * self.brightness
        mean = x.mean(dim=tuple(range(2 if self.per_channel else 1, x.ndim)), keepdim=True)
        return (x - mean) * factor + mean + offset


class BatchErase(nn.Module):
    """Cutout (DeVries and Taylor, 2017): with probability ``prob`` per sample, set a square (a
    cube in 3D) of ``size`` pixels a side to ``value``; its centre is drawn anywhere in the image,
    so near a border part of it falls outside (as in the paper). MONAI's ``RandCoarseDropout``
    does the same per sample, in the per-sample chain this module replaces on a CPU.

    Args:
        size: the side in pixels, >= 1 and at most the images' smallest side.
        prob: probability that a sample is erased.
        value: what fills the square (0: the middle of MedMNIST's ``[-1, 1]`` span).
    """

    # values change, pixels do not move: a segmentation mask stays as it is (see ArrayDataModule)
    moves_masks = False
    image_only = True

    def __init__(self, size: int = 8, prob: float = 0.5, value: float = 0.0) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise MedexpError(f"BatchErase size={size!r}; expected a whole number of pixels >= 1")
        if isinstance(prob, bool) or not isinstance(prob, int | float) or not 0.0 <= prob <= 1.0:
            raise MedexpError(f"BatchErase prob={prob!r}; expected a probability in [0, 1]")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MedexpError(f"BatchErase value={value!r}; expected a number")
        self.size, self.prob, self.value = size, float(prob), float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prob == 0:
            return x
        spatial = x.shape[2:]
        if self.size > min(spatial):
            raise MedexpError(f"BatchErase size={self.size} is larger than the images {tuple(spatial)}")
        batch, dims = x.shape[0], len(spatial)
        erased = (torch.rand(batch, device=x.device) < self.prob).view(batch, *[1] * dims)
        for axis, length in enumerate(spatial):
            start = torch.randint(length, (batch, 1), device=x.device) - self.size // 2
            positions = torch.arange(length, device=x.device)[None, :]
            inside = (positions >= start) & (positions < start + self.size)
            shape = [batch] + [1] * dims
            shape[1 + axis] = length
            erased = erased & inside.view(shape)
        return x.masked_fill(erased.unsqueeze(1), self.value)


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
