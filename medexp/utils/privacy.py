"""What leaves the machine: remote loggers get no image pixels unless asked, and no plain paths.

A logger is *remote* when what it receives ends up on someone else's machine: wandb always
(offline runs are made to be synced), MLflow unless both its tracking store and its artifact
store are local (``sqlite:``, ``file:`` or a plain path), a CSV or TensorBoard logger writing to
a non-local filesystem (``s3://``...), and every logger medexp does not know. For remote loggers,

- image pixels (segmentation overlays) are sent only with ``logger.log_images=true``;
- hyperparameter values that are file paths (``data.root``, ``data.manifest``, ``ckpt_path``,
  ``paths.*``, any file name) are replaced by :func:`pseudonym` unless ``logger.hash_paths=false``.

Local loggers get everything as it is. Images written next to the inputs (``medexp predict``)
keep only their geometry from the input's metadata (:func:`geometry_only`), never DICOM tags.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import Any

# the last part of a config key whose value is a path: data.root, data.manifest, ckpt_path,
# paths.log_dir, logger.csv.save_dir, callbacks.model_checkpoint.dirpath, logger.mlflow.tracking_uri
PATH_KEY = re.compile(r"(^|_)(root|manifest|dir|dirpath|path|file|uri|location)$")
# values that are paths whatever their key: absolute, home-relative, URIs, Windows paths, file names
PATH_VALUE = re.compile(r"^(/|~|\.\.?[/\\]|[A-Za-z]:[/\\]|\\\\|[A-Za-z][\w+.-]*:(//|/))")
FILE_SUFFIXES = (
    ".csv",
    ".tsv",
    ".txt",
    ".json",
    ".yaml",
    ".yml",
    ".npz",
    ".npy",
    ".ckpt",
    ".pt",
    ".pth",
    ".db",
    ".dcm",
    ".dicom",
    ".ima",
    ".nii",
    ".nii.gz",
    ".nrrd",
    ".mha",
    ".mhd",
    ".img",
    ".hdr",
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
    ".svs",
)
LOCAL_SCHEMES = ("", "file", "sqlite")
# what a written image keeps of its input's metadata: the geometry MONAI's writers need
GEOMETRY_KEYS = ("affine", "original_affine", "spatial_shape", "space", "original_channel_dim")


def pseudonym(text: str) -> str:
    """A stable stand-in for a path or file name, the same in every run: ``sha256:<12 hex>``.

    Unsalted, so runs on the same data can be matched; a pseudonym, not anonymisation: a name
    that can be guessed can be checked against it.
    """
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:12]


def is_remote(logger: Any) -> bool:
    """Whether what ``logger`` receives may leave this machine (unknown loggers: yes)."""
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger

    kind = type(logger)  # not isinstance: a subclass may send its data anywhere
    if kind in (CSVLogger, TensorBoardLogger):
        return not _is_local(str(logger.root_dir))
    if kind is MLFlowLogger:
        tracking = getattr(logger, "_tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI") or ""
        artifacts = getattr(logger, "_artifact_location", None) or ""
        return not (_is_local(tracking) and _is_local(artifacts))
    return True


def _is_local(location: str) -> bool:
    scheme = location.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][\w+.-]*:", location) else ""
    return scheme in LOCAL_SCHEMES or len(scheme) == 1  # C:\... is a Windows drive


def looks_like_path(key: str, value: Any) -> bool:
    """Whether the config value ``value`` of ``key`` (``data.root``) is a path or a file name."""
    if not isinstance(value, str) or not value:
        return False
    if PATH_KEY.search(key.rsplit(".", 1)[-1].lower()):
        return True
    text = value.strip()
    return bool(PATH_VALUE.match(text)) or "\\" in text or text.lower().endswith(FILE_SUFFIXES)


def hide_paths(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with every path-like value (also inside lists and dicts) replaced by its
    :func:`pseudonym`."""

    def scrub(key: str, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: scrub(f"{key}.{k}", v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [scrub(key, v) for v in value]
        return pseudonym(value) if looks_like_path(key, value) else value

    return {key: scrub(key, value) for key, value in params.items()}


def setting(settings: Mapping[str, Any] | None, name: str) -> bool:
    """The privacy switch ``logger.<name>`` (``log_images`` default false, ``hash_paths`` true)."""
    default = {"log_images": False, "hash_paths": True}[name]
    value = settings.get(name) if settings else None
    return default if value is None else bool(value)


def hyperparams_for(logger: Any, params: Mapping[str, Any], settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The hyperparameters ``logger`` may receive: ``params`` as they are for local loggers;
    for remote ones, paths replaced by pseudonyms unless ``settings`` (the ``logger`` config)
    say ``hash_paths: false``."""
    if not is_remote(logger) or not setting(settings, "hash_paths"):
        return dict(params)
    return hide_paths(params)


def may_send_images(logger: Any, allowed: bool) -> bool:
    """Whether image pixels may go to ``logger``: always to local ones, to remote ones when
    ``allowed`` (``logger.log_images=true``)."""
    return allowed or not is_remote(logger)


def geometry_only(image: Any) -> Any:
    """A MetaTensor like ``image`` whose metadata is only its geometry (:data:`GEOMETRY_KEYS`):
    readers such as MONAI's ``ITKReader`` copy every DICOM tag (patient name, ID, birth date...)
    into the metadata, and nothing of that may reach a file we write."""
    from monai.data import MetaTensor

    meta = {key: image.meta[key] for key in GEOMETRY_KEYS if key in image.meta}
    return MetaTensor(image.as_tensor(), meta=meta)
