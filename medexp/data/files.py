"""Image files listed in a CSV manifest or laid out in folders, for classification or segmentation.

Files are read with MONAI's ``LoadImage`` (PNG, JPEG, BMP, TIFF, GIF, DICOM, NIfTI), channel
first. Loaded cases are MetaTensors that keep each file's affine and metadata
(:meth:`FileDataModule.load_case`), so outputs can be written aligned with their inputs; batches
hold plain tensors.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset, PILReader
from monai.transforms import Compose, LoadImage, Transform

from medexp.data import validation
from medexp.data.base import SPLITS, ArrayDataModule
from medexp.data.folds import assign_folds, split_by_fold
from medexp.utils.errors import MedexpError, user_error_message

log = logging.getLogger(__name__)

FILE_TASKS = ("binary", "multiclass", "segmentation")
REQUIRED_COLUMNS = ("image", "label")
OPTIONAL_COLUMNS = ("split", "patient_id", "roi", "site")
# names a manifest may give its site column (the acquisition site or scanner of each image)
SITE_COLUMNS = ("site", "scanner")
# MONAI chooses PILReader by suffix only for png/jpg/jpeg/bmp: TIFF and GIF would reach the DICOM reader
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
# files whose affine places them in space (a folder counts too: a DICOM series); other formats get a
# default affine, so an image/mask geometry check compares only two of these
GEOMETRY_SUFFIXES = (".nii", ".nii.gz", ".dcm", ".dicom", ".nrrd", ".mha", ".mhd")
SHOWN = 5  # offending entries quoted in one message; the rest are counted


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


def _at(path: Any, where: str) -> str:
    return f"{path} ({where})" if where else str(path)


def _listing(entries: list[str]) -> str:
    more = len(entries) - SHOWN
    return "; ".join(entries[:SHOWN]) + (f"; and {more} more" if more > 0 else "")


def _resolve(base: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def read_csv_rows(path: Path, required: Sequence[str], needs: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The columns of a CSV manifest and its rows as ``(line number, {column: stripped value})``.

    Raises:
        MedexpError: naming the file, for columns in ``required`` that are missing (``needs``
            says what the manifest must hold), text that is not CSV, or no rows.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(file)
            columns = [name.strip() for name in reader.fieldnames or []]
            missing = [name for name in required if name not in columns]
            if missing:
                raise MedexpError(f"{path}: missing column(s) {missing}; {needs} (found {columns})")
            rows = [
                (reader.line_num, {key.strip(): (value or "").strip() for key, value in row.items() if key is not None})
                for row in reader
            ]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MedexpError(f"{path}: cannot read it as a CSV file ({exc})") from exc
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
        path, REQUIRED_COLUMNS, f"a manifest needs columns {list(REQUIRED_COLUMNS)} and may have {list(OPTIONAL_COLUMNS)}"
    )

    base = path.absolute().parent
    site_column = next((name for name in SITE_COLUMNS if name in columns), None)
    bad_splits, bad_labels, missing_files, cases = [], [], [], []
    for line, row in rows:
        split = row.get("split") if "split" in columns else None
        if split is not None and split not in SPLITS:
            bad_splits.append(f"line {line}: {split!r}")
        image = _resolve(base, row["image"])
        if not row["image"] or not image.exists():
            missing_files.append(f"line {line}: image {row['image']!r}")
        if task == "segmentation":
            label: int | Path = _resolve(base, row["label"])
            if not row["label"] or not label.exists():
                missing_files.append(f"line {line}: mask {row['label']!r}")
        else:
            try:
                label = int(row["label"])
            except ValueError:
                label = -1
            if not 0 <= label < num_classes:
                bad_labels.append(f"line {line}: {row['label']!r}")
        roi = _resolve(base, row["roi"]) if row.get("roi") else None
        if roi is not None and not roi.exists():
            missing_files.append(f"line {line}: roi {row['roi']!r}")
        site = row.get(site_column, "") if site_column else ""
        cases.append(Case(image, label, split, row.get("patient_id", ""), f"{path} line {line}", roi, site))

    unsited = [f"line {case.where.rsplit(' ', 1)[-1]}" for case in cases if site_column and not case.site]
    if unsited:
        raise MedexpError(
            f"{path}: the {site_column} column is empty on {len(unsited)} line(s): {_listing(unsited)}; give every "
            "image its site (or scanner), or drop the column"
        )
    if bad_splits:
        raise MedexpError(
            f"{path}: unknown split value(s) {_listing(bad_splits)}; expected one of {list(SPLITS)} "
            "(or no split column, to split by data.split_seed)"
        )
    if bad_labels:
        raise MedexpError(
            f"{path}: labels must be class indices 0..{num_classes - 1} (data.num_classes={num_classes}, "
            f"data.task={task}); {len(bad_labels)} are not: {_listing(bad_labels)}"
        )
    if missing_files and not missing_ok:
        raise MedexpError(
            f"{path}: {len(missing_files)} listed file(s) do not exist (relative paths resolve against "
            f"{base}): {_listing(missing_files)}. Fix the paths, or set data.on_bad=skip to train without these cases"
        )
    return cases


def _entries(folder: Path) -> list[Path]:
    # every visible entry is a case (a folder may be a DICOM series); hidden ones are OS clutter
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def _stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem


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
    folders = [path for path in _entries(root) if path.is_dir()]
    names = [path.name for path in folders]
    if {"images", "masks"} <= set(names):
        raise MedexpError(f"{root} holds images/ and masks/, a segmentation layout; set data.task=segmentation")
    if len(folders) != num_classes:
        raise MedexpError(
            f"{root}: {len(folders)} class folder(s) {names} but data.num_classes={num_classes}; "
            "a classification folder has one sub-folder per class"
        )
    strays = [path.name for path in _entries(root) if not path.is_dir()]
    if strays:
        log.warning("%s: files outside the class folders are not used: %s", root, _listing(strays))
    cases = []
    for index, folder in enumerate(folders):
        files = _entries(folder)
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
        for path in _entries(folder):
            by_stem.setdefault(_stem(path), {"image": [], "mask": []})[kind].append(path)
    problems = []
    for stem, found in sorted(by_stem.items()):
        for kind, other in (("image", "mask"), ("mask", "image")):
            if len(found[kind]) > 1:
                problems.append(f"{[p.name for p in found[kind]]} are {kind}s with the same name {stem!r}")
            elif found[kind] and not found[other]:
                problems.append(f"{found[kind][0].relative_to(root)} has no {other}")
    if problems:
        raise MedexpError(f"{root}: images/ and masks/ do not pair up by file name: {_listing(problems)}")
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


def _file_digest(path: Path) -> bytes:
    if path.is_dir():  # a DICOM series
        return b"".join(_file_digest(child) for child in sorted(path.iterdir()) if child.is_file())
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").digest()


def _single_frame(image: Any) -> Any:
    # PIL would read the first page of a TIFF stack or an animated GIF and drop the rest
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise ValueError(f"it has {frames} frames; only single-frame images are read (store a stack as NIfTI)")
    return image


def missing_files(case: Case) -> list[Path]:
    """The files of ``case`` (image, mask, roi) that do not exist."""
    paths = [case.image, case.label if isinstance(case.label, Path) else None, case.roi]
    return [path for path in paths if path is not None and not path.exists()]


def _has_geometry(path: str) -> bool:
    return path.lower().endswith(GEOMETRY_SUFFIXES) or Path(path).is_dir()


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with path.open("rb") as file:  # a DICOM file's preamble: 128 bytes, then "DICM"
        return file.read(132)[128:] == b"DICM"


def _not_a_series(folder: Path) -> str | None:
    """Why ``folder``, named where an image belongs, cannot be a DICOM series (a folder is read as
    one), or None when it may be: it holds no files, or none of its first files is DICOM."""
    files = [path for path in _entries(folder) if path.is_file()]
    if not files:
        return "a folder with no files, not an image (a folder is read as one DICOM series)"
    if not any(_is_dicom(path) for path in files[:16]):
        shown = ", ".join(path.name for path in files[:3]) + (", ..." if len(files) > 3 else "")
        return (
            f"a folder, not an image: a folder is read as one DICOM series, but it holds no DICOM files ({shown}); "
            "list the image files themselves"
        )
    return None


class UnreadableFile(MedexpError):
    """A file that cannot be read as an image: ``name`` (the file and its manifest line) and why."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name, self.detail = name, detail


class CaseReader(Transform):
    """Load one case and check it, as the first (cached) transform of a file dataset.

    Input ``{"image": path, "label": class index or mask path, "where": manifest line}``; output
    ``{"image": (C, *spatial), "label": class index or (1, *spatial) mask}``, images and masks as
    float32 MetaTensors carrying their file's affine and metadata. Without a ``label`` (prediction),
    only the image is read.

    Masks become class indices: with ``mask_threshold=None`` their values must already be
    ``0..num_classes-1``; with a number ``t``, values above ``t`` become 1 and the rest 0 (binary
    masks saved as 0/255 images: ``t=127``).

    Raises:
        MedexpError: naming the file (and manifest line) when it cannot be read, a mask has more
            than one channel, its spatial shape differs from the image's, or its values are not
            class indices. :meth:`inspect` lists these problems, and more, without raising.
    """

    def __init__(self, task: str, num_classes: int, mask_threshold: float | None = None) -> None:
        self.task = task
        self.num_classes = num_classes
        self.mask_threshold = mask_threshold
        # site name -> index (FileDataModule.site_names); a case's "site" is served as its index
        self.site_index: dict[str, int] = {}
        with warnings.catch_warnings():
            # LoadImage registers MONAI's GPU DICOM decoder too, which warns wherever nvImageCodec is absent
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
            self.loader = LoadImage(image_only=True, ensure_channel_first=True)
        self.raster_reader = PILReader(converter=_single_frame)
        # set by inspect(): the largest value of the case's mask as stored, and its file
        self.inspected_mask_max: tuple[float, str] | None = None

    def read(self, path: str, where: str = "") -> MetaTensor:
        """One file as a ``(C, *spatial)`` MetaTensor.

        Raises:
            UnreadableFile: naming the file, its manifest line and the reader's complaint.
        """
        if Path(path).is_dir() and (reason := _not_a_series(Path(path))):
            raise UnreadableFile(_at(path, where), reason)  # before MONAI's DICOM reader warns about every file
        reader = self.raster_reader if path.lower().endswith(RASTER_SUFFIXES) else None
        try:
            return self.loader(path, reader=reader)
        except Exception as exc:  # PIL, pydicom, nibabel and MONAI each raise their own types
            reason = (str(exc).strip().splitlines() or [""])[0]
            detail = f"cannot read it as an image ({type(exc).__name__}: {reason})"
            raise UnreadableFile(_at(path, where), detail) from exc

    def load(self, data: dict[str, Any]) -> dict[str, MetaTensor]:
        """The files of a case as stored, unchecked: ``image``, and for segmentation the mask
        (``label``) and ``roi`` where the case has them. Raises :class:`UnreadableFile`."""
        where = data.get("where", "")
        sample = {"image": self.read(data["image"], where)}
        if "label" in data and self.task == "segmentation":
            sample["label"] = self.read(data["label"], where)
            if "roi" in data:
                sample["roi"] = self.read(data["roi"], where)
        return sample

    def problems(self, data: dict[str, Any], sample: dict[str, MetaTensor]) -> list[tuple[str, str, str]]:
        """What makes a loaded segmentation case unusable for training, as ``(kind, file, detail)``
        (kinds of :data:`medexp.data.validation.KINDS`): a mask with several channels, masks or
        roi whose shape differs from the image's, mask values that are not class indices."""
        if "label" not in sample:
            return []
        where = data.get("where", "")
        image, mask = sample["image"], sample["label"]
        mask_name = _at(data["label"], where)
        if mask.shape[0] != 1:
            detail = (
                f"the mask has {mask.shape[0]} channels; expected one channel of class indices (save it as a grey "
                "image)"
            )
            return [("shape_mismatch", mask_name, detail)]
        found = []
        if mask.shape[1:] != image.shape[1:]:
            detail = (
                f"mask of spatial shape {tuple(mask.shape[1:])} does not match its image {data['image']} of "
                f"spatial shape {tuple(image.shape[1:])}"
            )
            found.append(("shape_mismatch", mask_name, detail))
        if "roi" in sample and sample["roi"].shape[1:] != image.shape[1:]:
            detail = (
                f"roi mask of spatial shape {tuple(sample['roi'].shape[1:])} does not match its image "
                f"{data['image']} of spatial shape {tuple(image.shape[1:])}"
            )
            found.append(("shape_mismatch", _at(data["roi"], where), detail))
        if self.mask_threshold is None:  # with a threshold every value becomes 0 or 1
            detail = validation.mask_values_problem(torch.unique(mask.as_tensor()).numpy(), self.num_classes)
            if detail:
                found.append(("label_range", mask_name, detail))
        return found

    def inspect(self, data: dict[str, Any]) -> tuple[list[tuple[str, str, str]], MetaTensor | None]:
        """Read a case as training does and list every problem found, without raising.

        Besides :meth:`problems`: unreadable files, NaN/Inf values and constant images, and for
        segmentation an image and mask that both carry geometry (NIfTI, DICOM, ...) but whose
        affines differ. The mask's largest value as stored, with its file, is left in
        :attr:`inspected_mask_max` (None without a mask), to tell whether ``mask_threshold``
        empties every mask (:func:`medexp.data.validation.mask_threshold_problem`).

        Returns:
            ``(kind, file, detail)`` per problem, and the image as read (None when unreadable).
        """
        where = data.get("where", "")
        self.inspected_mask_max = None
        try:
            sample = self.load(data)
        except UnreadableFile as exc:
            return [("unreadable", exc.name, exc.detail)], None
        image = sample["image"]
        image_name = _at(data["image"], where)
        found = [
            (kind, image_name, detail)
            for _, kind, detail in validation.content_problems(image.as_tensor().numpy()[None])
        ]
        found += self.problems(data, sample)
        mask = sample.get("label")
        if mask is not None and mask.numel():
            self.inspected_mask_max = (float(mask.as_tensor().max()), _at(data["label"], where))
        if mask is not None and _has_geometry(str(data["image"])) and _has_geometry(str(data["label"])):
            detail = validation.geometry_problem(image.affine, mask.affine, str(data["image"]))
            if detail:
                found.append(("geometry_mismatch", _at(data["label"], where), detail))
        return found, image

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        sample = self.load(data)
        if "site" in data:
            sample["site"] = self.site_index[data["site"]]
        if "label" not in data:  # an image to predict on
            return sample
        if self.task != "segmentation":
            return {**sample, "label": data["label"]}
        for _, name, detail in self.problems(data, sample)[:1]:
            raise MedexpError(f"{name}: {detail}")
        if "roi" in sample:
            sample["roi"] = (sample["roi"][:1] > 0).to(sample["roi"].dtype)
        if self.mask_threshold is not None:
            mask = sample["label"]
            sample["label"] = (mask > self.mask_threshold).to(mask.dtype)
        return sample


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
    chosen = np.random.default_rng(seed).choice(training, size=max(1, round(val_fraction * len(training))), replace=False)
    return [replace(case, split="val") if i in set(chosen.tolist()) else case for i, case in enumerate(cases)]


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

    Without a ``split`` column, splits are drawn from ``split_seed`` (see :func:`assign_splits`).
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
            :func:`read_manifest`).
        root: instead of a manifest, a folder layout (see :func:`scan_folder`).
        layout: how ``root`` is laid out: ``folders`` (see :func:`scan_folder`) or ``drive`` (the
            DRIVE dataset as distributed, see :func:`scan_drive`).
        output_dir: where ``splits.csv`` (and ``skipped.csv``) is written; None writes nothing.
        split_seed: seed of the random split; val_fraction, test_fraction: its sizes, as
            fractions of patients (of images without ``patient_id``).
        mask_threshold: how mask values become class indices (see :class:`CaseReader`).
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
                "%s: patients in more than one split (results may be optimistic): %s", self.source, _listing(shared)
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
        return _at(case.image, case.where)

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
                        name = _at(path, case.where)
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
                failed.append(validation.Finding("shape_disagreement", split, index, self._name(split, index), chains[key]))
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
            return SealedPersistentDataset(items, transform, self.cache_dir, self.cache_key_env, hash_transform=json_hashing)
        try:
            return CacheDataset(items, transform, progress=False)
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
                f"{_at(case.image, case.where)}: the first training image has shape {shape} (channels, *spatial) "
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
                        digest.update(_file_digest(Path(path)))
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
