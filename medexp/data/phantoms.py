"""Synthetic data: phantom images and volumes with lesions, and what the synthetic DataModules
derive from them (lesion boxes, smooth deformations, series over time). Offline, drawn from a
``numpy`` generator: the same generator state gives the same data.

Each image is a body-like ellipse (an ellipsoid in 3D) with two darker "lungs" and a bright
"spine" under a smooth bias field and noise. Lesions are small round blobs inside the body; the
label says whether, how many, or which kind are present, or is the lesion mask itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medexp.data.series import Series
from medexp.utils.errors import MedexpError


def _blob(grid: list[np.ndarray], centre: list[np.ndarray], radii: list[np.ndarray], soft: float = 0.04) -> np.ndarray:
    """Soft-edged ellipses/ellipsoids ``(n, *spatial)``: one per sample.

    ``grid`` holds one coordinate array in [-1, 1] per axis (broadcastable to the image shape);
    ``centre`` and ``radii`` one ``(n, 1, ..., 1)`` array per axis.
    """
    r = np.sqrt(sum(((g - c) / rad) ** 2 for g, c, rad in zip(grid, centre, radii)))
    return 1.0 / (1.0 + np.exp(np.minimum((r - 1.0) / soft, 50.0)))


def make_phantoms(
    n: int,
    size: int,
    task: str,
    num_classes: int,
    rng: np.random.Generator,
    lesion_contrast: float = 1.0,
    spatial_dims: int = 2,
    class_fractions: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``n`` phantom images (2D) or volumes (3D).

    Args:
        n: number of images; size: pixels (voxels) per side.
        task: ``binary`` (a bright lesion present or not), ``multiclass`` (number of bright
            lesions, 0..num_classes-1), ``multilabel`` (bright lesion present, dark lesion present)
            or ``segmentation`` (0-3 bright lesions, class 1; with ``num_classes=3`` also 0-2 dark
            lesions, class 2; the label is the mask).
        num_classes: classes (segmentation: including background), or labels for ``multilabel``.
        rng: the source of randomness; the same generator state gives the same images.
        lesion_contrast: scales the lesions' intensity difference; lower is harder to learn.
        spatial_dims: 2 for ``(size, size)`` images, 3 for ``(size, size, size)`` volumes.
        class_fractions: binary/multi-class: the probability of each class (summing to 1), for
            imbalanced data; None: classes equally likely.

    Returns:
        images ``(n, 1, *spatial)`` uint8; labels: ``(n,)`` int64, ``(n, 2)`` for multi-label, or
        the masks for segmentation; masks ``(n, 1, *spatial)`` uint8 of lesion classes
        (1 bright, 2 dark, 0 elsewhere).
    """
    if spatial_dims not in (2, 3):
        raise MedexpError(f"data.spatial_dims={spatial_dims}; synthetic data are 2D or 3D")
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    # one coordinate array per axis, broadcastable to (n, *spatial); axes (z,) y, x
    grid = [axis.reshape([1] + [-1 if d == i else 1 for d in range(spatial_dims)]) for i in range(spatial_dims)]
    shape = (n,) + (1,) * spatial_dims

    def draw(low, high):
        return rng.uniform(low, high, size=shape).astype(np.float32)

    # per axis (z,) y, x: body centre and radii; the z extent is long (a stack of slices)
    body_c = [draw(-0.05, 0.05) for _ in range(spatial_dims)]
    body_r = ([draw(0.7, 0.85)] if spatial_dims == 3 else []) + [draw(0.6, 0.75), draw(0.75, 0.9)]
    image = 0.05 + _blob(grid, body_c, body_r) * draw(0.4, 0.5)
    z_c, z_r = body_c[:-2], ([np.full(shape, 0.6, np.float32)] if spatial_dims == 3 else [])
    for side in (-1.0, 1.0):
        lung_c = [*z_c, body_c[-2] - 0.05, body_c[-1] + side * draw(0.35, 0.42)]
        image -= _blob(grid, lung_c, [*z_r, draw(0.3, 0.4), draw(0.2, 0.26)]) * draw(0.15, 0.22)
    spine_r = [np.full(shape, 0.9, np.float32)] if spatial_dims == 3 else []
    spine_c = [*z_c, body_c[-2] + body_r[-2] * 0.7, body_c[-1]]
    image += _blob(grid, spine_c, [*spine_r, draw(0.08, 0.12), draw(0.08, 0.12)]) * 0.35
    image += sum(draw(-0.05, 0.05) * g for g in grid)  # smooth bias field

    zeros = np.zeros(n, dtype=np.int64)
    match task:
        case "binary" | "multiclass" if class_fractions is not None:
            bright, dark = rng.choice(num_classes, size=n, p=np.asarray(class_fractions, dtype=np.float64)), zeros
            labels = bright
        case "binary":
            bright, dark = rng.integers(0, 2, size=n), zeros
            labels = bright
        case "multiclass":
            bright, dark = rng.integers(0, num_classes, size=n), zeros
            labels = bright
        case "multilabel":
            bright, dark = rng.integers(0, 2, size=n), rng.integers(0, 2, size=n)
            labels = np.stack([bright, dark], axis=1)
        case "segmentation":
            bright = rng.integers(0, 4, size=n)
            dark = rng.integers(0, 3, size=n) if num_classes == 3 else zeros
            labels = None
        case _:
            raise MedexpError(
                f"data.task={task!r}; expected one of ['binary', 'multiclass', 'multilabel', 'segmentation']"
            )

    mask = np.zeros((n,) + (size,) * spatial_dims, dtype=np.uint8)
    for lesion_class, count, contrast in ((1, bright, (0.12, 0.3)), (2, dark, (-0.3, -0.12))):
        for k in range(int(count.max(initial=0))):
            # lesions lie inside the body: uniform within 60% of its radii
            direction = rng.normal(size=(spatial_dims, *shape)).astype(np.float32)
            direction /= np.linalg.norm(direction, axis=0, keepdims=True) + 1e-6
            radius = draw(0, 1) ** (1 / spatial_dims) * 0.6
            centre = [c + radius * r * d for c, r, d in zip(body_c, body_r, direction)]
            # larger in 3D, where a 2D-sized lesion would cover a few voxels of a small volume
            size_ = draw(0.1, 0.17) if spatial_dims == 2 else draw(0.16, 0.26)
            blob = _blob(grid, centre, [size_] * spatial_dims, soft=0.08) * (k < count).reshape(shape)
            image += blob * draw(*contrast) * lesion_contrast
            mask[blob > 0.5] = lesion_class

    image += rng.normal(0.0, 0.05, size=image.shape).astype(np.float32)
    images = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)[:, None]
    masks = mask[:, None]
    return images, masks if labels is None else labels.astype(np.int64), masks


def mask_boxes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The boxes of the lesions in a mask: one per connected component of each class.

    Args:
        mask: ``(*spatial)`` lesion classes, 0 for background, ``c`` for lesion class ``c - 1``.

    Returns:
        boxes ``(N, 2 * spatial_dims)`` float32 in the module's convention (the component's
        first pixel to one past its last) and labels ``(N,)`` int64, by class then position.
    """
    from scipy import ndimage

    boxes, labels = [], []
    for value in np.unique(mask[mask > 0]):
        components, _ = ndimage.label(mask == value)
        for extent in ndimage.find_objects(components):
            boxes.append([s.start for s in extent] + [s.stop for s in extent])
            labels.append(int(value) - 1)
    width = 2 * mask.ndim
    return np.asarray(boxes, dtype=np.float32).reshape(-1, width), np.asarray(labels, dtype=np.int64)


def make_detection_phantoms(
    n: int, size: int, num_classes: int, rng: np.random.Generator, lesion_contrast: float = 1.0, spatial_dims: int = 2
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """``n`` phantoms with lesions and their boxes (see :func:`make_phantoms`).

    Each image holds 1-3 bright lesions (class 0), and with ``num_classes=2`` also 0-2 dark ones
    (class 1); a box is the extent of a lesion's mask (lesions that touch share one box).
    Phantoms drawn without a lesion are replaced by new draws from ``rng``.

    Returns:
        images ``(n, 1, *spatial)`` uint8, and per image boxes ``(N_i, 2 * spatial_dims)`` and
        labels ``(N_i,)`` (see :func:`mask_boxes`).
    """
    images = np.zeros((n, 1) + (size,) * spatial_dims, dtype=np.uint8)
    boxes: list[np.ndarray] = [np.zeros((0, 2 * spatial_dims), np.float32)] * n
    labels: list[np.ndarray] = [np.zeros(0, np.int64)] * n
    todo = np.arange(n)
    while len(todo):
        drawn, masks, _ = make_phantoms(
            len(todo), size, "segmentation", num_classes + 1, rng, lesion_contrast, spatial_dims
        )
        found = [mask_boxes(mask[0]) for mask in masks]
        for row, image, (image_boxes, image_labels) in zip(todo, drawn, found):
            images[row], boxes[row], labels[row] = image, image_boxes, image_labels
        todo = np.array([row for row, (image_boxes, _) in zip(todo, found) if len(image_boxes) == 0], dtype=np.int64)
    return images, boxes, labels


def random_ddf(
    n: int, size: int, spatial_dims: int, max_displacement: float, control_points: int, rng: np.random.Generator
) -> np.ndarray:
    """Random smooth displacement fields: displacements drawn uniformly in
    ``[-max_displacement, max_displacement]`` voxels on a grid of ``control_points`` per axis
    (corners included), interpolated (bi/trilinear) to every voxel.

    With the displacement well below the spacing of the control points (``size /
    (control_points - 1)``), the transforms are smooth and, in practice, fold nowhere.

    Returns:
        ``(n, spatial_dims, *[size] * spatial_dims)`` float32, in voxels (see
        :mod:`medexp.metrics.registration` for the convention).
    """
    shape = (n, spatial_dims, *[control_points] * spatial_dims)
    coarse = rng.uniform(-max_displacement, max_displacement, size=shape).astype(np.float32)
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    return F.interpolate(torch.from_numpy(coarse), size=(size,) * spatial_dims, mode=mode, align_corners=True).numpy()


def warp_arrays(images: np.ndarray, ddf: np.ndarray, mode: str = "bilinear") -> np.ndarray:
    """``(N, C, *spatial)`` arrays warped by ``(N, D, *spatial)`` displacements with MONAI's
    ``Warp`` (border padding), as float32; ``mode="nearest"`` keeps mask values."""
    from monai.networks.blocks import Warp

    with warnings.catch_warnings():
        # MONAI notes that it uses torch's grid_sample, its compiled extension being optional
        warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample", category=UserWarning)
        warp = Warp(mode=mode, padding_mode="border")
    return warp(torch.from_numpy(images).float(), torch.from_numpy(ddf)).numpy()


def make_series(
    n: int,
    size: int,
    min_visits: int,
    max_visits: int,
    max_length: int,
    rng: np.random.Generator,
    growth: tuple[float, float] = (0.12, 0.24),
    gap_days: tuple[float, float] = (30.0, 300.0),
    noise: float = 0.04,
) -> tuple[Series, np.ndarray]:
    """Generate ``n`` patients' series of 2D phantoms (see :func:`make_phantoms`).

    Each patient has a body-like ellipse with two lungs and a spine, the same at every visit but
    for noise and a slight brightness change, and one bright lesion at a fixed place. Visits are
    ``min_visits..max_visits`` irregular gaps of ``gap_days`` apart (the first at day 0). In
    progressors (label 1) the lesion radius grows linearly with the days since the first visit
    (``growth``: radius units per year, the image spanning [-1, 1]); in the others it keeps the
    size a progressor with the same parameters has at one of the patient's own visits (drawn at
    random). So a frame's lesion size alone says nothing of the class, the change over the
    visits does.

    Args:
        n: patients; size: pixels per side.
        min_visits, max_visits: the range of visits per patient (drawn uniformly).
        max_length: ``T``, steps the series are padded to (at least ``max_visits``).
        rng: the source of randomness; the same generator state gives the same series.
        growth: range of the progressors' growth rates (radius per 365 days).
        gap_days: range of the gaps between visits, in days.
        noise: standard deviation of the per-visit pixel noise.

    Returns:
        The series (images ``(n, T, 1, size, size)`` uint8, lengths, times in days, labels
        ``(n,)`` int64), and the lesion radius at each step ``(n, T)`` (0 where padded).
    """
    if not 1 <= min_visits <= max_visits <= max_length:
        raise MedexpError(
            f"data.min_visits={min_visits}, data.max_visits={max_visits}, data.max_length={max_length}; expected "
            "1 <= min_visits <= max_visits <= max_length"
        )
    steps = max_length
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    grid = [axis.reshape(1, 1, -1, 1), axis.reshape(1, 1, 1, -1)]  # y, x, broadcastable to (n, T, H, W)
    shape = (n, 1, 1, 1)

    def draw(low: float, high: float, where: tuple[int, ...] = shape) -> np.ndarray:
        return rng.uniform(low, high, size=where).astype(np.float32)

    labels = rng.integers(0, 2, size=n).astype(np.int64)
    lengths = rng.integers(min_visits, max_visits + 1, size=n).astype(np.int64)
    valid = np.arange(steps) < lengths[:, None]
    gaps = rng.uniform(*gap_days, size=(n, steps)).astype(np.float32)
    gaps[:, 0] = 0.0
    times = np.where(valid, np.cumsum(gaps, axis=1), 0.0).astype(np.float32)

    # the patient's anatomy: drawn once, the same at every visit
    body_c = [draw(-0.05, 0.05), draw(-0.05, 0.05)]
    body_r = [draw(0.6, 0.75), draw(0.75, 0.9)]
    anatomy = 0.05 + _blob(grid, body_c, body_r) * draw(0.4, 0.5)
    for side in (-1.0, 1.0):
        lung_c = [body_c[0] - 0.05, body_c[1] + side * draw(0.35, 0.42)]
        anatomy -= _blob(grid, lung_c, [draw(0.3, 0.4), draw(0.2, 0.26)]) * draw(0.15, 0.22)
    spine_c = [body_c[0] + body_r[0] * 0.7, body_c[1]]
    anatomy += _blob(grid, spine_c, [draw(0.08, 0.12), draw(0.08, 0.12)]) * 0.35
    anatomy += sum(draw(-0.05, 0.05) * g for g in grid)  # smooth bias field

    # the lesion: a fixed place within 50% of the body's radii; radius per visit
    direction = rng.normal(size=(2, *shape)).astype(np.float32)
    direction /= np.linalg.norm(direction, axis=0, keepdims=True) + 1e-6
    reach = np.sqrt(draw(0, 1)) * 0.5
    lesion_c = [c + reach * r * d for c, r, d in zip(body_c, body_r, direction)]
    start, rate = draw(0.07, 0.12)[:, 0, 0, 0], draw(*growth)[:, 0, 0, 0]
    grown = start[:, None] + rate[:, None] * times / 365.0  # (n, T): a progressor's radius at each visit
    # a stable lesion keeps the size a progressor has at one of the patient's visits (its own times)
    pick = (rng.uniform(size=n) * lengths).astype(np.int64)
    radii = np.where(labels[:, None] == 1, grown, grown[np.arange(n), pick][:, None])
    radii = np.where(valid, np.minimum(radii, 0.4), 0.0).astype(np.float32)
    contrast = draw(0.2, 0.3)
    lesion = _blob(grid, lesion_c, [np.maximum(radii, 1e-3)[..., None, None]] * 2, soft=0.06) * contrast

    image = anatomy + lesion + draw(-0.03, 0.03, (n, steps, 1, 1))  # a visit's overall brightness
    image += rng.normal(0.0, noise, size=image.shape).astype(np.float32)
    images = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    images[~valid] = 0
    ids = [f"patient {i}" for i in range(n)]
    return Series(images[:, :, None], lengths, times, labels, ids), radii
