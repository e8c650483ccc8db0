"""MedMNIST 2D and 3D datasets (official splits) from local ``.npz`` files or an MD5-verified download."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medexp.data.base import SPLITS, ArrayDataModule
from medexp.data.batch_augment import check_axes
from medexp.data.medmnist_info import FLIP_AXES, MEDMNIST, dataset_info, file_name, url
from medexp.utils.errors import MedexpError

log = logging.getLogger(__name__)

_KEYS = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read the six MedMNIST arrays of ``path`` (``{train,val,test}_{images,labels}``).

    Raises:
        MedexpError: when the file is not a readable ``.npz`` or lacks one of the arrays.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in _KEYS if key not in npz.files]
            if missing:
                raise MedexpError(f"{path}: not a MedMNIST file; missing arrays {missing} (has {npz.files})")
            return {key: npz[key] for key in _KEYS}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise MedexpError(
            f"{path}: cannot read it as a .npz archive ({type(exc).__name__}: {exc}); the file is corrupt or "
            "incomplete — delete it and fetch it again (data.download=true)"
        ) from exc


class MedMNISTDataModule(ArrayDataModule):
    """A 2D or 3D MedMNIST dataset with its official train/val/test splits.

    The dimensions follow ``spatial_dims``: 2D images ``(N, H, W)`` or ``(N, H, W, 3)`` become
    ``(N, C, H, W)``; 3D volumes ``(N, D, H, W)`` become ``(N, 1, D, H, W)``. Labels ``(N,)`` and
    ``(N, 1)`` are both accepted (multi-label sets keep ``(N, L)``).

    Args:
        name: dataset name, e.g. ``breastmnist`` or ``organmnist3d`` (see
            :mod:`medexp.data.medmnist_info`); a 2D name needs ``spatial_dims=2``, a 3D one 3.
        root: folder holding ``<name>.npz`` (size 28) or ``<name>_<size>.npz``.
        size: pixels (voxels) per side: 28, 64, 128 or 224 for 2D sets, 28 or 64 for 3D sets.
        download: fetch the file from Zenodo (MD5-verified) when it is not in ``root``.
        image_size: ``size`` again (derived in the YAML), under the synthetic data's name for it.
        flip_axes: spatial axes along which mirrored images keep their labels (0: rows, 1:
            columns); None: the dataset's (:data:`~medexp.data.medmnist_info.FLIP_AXES`). Flip
            augmentation and test-time flips of the fast recipe read it.
        ordinal: whether the classes are ordered grades (derived in the YAML from the metadata's
            "ordinal-regression"); ``model.ordinal_smoothing=${data.ordinal}`` reads it.
        **kwargs: see :class:`~medexp.data.base.ArrayDataModule`; ``task``, ``num_classes`` and
            ``in_channels`` must agree with the dataset's metadata (the YAML derives them from it).
    """

    def __init__(
        self,
        name: str,
        root: str | Path,
        size: int = 28,
        download: bool = False,
        image_size: int | None = None,
        flip_axes: Sequence[int] | None = None,
        ordinal: bool | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        # a derived property, named as on the synthetic data, for models that need the input shape (a VAE)
        if image_size is not None and image_size != size:
            raise MedexpError(f"data.image_size={image_size} but data.size={size}; leave data.image_size unset")
        try:
            self.info = dataset_info(name, dims=self.spatial_dims)
        except ValueError as exc:
            raise MedexpError(f"{exc}{_other_dims_hint(name, self.spatial_dims)}") from None
        # the axes a mirror keeps the label on, read by flip augmentation and test-time flips
        self.flip_axes = check_axes(
            FLIP_AXES[name] if flip_axes is None else flip_axes, self.spatial_dims, "data.flip_axes"
        )
        self.ordinal = self.info["task"] == "ordinal" if ordinal is None else bool(ordinal)
        if size not in self.info["md5"]:
            raise MedexpError(f"data.size={size}; {name} is offered at sizes {sorted(self.info['md5'])}")
        self.name, self.size, self.download = name, size, download
        self.class_names = list(self.info["labels"])
        self.path = Path(root).expanduser() / file_name(name, size)
        expected = {"num_classes": len(self.info["labels"]), "in_channels": self.info["channels"]}
        for key, value in expected.items():
            if getattr(self, key) != value:
                raise MedexpError(f"data.{key}={getattr(self, key)} but {name} has {value}; leave data.{key} unset")
        if not self.path.is_file() and not download:
            raise MedexpError(
                f"MedMNIST file not found: {self.path}. Point data.root at the folder that holds "
                f"{self.path.name}, or set data.download=true to fetch it (MD5-verified) from {url(name, size)}"
            )
        self._arrays: dict[str, np.ndarray] | None = None

    def describe(self) -> str:
        return str(self.path)

    def prepare_data(self) -> None:
        if self.path.is_file():
            return
        import pooch

        log.info("downloading %s to %s", url(self.name, self.size), self.path.parent)
        try:
            pooch.retrieve(
                url(self.name, self.size),
                known_hash=f"md5:{self.info['md5'][self.size]}",
                fname=self.path.name,
                path=self.path.parent,
                progressbar=True,
            )
        except Exception as exc:  # network errors come in many types; the message says which
            raise MedexpError(f"download of {url(self.name, self.size)} failed: {exc}") from exc

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = read_npz(self.path)
            self._report_split_sizes()
        images, labels = self._arrays[f"{split}_images"], self._arrays[f"{split}_labels"]
        if images.ndim == 1 + self.spatial_dims:  # grey (N, H, W) or (N, D, H, W)
            images = images[:, None]
        elif self.spatial_dims == 2 and images.ndim == 4 and images.shape[-1] in (1, 3):  # (N, H, W, C)
            images = images.transpose(0, 3, 1, 2)
        # any other shape is reported by the split check, against (N, C, *spatial)
        spatial = (self.size,) * self.spatial_dims
        if images.ndim == 2 + self.spatial_dims and images.shape[2:] != spatial:
            raise MedexpError(
                f"{self.path}: {split} images are {images.shape[2:]}, expected data.size={self.size} "
                f"({'x'.join(map(str, spatial))})"
            )
        if self.task != "multilabel":
            labels = labels.reshape(len(labels), -1)
            if labels.shape[1] != 1:
                raise MedexpError(f"{self.path}: {split} labels have shape {labels.shape}; expected (N,) or (N, 1)")
            labels = labels[:, 0]
        return np.ascontiguousarray(images), labels.astype(np.int64)

    def _report_split_sizes(self) -> None:
        sizes = {split: len(self._arrays[f"{split}_labels"]) for split in SPLITS}
        if sizes != self.info["splits"]:
            log.warning(
                "%s: split sizes %s differ from the official %s; results are not comparable with published tables",
                self.path,
                sizes,
                self.info["splits"],
            )


def _other_dims_hint(name: str, spatial_dims: int) -> str:
    """Where a dataset of the other dimensions is meant to go (for the error on a wrong name)."""
    info = MEDMNIST.get(name)
    if info is None or info["dims"] == spatial_dims:
        return ""
    option = "medmnist3d" if info["dims"] == 3 else "medmnist"
    return f"; {name} is a {info['dims']}D dataset (data={option} sets data.spatial_dims={info['dims']})"
