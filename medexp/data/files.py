"""Image files listed in a CSV manifest or laid out in folders, for classification or segmentation:
the DataModule (:class:`FileDataModule`) and its on-disk cache.

Manifests, folder layouts and splits are read in :mod:`medexp.data.manifest`; files in
:mod:`medexp.data.reading` (MONAI's ``LoadImage``: PNG, JPEG, BMP, TIFF, GIF, DICOM, NIfTI), channel
first. Loaded cases are MetaTensors that keep each file's affine and metadata
(:meth:`FileDataModule.load_case`), so outputs can be written aligned with their inputs; batches
hold plain tensors.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import Dataset, PersistentDataset
from monai.transforms import Compose

from medexp.data import validation
from medexp.data.base import SPLITS, ArrayDataModule
from medexp.data.caching import memory_cache
from medexp.data.folds import assign_folds, split_by_fold
from medexp.data.manifest import (
    Case,
    assign_splits,
    missing_files,
    read_manifest,
    scan_drive,
    scan_folder,
    write_splits,
)
from medexp.data.paths import file_digest, listing, located
from medexp.data.reading import CaseReader
from medexp.utils.errors import MedexpError, user_error_message

log = logging.getLogger(__name__)

FILE_TASKS = ("binary", "multiclass", "segmentation")


class SealedPersistentDataset(PersistentDataset):
    """MONAI's ``PersistentDataset`` whose cache files are encrypted with the key in ``key_env``
    (:mod:`medexp.privacy.encryption`, AES-256-GCM; None: plain files), so cached patient images
    are not left in the clear. With a key, a plain cached file is written again, sealed; a sealed
    one read with another key, or by a run without the key, is refused by name (MONAI's own class
    would take it for a corrupt file, delete it and cache the case again in the clear).
    """

    def __init__(self, data: Sequence, transform: Any, cache_dir: Path, key_env: str | None, **kwargs: Any) -> None:
        super().__init__(data, transform, cache_dir=cache_dir, **kwargs)
        self.key_env = key_env

    def _cachecheck(self, item_transformed: Any) -> Any:
        from copy import deepcopy

        from monai.utils import convert_to_tensor

        from medexp.privacy.encryption import is_encrypted_file, load_torch, save_torch

        path = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
        if path.is_file() and (is_encrypted_file(path) or not self.key_env):
            return load_torch(path, what="cached case")
        item = self._pre_transform(deepcopy(item_transformed))
        save_torch(convert_to_tensor(item, convert_numeric=False, track_meta=self.track_meta), path, self.key_env)
        return item


def _cache_mode(cache: bool | str | None) -> str | None:
    """``data.cache`` -> ``memory``, ``disk`` or None."""
    match cache:
        case None | False | "none":
            return None
        case True | "memory":
            return "memory"
        case "disk":
            return "disk"
        case _:
            raise MedexpError(f"data.cache={cache!r}; expected one of [null, memory, disk] (true: memory)")


class FileDataModule(ArrayDataModule):
    """Image files from a CSV manifest or a folder layout, for classification or segmentation.

    Reuses :class:`~medexp.data.base.ArrayDataModule`'s argument checks and data loaders; the
    cases are files instead of arrays. :meth:`setup` first checks the data
    (:mod:`medexp.data.validation`): ``scan="sample"`` reads ``scan_sample`` cases per split (the
    first always), ``scan="all"`` every case, through the same reader training uses, so a
    corrupt file, a mismatched mask or a leak stops the run before training, every problem named
    with its file and manifest line (or, with ``on_bad="skip"``, the bad cases are left out and
    listed in ``<output_dir>/skipped.csv``). Files outside the sample are first read in training
    (or when the cache is filled), where an unreadable one still stops the run.

    Without a ``split`` column, splits are drawn from ``split_seed`` (see :func:`~medexp.data.manifest.assign_splits`).
    :meth:`setup` writes the split used to ``<output_dir>/splits.csv``.

    With ``fold`` set (k-fold cross-validation), the training images are split into
    ``num_folds`` folds, stratified by class (segmentation: not stratified, as masks are not
    read before :meth:`setup`) and never splitting a patient; fold ``fold`` replaces the
    validation split. :meth:`setup` writes the assignment to ``<output_dir>/folds.csv``, and
    ``splits.csv`` holds the fold's split.

    Args:
        task: ``binary``, ``multiclass`` or ``segmentation``.
        num_classes: classes (segmentation: including the background).
        in_channels: channels, spatial_dims: 2 or 3, of images as the model receives them (after
            ``transforms``); checked on the first training image.
        manifest: CSV with columns ``image``, ``label`` (class index or mask path), optional
            ``split`` (train/val/test), ``patient_id`` and ``site`` (or ``scanner``: sets
            ``site_names``, sorted, and batches carry each image's ``site`` index; see
            :func:`~medexp.data.manifest.read_manifest`).
        root: instead of a manifest, a folder layout (see :func:`~medexp.data.manifest.scan_folder`).
        layout: how ``root`` is laid out: ``folders`` (see :func:`~medexp.data.manifest.scan_folder`) or ``drive`` (the
            DRIVE dataset as distributed, see :func:`~medexp.data.manifest.scan_drive`).
        output_dir: where ``splits.csv`` (and ``skipped.csv``) is written; None writes nothing.
        split_seed: seed of the random split; val_fraction, test_fraction: its sizes, as
            fractions of patients (of images without ``patient_id``).
        mask_threshold: how mask values become class indices (see :class:`~medexp.data.reading.CaseReader`).
        cache: keep loaded cases (and the results of their transforms up to the first random
            one): ``memory`` (or true; ``monai.data.CacheDataset``, filled at setup), ``disk``
            (``monai.data.PersistentDataset`` in ``cache_dir``, filled as cases are first read
            and kept across runs; keyed by each case's files and the transforms, so a changed
            chain is cached anew), or None/false.
        cache_dir: the folder of ``cache="disk"``.
        cache_key_env: with ``cache="disk"``, the environment variable holding the key that
            encrypts the cached cases (:class:`SealedPersistentDataset`; ``encryption.key_env``
            of the run); None: plain files.
        **kwargs: ``batch_size``, ``num_workers``, ``transforms``, ``augmentations``, ``fold``,
            ``num_folds``, ``fold_seed``, ``scan``, ``scan_sample``, ``on_bad``; see
            :class:`~medexp.data.base.ArrayDataModule`. With ``on_bad="skip"``, listed files that
            do not exist are left out too (with ``"fail"`` the manifest is refused).
    """

    def __init__(
        self,
        task: str,
        num_classes: int,
        in_channels: int,
        spatial_dims: int,
        manifest: str | Path | None = None,
        root: str | Path | None = None,
        output_dir: str | Path | None = None,
        split_seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        mask_threshold: float | None = None,
        cache: bool | str | None = False,
        cache_dir: str | Path | None = None,
        cache_key_env: str | None = None,
        layout: str = "folders",
        **kwargs,
    ) -> None:
        if task not in FILE_TASKS:
            raise MedexpError(f"data.task={task!r}; file data serve one of {list(FILE_TASKS)}")
        super().__init__(
            task=task,
            num_classes=num_classes,
            in_channels=in_channels,
            spatial_dims=spatial_dims,
            output_dir=output_dir,
            **kwargs,
        )
        if (manifest is None) == (root is None):
            given = "both" if manifest is not None else "neither"
            raise MedexpError(f"set one of data.manifest=cases.csv or data.root=DIR (a folder layout); got {given}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise MedexpError(
                f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}; expected each in (0, 1) "
                "and a sum below 1"
            )
        self.source = Path(manifest if manifest is not None else root).expanduser()
        self.cache = _cache_mode(cache)
        if self.cache == "disk" and cache_dir is None:
            raise MedexpError("data.cache=disk needs data.cache_dir (a folder for the cached cases)")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.cache_key_env = cache_key_env
        self.reader = CaseReader(task, num_classes, mask_threshold)
        if layout not in ("folders", "drive"):
            raise MedexpError(f"data.layout={layout!r}; expected one of ['folders', 'drive']")
        # the cases left out by on_bad=skip: (split, position) -> image path, for skipped.csv
        self._skipped_images: dict[tuple[str, int], str] = {}
        if manifest is not None:
            missing_ok = self.on_bad == "skip" and self.scan != "off"
            cases = read_manifest(self.source, task, num_classes, missing_ok=missing_ok)
        elif layout == "drive":
            cases = scan_drive(self.source, val_fraction, split_seed)
        else:
            cases, self.class_names = scan_folder(self.source, task, num_classes)
        if cases[0].split is None:
            cases = assign_splits(cases, split_seed, val_fraction, test_fraction, stratify=task != "segmentation")
        else:
            self._warn_shared_patients(cases)
        self.cases = {split: [case for case in cases if case.split == split] for split in SPLITS}
        # sorted: the same sites get the same indices whatever the manifest's order
        self.site_names = sorted({case.site for case in cases if case.site}) or None
        self.reader.site_index = {name: index for index, name in enumerate(self.site_names or [])}
        self.check_sites()
        if self.fold is not None:
            self._split_folds()
        for split, members in self.cases.items():
            if not members:
                raise MedexpError(
                    f"{self.source}: the {split} split is empty ({len(cases)} images); every split needs at least "
                    "one image: add data, raise data.val_fraction/data.test_fraction, or fix the split column"
                )
        log.info("%s: %s images", self.source, "/".join(f"{len(self.cases[s])} {s}" for s in SPLITS))

    def _warn_shared_patients(self, cases: list[Case]) -> None:
        splits_of: dict[str, set[str]] = {}
        for case in cases:
            if case.patient_id:
                splits_of.setdefault(case.patient_id, set()).add(case.split)
        shared = [f"{pid} in {sorted(splits)}" for pid, splits in splits_of.items() if len(splits) > 1]
        if shared:
            log.warning(
                "%s: patients in more than one split (results may be optimistic): %s", self.source, listing(shared)
            )

    def _split_folds(self) -> None:
        # the fold's validation part replaces the validation split (label_counts sees the rest)
        train = self.cases["train"]
        labels = None if self.task == "segmentation" else [case.label for case in train]
        if self.fold_by == "site":  # leave-one-site-out: fold k is site k
            folds = np.array([self.reader.site_index[case.site] for case in train], dtype=np.int64)
            split_by_fold(folds, self.fold, f"site {self.site_names[self.fold]!r}")
        else:
            folds = assign_folds(labels, [case.patient_id for case in train], self.num_folds, self.fold_seed)
        self.fold_table = [
            {"image": case.image, "patient_id": case.patient_id, "label": case.label, "fold": int(fold)}
            | ({"site": case.site} if self.site_names else {})
            for case, fold in zip(train, folds)
        ]
        self.cases["val"] = [replace(case, split="val") for case, fold in zip(train, folds) if fold == self.fold]
        self.cases["train"] = [case for case, fold in zip(train, folds) if fold != self.fold]

    def describe(self) -> str:
        return str(self.source)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self._scan()
        for split in SPLITS:
            self.datasets[split] = self._dataset(split)
        self._check_first_image()
        # the split is the same in every process (drawn from the seed); one of them records it
        if self.output_dir is not None and (self.trainer is None or self.trainer.is_global_zero):
            write_splits(self.cases, self.output_dir / "splits.csv")
        self.save_folds()
        self.save_skipped("image", lambda split, index: self._skipped_images[(split, index)])

    def _name(self, split: str, index: int) -> str:
        case = self.cases[split][index]
        return located(case.image, case.where)

    def _scan(self) -> None:
        """Check the cases (see :mod:`medexp.data.validation`) through the reader training uses;
        with ``on_bad="skip"`` leave the bad ones out of ``self.cases`` (so also out of
        ``splits.csv``, which stays a manifest of what was used)."""
        if self.scan == "off":
            return
        start = time.perf_counter()
        findings: list[validation.Finding] = []
        hashes: dict[tuple[str, int], bytes] = {}
        shapes: dict[tuple[str, int], tuple[int, ...]] = {}  # (C, *spatial) as stored
        mask_maxima: list[tuple[float, str]] = []
        scanned = {}
        for split in SPLITS:
            cases = self.cases[split]
            rows = validation.scan_indices(len(cases), self.scan, self.scan_sample, split)
            scanned[split] = (len(rows), len(cases))
            absent = set()
            if self.on_bad == "skip":  # the manifest let missing files through (missing_ok); all are looked for
                for index, case in enumerate(cases):
                    for path in missing_files(case):
                        name = located(path, case.where)
                        findings.append(validation.Finding("unreadable", split, index, name, "no such file"))
                        absent.add(index)
            for index in rows.tolist():
                if index in absent:
                    continue
                problems, image = self.reader.inspect(cases[index].item())
                if self.reader.inspected_mask_max is not None:
                    mask_maxima.append(self.reader.inspected_mask_max)
                findings += [validation.Finding(kind, split, index, name, detail) for kind, name, detail in problems]
                if image is not None and not problems:
                    hashes[(split, index)] = validation.pixel_hash(image.as_tensor().numpy())
                    shapes[(split, index)] = tuple(image.shape)
        # a setting, not a bad case: whatever data.on_bad says, skipping cases would not help
        problem = validation.mask_threshold_problem(self.reader.mask_threshold, mask_maxima)
        if problem:
            raise MedexpError(f"data check of {self.source}: {problem}")
        findings += validation.duplicate_findings(hashes, self._name)
        findings += self._shape_findings(shapes)
        drop = validation.resolve(
            findings, scanned, time.perf_counter() - start, source=str(self.source), scan=self.scan, on_bad=self.on_bad
        )
        if not drop:
            return
        self.skipped = [finding for finding in findings if (finding.split, finding.index) in drop]
        self._skipped_images = {(split, index): str(self.cases[split][index].image) for split, index in drop}
        for split in SPLITS:
            total = len(self.cases[split])
            self.cases[split] = [case for index, case in enumerate(self.cases[split]) if (split, index) not in drop]
            if not self.cases[split]:
                raise MedexpError(
                    f"{self.source}: all {total} cases of the {split} split are bad (data.on_bad=skip left them out); "
                    "nothing is left to use"
                )

    def _shape_findings(self, stored: dict[tuple[str, int], tuple[int, ...]]) -> list[validation.Finding]:
        """Scanned images that could not share a batch or the net with the others after their
        split's transforms (see :func:`medexp.data.validation.shape_findings`), e.g. a grey PNG
        among RGB ones, or sizes that no resizing transform makes agree. Images of one stored
        shape leave the transforms with one shape: one of each stored shape goes through them,
        and where every image is stored alike (the usual case), none."""
        args = (self._name, self.in_channels, self.spatial_dims, self.batch_size)
        if not validation.shape_findings(stored, *args):
            return []
        shapes, failed, chains = {}, [], {}
        for (split, index), shape in stored.items():
            key = (split, shape)
            if key not in chains:
                chain = self.transform(split, head=[self.reader])
                try:
                    sample = chain(self.cases[split][index].item())
                    # patch samplers (e.g. RandCropByPosNegLabeld) turn one case into a list of samples
                    chains[key] = tuple((sample[0] if isinstance(sample, list) else sample)["image"].shape)
                except Exception as exc:  # noqa: BLE001 - any transform's complaint about this shape
                    reason = (str(exc).strip().splitlines() or [""])[-1][:200]
                    chains[key] = f"data.transforms fail on an image of shape {shape} ({type(exc).__name__}: {reason})"
            if isinstance(chains[key], str):
                failed.append(
                    validation.Finding("shape_disagreement", split, index, self._name(split, index), chains[key])
                )
            else:
                shapes[(split, index)] = chains[key]
        return failed + validation.shape_findings(shapes, *args)

    def _dataset(self, split: str) -> Dataset:
        items = [case.item() for case in self.cases[split]]
        transform = self.transform(split, head=[self.reader])
        if self.cache is None:
            return Dataset(items, transform)
        if self.cache == "disk":
            from monai.data.utils import json_hashing

            self.cache_dir.mkdir(parents=True, exist_ok=True)
            return SealedPersistentDataset(
                items, transform, self.cache_dir, self.cache_key_env, hash_transform=json_hashing
            )
        try:
            return memory_cache(items, transform, f"{split} cases")
        except RuntimeError as exc:  # MONAI wraps a transform's error; ours names the file
            message = user_error_message(exc)
            if message is None:
                raise
            raise MedexpError(message) from exc

    def _check_first_image(self) -> None:
        sample = self.datasets["train"][0]
        # patch samplers (e.g. RandCropByPosNegLabeld) turn one case into a list of samples
        shape = tuple((sample[0] if isinstance(sample, list) else sample)["image"].shape)
        if len(shape) != 1 + self.spatial_dims or shape[0] != self.in_channels:
            case = self.cases["train"][0]
            expected = ", ".join([str(self.in_channels)] + ["S"] * self.spatial_dims)
            raise MedexpError(
                f"{located(case.image, case.where)}: the first training image has shape {shape} (channels, *spatial) "
                f"after data.transforms, but data.in_channels={self.in_channels} and "
                f"data.spatial_dims={self.spatial_dims} expect ({expected}); set data.in_channels={shape[0]} "
                f"data.spatial_dims={len(shape) - 1}, or add a transform that converts the images"
            )

    def predict_transform(self) -> Compose:
        """The test split's chain for one image file, ``{"image": path}`` -> ``{"image": (C, *spatial)}``:
        the reader, then ``transforms`` (see :meth:`ArrayDataModule.predict_transform`)."""
        return self.transform("predict", head=[self.reader])

    def fingerprint(self) -> str:
        """SHA-256 of the splits' cases: each file's bytes (image, mask, roi), label and split.
        Reads every file once; file names and folders do not count, so a copied dataset matches."""
        digest = hashlib.sha256()
        for split in SPLITS:
            for case in self.cases[split]:
                digest.update(f"{split}|{case.label if self.task != 'segmentation' else ''}|".encode())
                for path in (case.image, case.label if self.task == "segmentation" else None, case.roi):
                    if path:
                        digest.update(file_digest(Path(path)))
        if self.generated is not None:
            self.generated.fingerprint(digest, self)
        return digest.hexdigest()

    def load_case(self, split: str, index: int) -> dict[str, Any]:
        """Case ``index`` of ``split`` as loaded, before any transform: ``image`` ``(C, *spatial)`` (and
        for segmentation ``label`` ``(1, *spatial)``) MetaTensors with the file's ``affine`` and
        ``meta`` (e.g. ``filename_or_obj``), e.g. to write a prediction aligned with its input."""
        return self.reader(self.cases[split][index].item())

    def label_counts(self) -> tuple[np.ndarray, int]:
        """Training images per class, or for segmentation voxels per class (reads every training
        mask), and their total; with ``fold`` set, of the folds trained on."""
        train = self.cases["train"]
        if self.task != "segmentation":
            return np.bincount([case.label for case in train], minlength=self.num_classes), len(train)
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for case in train:
            mask = self.reader(case.item())["label"].as_tensor().long()
            counts += np.bincount(mask.flatten().numpy(), minlength=self.num_classes)
        return counts, int(counts.sum())
