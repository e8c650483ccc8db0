"""Small files that tests write themselves, and a way to interrupt a running command."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def write_medmnist_npz(
    path: Path,
    sizes: dict[str, int],
    num_classes: int,
    channels: int = 1,
    size: int = 28,
    multilabel: bool = False,
    label_shape_n1: bool = True,
    seed: int = 0,
) -> Path:
    """A MedMNIST-format ``.npz`` with random images whose mean intensity depends on the label."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes.items():
        if multilabel:
            labels = rng.integers(0, 2, size=(n, num_classes))
            signal = labels[:, 0]
        else:
            labels = rng.integers(0, num_classes, size=n)
            signal = labels
        shape = (n, size, size) if channels == 1 else (n, size, size, channels)
        images = rng.integers(0, 120, size=shape) + (signal * (100 // max(1, num_classes - 1))).reshape(
            -1, *[1] * (len(shape) - 1)
        )
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None] if (label_shape_n1 and not multilabel) else labels
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def write_dicom(path: Path, pixels: np.ndarray, spacing: tuple[float, float] = (0.5, 0.5), **attributes: str) -> Path:
    """A single-frame CT slice ``(H, W)`` (16-bit, MONOCHROME2) with geometry and any extra
    DICOM ``attributes`` (e.g. ``PatientName``)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing, ds.ImagePositionPatient = list(spacing), [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def signal_when(proc: subprocess.Popen, ready: Callable[[], bool], signum: int, timeout: float = 300) -> bool:
    """Send ``signum`` to ``proc`` as soon as ``ready()`` is true (polled every 20 ms; an
    exception counts as not ready, e.g. a checkpoint still being written). False when the
    process ended first."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            if ready():
                proc.send_signal(signum)
                return True
        except Exception:
            pass
        time.sleep(0.02)
    return False
