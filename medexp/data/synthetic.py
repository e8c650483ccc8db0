"""Built-in phantom images and volumes with lesions: offline data a model has to learn.

Each image is a body-like ellipse (an ellipsoid in 3D) with two darker "lungs" and a bright
"spine" under a smooth bias field and noise. Lesions are small round blobs inside the body; the
label says whether, how many, or which kind are present, or is the lesion mask itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medexp.data.base import SPLITS, ArrayDataModule
from medexp.data.sites import apply_site, check_train_sites, deal_sites, parse_sites
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


class SyntheticDataModule(ArrayDataModule):
    """Phantom images generated deterministically from ``seed`` (see :func:`make_phantoms`).

    Classification tasks also serve each validation and test image's lesion mask as
    ``sample["mask"]``, ``(1, *spatial)`` ``uint8`` (1 bright, 2 dark lesion, 0 elsewhere), to
    score saliency maps against (``medexp explain split=test``, the ``SaliencyWatch`` callback);
    the training split has none, and the model and its metrics never read them.

    Args:
        image_size: pixels (voxels) per side.
        num_samples: images per split, e.g. ``{"train": 2000, "val": 500, "test": 500}``.
        lesion_contrast: difficulty knob, see :func:`make_phantoms`.
        seed: data seed, independent of the training seed so sweeps over seeds see the same data.
        class_fractions: binary/multi-class: the frequency of each class, e.g. ``[0.9, 0.1]``
            for imbalanced data; None: equally frequent.
        sites: acquisition sites, name -> :class:`~medexp.data.sites.SiteShift` settings (e.g.
            ``{a: {}, b: {contrast: 0.6, noise: 0.05}}``); each split's samples are dealt to the
            sites in turn and carry ``site``. None: no sites.
        train_sites: names of the sites of the training and validation splits (the test split
            holds every site): train on some sites, test on others. None: all sites.
        **kwargs: see :class:`~medexp.data.base.ArrayDataModule`.
    """

    def __init__(
        self,
        image_size: int = 32,
        num_samples: dict | None = None,
        lesion_contrast: float = 1.0,
        seed: int = 0,
        class_fractions: Sequence[float] | None = None,
        sites: dict[str, Any] | None = None,
        train_sites: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        num_samples = dict(num_samples or {"train": 2000, "val": 500, "test": 500})
        if sorted(num_samples) != sorted(SPLITS) or min(num_samples.values()) < 1:
            raise MedexpError(f"data.num_samples={num_samples}; expected positive counts for {list(SPLITS)}")
        if self.task == "multilabel" and self.num_classes != 2:
            raise MedexpError("data.num_classes must be 2 for synthetic multilabel data (bright, dark lesion)")
        if self.task == "segmentation" and self.num_classes not in (2, 3):
            raise MedexpError(
                f"data.num_classes={self.num_classes}; synthetic segmentation has 2 (background, lesion) "
                "or 3 (background, bright lesion, dark lesion) classes"
            )
        if self.in_channels != 1 or self.spatial_dims not in (2, 3):
            raise MedexpError("synthetic data are grey (data.in_channels=1), 2D or 3D (data.spatial_dims)")
        if image_size < 16:
            raise MedexpError(f"data.image_size={image_size}; expected at least 16 pixels")
        if class_fractions is not None:
            fractions = np.asarray(class_fractions, dtype=np.float64)
            if self.task not in ("binary", "multiclass") or fractions.shape != (self.num_classes,) or (
                not (fractions > 0).all() or abs(fractions.sum() - 1) > 1e-6
            ):
                raise MedexpError(
                    f"data.class_fractions={list(class_fractions)}; expected {self.num_classes} positive numbers "
                    "summing to 1, one per class, for binary or multiclass data"
                )
        self.image_size = image_size
        self.num_samples = num_samples
        self.lesion_contrast = lesion_contrast
        self.seed = seed
        self.class_fractions = None if class_fractions is None else [float(f) for f in class_fractions]
        names, self.site_shifts = parse_sites(sites)
        self.site_names = names or None
        self.train_sites = check_train_sites(train_sites, names)
        # lesion masks of the loaded splits, until setup() hands them to the datasets
        self._masks: dict[str, np.ndarray] = {}

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, SPLITS.index(split)])
        images, labels, masks = make_phantoms(
            self.num_samples[split],
            self.image_size,
            self.task,
            self.num_classes,
            rng,
            self.lesion_contrast,
            self.spatial_dims,
            self.class_fractions,
        )
        if self.site_names:
            images = self._image_sites(split, images)
        # the training split's masks only where a fold of it validates
        if self.task != "segmentation" and (split != "train" or self.fold is not None):
            self._masks[split] = masks
        return images, labels

    def _image_sites(self, split: str, images: np.ndarray) -> np.ndarray:
        """Deal the split's images to the sites (the training sites for training and validation)
        and apply each site's changes; records the sites in ``loaded_sites``."""
        pool = self.train_sites if self.train_sites is not None and split != "test" else range(len(self.site_names))
        sites = deal_sites(len(images), list(pool))
        # a stream of its own: the phantoms are the same with or without sites
        rng = np.random.default_rng([self.seed, SPLITS.index(split), 1])
        images = images.copy()
        for index, shift in enumerate(self.site_shifts):
            rows = sites == index
            if rows.any():
                images[rows] = apply_site(images[rows], shift, rng)
        self.loaded_sites[split] = sites
        return images

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        super().setup(stage)
        self._attach_masks()

    def _attach_masks(self) -> None:
        """Give the validation and test datasets the masks of the rows they kept (``on_bad=skip``
        leaves rows out; with ``fold`` set, the validation rows are a fold of the training split)."""
        masks, self._masks = self._masks, {}
        if not masks:
            return
        dropped: dict[str, set[int]] = {}
        for finding in self.skipped:
            dropped.setdefault(finding.split, set()).add(finding.index)

        def kept(split: str) -> np.ndarray:
            return masks[split][[i for i in range(len(masks[split])) if i not in dropped.get(split, set())]]

        served = {"test": kept("test")}
        if self.fold is None:
            served["val"] = kept("val")
        else:
            served["val"] = masks["train"][[row["index"] for row in self.fold_table if row["fold"] == self.fold]]
        for split, split_masks in served.items():
            if len(split_masks) != len(self.datasets[split]):  # never expected: the rows went astray
                raise RuntimeError(f"{len(split_masks)} masks for {len(self.datasets[split])} {split} samples")
            self.datasets[split].masks = np.ascontiguousarray(split_masks)

    def describe(self) -> str:
        return f"synthetic {self.task} data"
