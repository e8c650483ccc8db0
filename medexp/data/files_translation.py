"""Image-to-image translation data from files (``data=files_translation``): pairs of a source and
a target image listed in a CSV manifest, or two folders of unpaired images; and
:func:`slice_pairs`, which cuts two co-registered volumes into 2D slice pairs with a manifest.

Batches are ``{"image": (B, C_in, *spatial), "target": (B, C_out, *spatial)}`` float32 (the
source and the target), read by the reader of :mod:`medexp.data.reading` (PNG, JPEG, BMP, TIFF,
GIF, DICOM, NIfTI). Two layouts:

- a manifest with columns ``source``, ``target`` and optionally ``split`` (train/val/test) and
  ``patient_id`` (without ``split``, patients are split at random from ``split_seed``, as
  :class:`~medexp.data.files.FileDataModule` splits). Each row is a pair, so validation and test
  targets are the true translations of their sources (``truth: true``). With ``paired: true``
  the source and target of a row must share a grid: the same spatial shape, and for files with
  geometry (NIfTI, DICOM) the same affine within tolerance. With ``paired: false`` the training
  split's targets are drawn from an independent permutation per epoch (unpaired training, e.g.
  CycleGAN on paired data), and the evaluation splits keep their rows' targets;
- two folders, ``source_dir`` and ``target_dir`` (``paired: false``, ``truth: false``): each
  folder's files are split at random on their own; a source of the evaluation splits is served
  with a target of the same split (by position), which is not its translation.

Predictions on new files (``medexp predict``) go through :meth:`FileTranslationDataModule.predict_transform`,
whose samples keep their file's geometry (MetaTensors) so the translated image can be written
where the input lies (:class:`~medexp.inference.writers.ImageWriter`).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Transform
from torch.utils.data import Dataset

from medexp.data import validation
from medexp.data.base import SPLITS
from medexp.data.manifest import Case, assign_splits, read_csv_rows
from medexp.data.paths import file_digest, folder_entries, has_geometry, listing, located, resolve_path
from medexp.data.reading import CaseReader, UnreadableFile
from medexp.data.sampling import EpochShuffleSampler, epoch_seed
from medexp.data.translation import KEYS, TranslationDataModule
from medexp.utils.errors import MedexpError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("source", "target")
OPTIONAL_COLUMNS = ("split", "patient_id")
# how far two affines may differ (in their units: mm for NIfTI and DICOM) and still share a grid
AFFINE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class TranslationCase:
    """One source image and its target (None in unpaired folders, where targets are listed apart).

    ``split`` is None until a split is assigned; ``where`` names the manifest line.
    """

    source: Path
    target: Path | None = None
    split: str | None = None
    patient_id: str = ""
    where: str = ""


def read_translation_manifest(path: Path, missing_ok: bool = False) -> list[TranslationCase]:
    """Read a CSV of translation pairs: columns ``source``, ``target`` and optionally ``split``
    and ``patient_id``; relative paths resolve against the CSV's folder, other columns are ignored.

    Args:
        missing_ok: keep rows whose files do not exist (the data check reports them and
            ``data.on_bad=skip`` leaves them out) instead of raising.

    Raises:
        MedexpError: naming the file and its offending lines, for a missing or unreadable CSV,
            missing columns, unknown split values or listed files that do not exist.
    """
    if not path.is_file():
        raise MedexpError(
            f"data.manifest={str(path)!r}: no such file; expected a CSV with columns {list(REQUIRED_COLUMNS)} "
            f"(optional {list(OPTIONAL_COLUMNS)}), or data.source_dir and data.target_dir for unpaired folders"
        )
    columns, rows = read_csv_rows(
        path,
        REQUIRED_COLUMNS,
        f"a translation manifest needs columns {list(REQUIRED_COLUMNS)} and may have {list(OPTIONAL_COLUMNS)}",
    )
    base = path.absolute().parent
    bad_splits, missing, cases = [], [], []
    for line, row in rows:
        files = {}
        for key in REQUIRED_COLUMNS:
            files[key] = resolve_path(base, row[key]) if row[key] else None
            if files[key] is None or not files[key].exists():
                missing.append(f"line {line}: {key} {row[key]!r}")
        split = row.get("split") if "split" in columns else None
        if split is not None and split not in SPLITS:
            bad_splits.append(f"line {line}: {split!r}")
        source = files["source"] or base / f"<empty source, line {line}>"
        target = files["target"] or base / f"<empty target, line {line}>"
        cases.append(TranslationCase(source, target, split, row.get("patient_id", ""), f"{path} line {line}"))
    if bad_splits:
        raise MedexpError(
            f"{path}: unknown split value(s) {listing(bad_splits)}; expected one of {list(SPLITS)} "
            "(or no split column, to split by data.split_seed)"
        )
    if missing and not missing_ok:
        raise MedexpError(
            f"{path}: {len(missing)} listed file(s) do not exist (relative paths resolve against {base}): "
            f"{listing(missing)}. Fix the paths, or set data.on_bad=skip to train without these rows"
        )
    return cases


def _folder_files(folder: Path, key: str) -> list[Path]:
    if not folder.is_dir():
        raise MedexpError(f"data.{key}={str(folder)!r} is not a folder; point it at a folder of images")
    files = folder_entries(folder)
    if not files:
        raise MedexpError(f"data.{key}={str(folder)!r}: the folder holds no images")
    return files


def _split_files(files: list[Path], seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[Path]]:
    cases = assign_splits([Case(path, 0) for path in files], seed, val_fraction, test_fraction, stratify=False)
    return {split: [case.image for case in cases if case.split == split] for split in SPLITS}


def grid_problem(source: Any, target: Any, source_file: str, target_file: str) -> tuple[str, str] | None:
    """Why a source and its target (``(C, *spatial)`` MetaTensors as read) do not share a grid, as
    ``(kind, detail)`` (kinds of :data:`medexp.data.validation.KINDS`), or None when they do:
    their spatial shapes differ, or both files carry geometry and their affines differ."""
    if tuple(source.shape[1:]) != tuple(target.shape[1:]):
        return "shape_mismatch", (
            f"target of spatial shape {tuple(target.shape[1:])} does not share a grid with its source {source_file} "
            f"of spatial shape {tuple(source.shape[1:])}; resample both to one grid first"
        )
    if has_geometry(source_file) and has_geometry(target_file):
        a = np.asarray(source.affine, dtype=np.float64)
        b = np.asarray(target.affine, dtype=np.float64)
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-5, atol=AFFINE_TOLERANCE):
            return "geometry_mismatch", (
                f"target affine {np.round(b, 4).tolist()} differs from its source {source_file}'s "
                f"{np.round(a, 4).tolist()} (tolerance {AFFINE_TOLERANCE}); resample both to one grid first"
            )
    return None


class TranslationReader(Transform):
    """Load a source (``image``) and, where the sample names one, its ``target``, as the first
    transform of a translation dataset: ``{"image": path, "target": path, "where": line}`` ->
    ``{"image": (C_in, *spatial), "target": (C_out, *spatial)}`` float32 MetaTensors carrying
    their file's affine and metadata. A prediction input (``{"image": path}``) gives the image alone.

    Args:
        paired: check that source and target share a grid (see :func:`grid_problem`).

    Raises:
        MedexpError: naming the files and manifest line, when a file cannot be read or, with
            ``paired``, the pair does not share a grid.
    """

    def __init__(self, paired: bool) -> None:
        self.paired = paired
        # only CaseReader's reading is used (PIL for raster images, MONAI's readers for NIfTI and DICOM)
        self.reader = CaseReader("translation", 1)

    def load(self, data: dict[str, Any]) -> dict[str, Any]:
        """The files of a sample as stored, unchecked. Raises :class:`~medexp.data.reading.UnreadableFile`."""
        where = data.get("where", "")
        return {key: self.reader.read(data[key], where) for key in KEYS if key in data}

    def problems(self, data: dict[str, Any], sample: dict[str, Any]) -> list[tuple[str, str, str]]:
        """``(kind, file, detail)`` of what makes a loaded pair unusable: NaN/Inf or constant
        sources, NaN/Inf targets and, with ``paired``, a grid mismatch."""
        where = data.get("where", "")
        found = [
            (kind, located(data["image"], where), f"the source image: {detail}")
            for _, kind, detail in validation.content_problems(sample["image"].as_tensor().numpy()[None])
        ]
        if "target" not in sample:
            return found
        found += [
            (kind, located(data["target"], where), f"the target image: {detail}")
            for _, kind, detail in validation.content_problems(sample["target"].as_tensor().numpy()[None])
            if kind == "nan_inf"  # a constant target (e.g. empty tissue) is a valid translation
        ]
        if self.paired:
            problem = grid_problem(sample["image"], sample["target"], str(data["image"]), str(data["target"]))
            if problem:
                found.append((problem[0], located(data["target"], where), problem[1]))
        return found

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        sample = self.load(data)
        if self.paired and "target" in sample:
            problem = grid_problem(sample["image"], sample["target"], str(data["image"]), str(data["target"]))
            if problem:
                raise MedexpError(f"{located(data['target'], data.get('where', ''))}: {problem[1]}")
        return sample


class TranslationFiles(Dataset):
    """Source and target files of one split, each sample read and prepared by ``transform``.

    Index ``i`` gives source ``i`` with target ``i`` modulo the number of targets (paired data:
    its own target); an index ``(i, j)`` (drawn by :class:`UnpairedFileSampler`) gives source ``i``
    with target ``j``.

    Args:
        sources: ``{"image": path, "where": line}`` per source.
        targets: target paths (paired: one per source, aligned).
        transform: the sample chain (its first step reads the files).
    """

    def __init__(self, sources: list[dict[str, str]], targets: list[str], transform: Callable) -> None:
        self.sources, self.targets, self.transform = sources, targets, transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        i, j = index if isinstance(index, tuple) else (index, index % len(self.targets))
        return self.transform({**self.sources[i], "target": self.targets[j]})


class UnpairedFileSampler(EpochShuffleSampler):
    """Unpaired training over files: per epoch a permutation of the sources and an independent
    one of the targets (repeated or cut to the sources' count: folders may hold different
    numbers), both drawn from ``(seed, epoch)``; yields ``(source index, target index)`` for
    :class:`TranslationFiles`, which reads only the two files each sample uses (unlike
    :class:`~medexp.data.translation.UnpairedDataset` over paired samples).

    Args:
        data: the training :class:`TranslationFiles`.
        seed: the seed of the permutations.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, self._skip = self._skip, 0
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        sources = torch.randperm(len(self.data), generator=generator)
        n_targets = len(self.data.targets)
        rounds = -(-len(sources) // n_targets)
        targets = torch.cat([torch.randperm(n_targets, generator=generator) for _ in range(rounds)])
        yield from list(zip(sources.tolist(), targets[: len(sources)].tolist()))[skip:]


class FileTranslationDataModule(TranslationDataModule):
    """Source and target image files for image-to-image translation (see the module).

    :meth:`setup` checks the data first (:mod:`medexp.data.validation`): ``scan="sample"`` reads
    ``scan_sample`` cases per split (the first always), ``scan="all"`` every case, through the
    reader training uses; unreadable files, NaN/Inf values, constant sources and pairs that do not
    share a grid stop the run with every problem named by file and manifest line, or with
    ``on_bad="skip"`` are left out and listed in ``<output_dir>/skipped.csv`` (``warn`` keeps
    constant sources and affine mismatches with a warning). The first training sample is then
    checked against ``in_channels``, ``out_channels``, ``spatial_dims`` and both intensity ranges.
    :meth:`setup` writes the split used to ``<output_dir>/splits.csv``.

    Args:
        task: must be ``translation``.
        in_channels: source channels, out_channels: target channels, spatial_dims: 2 or 3, as
            the model receives them (after ``transforms``).
        manifest: CSV of pairs (see :func:`read_translation_manifest`); or
        source_dir, target_dir: folders of unpaired images (needs ``paired=false``, ``truth=false``).
        paired: training pairs are aligned (each source with its own target); false: the
            training targets are an independent permutation per epoch.
        truth: evaluation targets are the true translations of their sources (a manifest: true;
            folders: false).
        intensity_range, target_intensity_range: ``[low, high]`` of source and target values
            after ``transforms`` (what a generator outputs, the data range of PSNR/SSIM).
        image_size: resize sources and targets to this many pixels (voxels) per axis (MONAI
            ``Resized``, area) before ``transforms``; None keeps the files' sizes.
        transforms: MONAI dictionary transforms for every split on the keys ``image`` (source)
            and ``target``, e.g. ``ScaleIntensityRanged`` per side.
        augmentations: MONAI dictionary transforms for training samples only, before ``transforms``.
        output_dir: where ``splits.csv`` and ``skipped.csv`` are written; None writes nothing.
        split_seed, val_fraction, test_fraction: the random split of patients (of rows without
            ``patient_id``; of files in folders) without a ``split`` column.
        scan, scan_sample, on_bad: the data check (see :class:`~medexp.data.base.ArrayDataModule`).
        task, num_classes, seed, batch_size, num_workers: see
            :class:`~medexp.data.translation.TranslationDataModule` (``seed`` also seeds the
            unpaired permutations, with the run's seed).
    """

    def __init__(
        self,
        task: str = "translation",
        in_channels: int = 1,
        out_channels: int = 1,
        spatial_dims: int = 2,
        manifest: str | Path | None = None,
        source_dir: str | Path | None = None,
        target_dir: str | Path | None = None,
        paired: bool = True,
        truth: bool = True,
        intensity_range: Sequence[float] = (0.0, 1.0),
        target_intensity_range: Sequence[float] = (0.0, 1.0),
        image_size: int | None = None,
        transforms: Sequence[Callable] = (),
        augmentations: Sequence[Callable] = (),
        output_dir: str | Path | None = None,
        split_seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        scan: str = "sample",
        scan_sample: int = 256,
        on_bad: str = "fail",
        num_classes: int = 1,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        if image_size is not None and (
            isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
        ):
            raise MedexpError(f"data.image_size={image_size!r}; expected null or a positive number of pixels per axis")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise MedexpError(
                f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}; expected each in (0, 1) "
                "and a sum below 1"
            )
        self.scan = validation.check_options(scan, scan_sample, on_bad)
        self.scan_sample, self.on_bad = scan_sample, on_bad
        super().__init__(
            task=task,
            paired=paired,
            truth=truth,
            num_classes=num_classes,
            in_channels=in_channels,
            out_channels=out_channels,
            spatial_dims=spatial_dims,
            batch_size=batch_size,
            num_workers=num_workers,
            transforms=transforms,
            intensity_range=intensity_range,
            target_intensity_range=target_intensity_range,
            seed=seed,
        )
        self.image_size = image_size
        self.augmentations = list(augmentations)
        self.output_dir = Path(output_dir).expanduser() if output_dir else None
        self.reader = TranslationReader(self.paired)
        self.skipped: list[validation.Finding] = []
        self._skipped_names: dict[tuple[str, int], str] = {}
        folders = source_dir is not None or target_dir is not None
        if (manifest is None) == (not folders):
            given = "both" if manifest is not None else "neither"
            raise MedexpError(
                "set one of data.manifest=pairs.csv (columns source, target) or data.source_dir=DIR "
                f"data.target_dir=DIR (unpaired folders); got {given}"
            )
        if manifest is not None:
            if not self.truth:
                raise MedexpError(
                    "data.truth=false with data.manifest: each row pairs a source with its true target; set "
                    "data.truth=true (data.paired=false still trains unpaired)"
                )
            self.source = Path(manifest).expanduser()
            cases = read_translation_manifest(self.source, missing_ok=self.on_bad == "skip" and self.scan != "off")
            if cases[0].split is None:
                # assign_splits groups Cases by patient; a pair's source stands for it
                drawn = assign_splits(
                    [Case(case.source, 0, patient_id=case.patient_id) for case in cases],
                    split_seed,
                    val_fraction,
                    test_fraction,
                    stratify=False,
                )
                cases = [replace(case, split=d.split) for case, d in zip(cases, drawn)]
            self.cases = {split: [case for case in cases if case.split == split] for split in SPLITS}
            self.targets = {split: [case.target for case in self.cases[split]] for split in SPLITS}
        else:
            if source_dir is None or target_dir is None:
                missing = "data.target_dir" if target_dir is None else "data.source_dir"
                raise MedexpError(f"unpaired folders need data.source_dir and data.target_dir; {missing} is not set")
            if self.paired or self.truth:
                raise MedexpError(
                    f"data.source_dir/data.target_dir are unpaired folders, but data.paired={self.paired} "
                    f"data.truth={self.truth}; set data.paired=false data.truth=false (or list pairs in data.manifest)"
                )
            self.source = Path(source_dir).expanduser()
            sources = _split_files(_folder_files(self.source, "source_dir"), split_seed, val_fraction, test_fraction)
            targets = _split_files(
                _folder_files(Path(target_dir).expanduser(), "target_dir"), split_seed, val_fraction, test_fraction
            )
            self.cases = {split: [TranslationCase(path, split=split) for path in sources[split]] for split in SPLITS}
            self.targets = targets
        self._check_splits_filled()
        log.info(
            "%s: %s %s",
            self.source,
            "/".join(f"{len(self.cases[s])} {s}" for s in SPLITS),
            "pairs" if manifest is not None else "sources (unpaired)",
        )

    def _check_splits_filled(self, after: str = "") -> None:
        for split in SPLITS:
            for what, members in (("sources", self.cases[split]), ("targets", self.targets[split])):
                if not members:
                    raise MedexpError(
                        f"{self.source}: the {split} split has no {what}{after}; every split needs at least one: "
                        "add data, raise data.val_fraction/data.test_fraction, or fix the split column"
                    )

    def describe(self) -> str:
        return str(self.source)

    # ------------------------------------------------------------------ samples

    def _resize(self) -> list[Callable]:
        if self.image_size is None:
            return []
        from monai.transforms import Resized

        return [Resized(keys=list(KEYS), spatial_size=[self.image_size] * self.spatial_dims, mode="area")]

    def split_transform(self, split: str) -> Callable:
        """The per-sample chain of ``split``: the reader, the resize to ``image_size``,
        augmentations (training only), ``transforms``, then float32 tensors. ``split="predict"``:
        keys a sample lacks (the target) are skipped, and images stay MetaTensors that record the
        spatial transforms applied, so outputs can be mapped back onto their input."""
        augmentations = self.augmentations if split == "train" else []
        return self.transform(head=[self.reader, *self._resize(), *augmentations], predict=split == "predict")

    def predict_transform(self) -> Callable:
        """The test split's chain for one source file, ``{"image": path}`` -> ``{"image": (C_in, *spatial)}``
        (a MetaTensor with the file's geometry and the transforms applied)."""
        return self.split_transform("predict")

    def _items(self, split: str) -> tuple[list[dict[str, str]], list[str]]:
        sources = [{"image": str(case.source), "where": case.where} for case in self.cases[split]]
        return sources, [str(path) for path in self.targets[split]]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self._scan()
        for split in SPLITS:
            self.datasets[split] = TranslationFiles(*self._items(split), self.split_transform(split))
        self._check_first_sample()
        if self.output_dir is not None and (self.trainer is None or self.trainer.is_global_zero):
            self._write_splits(self.output_dir / "splits.csv")
            if self.on_bad == "skip" and self.scan != "off":
                validation.write_skipped(
                    self.output_dir / "skipped.csv",
                    self.skipped,
                    "file",
                    lambda split, i: self._skipped_names[(split, i)],
                )

    def _scan(self) -> None:
        """Check the cases through the reader training uses (see the class); with
        ``on_bad="skip"`` leave the bad ones out. Unpaired targets are checked on their own and
        counted after the sources (index ``len(sources) + j``)."""
        if self.scan == "off":
            return
        start = time.perf_counter()
        findings: list[validation.Finding] = []
        scanned = {}
        for split in SPLITS:
            cases = self.cases[split]
            items = [
                {"image": str(c.source), "target": str(c.target), "where": c.where}
                if self.truth
                else {"image": str(c.source), "where": c.where}
                for c in cases
            ]
            if not self.truth:
                items += [{"target": str(path)} for path in self.targets[split]]
            absent = set()
            if self.on_bad == "skip":  # the manifest let missing files through (missing_ok); all are looked for
                for index, item in enumerate(items):
                    for key in KEYS:
                        if key in item and not Path(item[key]).exists():
                            name = located(item[key], item.get("where", ""))
                            findings.append(validation.Finding("unreadable", split, index, name, "no such file"))
                            absent.add(index)
            rows = validation.scan_indices(len(items), self.scan, self.scan_sample, split)
            scanned[split] = (len(rows), len(items))
            for index in rows.tolist():
                if index in absent:
                    continue
                item = items[index]
                name = located(item.get("image", item.get("target")), item.get("where", ""))
                try:
                    sample = self.reader.load(item)
                except UnreadableFile as exc:
                    findings.append(validation.Finding("unreadable", split, index, exc.name, exc.detail))
                    continue
                if "image" not in sample:  # an unpaired target
                    problems = [
                        (kind, name, f"the target image: {detail}")
                        for _, kind, detail in validation.content_problems(sample["target"].as_tensor().numpy()[None])
                        if kind == "nan_inf"
                    ]
                else:
                    problems = self.reader.problems(item, sample)
                findings += [validation.Finding(kind, split, index, file, detail) for kind, file, detail in problems]
        drop = self.resolve_findings(findings, scanned, start, verb="read")
        # skipped.csv names each case by a file of it (the first problem's), as the cases are renumbered below
        for finding in reversed(self.skipped):
            self._skipped_names[(finding.split, finding.index)] = finding.name
        if not drop:
            return
        for split in SPLITS:
            count = len(self.cases[split])
            bad = {index for where, index in drop if where == split}
            kept = [i for i in range(count) if i not in bad]
            self.cases[split] = [self.cases[split][i] for i in kept]
            if self.truth:
                self.targets[split] = [self.targets[split][i] for i in kept]
            else:
                self.targets[split] = [p for j, p in enumerate(self.targets[split]) if count + j not in bad]
        self._check_splits_filled(" left after data.on_bad=skip")

    def _check_first_sample(self) -> None:
        sample = self.datasets["train"][0]
        case = self.cases["train"][0]
        for key, channels, channel_key, range_key in (
            ("image", self.in_channels, "in_channels", "intensity_range"),
            ("target", self.out_channels, "out_channels", "target_intensity_range"),
        ):
            shape = tuple(sample[key].shape)
            if len(shape) != 1 + self.spatial_dims or shape[0] != channels:
                expected = ", ".join([str(channels)] + ["S"] * self.spatial_dims)
                raise MedexpError(
                    f"{located(case.source, case.where)}: the first training {'source' if key == 'image' else 'target'} "
                    f"has shape {shape} (channels, *spatial) after data.transforms, but data.{channel_key}={channels} "
                    f"and data.spatial_dims={self.spatial_dims} expect ({expected}); set data.{channel_key}={shape[0]} "
                    f"data.spatial_dims={len(shape) - 1}, or add a transform that converts the images"
                )
            low, high = getattr(self, range_key)
            found = float(sample[key].min()), float(sample[key].max())
            slack = 1e-3 * (high - low)
            if found[0] < low - slack or found[1] > high + slack:
                raise MedexpError(
                    f"{located(case.source, case.where)}: the first training {'source' if key == 'image' else 'target'} "
                    f"has values in [{found[0]:.4g}, {found[1]:.4g}] after data.transforms, outside "
                    f"data.{range_key}={[low, high]}; scale it into that range in data.transforms (e.g. "
                    f"monai.transforms.ScaleIntensityRanged with clip: true) or set data.{range_key}"
                )

    def train_dataloader(self) -> Any:
        # unpaired: the files dataset pairs indices itself (see UnpairedFileSampler)
        return self._make_loader(self.datasets["train"], shuffle=True)

    def _shuffler(self, dataset: Dataset) -> EpochShuffleSampler:
        if self.paired or not isinstance(dataset, TranslationFiles):
            return super()._shuffler(dataset)
        # the run's seed (as the shuffle) and the data's, as the synthetic pairs' unpaired sampler
        seed = int(np.random.SeedSequence([int(torch.initial_seed() % 2**32), self.seed]).generate_state(1)[0])
        sampler = UnpairedFileSampler(dataset, seed)
        sampler.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        return sampler

    # ------------------------------------------------------------------ records

    def _write_splits(self, path: Path) -> None:
        """The split used: ``source, target, split, patient_id`` (absolute paths); unpaired
        folders list each source with an empty target and each target with an empty source."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["source", "target", "split", "patient_id"])
            for split in SPLITS:
                if self.truth:
                    writer.writerows([c.source, c.target, split, c.patient_id] for c in self.cases[split])
                else:
                    writer.writerows([c.source, "", split, ""] for c in self.cases[split])
                    writer.writerows(["", target, split, ""] for target in self.targets[split])

    def fingerprint(self) -> str:
        """SHA-256 of the splits' files (bytes of sources and targets, in order) and split names."""
        digest = hashlib.sha256()
        for split in SPLITS:
            digest.update(split.encode())
            for path in [case.source for case in self.cases[split]] + list(self.targets[split]):
                digest.update(file_digest(Path(path)))
        return digest.hexdigest()

    def load_case(self, split: str, index: int) -> dict[str, Any]:
        """Case ``index`` of ``split`` as read, before any transform: ``image`` and ``target``
        ``(C, *spatial)`` MetaTensors with their files' affines (unpaired: the target served with it)."""
        sources, targets = self._items(split)
        return self.reader.load({**sources[index], "target": targets[index % len(targets)]})


# ---------------------------------------------------------------------- slices of two volumes


def _slice_affine(affine: np.ndarray, axis: int, index: int, scale: tuple[float, float]) -> np.ndarray:
    """The 4x4 affine of slice ``index`` along ``axis`` of a volume with ``affine``, its in-plane
    axes resampled by ``scale`` (old size / new size; pixel centres as ``torch`` area resizing)."""
    plane = [a for a in range(3) if a != axis]
    voxel = np.eye(4)
    voxel[axis, 3] = index
    for a, s in zip(plane, scale):
        voxel[a, a] = s
        voxel[a, 3] = 0.5 * s - 0.5
    full = affine @ voxel
    # the slice's array axes are the two in-plane axes, then the normal (a one-voxel third axis)
    return full[:, [*plane, axis, 3]]


def slice_pairs(
    source_volume: str | Path,
    target_volume: str | Path,
    out_dir: str | Path,
    axis: int = 2,
    step: int = 4,
    size: int | None = None,
    slab: int = 4,
    min_foreground: float = 0.1,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Path:
    """Cut two co-registered 3D volumes (e.g. a T1 MRI and its grey-matter probability map)
    into 2D slice pairs saved as NIfTI, with a manifest for ``data=files_translation``.

    Every ``step``-th slice along ``axis`` is kept unless it is nearly empty: fewer than
    ``min_foreground`` of its source pixels above a tenth of the volume's maximum. Consecutive
    kept slices form slabs of ``slab`` slices (the ``patient_id``), and whole slabs are assigned
    to train/val/test at random from ``seed``, so nearly identical neighbours do not land in
    different splits; where the split changes from one slab to the next, the first slice of the
    new slab is dropped, leaving a gap of ``2 * step`` slices between splits.

    Args:
        source_volume, target_volume: the volumes (NIfTI), of one grid.
        out_dir: where ``source/``, ``target/`` and ``pairs.csv`` go.
        axis: the axis sliced across (2: axial slices of a RAS volume).
        step: keep every ``step``-th slice.
        size: resample each slice in-plane to ``size x size`` (area), the affine following; None
            keeps the volume's size.
        slab, min_foreground, val_fraction, test_fraction, seed: see above.

    Returns:
        The manifest, ``<out_dir>/pairs.csv`` (columns ``source, target, split, patient_id``),
        paths relative to it. The slices keep the volumes' intensities (float32) and in-plane affine.

    Raises:
        MedexpError: when a volume cannot be read, is not 3D, the two do not share a grid, an
            argument is out of range, or too few slabs remain to fill three splits.
    """
    import nibabel as nib
    import torch.nn.functional as F

    if axis not in (0, 1, 2) or step < 1 or slab < 1 or (size is not None and size < 1):
        raise MedexpError(
            f"slice_pairs: axis={axis}, step={step}, slab={slab}, size={size}; expected axis 0..2, step, slab and "
            "size positive (size may be None)"
        )
    reader = CaseReader("translation", 1)
    volumes = {}
    for key, path in (("source", source_volume), ("target", target_volume)):
        volume = reader.read(str(path))
        if volume.ndim != 4 or volume.shape[0] != 1:
            raise MedexpError(
                f"{path}: a volume of shape {tuple(volume.shape)} (channels, *spatial); expected (1, X, Y, Z)"
            )
        volumes[key] = volume
    problem = grid_problem(volumes["source"], volumes["target"], str(source_volume), str(target_volume))
    if problem:
        raise MedexpError(f"{target_volume}: {problem[1]}")
    affine = np.asarray(volumes["source"].affine, dtype=np.float64)
    arrays = {key: volume.as_tensor()[0].float() for key, volume in volumes.items()}
    source = arrays["source"]
    threshold = 0.1 * float(source.max())
    kept = []
    for index in range(0, source.shape[axis], step):
        plane = source.select(axis, index)
        if float((plane > threshold).float().mean()) >= min_foreground:
            kept.append(index)
    slabs = [kept[i : i + slab] for i in range(0, len(kept), slab)]
    if len(slabs) < 3:
        raise MedexpError(
            f"slice_pairs: {len(kept)} slice(s) kept in {len(slabs)} slab(s); three splits need at least 3 slabs: "
            "lower step, slab or min_foreground"
        )
    drawn = assign_splits(
        [Case(Path(f"slab{number}"), 0, patient_id=f"slab{number}") for number in range(len(slabs))],
        seed,
        val_fraction,
        test_fraction,
        stratify=False,
    )
    if {case.split for case in drawn} != set(SPLITS):
        raise MedexpError(
            f"slice_pairs: {len(slabs)} slabs do not fill the three splits at val_fraction={val_fraction}, "
            f"test_fraction={test_fraction}; lower step or slab"
        )
    out = Path(out_dir)
    for key in ("source", "target"):
        (out / key).mkdir(parents=True, exist_ok=True)
    rows, previous = [], None
    for number, (indices, case) in enumerate(zip(slabs, drawn)):
        for position, index in enumerate(indices):
            if position == 0 and previous is not None and case.split != previous:
                continue  # a gap between splits
            planes = {key: array.select(axis, index) for key, array in arrays.items()}
            shape = tuple(planes["source"].shape)
            if size is not None:
                planes = {
                    key: F.interpolate(plane[None, None], size=(size, size), mode="area")[0, 0]
                    for key, plane in planes.items()
                }
            scale = (1.0, 1.0) if size is None else (shape[0] / size, shape[1] / size)
            slice_affine = _slice_affine(affine, axis, index, scale)
            name = f"slice{index:04d}.nii.gz"
            for key, plane in planes.items():
                nib.save(nib.Nifti1Image(plane.numpy().astype(np.float32), slice_affine), str(out / key / name))
            rows.append([f"source/{name}", f"target/{name}", case.split, f"slab{number}"])
        previous = case.split
    manifest = out / "pairs.csv"
    with manifest.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["source", "target", "split", "patient_id"])
        writer.writerows(rows)
    log.info("slice_pairs: %d slice pairs in %d slabs -> %s", len(rows), len(slabs), manifest)
    return manifest
