"""``medexp predict ckpt_path=... input=... output=...`` (or ``python -m medexp.predict``): apply a
checkpoint to new images.

Model and data module are rebuilt from the run config stored in the checkpoint (the data
module's splits are not loaded); each input is prepared exactly as the test split was
(:meth:`~medexp.data.base.ArrayDataModule.predict_transform`). Classification writes
``<output>/predictions.csv``; segmentation writes one mask of class indices per input, in the
input's format and geometry, and lists them in ``<output>/predictions.csv``.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig

from medexp.utils.config import CONFIG_PATH, register_resolvers
from medexp.utils.errors import MedexpError, user_errors

log = logging.getLogger("medexp")
register_resolvers()

GLOB_CHARS = "*?["


def find_inputs(spec: str) -> list[Path]:
    """The image files that ``input=spec`` names, in a stable order.

    ``spec`` is one file, a glob pattern (``**`` recurses), a folder (its image files, sorted,
    sub-folders not included) or a CSV file with an ``image`` column whose relative paths resolve
    against the CSV's folder.

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
        images = sorted(p for p in path.iterdir() if p.is_file() and _is_image(p))
        if not images:
            raise MedexpError(f"input={spec!r}: the folder holds no image files ({', '.join(_suffixes())})")
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
    from medexp.data.files import _listing, _resolve

    try:
        with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(file)
            columns = [name.strip() for name in reader.fieldnames or []]
            if "image" not in columns:
                raise MedexpError(f"input={str(path)!r}: no 'image' column (found {columns})")
            rows = [(reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items() if k}) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MedexpError(f"input={str(path)!r}: cannot read it as a CSV file ({exc})") from exc
    base = path.absolute().parent
    images = [_resolve(base, row["image"]) for _, row in rows]
    missing = [f"line {line}: {row['image']!r}" for (line, row), image in zip(rows, images) if not row["image"] or not image.exists()]
    if missing:
        raise MedexpError(
            f"input={str(path)!r}: {len(missing)} listed image(s) do not exist (relative paths resolve against "
            f"{base}): {_listing(missing)}"
        )
    if not images:
        raise MedexpError(f"input={str(path)!r}: the CSV lists no images")
    return images


def _suffixes() -> tuple[str, ...]:
    from medexp.data.files import RASTER_SUFFIXES

    return (*RASTER_SUFFIXES, ".nii", ".nii.gz", ".dcm")


def _is_image(path: Path) -> bool:
    return not path.name.startswith(".") and path.name.lower().endswith(_suffixes())


def mask_paths(inputs: list[Path], output: Path) -> list[Path]:
    """Where the masks of ``inputs`` go: ``output`` mirrors the inputs' folders below their common
    parent; NIfTI stays NIfTI, raster images become PNG (lossless), anything else (DICOM) NIfTI.

    Raises:
        MedexpError: when a mask would overwrite an input or another input's mask.
    """
    from medexp.data.files import RASTER_SUFFIXES, _stem

    absolute = [path.absolute() for path in inputs]
    root = Path(os.path.commonpath([path.parent for path in absolute]))
    paths = []
    for path in absolute:
        name = path.name.lower()
        suffix = ".png" if name.endswith(RASTER_SUFFIXES) else ".nii" if name.endswith(".nii") else ".nii.gz"
        paths.append(output.absolute() / path.parent.relative_to(root) / f"{_stem(path)}{suffix}")
    resolved = {path.resolve() for path in absolute}
    for path, mask in zip(absolute, paths):
        if mask.resolve() in resolved:
            raise MedexpError(f"output={str(output)!r}: the mask of {path} would overwrite an input; choose another folder")
    if len(set(paths)) < len(paths):
        twice = sorted({str(p) for p in paths if paths.count(p) > 1})
        raise MedexpError(f"inputs that differ only in their extension would share a mask file: {twice[:3]}")
    return paths


def predict(cfg: DictConfig) -> Path:
    """Predict on the images of ``cfg.input`` with ``cfg.ckpt_path``; write into ``cfg.output``.

    Returns:
        The path of ``predictions.csv``.
    """
    from medexp.utils.config import check_config

    check_config(cfg)
    if cfg.batch_size < 1:
        raise MedexpError(f"batch_size={cfg.batch_size}; expected a positive integer")

    import lightning.pytorch as L
    from hydra.utils import instantiate
    from monai.data import DataLoader, Dataset

    from medexp.utils.checkpoint import load_checkpoint, rebuild
    from medexp.utils.runtime import tidy_library_output

    tidy_library_output()
    checkpoint = load_checkpoint(cfg.ckpt_path)
    inputs = find_inputs(str(cfg.input))
    output = Path(cfg.output).expanduser()
    # class_weights=auto counts training labels at setup; loss weights do not change predictions
    datamodule, model = rebuild(checkpoint, cfg.data, data_output_dir=None, model_overrides={"class_weights": None}, allowed_targets=cfg.allowed_targets)

    from medexp.tasks.reconstruction import ReconstructionTask

    if isinstance(model, ReconstructionTask):
        raise MedexpError(
            "medexp predict writes class probabilities and masks; it does not write reconstructions yet. "
            f"Evaluate the reconstruction model with: medexp eval ckpt_path={cfg.ckpt_path}"
        )
    transform = datamodule.predict_transform()
    if datamodule.task == "segmentation":
        writer: L.Callback = MaskWriter(transform, inputs, mask_paths(inputs, output))
    else:
        writer = TableWriter(datamodule.task, _class_columns(datamodule))
    loader = DataLoader(
        Dataset([{"image": str(path)} for path in inputs], transform),
        batch_size=cfg.batch_size,
        num_workers=datamodule.num_workers,
    )
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[writer])
    log.info("predicting on %d image(s) from %s", len(inputs), cfg.input)
    trainer.predict(model, dataloaders=loader, return_predictions=False)
    table = output / "predictions.csv"
    writer.save(table)
    log.info("predictions: %s", table)
    return table


def _class_columns(datamodule: Any) -> list[str]:
    names = datamodule.class_names
    columns = [str(name) for name in names] if names else []
    if len(set(columns)) != datamodule.num_classes or {"image", "prediction"} & set(columns):
        return [f"p_{index}" for index in range(datamodule.num_classes)]
    return columns


def _batch_files(batch: dict[str, Any]) -> list[str]:
    files = batch["image"].meta["filename_or_obj"]
    return [files] if isinstance(files, str) else list(files)


class TableWriter(BasePredictionWriter):
    """Collect classification probabilities per image; :meth:`save` writes them as a CSV.

    Columns: ``image``, one probability per class (``columns``), ``prediction``: the most
    probable class index, or for multi-label tasks each label's 0/1 (probability above 0.5),
    separated by spaces.
    """

    def __init__(self, task: str, columns: list[str]) -> None:
        super().__init__(write_interval="batch")
        self.task, self.columns = task, columns
        self.rows: list[list[Any]] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        probs = prediction.float().cpu()  # (B, num_classes)
        for file, p in zip(_batch_files(batch), probs):
            label = " ".join(str(int(v > 0.5)) for v in p) if self.task == "multilabel" else int(p.argmax())
            self.rows.append([file, *(f"{v:.6g}" for v in p.tolist()), label])

    def save(self, path: Path) -> None:
        _write_csv(path, ["image", *self.columns, "prediction"], self.rows)


class MaskWriter(BasePredictionWriter):
    """Write each input's predicted classes ``(1, *spatial)`` as a ``uint8`` mask in the input's
    geometry: the spatial transforms of ``transform`` (resizing, resampling, reorienting) are
    undone with nearest-neighbour interpolation, and the input's affine travels with the mask.

    Args:
        transform: the chain that prepared the inputs (``predict_transform()``).
        inputs: the input files; masks: where their masks go (see :func:`mask_paths`).
    """

    def __init__(self, transform: Any, inputs: list[Path], masks: list[Path]) -> None:
        from monai.transforms import Invertd

        super().__init__(write_interval="batch")
        self.invert = Invertd(keys="mask", transform=transform, orig_keys="image", nearest_interp=True)
        self.mask_of = {str(image): mask for image, mask in zip(inputs, masks)}
        self.savers: dict[str, Any] = {}
        self.rows: list[list[str]] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        from monai.data import decollate_batch
        from monai.transforms import SaveImage

        from medexp.utils.privacy import geometry_only

        classes = prediction.argmax(dim=1, keepdim=True).cpu()  # (B, 1, *spatial)
        for item, mask, file in zip(decollate_batch(batch["image"].cpu()), classes, _batch_files(batch)):
            inverted = self.invert({"image": item, "mask": mask})["mask"]
            path = self.mask_of[file]
            suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
            if suffix not in self.savers:
                self.savers[suffix] = SaveImage(output_ext=suffix, output_dtype=np.uint8, resample=False, print_log=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            # only the geometry of the input's metadata: never its DICOM tags (patient name, ID...)
            self.savers[suffix](geometry_only(inverted), filename=str(path)[: -len(suffix)])
            self.rows.append([file, str(path)])

    def save(self, path: Path) -> None:
        _write_csv(path, ["image", "mask"], self.rows)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors():
        predict(cfg)


if __name__ == "__main__":
    main()
