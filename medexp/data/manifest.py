"""CSV manifests and folder layouts of image files, and the train/val/test splits of their cases.

Nothing here reads an image: manifests and folders give :class:`Case` objects (paths, labels,
splits), which :class:`~medexp.data.reading.CaseReader` reads. :func:`read_csv` is the one CSV
reader of medexp (manifests, pair lists, prediction input lists).
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medexp.data.base import SPLITS
from medexp.data.paths import file_stem, folder_entries, listing, resolve_path
from medexp.utils.errors import MedexpError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "label")
OPTIONAL_COLUMNS = ("split", "patient_id", "roi", "site")
# names a manifest may give its site column (the acquisition site or scanner of each image)
SITE_COLUMNS = ("site", "scanner")


@dataclass(frozen=True)
class Case:
    """One image and its label: a class index, or a mask file for segmentation.

    ``split`` is None until a split is assigned; ``where`` names the manifest line the case came
    from (empty for folder layouts, where the path says it all). ``roi`` is an optional mask of
    the region where segmentation metrics are computed (e.g. a retina's field of view).
    ``site`` is the acquisition site or scanner (empty when the manifest has none).
    """

    image: Path
    label: int | Path
    split: str | None = None
    patient_id: str = ""
    where: str = ""
    roi: Path | None = None
    site: str = ""

    def item(self) -> dict[str, Any]:
        """The dict a MONAI dataset holds for this case (see :class:`CaseReader`)."""
        label = str(self.label) if isinstance(self.label, Path) else self.label
        item = {"image": str(self.image), "label": label, "where": self.where}
        if self.site:
            item["site"] = self.site
        return item if self.roi is None else {**item, "roi": str(self.roi)}


def read_csv(path: Path, name: str | None = None) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The columns of a CSV file and its rows as ``(line number, {column: value})``, names and
    values stripped of surrounding spaces; a byte-order mark (spreadsheets write one) is skipped.

    Args:
        name: how messages name the file (default: its path).

    Raises:
        MedexpError: naming the file, for text that is not CSV.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(file)
            columns = [column.strip() for column in reader.fieldnames or []]
            rows = [
                (reader.line_num, {key.strip(): (value or "").strip() for key, value in row.items() if key is not None})
                for row in reader
            ]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MedexpError(f"{path if name is None else name}: cannot read it as a CSV file ({exc})") from exc
    return columns, rows


def read_csv_rows(
    path: Path, required: Sequence[str], needs: str
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The columns of a CSV manifest and its rows (see :func:`read_csv`).

    Raises:
        MedexpError: naming the file, for columns in ``required`` that are missing (``needs``
            says what the manifest must hold), text that is not CSV, or no rows.
    """
    columns, rows = read_csv(path)
    missing = [name for name in required if name not in columns]
    if missing:
        raise MedexpError(f"{path}: missing column(s) {missing}; {needs} (found {columns})")
    if not rows:
        raise MedexpError(f"{path}: the manifest lists no images")
    return columns, rows


def read_manifest(path: Path, task: str, num_classes: int, missing_ok: bool = False) -> list[Case]:
    """Read a CSV manifest: columns ``image``, ``label`` and optionally ``split``, ``patient_id``,
    ``roi`` and ``site`` (or ``scanner``: the acquisition site of each image, for per-site metrics
    and leave-one-site-out folds).

    Relative paths resolve against the manifest's folder. ``label`` is a class index, or a mask
    path for ``task="segmentation"``. Other columns are ignored.

    Args:
        missing_ok: keep cases whose files do not exist (the data check then reports them, and
            ``data.on_bad=skip`` leaves them out) instead of raising.

    Raises:
        MedexpError: for a missing or unreadable manifest, missing columns, unknown split values,
            labels that are not class indices ``0..num_classes-1``, or listed files that do not
            exist (every offending line is counted, the first few quoted).
    """
    if not path.is_file():
        raise MedexpError(
            f"manifest not found: {path}. Point data.manifest at a CSV file with columns "
            f"{list(REQUIRED_COLUMNS)} (optional {list(OPTIONAL_COLUMNS)}), or use data.root=DIR for a folder layout"
        )
    columns, rows = read_csv_rows(
        path,
        REQUIRED_COLUMNS,
        f"a manifest needs columns {list(REQUIRED_COLUMNS)} and may have {list(OPTIONAL_COLUMNS)}",
    )

    base = path.absolute().parent
    site_column = next((name for name in SITE_COLUMNS if name in columns), None)
    bad_splits, bad_labels, missing_files, cases = [], [], [], []
    for line, row in rows:
        split = row.get("split") if "split" in columns else None
        if split is not None and split not in SPLITS:
            bad_splits.append(f"line {line}: {split!r}")
        image = resolve_path(base, row["image"])
        if not row["image"] or not image.exists():
            missing_files.append(f"line {line}: image {row['image']!r}")
        if task == "segmentation":
            label: int | Path = resolve_path(base, row["label"])
            if not row["label"] or not label.exists():
                missing_files.append(f"line {line}: mask {row['label']!r}")
        else:
            try:
                label = int(row["label"])
            except ValueError:
                label = -1
            if not 0 <= label < num_classes:
                bad_labels.append(f"line {line}: {row['label']!r}")
        roi = resolve_path(base, row["roi"]) if row.get("roi") else None
        if roi is not None and not roi.exists():
            missing_files.append(f"line {line}: roi {row['roi']!r}")
        site = row.get(site_column, "") if site_column else ""
        cases.append(Case(image, label, split, row.get("patient_id", ""), f"{path} line {line}", roi, site))

    unsited = [f"line {case.where.rsplit(' ', 1)[-1]}" for case in cases if site_column and not case.site]
    if unsited:
        raise MedexpError(
            f"{path}: the {site_column} column is empty on {len(unsited)} line(s): {listing(unsited)}; give every "
            "image its site (or scanner), or drop the column"
        )
    if bad_splits:
        raise MedexpError(
            f"{path}: unknown split value(s) {listing(bad_splits)}; expected one of {list(SPLITS)} "
            "(or no split column, to split by data.split_seed)"
        )
    if bad_labels:
        raise MedexpError(
            f"{path}: labels must be class indices 0..{num_classes - 1} (data.num_classes={num_classes}, "
            f"data.task={task}); {len(bad_labels)} are not: {listing(bad_labels)}"
        )
    if missing_files and not missing_ok:
        raise MedexpError(
            f"{path}: {len(missing_files)} listed file(s) do not exist (relative paths resolve against "
            f"{base}): {listing(missing_files)}. Fix the paths, or set data.on_bad=skip to train without these cases"
        )
    return cases


def scan_folder(root: Path, task: str, num_classes: int) -> tuple[list[Case], list[str] | None]:
    """Cases of a folder layout, and the class names (classification) in class-index order.

    Segmentation: ``root/images/`` and ``root/masks/`` whose files match by name (extensions may
    differ, e.g. ``a.jpg`` and ``a.png``). Classification: one sub-folder per class; sorted
    folder names give the class indices.

    Raises:
        MedexpError: when the layout does not match ``task`` or ``num_classes``, a class folder is
            empty, or images and masks do not pair up.
    """
    if not root.is_dir():
        raise MedexpError(f"data.root={root} is not a folder; point it at the data, or use data.manifest=cases.csv")
    if task == "segmentation":
        return _scan_segmentation(root), None
    folders = [path for path in folder_entries(root) if path.is_dir()]
    names = [path.name for path in folders]
    if {"images", "masks"} <= set(names):
        raise MedexpError(f"{root} holds images/ and masks/, a segmentation layout; set data.task=segmentation")
    if len(folders) != num_classes:
        raise MedexpError(
            f"{root}: {len(folders)} class folder(s) {names} but data.num_classes={num_classes}; "
            "a classification folder has one sub-folder per class"
        )
    strays = [path.name for path in folder_entries(root) if not path.is_dir()]
    if strays:
        log.warning("%s: files outside the class folders are not used: %s", root, listing(strays))
    cases = []
    for index, folder in enumerate(folders):
        files = folder_entries(folder)
        if not files:
            raise MedexpError(f"{folder}: class folder {folder.name!r} holds no images")
        cases += [Case(path, index) for path in files]
    return cases, names


def _scan_segmentation(root: Path) -> list[Case]:
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise MedexpError(
            f"{root}: a segmentation folder needs images/ and masks/ sub-folders with matching file names "
            "(or list the pairs in data.manifest=cases.csv)"
        )
    by_stem: dict[str, dict[str, list[Path]]] = {}
    for kind, folder in (("image", images_dir), ("mask", masks_dir)):
        for path in folder_entries(folder):
            by_stem.setdefault(file_stem(path), {"image": [], "mask": []})[kind].append(path)
    problems = []
    for stem, found in sorted(by_stem.items()):
        for kind, other in (("image", "mask"), ("mask", "image")):
            if len(found[kind]) > 1:
                problems.append(f"{[p.name for p in found[kind]]} are {kind}s with the same name {stem!r}")
            elif found[kind] and not found[other]:
                problems.append(f"{found[kind][0].relative_to(root)} has no {other}")
    if problems:
        raise MedexpError(f"{root}: images/ and masks/ do not pair up by file name: {listing(problems)}")
    if not by_stem:
        raise MedexpError(f"{images_dir} holds no images")
    return [Case(found["image"][0], found["mask"][0]) for _, found in sorted(by_stem.items())]


def assign_splits(
    cases: list[Case], seed: int, val_fraction: float, test_fraction: float, stratify: bool
) -> list[Case]:
    """Random train/val/test splits that keep each patient in one split.

    Cases without a ``patient_id`` count as patients of their own. The fractions are of patients;
    with ``stratify``, each class (a patient's most frequent label) is split in proportion, and
    rounding carries over from one class to the next so the totals still match the fractions.
    The same cases in the same order and the same seed give the same split.
    """
    groups: dict[str | int, list[int]] = {}
    for index, case in enumerate(cases):
        groups.setdefault(case.patient_id or index, []).append(index)
    strata: dict[Any, list[str | int]] = {}
    for key, members in groups.items():
        stratum = Counter(cases[i].label for i in members).most_common(1)[0][0] if stratify else 0
        strata.setdefault(stratum, []).append(key)

    rng = np.random.default_rng(seed)
    carry = {"test": 0.0, "val": 0.0}
    split_of: dict[str | int, str] = {}
    for stratum in sorted(strata):
        keys = strata[stratum]
        take = {}
        for split, fraction in (("test", test_fraction), ("val", val_fraction)):
            exact = len(keys) * fraction + carry[split]
            take[split] = int(np.floor(exact + 0.5))
            carry[split] = exact - take[split]
        n_test = min(take["test"], len(keys))
        n_val = min(take["val"], len(keys) - n_test)
        for rank, position in enumerate(rng.permutation(len(keys))):
            split_of[keys[position]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return [replace(case, split=split_of[case.patient_id or index]) for index, case in enumerate(cases)]


def write_splits(cases: dict[str, list[Case]], path: Path) -> None:
    """Write the split used as a CSV (``image, label, split, patient_id, roi``, absolute paths;
    and ``site`` where the cases have sites).

    The file is itself a manifest: ``data.manifest=<it>`` reuses the split elsewhere.
    """
    sites = any(case.site for members in cases.values() for case in members)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "label", "split", "patient_id", "roi", *(["site"] if sites else [])])
        for split in SPLITS:
            writer.writerows(
                [c.image, c.label, split, c.patient_id, c.roi or "", *([c.site] if sites else [])] for c in cases[split]
            )


def missing_files(case: Case) -> list[Path]:
    """The files of ``case`` (image, mask, roi) that do not exist."""
    paths = [case.image, case.label if isinstance(case.label, Path) else None, case.roi]
    return [path for path in paths if path is not None and not path.exists()]


def scan_drive(root: Path, val_fraction: float, seed: int) -> list[Case]:
    """Cases of the DRIVE retinal vessel dataset as distributed (Staal et al. 2004).

    ``{training,test}/images/NN_{training,test}.tif`` with vessel masks
    ``*/1st_manual/NN_manual1.gif`` and field-of-view masks ``*/mask/NN_*_mask.gif`` (the
    ``roi``). The official test images are the test split; ``val_fraction`` of the training images,
    drawn from ``seed``, are the validation split.
    """
    cases: list[Case] = []
    for part in ("training", "test"):
        images = sorted((root / part / "images").glob("*.tif"))
        if not images:
            raise MedexpError(
                f"{root / part / 'images'}: no DRIVE images (*.tif); data.root should be the DRIVE folder holding "
                "training/ and test/"
            )
        for image in images:
            number = image.name.split("_")[0]
            label = root / part / "1st_manual" / f"{number}_manual1.gif"
            roi = root / part / "mask" / f"{number}_{part}_mask.gif"
            missing = [str(p) for p in (label, roi) if not p.is_file()]
            if missing:
                raise MedexpError(f"{image}: DRIVE files missing: {missing}")
            cases.append(Case(image, label, "test" if part == "test" else "train", f"drive-{part}-{number}", roi=roi))
    training = [i for i, case in enumerate(cases) if case.split == "train"]
    chosen = np.random.default_rng(seed).choice(
        training, size=max(1, round(val_fraction * len(training))), replace=False
    )
    return [replace(case, split="val") if i in set(chosen.tolist()) else case for i, case in enumerate(cases)]
