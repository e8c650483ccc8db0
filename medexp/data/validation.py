"""A quick scan of the data before training, so one broken case stops a run at its start, not
hours into it.

What is found (kinds, see :data:`KINDS`): unreadable or missing files, NaN/Inf values, constant
images (every pixel equal, e.g. an all-black export), labels or mask values outside the classes,
image/mask shape and geometry (affine) mismatches, and images duplicated across splits (a leak);
images duplicated within a split are a warning only. A ``data.mask_threshold`` at or above every
mask value read (file data: masks saved as 0/1 with ``mask_threshold=127``) stops the run
whatever ``on_bad`` says: it would empty every mask (:func:`mask_threshold_problem`).

The functions here are pure: they look at arrays and return problems or :class:`Finding` lists.
The data modules read the cases (in-memory arrays: vectorised, :mod:`medexp.data.base`; files:
through the reader training uses, :mod:`medexp.data.reading`) in ``setup()``, and
:func:`resolve` reports what was found: one INFO line, then either one
:class:`~medexp.utils.errors.MedexpError` listing every problem (``on_bad="fail"``) or the cases
to leave out (``on_bad="skip"``), which :func:`write_skipped` records in ``skipped.csv``;
``on_bad="warn"`` keeps the cases whose problems are in :data:`TOLERABLE_KINDS` with a warning.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medexp.utils.errors import MedexpError

log = logging.getLogger(__name__)

SCAN_MODES = ("sample", "all", "off")
ON_BAD = ("fail", "skip", "warn")
SHOWN = 5  # findings quoted per kind in a message; the rest are counted
SCAN_SEED = 0  # the sample does not depend on the run's seed: every job of a sweep reads the same cases

KINDS = {
    "unreadable": "unreadable or missing files",
    "nan_inf": "NaN/Inf values",
    "constant": "constant images (every pixel equal)",
    "label_range": "labels outside the classes",
    "shape_mismatch": "image/mask shape mismatches",
    "shape_disagreement": "images of another shape than the rest (one net and each batch take one shape)",
    "geometry_mismatch": "image/mask geometry mismatches",
    "duplicate_across_splits": "images duplicated across splits (a leak)",
    "duplicate_within_split": "images duplicated within a split",
}
WARNING_KINDS = ("duplicate_within_split",)
# what on_bad=warn may keep: cases that train and evaluate, only questionably; the other kinds
# would crash training or corrupt it (NaN) and still stop the run
TOLERABLE_KINDS = ("constant", "geometry_mismatch", "duplicate_across_splits")
# Identical images in several splits: the copy in the first split listed here stays, the others
# are the problem (and what on_bad=skip drops). Evaluation splits stay as they are, so their
# metrics remain comparable with other runs on the same data; the training set loses the copy.
KEEP_FIRST = ("test", "val", "train")


@dataclass(frozen=True)
class Finding:
    """One problem of one case.

    ``split`` and ``index`` (position in the split as loaded: file data: in the split's case
    list; arrays: the row of the split's array) identify the case; ``name`` is what a person
    looks for (a file and its manifest line, or ``"train sample 12"``).
    """

    kind: str
    split: str
    index: int
    name: str
    detail: str

    @property
    def is_error(self) -> bool:
        return self.kind not in WARNING_KINDS

    def __str__(self) -> str:
        return f"{self.name}: {self.detail}"


def check_options(scan: Any, scan_sample: Any, on_bad: Any) -> str:
    """Check ``data.scan``, ``data.scan_sample`` and ``data.on_bad``; returns ``scan`` normalised.

    YAML 1.1 reads an unquoted ``off`` as false, so ``False`` means ``"off"``.

    Raises:
        MedexpError: naming the key, the value and the valid options.
    """
    if scan is False:
        scan = "off"
    if scan not in SCAN_MODES:
        raise MedexpError(f"data.scan={scan!r}; expected one of {list(SCAN_MODES)}")
    if on_bad not in ON_BAD:
        raise MedexpError(f"data.on_bad={on_bad!r}; expected one of {list(ON_BAD)}")
    if isinstance(scan_sample, bool) or not isinstance(scan_sample, int) or scan_sample < 1:
        raise MedexpError(f"data.scan_sample={scan_sample!r}; expected a positive number of cases per split")
    return scan


def scan_indices(n: int, scan: str, scan_sample: int, split: str) -> np.ndarray:
    """Sorted positions of the cases of a split of ``n`` that a scan reads.

    ``all``: every case; ``sample``: ``scan_sample`` of them, the first always, the others drawn
    from a fixed seed (the same cases in every run and every DDP process); ``off``: none.
    """
    if scan == "off" or n == 0:
        return np.empty(0, dtype=np.int64)
    if scan == "all" or n <= scan_sample:
        return np.arange(n)
    rng = np.random.default_rng([SCAN_SEED, zlib.crc32(split.encode())])
    others = rng.choice(n - 1, size=scan_sample - 1, replace=False) + 1
    return np.sort(np.concatenate([[0], others])).astype(np.int64)


def content_problems(images: np.ndarray, rows: np.ndarray | None = None) -> list[tuple[int, str, str]]:
    """NaN/Inf values and constant images among ``images[rows]`` (all rows by default).

    Args:
        images: ``(N, ...)``, one image per row, any dtype.
        rows: the rows to check.

    Returns:
        ``(row, kind, detail)`` per problem, kind ``nan_inf`` or ``constant`` (an image with
        NaN/Inf is not also called constant).
    """
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    problems: list[tuple[int, str, str]] = []
    per_row = max(1, int(np.prod(images.shape[1:], dtype=np.int64)))
    floating = np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.complexfloating)
    step = max(1, (32 << 20) // (per_row * images.itemsize))  # ~32 MB at a time: bounded memory
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        flat = images[chunk].reshape(len(chunk), -1)
        if flat.shape[1] == 0:
            continue
        finite = np.ones(len(chunk), dtype=bool)
        if floating:
            nan, inf = np.isnan(flat).sum(axis=1), np.isinf(flat).sum(axis=1)
            finite = (nan + inf) == 0
            for k in np.flatnonzero(~finite):
                counts = [f"{c} {what}" for c, what in ((nan[k], "NaN"), (inf[k], "Inf")) if c]
                problems.append((int(chunk[k]), "nan_inf", f"{' and '.join(counts)} of {per_row} values"))
        low, high = flat.min(axis=1), flat.max(axis=1)
        for k in np.flatnonzero(finite & (low == high)):
            problems.append((int(chunk[k]), "constant", f"every pixel is {low[k].item():g}"))
    return sorted(problems)


def mask_values_problem(values: np.ndarray, num_classes: int) -> str | None:
    """What is wrong with a mask whose distinct values are ``values``, if anything: class indices
    are whole numbers ``0..num_classes-1``."""
    values = np.asarray(values, dtype=np.float64).ravel()
    bad = values[(values != np.round(values)) | (values < 0) | (values >= num_classes)]  # NaN is bad too
    if not len(bad):
        return None
    message = (
        f"mask values {bad[:SHOWN].tolist()} are not class indices 0..{num_classes - 1} "
        f"(data.num_classes={num_classes})"
    )
    if 255 in bad:
        message += "; for a binary mask saved as 0/255 set data.mask_threshold=127 (values above it become 1)"
    elif (bad != np.round(bad)).any():
        message += "; a mask resampled with linear interpolation? resample masks with nearest neighbours"
    return message


def mask_threshold_problem(threshold: float | None, maxima: list[tuple[float, str]]) -> str | None:
    """What is wrong with ``data.mask_threshold``, if anything: it empties every mask read (the
    threshold is at or above every mask value found, though some masks hold foreground values).

    Args:
        threshold: ``data.mask_threshold`` (values above it become foreground); None: none.
        maxima: ``(largest value as stored, file)`` of each mask read.
    """
    if threshold is None or not maxima:
        return None
    top, name = max(maxima, key=lambda item: item[0])
    if not 0 < top <= threshold:  # some mask keeps foreground, or every mask is empty as stored
        return None
    hint = "0 for masks saved as 0/1" if top == 1 else f"a value below {top:g}"
    return (
        f"data.mask_threshold={threshold:g} empties every mask: the largest mask value in the {len(maxima)} mask(s) "
        f"read is {top:g} ({name}) and only values above the threshold become foreground; set data.mask_threshold "
        f"to {hint}, or null for masks that hold class indices already"
    )


def label_problems(labels: np.ndarray, task: str, num_classes: int) -> list[tuple[int, str]]:
    """Samples whose label is not one of the task's classes (every row; labels are small).

    Args:
        labels: ``(N,)`` class indices, ``(N, L)`` multi-label 0/1 indicators, or ``(N, 1, *spatial)``
            masks for ``task="segmentation"``.

    Returns:
        ``(row, detail)`` per bad sample.
    """
    if len(labels) == 0:
        return []
    flat = labels.reshape(len(labels), -1)
    match task:
        case "multilabel":
            bad = np.flatnonzero(~np.isin(flat, (0, 1)).all(axis=1))
            return [(int(r), f"targets {flat[r].tolist()} are not 0/1 indicators of {num_classes} labels") for r in bad]
        case "segmentation":
            low, high = flat.min(axis=1), flat.max(axis=1)
            bad = np.flatnonzero((low < 0) | (high >= num_classes))
            return [(int(r), mask_values_problem(np.unique(flat[r]), num_classes)) for r in bad]
        case _:
            bad = np.flatnonzero((flat[:, 0] < 0) | (flat[:, 0] >= num_classes))
            expected = f"a class index 0..{num_classes - 1} (data.num_classes={num_classes})"
            return [(int(r), f"label {flat[r, 0]} is not {expected}") for r in bad]


def _spacing_origin(affine: np.ndarray) -> str:
    spacing = np.linalg.norm(affine[:-1, :-1], axis=0)
    return f"spacing {np.round(spacing, 4).tolist()}, origin {np.round(affine[:-1, -1], 4).tolist()}"


def geometry_problem(image_affine: Any, mask_affine: Any, image_name: str, atol: float = 1e-3) -> str | None:
    """What differs between the geometry (affine: spacing, orientation, origin) of a mask and of
    its image, if anything. ``atol`` is in the affine's units (mm for NIfTI and DICOM)."""
    a, b = np.asarray(image_affine, dtype=np.float64), np.asarray(mask_affine, dtype=np.float64)
    if a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=atol):
        return None
    if a.shape != b.shape:
        return f"its affine is {b.shape[0]}x{b.shape[1]}, its image {image_name}'s {a.shape[0]}x{a.shape[1]}"
    return (
        f"its affine differs from its image's ({image_name}) by up to {np.abs(a - b).max():.4g}: "
        f"mask {_spacing_origin(b)}; image {_spacing_origin(a)}"
    )


def pixel_hash(image: np.ndarray) -> bytes:
    """A digest of a decoded image (values, dtype and shape): equal digests, identical pixels."""
    array = np.ascontiguousarray(image)
    digest = hashlib.blake2b(f"{array.dtype.str}{array.shape}".encode(), digest_size=16)
    digest.update(array.tobytes() if array.size else b"")
    return digest.digest()


def duplicate_findings(hashes: dict[tuple[str, int], bytes], name: Callable[[str, int], str]) -> list[Finding]:
    """Images with identical pixels.

    Of each group of identical images the copy in the first of :data:`KEEP_FIRST` (test, val,
    train; the first by position within a split) stays; a copy in another split is a
    ``duplicate_across_splits`` finding (a leak: an error), another copy in the same split a
    ``duplicate_within_split`` one (a warning).

    Args:
        hashes: :func:`pixel_hash` of each checked case, keyed by ``(split, index)``.
        name: how to call the case ``(split, index)`` in a message.
    """
    groups: dict[bytes, list[tuple[str, int]]] = {}
    for key, digest in hashes.items():
        groups.setdefault(digest, []).append(key)
    findings = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda key: (KEEP_FIRST.index(key[0]) if key[0] in KEEP_FIRST else len(KEEP_FIRST), key))
        (kept_split, kept_index), *others = members
        kept = name(kept_split, kept_index)
        for split, index in others:
            if split == kept_split:
                detail = f"the same image as {kept}"
                findings.append(Finding("duplicate_within_split", split, index, name(split, index), detail))
            else:
                detail = f"the same image as {kept} in the {kept_split} split"
                findings.append(Finding("duplicate_across_splits", split, index, name(split, index), detail))
    return sorted(findings, key=lambda f: (KEEP_FIRST[::-1].index(f.split) if f.split in KEEP_FIRST else -1, f.index))


def shape_findings(
    shapes: dict[tuple[str, int], tuple[int, ...]],
    name: Callable[[str, int], str],
    in_channels: int,
    spatial_dims: int,
    batch_size: int,
) -> list[Finding]:
    """Images whose shape differs from the others' (``shape_disagreement`` findings): batches
    could not stack them, or the net could not take them.

    Channels and spatial axes must agree across all splits (one net takes every image); the
    shape that counts is the most common of those fitting ``in_channels`` and ``spatial_dims``
    (else the most common). With ``batch_size > 1`` the spatial size must agree within each split
    too (splits may differ: e.g. random crops for training, whole images for validation).

    Args:
        shapes: ``(C, *spatial)`` of each checked case as its split's transforms leave it, keyed
            by ``(split, index)`` in the order the cases were read.
        name: how to call the case ``(split, index)`` in a message.
    """

    cases = list(shapes)
    position = {case: k for k, case in enumerate(cases)}

    def most_common(group: list[tuple[str, int]], key: Callable[[tuple[str, int]], Any]) -> tuple[str, int]:
        counts = Counter(key(case) for case in group)  # ties: the first case read
        return max(group, key=lambda case: (counts[key(case)], -position[case]))

    def form(case: tuple[str, int]) -> tuple[int, int]:
        return shapes[case][0], len(shapes[case]) - 1

    if not cases:
        return []
    fitting = [case for case in cases if form(case) == (in_channels, spatial_dims)]
    example = most_common(fitting or cases, form)
    findings = []
    for case in cases:
        if form(case) == form(example):
            continue
        (channels, dims), (ref_channels, ref_dims) = form(case), form(example)
        expected = (
            " as data.in_channels and data.spatial_dims expect" if form(example) == (in_channels, spatial_dims) else ""
        )
        hint = (
            f"a {dims}D image among {ref_dims}D ones"
            if dims != ref_dims
            else f"{channels} channel(s), not {ref_channels}: store all images with one number of channels and set data.in_channels to it"
        )
        detail = (
            f"shape {shapes[case]} (channels, *spatial), but {name(*example)} has {shapes[example]}{expected}: {hint}"
        )
        findings.append(Finding("shape_disagreement", *case, name(*case), detail))
    if batch_size > 1:
        for split in dict.fromkeys(split for split, _ in cases):
            members = [case for case in cases if case[0] == split and form(case) == form(example)]
            reference = most_common(members, lambda case: shapes[case]) if members else None
            for case in members:
                if shapes[case] != shapes[reference]:
                    detail = (
                        f"shape {shapes[case]}, but {name(*reference)} in the same split has {shapes[reference]}: a batch "
                        f"(data.batch_size={batch_size}) takes one size; resize them in data.transforms (e.g. "
                        f"monai.transforms.Resized with spatial_size {list(shapes[reference][1:])}), or set data.batch_size=1"
                    )
                    findings.append(Finding("shape_disagreement", *case, name(*case), detail))
    return findings


def summary(findings: Iterable[Finding]) -> str:
    """The findings grouped by kind, with counts and the first few of each: one line."""
    findings = list(findings)
    parts = []
    for kind, title in KINDS.items():
        group = [str(f) for f in findings if f.kind == kind]
        if group:
            more = len(group) - SHOWN
            listed = "; ".join(group[:SHOWN]) + (f"; and {more} more" if more > 0 else "")
            parts.append(f"{title} ({len(group)}): {listed}")
    return " | ".join(parts)


def _scanned_text(scanned: dict[str, tuple[int, int]], scan: str, verb: str) -> str:
    counts = ", ".join(f"{done} of {total} {split}" for split, (done, total) in scanned.items())
    return f"data.scan={scan} {verb} {counts} cases"


def resolve(
    findings: list[Finding],
    scanned: dict[str, tuple[int, int]],
    seconds: float,
    *,
    source: str,
    scan: str,
    on_bad: str,
    verb: str = "read",
) -> set[tuple[str, int]]:
    """Report a scan; stop the run or say which cases to leave out.

    Logs one INFO line (what was scanned, how long it took, how many problems), and warns of
    duplicates within a split.

    Args:
        findings: everything found.
        scanned: per split, ``(cases checked, cases in the split)``.
        seconds: how long the scan took.
        source: the data, as messages name it (a manifest, a folder, a file).
        scan, on_bad: the options in force (see :func:`check_options`).
        verb: what the scan did to a case: ``read`` (files) or ``checked`` (arrays in memory).

    Returns:
        ``(split, index)`` of the cases to drop: none with ``on_bad="fail"`` or ``"warn"``; with
        ``"skip"`` every case with an error (logged as a warning).

    Raises:
        MedexpError: with ``on_bad="fail"``, listing every error found, grouped by kind, and how
            to proceed; with ``"warn"``, when any is not in :data:`TOLERABLE_KINDS`.
    """
    errors = [f for f in findings if f.is_error]
    bad_cases = {(f.split, f.index) for f in errors}
    scanned_text = _scanned_text(scanned, scan, verb)
    outcome = f"{len(errors)} problem(s) in {len(bad_cases)} case(s)" if errors else "no problems"
    log.info("data check of %s: %s in %.2f s: %s", source, scanned_text, seconds, outcome)
    warnings = [f for f in findings if not f.is_error]
    if warnings:
        log.warning("data check of %s (kept, a warning only): %s", source, summary(warnings))
    if not errors:
        return set()
    if on_bad == "warn" and all(f.kind in TOLERABLE_KINDS for f in errors):
        log.warning("data check of %s (kept: data.on_bad=warn): %s", source, summary(errors))
        return set()
    if on_bad in ("fail", "warn"):
        raise MedexpError(
            f"data check of {source} found {outcome} ({scanned_text}): {summary(errors)}. Fix or remove these "
            "cases; or set data.on_bad=skip to train without them (listed in skipped.csv in the run directory), "
            "or data.scan=off to train without this check"
        )
    log.warning(
        "data check of %s: skipping %d bad case(s) (data.on_bad=skip; listed in skipped.csv in the run directory): %s",
        source,
        len(bad_cases),
        summary(errors),
    )
    return bad_cases


def write_skipped(path: Path, findings: list[Finding], key_column: str, key: Callable[[str, int], Any]) -> None:
    """Write the cases left out to a CSV: ``<key_column>, split, kind, reason``, one row per case.

    Args:
        path: e.g. ``<run>/skipped.csv``.
        findings: the errors of the cases left out (warnings are ignored).
        key_column: ``image`` (file data: the image's path) or ``index`` (arrays: the row in the
            split as loaded), as in ``splits.csv`` and ``folds.csv``.
        key: the value of that column for case ``(split, index)``.
    """
    by_case: dict[tuple[str, int], list[Finding]] = {}
    for finding in findings:
        if finding.is_error:
            by_case.setdefault((finding.split, finding.index), []).append(finding)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([key_column, "split", "kind", "reason"])
        order = ("train", "val", "test")
        for (split, index), group in sorted(by_case.items(), key=lambda item: (order.index(item[0][0]), item[0][1])):
            kinds = ";".join(dict.fromkeys(f.kind for f in group))
            writer.writerow([key(split, index), split, kinds, "; ".join(str(f) for f in group)])
