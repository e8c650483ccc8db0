"""The files a command is given: ``input=`` (a file, a folder, a glob, a CSV of images or of
registration pairs), ``mask=`` (a CSV column or a folder of masks), and where predicted masks go."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from medexp.data.manifest import read_csv
from medexp.utils.errors import MedexpError

GLOB_CHARS = "*?["


def find_inputs(spec: str) -> list[Path]:
    """The image files that ``input=spec`` names, in a stable order.

    ``spec`` is one file, a glob pattern (``**`` recurses), a folder (its image files, sorted,
    sub-folders not included) or a CSV file with an ``image`` column (a translation manifest:
    ``source``) whose relative paths resolve against the CSV's folder.

    Raises:
        MedexpError: naming what was looked for when nothing matches, the CSV has no ``image``
            column, or files it lists do not exist.
    """
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        return _read_image_list(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.is_file() and is_image(p))
        if not images:
            raise MedexpError(f"input={spec!r}: the folder holds no image files ({', '.join(image_suffixes())})")
        return images
    if any(char in spec for char in GLOB_CHARS):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise MedexpError(f"input={spec!r}: no file matches the pattern")
        return matches
    raise MedexpError(
        f"input={spec!r}: no such file or folder; expected an image file, a folder of images, a glob pattern "
        "(quoted, e.g. 'scans/*.nii.gz') or a CSV file with an image column"
    )


def _read_image_list(path: Path) -> list[Path]:
    from medexp.data.paths import listing, resolve_path

    columns, rows = read_csv(path, f"input={str(path)!r}")
    # a translation manifest (data=files_translation) lists the images to translate as `source`
    column = "image" if "image" in columns else "source" if "source" in columns else None
    if column is None:
        raise MedexpError(
            f"input={str(path)!r}: no 'image' column (found {columns}); a CSV lists the images in an 'image' "
            "column (a translation manifest: 'source')"
        )
    base = path.absolute().parent
    images = [resolve_path(base, row[column]) for _, row in rows]
    missing = [
        f"line {line}: {row[column]!r}"
        for (line, row), image in zip(rows, images)
        if not row[column] or not image.exists()
    ]
    if missing:
        raise MedexpError(
            f"input={str(path)!r}: {len(missing)} listed image(s) do not exist (relative paths resolve against "
            f"{base}): {listing(missing)}"
        )
    if not images:
        raise MedexpError(f"input={str(path)!r}: the CSV lists no images")
    return images


def find_pairs(spec: str) -> list[Any]:
    """The pairs a registration model registers, from ``input=spec``: a CSV file with columns
    ``fixed`` and ``moving`` (see :func:`medexp.data.registration.read_pairs`; other columns,
    masks and splits included, are ignored).

    Raises:
        MedexpError: when ``spec`` is not a CSV file, or naming its bad lines.
    """
    from medexp.data.registration import read_pairs

    path = Path(spec).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".csv"):
        raise MedexpError(
            f"input={spec!r}: a registration model predicts on pairs; give a CSV file with columns fixed and moving "
            "(one pair per row; relative paths resolve against the CSV's folder)"
        )
    return read_pairs(path, labels=False)


def image_suffixes() -> tuple[str, ...]:
    """The file name endings of images (lower case)."""
    from medexp.data.paths import RASTER_SUFFIXES

    return (*RASTER_SUFFIXES, ".nii", ".nii.gz", ".dcm")


def is_image(path: Path) -> bool:
    """Whether ``path`` names an image file (not a hidden one)."""
    return not path.name.startswith(".") and path.name.lower().endswith(image_suffixes())


def mask_paths(inputs: list[Path], output: Path) -> list[Path]:
    """Where the masks of ``inputs`` go: ``output`` mirrors the inputs' folders below their common
    parent; NIfTI stays NIfTI, raster images become PNG (lossless), anything else (DICOM) NIfTI.

    Raises:
        MedexpError: when a mask would overwrite an input or another input's mask.
    """
    from medexp.data.paths import RASTER_SUFFIXES, file_stem

    absolute = [path.absolute() for path in inputs]
    root = Path(os.path.commonpath([path.parent for path in absolute]))
    paths = []
    for path in absolute:
        name = path.name.lower()
        suffix = ".png" if name.endswith(RASTER_SUFFIXES) else ".nii" if name.endswith(".nii") else ".nii.gz"
        paths.append(output.absolute() / path.parent.relative_to(root) / f"{file_stem(path)}{suffix}")
    resolved = {path.resolve() for path in absolute}
    for path, mask in zip(absolute, paths):
        if mask.resolve() in resolved:
            raise MedexpError(
                f"output={str(output)!r}: the mask of {path} would overwrite an input; choose another folder"
            )
    if len(set(paths)) < len(paths):
        twice = sorted({str(p) for p in paths if paths.count(p) > 1})
        raise MedexpError(f"inputs that differ only in their extension would share a mask file: {twice[:3]}")
    return paths


def mask_files(inputs: list[Path], spec: str, input_spec: str) -> list[Path | None]:
    """The mask file of each input named by ``mask=spec``: a column of the input CSV (empty cells:
    none; relative paths resolve against the CSV's folder), or a folder holding files named like
    the images (the same file name, or the same stem with any image extension).

    Raises:
        MedexpError: when ``spec`` is neither, or listed masks do not exist.
    """
    from medexp.data.paths import file_stem, resolve_path

    source = Path(input_spec).expanduser()
    if source.is_file() and source.suffix.lower() == ".csv":
        columns, rows = read_csv(source, f"input={input_spec!r}")
        if spec in columns:
            base = source.absolute().parent
            found = [resolve_path(base, row[spec]) if row[spec] else None for _, row in rows]
            missing = [str(path) for path in found if path is not None and not path.is_file()]
            if missing:
                raise MedexpError(f"mask={spec!r}: {len(missing)} listed mask(s) do not exist, e.g. {missing[:3]}")
            return found
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise MedexpError(
            f"mask={spec!r}: neither a folder of masks nor a column of the input CSV"
            + ("" if source.suffix.lower() == ".csv" else " (input is not a CSV file)")
        )
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and is_image(path):
            by_stem.setdefault(file_stem(path), []).append(path)
    found: list[Path | None] = []
    for image in inputs:
        candidates = by_stem.get(file_stem(image), [])
        exact = [path for path in candidates if path.name == image.name]
        found.append((exact or candidates or [None])[0])
    return found
