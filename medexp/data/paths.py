"""File names and paths of image data: how manifests resolve them, which formats carry geometry,
and how messages name a file (with its manifest line) or a long list of offenders."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

# MONAI chooses PILReader by suffix only for png/jpg/jpeg/bmp: TIFF and GIF would reach the DICOM reader
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
# files whose affine places them in space (a folder counts too: a DICOM series); other formats get a
# default affine, so an image/mask geometry check compares only two of these
GEOMETRY_SUFFIXES = (".nii", ".nii.gz", ".dcm", ".dicom", ".nrrd", ".mha", ".mhd")
SHOWN = 5  # offending entries quoted in one message; the rest are counted


def located(path: Any, where: str) -> str:
    """``path`` as messages name it: followed by its manifest line ``where`` when there is one."""
    return f"{path} ({where})" if where else str(path)


def listing(entries: list[str]) -> str:
    """The first :data:`SHOWN` of ``entries`` for a message, and how many more there are."""
    more = len(entries) - SHOWN
    return "; ".join(entries[:SHOWN]) + (f"; and {more} more" if more > 0 else "")


def resolve_path(base: Path, text: str) -> Path:
    """A path written in a manifest: ``~`` expanded, relative paths taken from ``base`` (the
    manifest's folder)."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def file_stem(path: Path) -> str:
    """The name without its extension, ``.nii.gz`` counting as one (``a.nii.gz`` -> ``a``)."""
    return path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem


def folder_entries(folder: Path) -> list[Path]:
    """The visible entries of ``folder``, sorted: every one is a case (a folder may be a DICOM
    series); hidden ones are OS clutter."""
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def has_geometry(path: str) -> bool:
    """Whether the file (or DICOM series folder) has an affine that places it in space."""
    return path.lower().endswith(GEOMETRY_SUFFIXES) or Path(path).is_dir()


def is_dicom(path: Path) -> bool:
    """Whether ``path`` is a DICOM file, by its suffix or its preamble."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with path.open("rb") as file:  # a DICOM file's preamble: 128 bytes, then "DICM"
        return file.read(132)[128:] == b"DICM"


def file_digest(path: Path) -> bytes:
    """SHA-256 of a file's bytes (of a DICOM series folder: of its files', in name order)."""
    if path.is_dir():  # a DICOM series
        return b"".join(file_digest(child) for child in sorted(path.iterdir()) if child.is_file())
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").digest()
