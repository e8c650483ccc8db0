"""Longitudinal data: each sample is one patient's 2D images over time and a patient-level label.

A sample is ``{"image": (T, C, H, W) float32, "length": () int64, "time": (T,) float32,
"label": () int64}``: the patient's visits in time order, zero-padded to a fixed ``T``
(``max_length``) so the default collate stacks them. ``length`` counts the valid visits; ``time``
is each visit's time as the data give it (days, or a visit index), 0 on padded steps. Sequence
models such as :class:`~medexp.nets.cnn_lstm.CNNLSTM` take ``length`` and ``time`` besides the
images and never let padded steps reach their output.

Two sources: :class:`SyntheticLongitudinalDataModule` (phantoms whose lesion grows in
"progressors", generated from a seed) and :class:`FileLongitudinalDataModule` (image files listed
in a CSV manifest, one row per visit). Both hold every series in memory.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose

from medexp.data import validation
from medexp.data.base import SPLITS, ArrayDataModule
from medexp.data.folds import assign_folds, strata
from medexp.data.manifest import Case, assign_splits, read_csv_rows
from medexp.data.paths import RASTER_SUFFIXES, listing, resolve_path
from medexp.data.phantoms import make_series
from medexp.data.reading import CaseReader, UnreadableFile
from medexp.data.series import SequenceDataset, Series
from medexp.utils.errors import MedexpError

log = logging.getLogger(__name__)

SEQUENCE_TASKS = ("binary", "multiclass")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class LongitudinalDataModule(ArrayDataModule):
    """Base of DataModules whose samples are series of 2D images (see :class:`SequenceDataset`).

    Subclasses implement :meth:`load_series`. Everything of
    :class:`~medexp.data.base.ArrayDataModule` applies per series (patient): ``fold`` splits
    patients into folds, the data check (``scan``/``on_bad``) reads every frame of the series it
    checks (NaN/Inf values, constant frames, a frame identical to one of another split's series)
    and ``on_bad="skip"`` leaves out whole series, ``label_counts`` counts patients. Not
    available: ``generated`` (a GAN makes single images, not series) and ``medexp predict``
    (which reads single image files; evaluate series with ``medexp eval``).

    Args:
        max_length: ``T``, the steps every series is padded to.
        **kwargs: see :class:`~medexp.data.base.ArrayDataModule`; ``spatial_dims`` must be 2
            (frames are 2D), ``task`` binary or multiclass.
    """

    def __init__(self, max_length: int | None = None, generated: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if generated and generated.get("ratio", 0):
            raise MedexpError(
                "data.generated: GAN-augmented training mixes single generated images into the training split, and "
                "these samples are series of images over time; set data.generated=null"
            )
        super().__init__(**kwargs)
        if self.task not in SEQUENCE_TASKS:
            raise MedexpError(f"data.task={self.task!r}; longitudinal data serve one of {list(SEQUENCE_TASKS)}")
        if self.spatial_dims != 2:
            raise MedexpError(
                f"data.spatial_dims={self.spatial_dims}; longitudinal data are series of 2D images (spatial_dims=2)"
            )
        if max_length is not None and not _positive_int(max_length):
            raise MedexpError(f"data.max_length={max_length!r}; expected a positive number of visits, or null")
        self.max_length = max_length
        self.series: dict[str, Series] = {}

    def load_series(self, split: str) -> Series:
        """The series of one split, padded to the same ``T`` in every split."""
        raise NotImplementedError

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Images ``(N, T, C, H, W)`` and labels ``(N,)`` of one split (see :meth:`load_series`)."""
        series = self.load_series(split)
        return series.images, series.labels

    def load_findings(self) -> list[validation.Finding]:
        """Problems met while loading (e.g. unreadable files), reported with the data check."""
        return []

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        loaded = {}
        for split in SPLITS:
            if split == "val" and self.fold is not None:
                continue  # replaced by a fold of the training split
            loaded[split] = self.load_series(split)
            self._check_series(split, loaded[split])
        kept = self._scan_series(loaded)
        series = {split: loaded[split].take(kept[split]) for split in loaded}
        if self.fold is not None:
            train = series["train"]
            folds = assign_folds(strata(train.labels, self.task), None, self.num_folds, self.fold_seed)
            self.fold_table = [
                self._fold_row(train, row, int(kept["train"][row]), int(fold)) for row, fold in enumerate(folds)
            ]
            series["val"], series["train"] = train.take(folds == self.fold), train.take(folds != self.fold)
        self.series = series
        for split in SPLITS:
            self.datasets[split] = SequenceDataset(series[split], self.transform(split))
        self._check_first_series()
        self.save_folds()
        self.save_skipped(*self._skipped_key(loaded))

    def _fold_row(self, series: Series, row: int, index: int, fold: int) -> dict[str, Any]:
        return {"index": index, "label": int(series.labels[row]), "fold": fold}

    def _skipped_key(self, loaded: dict[str, Series]) -> tuple[str, Callable[[str, int], Any]]:
        # skipped.csv names a series by its row in the split as loaded
        return "index", lambda split, index: index

    def _check_series(self, split: str, series: Series) -> None:
        where = f"{self.describe()} {split} split"
        images, n = series.images, len(series)
        if images.ndim != 5 or images.shape[2] != self.in_channels:
            raise MedexpError(
                f"{where}: series of shape {images.shape}; expected (N, T, {self.in_channels}, H, W) for "
                f"in_channels={self.in_channels}"
            )
        if series.lengths.shape != (n,) or series.times.shape != images.shape[:2] or series.labels.shape != (n,):
            raise MedexpError(
                f"{where}: lengths {series.lengths.shape}, times {series.times.shape} and labels {series.labels.shape} "
                f"do not fit series of shape {images.shape}; expected ({n},), {images.shape[:2]} and ({n},)"
            )
        if n and (series.lengths.min() < 1 or series.lengths.max() > images.shape[1]):
            raise MedexpError(f"{where}: series lengths must be in [1, {images.shape[1]}]")

    def frame_name(self, split: str, row: int, step: int) -> str:
        """How messages name visit ``step`` of series ``row`` of ``split`` (as loaded)."""
        return f"{split} series {row} visit {step}"

    def series_name(self, split: str, row: int) -> str:
        """How messages name series ``row`` of ``split`` (as loaded)."""
        return f"{split} series {row}"

    def _scan_series(self, loaded: dict[str, Series]) -> dict[str, np.ndarray]:
        """Check the loaded series frame by frame (see :mod:`medexp.data.validation`). Returns
        the rows of each split to keep: all of them unless ``on_bad="skip"``, which leaves out
        every series with an error."""
        kept = {split: np.arange(len(series)) for split, series in loaded.items()}
        findings = self.load_findings()
        if self.scan == "off":
            if findings:  # a file that cannot be read cannot be trained on either
                raise MedexpError(f"{self.describe()}: {validation.summary(findings)}")
            return kept
        start = time.perf_counter()
        steps = max(series.images.shape[1] for series in loaded.values())
        unreadable = {(f.split, f.index) for f in findings}
        hashes: dict[tuple[str, int], bytes] = {}
        scanned = {}
        for split, series in loaded.items():
            rows = validation.scan_indices(len(series), self.scan, self.scan_sample, split)
            scanned[split] = (len(rows), len(series))
            for row in rows.tolist():
                if (split, row) in unreadable:
                    continue
                frames = series.images[row, : series.lengths[row]]
                found = [
                    validation.Finding(kind, split, row, self.frame_name(split, row, step), detail)
                    for step, kind, detail in validation.content_problems(frames)
                ]
                findings += found
                if not found:  # a frame with NaN is no duplicate of anything
                    for step, frame in enumerate(frames):
                        hashes[(split, row * steps + step)] = validation.pixel_hash(frame)
            findings += [
                validation.Finding("label_range", split, row, self.series_name(split, row), detail)
                for row, detail in validation.label_problems(series.labels, self.task, self.num_classes)
            ]

        # frames, not whole series, are compared: one image filed under two patients is a leak too
        def name(split: str, code: int) -> str:
            return self.frame_name(split, *divmod(code, steps))

        duplicates = validation.duplicate_findings(hashes, name)
        findings += [replace(finding, index=finding.index // steps) for finding in duplicates]
        drop = self.resolve_findings(findings, scanned, start)
        if not drop:
            return kept
        for split, series in loaded.items():
            keep = np.array([(split, row) not in drop for row in range(len(series))], dtype=bool)
            if not keep.any():
                raise MedexpError(
                    f"{self.describe()}: all {len(series)} series of the {split} split are bad (data.on_bad=skip left "
                    "them out); nothing is left to use"
                )
            kept[split] = kept[split][keep]
        return kept

    def _check_first_series(self) -> None:
        shape = tuple(self.datasets["train"][0]["image"].shape)
        if len(shape) != 4 or shape[1] != self.in_channels:
            raise MedexpError(
                f"{self.describe()}: the first training series has shape {shape} (T, channels, H, W) after "
                f"data.transforms; data.in_channels={self.in_channels} expects (T, {self.in_channels}, H, W)"
            )

    def predict_transform(self) -> Compose:
        raise MedexpError(
            f"{self.describe()}: medexp predict reads single image files, and this model takes series of images over "
            "time; evaluate it on the data's splits with medexp eval"
        )

    def fingerprint(self) -> str:
        """SHA-256 of what the splits hold (frames, lengths, times and labels, in order), so a
        reproduction can tell whether it trained on the same data. Call after :meth:`setup`."""
        digest = hashlib.sha256()
        for split in SPLITS:
            series = self.series[split]
            digest.update(split.encode())
            for array in (series.images, series.lengths, series.times, series.labels):
                array = np.ascontiguousarray(array)
                digest.update(f"{array.dtype}{array.shape}".encode())
                digest.update(array.tobytes())
        return digest.hexdigest()


class SyntheticLongitudinalDataModule(LongitudinalDataModule):
    """Series of phantom images over time, generated deterministically from ``seed`` (see
    :func:`~medexp.data.phantoms.make_series`): binary, "does the lesion grow". Held in memory as ``uint8``.

    Args:
        image_size: pixels per side.
        num_patients: series per split, e.g. ``{"train": 512, "val": 128, "test": 128}``.
        min_visits, max_visits: the range of visits per patient.
        max_length: steps every series is padded to; None: ``max_visits``.
        growth: range of the progressors' lesion growth (radius per year; the image spans [-1, 1]).
        gap_days: range of the gaps between visits, in days.
        seed: data seed, independent of the training seed so sweeps over seeds see the same data;
            each split draws from its own stream.
        **kwargs: see :class:`LongitudinalDataModule` and :class:`~medexp.data.base.ArrayDataModule`.
    """

    def __init__(
        self,
        image_size: int = 32,
        num_patients: dict[str, int] | None = None,
        min_visits: int = 2,
        max_visits: int = 6,
        max_length: int | None = None,
        growth: tuple[float, float] | list[float] = (0.12, 0.24),
        gap_days: tuple[float, float] | list[float] = (30.0, 300.0),
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_length=max_length, **kwargs)
        num_patients = dict(num_patients or {"train": 512, "val": 128, "test": 128})
        if sorted(num_patients) != sorted(SPLITS) or min(num_patients.values()) < 1:
            raise MedexpError(f"data.num_patients={num_patients}; expected positive counts for {list(SPLITS)}")
        if self.task != "binary":
            raise MedexpError(f"data.task={self.task!r}; synthetic longitudinal data are binary (does the lesion grow)")
        if self.in_channels != 1:
            raise MedexpError(f"data.in_channels={self.in_channels}; synthetic longitudinal data are grey (1 channel)")
        if image_size < 16:
            raise MedexpError(f"data.image_size={image_size}; expected at least 16 pixels")
        if max_length is None:
            max_length = max_visits
        if not 1 <= min_visits <= max_visits <= max_length:
            raise MedexpError(
                f"data.min_visits={min_visits}, data.max_visits={max_visits}, data.max_length={max_length}; expected "
                "1 <= min_visits <= max_visits <= max_length (max_length: null pads to max_visits)"
            )
        for key, pair in (("growth", growth), ("gap_days", gap_days)):
            if len(pair) != 2 or not 0 <= pair[0] <= pair[1]:
                raise MedexpError(f"data.{key}={list(pair)}; expected [low, high] with 0 <= low <= high")
        self.image_size = image_size
        self.num_patients = num_patients
        self.min_visits, self.max_visits, self.max_length = min_visits, max_visits, max_length
        self.growth, self.gap_days = tuple(growth), tuple(gap_days)
        self.seed = seed

    def load_series(self, split: str) -> Series:
        rng = np.random.default_rng([self.seed, SPLITS.index(split)])
        series, _ = make_series(
            self.num_patients[split],
            self.image_size,
            self.min_visits,
            self.max_visits,
            self.max_length,
            rng,
            growth=self.growth,
            gap_days=self.gap_days,
        )
        return series

    def describe(self) -> str:
        return "synthetic longitudinal data"


# --- series from files -------------------------------------------------------------------------

MANIFEST_COLUMNS = ("patient_id", "time", "image", "label")


@dataclass(frozen=True)
class Visit:
    """One manifest row: a patient's image at one time. ``line`` is its manifest line."""

    patient_id: str
    time: float
    image: Path
    label: int
    split: str | None
    line: int


def read_visits(path: Path, num_classes: int, missing_ok: bool = False) -> list[Visit]:
    """Read a longitudinal manifest: columns ``patient_id``, ``time``, ``image``, ``label`` and
    optionally ``split``; relative image paths resolve against the manifest's folder.

    Args:
        missing_ok: keep visits whose image does not exist (reading it then fails, and
            ``data.on_bad=skip`` leaves the patient out) instead of raising.

    Raises:
        MedexpError: for a missing or unreadable manifest, missing columns, an empty patient_id,
            a time that is not a finite number, a label that is not a class index, an unknown
            split, a patient whose rows disagree on label or split, two rows of one patient at
            the same time, or listed images that do not exist (each with its manifest lines).
    """
    if not path.is_file():
        raise MedexpError(
            f"manifest not found: {path}. Point data.manifest at a CSV file with columns {list(MANIFEST_COLUMNS)} "
            "(optional ['split']), one row per visit"
        )
    columns, rows = read_csv_rows(
        path,
        MANIFEST_COLUMNS,
        f"a longitudinal manifest needs columns {list(MANIFEST_COLUMNS)} (one row per visit) and may have ['split']",
    )

    base = path.absolute().parent
    problems: dict[str, list[str]] = {}

    def problem(kind: str, text: str) -> None:
        problems.setdefault(kind, []).append(text)

    visits = []
    for line, row in rows:
        if not row["patient_id"]:
            problem("patient", f"line {line}")
        try:
            when = float(row["time"])
        except ValueError:
            when = math.nan
        if not math.isfinite(when):
            problem("time", f"line {line}: {row['time']!r}")
        try:
            label = int(row["label"])
        except ValueError:
            label = -1
        if not 0 <= label < num_classes:
            problem("label", f"line {line}: {row['label']!r}")
        split = row.get("split") if "split" in columns else None
        if split is not None and split not in SPLITS:
            problem("split", f"line {line}: {split!r}")
        image = resolve_path(base, row["image"])
        if not row["image"] or (not image.exists() and not missing_ok):
            problem("missing", f"line {line}: {row['image']!r}")
        visits.append(Visit(row["patient_id"], when, image, label, split, line))

    messages = {
        "patient": "empty patient_id at {}; every visit names its patient",
        "time": "time must be a number (days, or a visit index); {} are not",
        "label": f"labels must be class indices 0..{num_classes - 1} (data.num_classes={num_classes}); {{}} are not",
        "split": f"unknown split value(s) {{}}; expected one of {list(SPLITS)} (or no split column, to split patients "
        "by data.split_seed)",
        "missing": f"listed image(s) do not exist (relative paths resolve against {base}): {{}}",
    }
    if problems:
        found = [messages[kind].format(f"{len(entries)}: {listing(entries)}") for kind, entries in problems.items()]
        raise MedexpError(f"{path}: " + " | ".join(found))

    by_patient: dict[str, list[Visit]] = {}
    for visit in visits:
        by_patient.setdefault(visit.patient_id, []).append(visit)
    for kind, attribute in (("labels", "label"), ("splits", "split")):
        conflicts = [
            f"{pid}: " + ", ".join(f"{getattr(v, attribute)} (line {v.line})" for v in members)
            for pid, members in by_patient.items()
            if len({getattr(v, attribute) for v in members}) > 1
        ]
        if conflicts:
            raise MedexpError(
                f"{path}: patients whose rows disagree on their {attribute} ({len(conflicts)}): {listing(conflicts)}; "
                f"{kind} are per patient: give every row of a patient the same {attribute}"
            )
    duplicates = []
    for pid, members in by_patient.items():
        at: dict[float, list[int]] = {}
        for visit in members:
            at.setdefault(visit.time, []).append(visit.line)
        duplicates += [
            f"{pid} at time {t:g} (lines {', '.join(map(str, lines))})" for t, lines in at.items() if len(lines) > 1
        ]
    if duplicates:
        raise MedexpError(
            f"{path}: {len(duplicates)} duplicate (patient_id, time) visit(s): {listing(duplicates)}; each patient "
            "has one image per time: remove the repeats or correct their times"
        )
    return visits


def _number(value: float) -> str:
    # times as written in a manifest: whole numbers without a decimal point, others exactly
    return str(int(value)) if value.is_integer() else repr(value)


class FileLongitudinalDataModule(LongitudinalDataModule):
    """Series of 2D image files over time, from a CSV manifest with one row per visit.

    Manifest columns: ``patient_id``, ``time`` (days or a visit index, any number: visits are
    ordered by it), ``image`` (a 2D PNG, TIFF, JPEG, BMP, DICOM or NIfTI file; relative paths
    resolve against the manifest's folder), ``label`` (the patient's class index, the same on all
    its rows) and optionally ``split`` (train/val/test, the same on all rows of a patient).
    Without ``split``, patients are split at random from ``split_seed``, stratified by class (see
    :func:`medexp.data.manifest.assign_splits`); :meth:`setup` writes the split used to
    ``<output_dir>/splits.csv``, itself a manifest that reproduces it.

    Every image is read in :meth:`setup` (MONAI ``LoadImage``, channel first), scaled to [0, 1]
    on its own (min-max, as ``conf/data/files.yaml`` does per image), resized to ``resize``
    when set, and kept in memory as float32: ``patients x max_length x C x H x W x 4`` bytes
    (1000 patients of 10 visits at 256 x 256: 2.6 GB). Unreadable files and images of another
    shape or channel count stop :meth:`setup` with an error naming them and their manifest line
    (with ``on_bad="skip"``, patients with a missing or unreadable file are left out instead).

    Args:
        manifest: the CSV file (see :func:`read_visits`).
        max_length: ``T``, the visits every series is padded to; None: the longest series. A
            patient with more visits is an error.
        resize: ``[H, W]`` (or one number for square images) every image is resized to
            (bilinear, antialiased); None: images must all have the same shape.
        output_dir: where ``splits.csv`` (and ``folds.csv``, ``skipped.csv``) is written.
        split_seed, val_fraction, test_fraction: the random split of patients without a
            ``split`` column.
        **kwargs: see :class:`LongitudinalDataModule` and :class:`~medexp.data.base.ArrayDataModule`.
    """

    def __init__(
        self,
        manifest: str | Path | None = None,
        max_length: int | None = None,
        resize: int | list[int] | None = None,
        output_dir: str | Path | None = None,
        split_seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_length=max_length, output_dir=output_dir, **kwargs)
        if manifest is None:
            raise MedexpError(
                f"data.manifest is not set; point it at a CSV file with columns {list(MANIFEST_COLUMNS)} (optional "
                "['split']), one row per visit"
            )
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise MedexpError(
                f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}; expected each in (0, 1) "
                "and a sum below 1"
            )
        if resize is not None:
            size = [resize] * 2 if isinstance(resize, int) else list(resize)
            if len(size) != 2 or not all(_positive_int(s) for s in size):
                raise MedexpError(f"data.resize={resize!r}; expected [H, W] (or one size), positive integers, or null")
            resize = size
        self.resize = resize
        self.source = Path(manifest).expanduser()
        # with on_bad=skip a missing image leaves its patient out (see load_series), as an unreadable one does
        visits = read_visits(self.source, self.num_classes, missing_ok=self.on_bad == "skip" and self.scan != "off")
        patients: dict[str, list[Visit]] = {}
        for visit in visits:
            patients.setdefault(visit.patient_id, []).append(visit)
        # visits in time order (the manifest's order need not be)
        patients = {pid: sorted(members, key=lambda v: v.time) for pid, members in patients.items()}
        longest = max(len(members) for members in patients.values())
        if max_length is not None and max_length < longest:
            over = [f"{pid} ({len(members)} visits)" for pid, members in patients.items() if len(members) > max_length]
            raise MedexpError(
                f"{self.source}: data.max_length={max_length} but {len(over)} patient(s) have more visits: "
                f"{listing(over)}; set data.max_length={longest} or null (the longest series)"
            )
        self.max_length = max_length or longest
        if visits[0].split is None:
            # one case per patient: assign_splits keeps patients whole and stratifies by label
            cases = [Case(members[0].image, members[0].label, None, pid) for pid, members in patients.items()]
            cases = assign_splits(cases, split_seed, val_fraction, test_fraction, stratify=True)
            split_of = {case.patient_id: case.split for case in cases}
        else:
            split_of = {pid: members[0].split for pid, members in patients.items()}
        # per split, each patient's visits in time order
        self.patients = {
            split: [members for pid, members in patients.items() if split_of[pid] == split] for split in SPLITS
        }
        for split, members in self.patients.items():
            if not members:
                raise MedexpError(
                    f"{self.source}: the {split} split is empty ({len(patients)} patients); every split needs at least "
                    "one patient: add data, raise data.val_fraction/data.test_fraction, or fix the split column"
                )
        if self.fold is not None:  # a fold of the training split replaces the validation split
            self.patients["val"] = []
        self.reader = CaseReader(self.task, self.num_classes)
        self._findings: list[validation.Finding] = []
        self._shape: tuple[int, ...] | None = None
        log.info(
            "%s: %s patients, %d visits, up to %d per patient",
            self.source,
            "/".join(f"{len(self.patients[s])} {s}" for s in SPLITS),
            len(visits),
            longest,
        )

    def describe(self) -> str:
        return str(self.source)

    def _where(self, visit: Visit) -> str:
        return f"{visit.image} ({self.source} line {visit.line})"

    def frame_name(self, split: str, row: int, step: int) -> str:
        return self._where(self.patients[split][row][step])

    def series_name(self, split: str, row: int) -> str:
        members = self.patients[split][row]
        return f"patient {members[0].patient_id} ({self.source} lines {', '.join(str(v.line) for v in members)})"

    def load_findings(self) -> list[validation.Finding]:
        return list(self._findings)

    def _read(self, visit: Visit) -> np.ndarray:
        """One image as ``(C, H, W)`` float32 in [0, 1] (resized to ``resize`` when set)."""
        image = self.reader.read(str(visit.image), f"{self.source} line {visit.line}").as_tensor().float()
        if image.ndim != 3:  # (C, H, W); NIfTI volumes are 3D
            raise MedexpError(
                f"{self._where(visit)}: an image of {image.ndim - 1} spatial dimensions (shape {tuple(image.shape[1:])}); "
                "longitudinal data are series of 2D images"
            )
        if image.shape[0] != self.in_channels:
            raise MedexpError(
                f"{self._where(visit)}: {image.shape[0]} channel(s) but data.in_channels={self.in_channels}; set "
                f"data.in_channels={image.shape[0]}, or convert the images"
            )
        if str(visit.image).lower().endswith(RASTER_SUFFIXES):
            image = image.transpose(1, 2)  # PIL reads (W, H) (MONAI's reverse_indexing); arrays are (H, W)
        low, high = image.amin(), image.amax()
        if torch.isfinite(image).all():  # NaN/Inf stay, for the data check to report
            image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
        if self.resize is not None and list(image.shape[1:]) != self.resize:
            image = F.interpolate(image[None], self.resize, mode="bilinear", antialias=True, align_corners=False)[0]
        return image.numpy()

    def load_series(self, split: str) -> Series:
        members = self.patients[split]
        self._findings = [finding for finding in self._findings if finding.split != split]
        frames: dict[tuple[int, int], np.ndarray] = {}
        for row, visits in enumerate(members):
            for step, visit in enumerate(visits):
                try:
                    frames[(row, step)] = self._read(visit)
                except UnreadableFile as exc:  # reported with the data check (on_bad=skip drops the patient)
                    self._findings.append(validation.Finding("unreadable", split, row, exc.name, exc.detail))
        if self._shape is None and frames:  # the first split read sets the shape; most of its images have it
            self._shape = Counter(frame.shape for frame in frames.values()).most_common(1)[0][0]
        shape = self._shape or (self.in_channels, 1, 1)
        odd = [(members[row][step], frame.shape) for (row, step), frame in frames.items() if frame.shape != shape]
        if odd:
            listed = [f"{self._where(visit)}: {odd_shape[1:]}" for visit, odd_shape in odd]
            raise MedexpError(
                f"{self.source}: images of different shapes: {len(odd)} differ from the {shape[1:]} (H, W) of the "
                f"others: {listing(listed)}. Set data.resize=[H, W] to resize every image on loading"
            )
        n, steps = len(members), self.max_length
        images = np.zeros((n, steps, *shape), dtype=np.float32)
        times = np.zeros((n, steps), dtype=np.float32)
        for row, visits in enumerate(members):
            times[row, : len(visits)] = [visit.time for visit in visits]
        for (row, step), frame in frames.items():
            images[row, step] = frame
        lengths = np.array([len(visits) for visits in members], dtype=np.int64)
        labels = np.array([visits[0].label for visits in members], dtype=np.int64)
        return Series(images, lengths, times, labels, [visits[0].patient_id for visits in members])

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        super().setup(stage)
        # splits.csv: the patients used (after any on_bad=skip), a manifest that reproduces the split
        if self.output_dir is not None and (self.trainer is None or self.trainer.is_global_zero):
            self._write_splits(self.output_dir / "splits.csv")

    def _fold_row(self, series: Series, row: int, index: int, fold: int) -> dict[str, Any]:
        return {"patient_id": series.ids[row], "label": int(series.labels[row]), "fold": fold}

    def _skipped_key(self, loaded: dict[str, Series]) -> tuple[str, Callable[[str, int], Any]]:
        return "patient_id", lambda split, index: loaded[split].ids[index]

    def _write_splits(self, path: Path) -> None:
        by_id = {visits[0].patient_id: visits for members in self.patients.values() for visits in members}
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow([*MANIFEST_COLUMNS, "split"])
            for split in SPLITS:
                for pid in self.series[split].ids:
                    writer.writerows([pid, _number(v.time), v.image.absolute(), v.label, split] for v in by_id[pid])
