"""Pairs of images to register, a fixed and a moving image (and optional masks), as dict batches.

A sample is ``{"fixed": (C, *spatial), "moving": (C, *spatial)}`` float32, plus
``"fixed_label"`` and ``"moving_label"`` ``(1, *spatial)`` float32 masks (1 foreground, 0
elsewhere) where the data have them. Two sources:

- :class:`SyntheticRegistrationDataModule`: phantoms of :mod:`medexp.data.phantoms` (moving) and
  the same phantoms warped by random smooth deformations drawn from a seed (fixed), 2D or 3D, so
  the deformation a model should recover is known; the lesion masks are the labels;
- :class:`FileRegistrationDataModule`: image files listed in a CSV manifest (columns ``fixed``,
  ``moving``, optional ``fixed_label``, ``moving_label``, ``split``, ``patient_id``), read with
  the file reader of :mod:`medexp.data.reading`.

Registration works in voxel space: the images of a pair must share one grid (spatial shape),
as after resampling both to a common space.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.data import Dataset as MonaiDataset
from monai.transforms import Compose, EnsureTyped, Resized, ScaleIntensityRanged, Transform
from torch.utils.data import Dataset

from medexp.data import validation
from medexp.data.base import SPLITS, DataModule, check_num_samples, monai_chain
from medexp.data.caching import memory_cache
from medexp.data.manifest import Case, assign_splits, read_csv_rows
from medexp.data.paths import file_digest, has_geometry, listing, located, resolve_path
from medexp.data.phantoms import make_phantoms, random_ddf, warp_arrays
from medexp.data.reading import CaseReader
from medexp.utils.errors import MedexpError, find_user_error

log = logging.getLogger(__name__)

PAIR_KEYS = ("fixed", "moving")
LABEL_KEYS = ("fixed_label", "moving_label")
KEYS = (*PAIR_KEYS, *LABEL_KEYS)
OPTIONAL_COLUMNS = (*LABEL_KEYS, "split", "patient_id")


class PairDataset(Dataset):
    """Pairs held in memory, served as dicts of float32 tensors (see the module).

    Args:
        arrays: ``fixed``, ``moving`` ``(N, C, *spatial)`` images and optionally ``fixed_label``,
            ``moving_label`` ``(N, 1, *spatial)`` masks.
        transform: applied to each sample dict (MONAI dictionary transforms).
        true_ddf: ``(N, D, *spatial)``, the displacement that warps each moving image onto its
            fixed image, where it is known (synthetic pairs); never served in batches.
    """

    def __init__(
        self, arrays: dict[str, np.ndarray], transform: Callable | None = None, true_ddf: np.ndarray | None = None
    ) -> None:
        lengths = {key: len(array) for key, array in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays of different lengths: {lengths}")
        self.arrays = arrays
        self.transform = transform
        self.true_ddf = true_ddf

    def __len__(self) -> int:
        return len(self.arrays["fixed"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {key: torch.from_numpy(array[index]).float() for key, array in self.arrays.items()}
        return self.transform(sample) if self.transform is not None else sample


@dataclass(frozen=True)
class Pair:
    """One fixed and one moving image file, and optionally their mask files.

    ``split`` is None until a split is assigned; ``where`` names the manifest line.
    """

    fixed: Path
    moving: Path
    fixed_label: Path | None = None
    moving_label: Path | None = None
    split: str | None = None
    patient_id: str = ""
    where: str = ""

    def item(self) -> dict[str, str]:
        """The dict a MONAI dataset holds for this pair (see :class:`PairReader`)."""
        item = {"fixed": str(self.fixed), "moving": str(self.moving), "where": self.where}
        if self.fixed_label is not None and self.moving_label is not None:
            item.update(fixed_label=str(self.fixed_label), moving_label=str(self.moving_label))
        return item


def read_pairs(path: Path, labels: bool = True) -> list[Pair]:
    """Read a CSV of pairs: columns ``fixed``, ``moving`` and optionally ``fixed_label``,
    ``moving_label`` (masks, both or neither, on every row), ``split`` (train/val/test) and
    ``patient_id`` (pairs of one patient stay in one split). Relative paths resolve against the
    CSV's folder; other columns are ignored.

    Args:
        labels: read the mask columns (False: only the images, e.g. to predict).

    Raises:
        MedexpError: naming the file and the offending lines, for a missing or unreadable CSV,
            missing columns, one mask column without the other, rows without masks where the
            columns exist, unknown split values, or listed files that do not exist.
    """
    if not path.is_file():
        raise MedexpError(
            f"pair list not found: {path}; expected a CSV file with columns {list(PAIR_KEYS)} "
            f"(optional {list(OPTIONAL_COLUMNS)})"
        )
    columns, rows = read_csv_rows(
        path, PAIR_KEYS, f"a pair list needs columns {list(PAIR_KEYS)} and may have {list(OPTIONAL_COLUMNS)}"
    )
    label_columns = [key for key in LABEL_KEYS if key in columns] if labels else []
    if len(label_columns) == 1:
        raise MedexpError(
            f"{path}: column {label_columns[0]!r} without {({*LABEL_KEYS} - {label_columns[0]}).pop()!r}; "
            "masks are compared pairwise, so give both mask columns or neither"
        )
    base = path.absolute().parent
    bad_splits, no_masks, missing, pairs = [], [], [], []
    for line, row in rows:
        files: dict[str, Path] = {}
        for key in (*PAIR_KEYS, *label_columns):
            if not row.get(key):
                (no_masks if key in LABEL_KEYS else missing).append(f"line {line}: no {key}")
                continue
            files[key] = resolve_path(base, row[key])
            if not files[key].exists():
                missing.append(f"line {line}: {key} {row[key]!r}")
        split = row.get("split") if labels and "split" in columns else None
        if split is not None and split not in SPLITS:
            bad_splits.append(f"line {line}: {split!r}")
        pairs.append(
            Pair(
                files.get("fixed", Path()),
                files.get("moving", Path()),
                files.get("fixed_label"),
                files.get("moving_label"),
                split,
                row.get("patient_id", ""),
                f"{path} line {line}",
            )
        )
    if bad_splits:
        raise MedexpError(f"{path}: unknown split value(s) {listing(bad_splits)}; expected one of {list(SPLITS)}")
    if no_masks:
        raise MedexpError(
            f"{path}: {len(no_masks)} mask cell(s) are empty: {listing(no_masks)}; pairs in one batch must all "
            "have masks or none, so fill them or drop the fixed_label/moving_label columns"
        )
    if missing:
        raise MedexpError(
            f"{path}: {len(missing)} listed file(s) do not exist (relative paths resolve against {base}): "
            f"{listing(missing)}"
        )
    return pairs


class PairReader(Transform):
    """Load the files of one pair and check them, as the first transform of a file dataset.

    Input ``{"fixed": path, "moving": path, "where": manifest line}`` and optionally
    ``"fixed_label"``, ``"moving_label"`` mask paths; output float32 MetaTensors ``(C, *spatial)``
    carrying each file's affine and metadata, masks ``(1, *spatial)`` set to 1 where their value
    is above ``mask_threshold`` and 0 elsewhere.

    Raises:
        MedexpError: naming the file and manifest line, when a file cannot be read, an image
            holds NaN/Inf or is constant, the moving image's shape differs from the fixed one's,
            or a mask has several channels, another spatial shape than its image, or another
            geometry (affine) where both files carry one.
    """

    def __init__(self, mask_threshold: float = 0.0) -> None:
        self.mask_threshold = mask_threshold
        # only CaseReader's reading is used: its format handling (PIL for raster images, MONAI's
        # readers for NIfTI and DICOM); the task and classes apply to its checks, not to read()
        self.reader = CaseReader("registration", 1)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        where = data.get("where", "")
        sample = {key: self.reader.read(data[key], where) for key in KEYS if key in data}
        for key in PAIR_KEYS:
            for _, _, detail in validation.content_problems(sample[key].as_tensor().numpy()[None]):
                raise MedexpError(f"{located(data[key], where)}: the {key} image is unusable: {detail}")
        fixed, moving = sample["fixed"], sample["moving"]
        if moving.shape != fixed.shape:
            raise MedexpError(
                f"{located(data['moving'], where)}: moving image of shape {tuple(moving.shape)} (channels, *spatial) but its "
                f"fixed image {data['fixed']} has {tuple(fixed.shape)}; a pair must share channels and grid (resample "
                "both to one space first)"
            )
        for label_key, image_key in zip(LABEL_KEYS, PAIR_KEYS):
            if label_key not in sample:
                continue
            mask, image, name = sample[label_key], sample[image_key], located(data[label_key], where)
            if mask.shape[0] != 1 or mask.shape[1:] != image.shape[1:]:
                raise MedexpError(
                    f"{name}: mask of shape {tuple(mask.shape)} (channels, *spatial); expected one channel of its "
                    f"{image_key} image's spatial shape {tuple(image.shape[1:])}"
                )
            if has_geometry(data[label_key]) and has_geometry(data[image_key]):
                problem = validation.geometry_problem(image.affine, mask.affine, data[image_key])
                if problem:
                    raise MedexpError(f"{name}: {problem}")
            sample[label_key] = (mask > self.mask_threshold).to(mask.dtype)
        return sample


class RegistrationDataModule(DataModule):
    """Base of the registration data modules: their shared arguments and sample chain.

    Subclasses fill ``self.datasets`` (``train``, ``val``, ``test``) in :meth:`setup` and implement
    :meth:`predict_transform` and :meth:`fingerprint` (see :class:`~medexp.data.base.DataModule`).

    Args:
        task: must be ``registration`` (model configs read it, as every data module's).
        num_classes: classes of the masks: 2 (background, foreground), the only choice; read by
            model configs, so a model for another task is refused with the models that fit.
        in_channels: channels of each image; spatial_dims: 2 or 3. Model configs read both.
        batch_size: pairs per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        transforms: MONAI dictionary transforms for every split, on the keys of the module
            docstring (e.g. intensity scaling of ``fixed`` and ``moving``).
        intensity_range: ``[low, high]`` of image values after ``transforms`` (MI expects [0, 1]).
    """

    def __init__(
        self,
        task: str = "registration",
        num_classes: int = 2,
        in_channels: int = 1,
        spatial_dims: int = 2,
        batch_size: int = 16,
        num_workers: int = 0,
        transforms: Sequence[Callable] = (),
        intensity_range: Sequence[float] | None = None,
    ) -> None:
        if task != "registration":
            raise MedexpError(f"data.task={task!r}; registration data serve data.task=registration")
        if spatial_dims not in (2, 3):
            raise MedexpError(f"data.spatial_dims={spatial_dims}; registration data are 2D or 3D")
        if num_classes != 2:
            raise MedexpError(
                f"data.num_classes={num_classes}; registration masks are binary (background, foreground): 2"
            )
        if in_channels < 1 or batch_size < 1 or num_workers < 0:
            raise MedexpError(
                f"data.in_channels={in_channels}, data.batch_size={batch_size}, data.num_workers={num_workers}; "
                "expected positive channels and batch size, and workers >= 0"
            )
        super().__init__(task, num_classes, in_channels, spatial_dims, batch_size, num_workers)
        self.transforms = list(transforms)
        self.intensity_range = None if intensity_range is None else [float(v) for v in intensity_range]

    def transform(self, head: Sequence[Callable] = (), predict: bool = False) -> Compose:
        """The per-sample chain: ``head`` (e.g. a file reader), ``transforms``, then plain float32
        tensors; with ``predict``, MetaTensors that keep their metadata (file names)."""
        ensure = EnsureTyped(keys=list(KEYS), dtype=torch.float32, track_meta=predict, allow_missing_keys=True)
        return monai_chain([*head, *self.transforms, ensure], predict)

    def _loader_type(self, dataset: Dataset) -> tuple[type[DataLoader], dict[str, Any]]:
        # MONAI's loader seeds the random transforms of each worker
        return DataLoader, {}


class SyntheticRegistrationDataModule(RegistrationDataModule):
    """Phantom pairs generated deterministically from ``seed``.

    Each moving image is a phantom of :func:`~medexp.data.phantoms.make_phantoms` (with 0-3
    lesions, whose mask is its label); its fixed image is the same phantom warped by a random
    smooth deformation (:func:`~medexp.data.phantoms.random_ddf`), its mask warped alike (bilinear, above 0.5). The deformation is
    kept as the datasets' ``true_ddf``: the displacement a perfect model outputs.

    Args:
        image_size: pixels (voxels) per side, at least 16.
        num_samples: pairs per split, e.g. ``{"train": 400, "val": 100, "test": 100}``.
        max_displacement: the largest displacement of a control point, as a fraction of
            ``image_size``.
        control_points: control points of the deformation per axis (at least 2; more: less smooth).
        lesion_contrast: see :func:`~medexp.data.phantoms.make_phantoms`.
        seed: data seed, independent of the training seed.
        **kwargs: see :class:`RegistrationDataModule`.
    """

    def __init__(
        self,
        image_size: int = 32,
        num_samples: dict[str, int] | None = None,
        max_displacement: float = 0.08,
        control_points: int = 4,
        lesion_contrast: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        num_samples = check_num_samples(num_samples)
        if self.in_channels != 1:
            raise MedexpError(f"data.in_channels={self.in_channels}; synthetic pairs are grey (1 channel)")
        if image_size < 16:
            raise MedexpError(f"data.image_size={image_size}; expected at least 16 pixels")
        if not 0 <= max_displacement < 0.5:
            raise MedexpError(f"data.max_displacement={max_displacement}; expected a fraction of the image in [0, 0.5)")
        if control_points < 2:
            raise MedexpError(f"data.control_points={control_points}; expected at least 2 per axis")
        self.image_size, self.num_samples, self.seed = image_size, num_samples, seed
        self.max_displacement, self.control_points = max_displacement, control_points
        self.lesion_contrast = lesion_contrast

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        size, dims = self.image_size, self.spatial_dims
        for split in SPLITS:
            rng = np.random.default_rng([self.seed, SPLITS.index(split)])
            n = self.num_samples[split]
            images, masks, _ = make_phantoms(n, size, "segmentation", 2, rng, self.lesion_contrast, dims)
            ddf = random_ddf(n, size, dims, self.max_displacement * size, self.control_points, rng)
            moving = images.astype(np.float32) / 255
            arrays = {
                "fixed": warp_arrays(moving, ddf),
                "moving": moving,
                # warped as the task warps masks for Dice (bilinear, above 0.5): the deformation scores 1
                "fixed_label": (warp_arrays(masks, ddf) > 0.5).astype(np.uint8),
                "moving_label": masks,
            }
            self.datasets[split] = PairDataset(arrays, self.transform(), true_ddf=ddf)

    def predict_transform(self) -> Compose:
        """Image files read as the phantoms are served: 8-bit values scaled to [0, 1]."""
        scale = ScaleIntensityRanged(keys=list(PAIR_KEYS), a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0)
        return self.transform(head=[PairReader(), scale], predict=True)

    def fingerprint(self) -> str:
        """SHA-256 of the pairs of every split (images and masks, in order). Call after :meth:`setup`."""
        digest = hashlib.sha256()
        for split in SPLITS:
            digest.update(split.encode())
            for key, array in self.datasets[split].arrays.items():
                array = np.ascontiguousarray(array)
                digest.update(f"{key}{array.dtype}{array.shape}".encode())
                digest.update(array.tobytes())
        return digest.hexdigest()

    def describe(self) -> str:
        return "synthetic registration pairs"


class FileRegistrationDataModule(RegistrationDataModule):
    """Pairs of image files from a CSV manifest (see :func:`read_pairs`).

    Files are read with the reader of :mod:`medexp.data.reading` (PNG, JPEG, BMP, TIFF, GIF,
    DICOM, NIfTI) and checked as they are loaded (:class:`PairReader`); :meth:`setup` loads the
    first training pair, so a broken manifest stops the run before training. Without a
    ``split`` column, pairs are split at random from ``split_seed``, keeping each patient's pairs
    in one split (see :func:`~medexp.data.manifest.assign_splits`); :meth:`setup` writes the split
    used to ``<output_dir>/splits.csv``, itself a manifest.

    Args:
        manifest: the CSV of pairs.
        output_dir: where ``splits.csv`` is written; None writes nothing.
        split_seed: seed of the random split; val_fraction, test_fraction: its sizes, as
            fractions of patients (of pairs without ``patient_id``).
        image_size: resample every image and mask to this many pixels (voxels) per axis (MONAI
            ``Resized``: area for images, nearest for masks), e.g. for GlobalNet, which needs one
            input size; None keeps the files' sizes (a batch then needs pairs of one size).
        mask_threshold: mask values above it are foreground.
        cache: keep loaded pairs (and their deterministic transforms) in memory.
        **kwargs: see :class:`RegistrationDataModule`.
    """

    def __init__(
        self,
        manifest: str | Path | None = None,
        output_dir: str | Path | None = None,
        split_seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        image_size: int | None = None,
        mask_threshold: float = 0.0,
        cache: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if manifest is None:
            raise MedexpError(
                "data.manifest=null; set it to a CSV of pairs with columns fixed, moving (optional fixed_label, "
                "moving_label, split, patient_id)"
            )
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise MedexpError(
                f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}; expected each in (0, 1) "
                "and a sum below 1"
            )
        if image_size is not None and image_size < 1:
            raise MedexpError(f"data.image_size={image_size}; expected null or a positive number of pixels per axis")
        self.source = Path(manifest).expanduser()
        self.output_dir = Path(output_dir).expanduser() if output_dir else None
        self.image_size, self.cache = image_size, cache
        self.reader = PairReader(mask_threshold)
        pairs = read_pairs(self.source)
        if pairs[0].split is None:
            # assign_splits groups Cases by patient; a pair's fixed image stands for it
            cases = assign_splits(
                [Case(pair.fixed, 0, patient_id=pair.patient_id) for pair in pairs],
                split_seed,
                val_fraction,
                test_fraction,
                stratify=False,
            )
            pairs = [replace(pair, split=case.split) for pair, case in zip(pairs, cases)]
        self.pairs = {split: [pair for pair in pairs if pair.split == split] for split in SPLITS}
        for split, members in self.pairs.items():
            if not members:
                raise MedexpError(
                    f"{self.source}: the {split} split is empty ({len(pairs)} pairs); every split needs at least one "
                    "pair: add pairs, raise data.val_fraction/data.test_fraction, or fix the split column"
                )
        log.info("%s: %s pairs", self.source, "/".join(f"{len(self.pairs[s])} {s}" for s in SPLITS))

    def head(self) -> list[Callable]:
        """The reader and, with ``image_size``, the resampling to it."""
        if self.image_size is None:
            return [self.reader]
        resize = Resized(
            keys=list(KEYS),
            spatial_size=[self.image_size] * self.spatial_dims,
            mode=["area", "area", "nearest", "nearest"],
            allow_missing_keys=True,
        )
        return [self.reader, resize]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        transform = self.transform(head=self.head())
        try:
            for split in SPLITS:
                items = [pair.item() for pair in self.pairs[split]]
                self.datasets[split] = (
                    memory_cache(items, transform, f"{split} pairs") if self.cache else MonaiDataset(items, transform)
                )
            self._check_first_pair()
        except RuntimeError as exc:  # MONAI wraps a transform's error; ours names the file
            error = find_user_error(exc)
            if error is None:
                raise
            raise error from exc
        if self.output_dir is not None and (self.trainer is None or self.trainer.is_global_zero):
            self._write_splits(self.output_dir / "splits.csv")

    def _check_first_pair(self) -> None:
        shape = tuple(self.datasets["train"][0]["fixed"].shape)
        if len(shape) != 1 + self.spatial_dims or shape[0] != self.in_channels:
            pair = self.pairs["train"][0]
            raise MedexpError(
                f"{located(pair.fixed, pair.where)}: the first training pair has images of shape {shape} (channels, "
                f"*spatial) after data.transforms, but data.in_channels={self.in_channels} and "
                f"data.spatial_dims={self.spatial_dims}; set data.in_channels={shape[0]} data.spatial_dims={len(shape) - 1}"
            )

    def _write_splits(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow([*KEYS, "split", "patient_id"])
            for split in SPLITS:
                writer.writerows(
                    [p.fixed, p.moving, p.fixed_label or "", p.moving_label or "", split, p.patient_id]
                    for p in self.pairs[split]
                )

    def predict_transform(self) -> Compose:
        """The test split's chain for a pair of files (masks are not read)."""
        return self.transform(head=self.head(), predict=True)

    def fingerprint(self) -> str:
        """SHA-256 of the splits' files (bytes of images and masks, in order) and split names."""
        digest = hashlib.sha256()
        for split in SPLITS:
            for pair in self.pairs[split]:
                digest.update(split.encode())
                for path in (pair.fixed, pair.moving, pair.fixed_label, pair.moving_label):
                    if path is not None:
                        digest.update(file_digest(path))
        return digest.hexdigest()

    def describe(self) -> str:
        return str(self.source)
