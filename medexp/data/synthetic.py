"""Built-in phantom images and volumes with lesions, served as a DataModule: offline data a model
has to learn (the phantoms are drawn by :func:`~medexp.data.phantoms.make_phantoms`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medexp.data.base import SPLITS, ArrayDataModule
from medexp.data.phantoms import make_phantoms
from medexp.data.sites import apply_site, check_train_sites, deal_sites, parse_sites
from medexp.utils.errors import MedexpError


class SyntheticDataModule(ArrayDataModule):
    """Phantom images generated deterministically from ``seed`` (see :func:`~medexp.data.phantoms.make_phantoms`).

    Classification tasks also serve each validation and test image's lesion mask as
    ``sample["mask"]``, ``(1, *spatial)`` ``uint8`` (1 bright, 2 dark lesion, 0 elsewhere), to
    score saliency maps against (``medexp explain split=test``, the ``SaliencyWatch`` callback);
    the training split has none, and the model and its metrics never read them.

    Args:
        image_size: pixels (voxels) per side.
        num_samples: images per split, e.g. ``{"train": 2000, "val": 500, "test": 500}``.
        lesion_contrast: difficulty knob, see :func:`~medexp.data.phantoms.make_phantoms`.
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
            if (
                self.task not in ("binary", "multiclass")
                or fractions.shape != (self.num_classes,)
                or (not (fractions > 0).all() or abs(fractions.sum() - 1) > 1e-6)
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
