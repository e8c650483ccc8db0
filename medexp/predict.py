"""``medexp predict ckpt_path=... input=... output=...`` (or ``python -m medexp.predict``): apply a
checkpoint to new images.

Model and data module are rebuilt from the run config stored in the checkpoint (the data
module's splits are not loaded); each input is prepared exactly as the test split was
(:meth:`~medexp.data.base.ArrayDataModule.predict_transform`). Classification writes
``<output>/predictions.csv``; segmentation writes one mask of class indices per input, in the
input's format and geometry, and lists them in ``<output>/predictions.csv``; detection writes one
row per box to ``<output>/predictions.csv`` and every image's boxes to ``<output>/boxes.json``
(:class:`BoxWriter`); registration takes a CSV of pairs (``fixed``, ``moving``) and writes each
warped moving image and its displacement field in the fixed image's format and geometry
(:class:`RegistrationWriter`).

Classifiers may report how certain they are (``uncertainty=mc_dropout|tta``): the CSV then
holds each image's probabilities averaged over several stochastic passes, and two more columns
(see :class:`TableWriter`): ``entropy`` and ``std``.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig

from medexp.utils.config import CONFIG_PATH, register_resolvers
from medexp.utils.errors import MedexpError, user_errors

log = logging.getLogger("medexp")
register_resolvers()

GLOB_CHARS = "*?["
# uncertainty=...: Monte Carlo dropout (dropout layers kept stochastic, `samples` passes) or
# test-time augmentation (every combination of flips along the spatial axes)
UNCERTAINTY = ("mc_dropout", "tta")


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
    method = check_uncertainty(cfg)

    from hydra.utils import instantiate
    from monai.data import DataLoader, Dataset

    from medexp.utils.checkpoint import CONFIG_KEY, load_checkpoint, rebuild
    from medexp.utils.runtime import tidy_library_output

    tidy_library_output()
    checkpoint = load_checkpoint(cfg.ckpt_path)
    # a registration model predicts on pairs of images (a CSV with fixed and moving columns)
    registration = (checkpoint[CONFIG_KEY].get("data") or {}).get("task") == "registration"
    inputs = find_pairs(str(cfg.input)) if registration else find_inputs(str(cfg.input))
    output = Path(cfg.output).expanduser()
    # class_weights=auto counts training labels at setup; loss weights do not change predictions
    datamodule, model = rebuild(checkpoint, cfg.data, data_output_dir=None, model_overrides={"class_weights": None}, allowed_targets=cfg.allowed_targets)

    from medexp.tasks.reconstruction import ReconstructionTask

    if isinstance(model, ReconstructionTask):
        raise MedexpError(
            "medexp predict writes class probabilities and masks; it does not write reconstructions yet. "
            f"Evaluate the reconstruction model with: medexp eval ckpt_path={cfg.ckpt_path}"
        )
    if method is not None:
        model = Sampled(model, method, int(cfg.samples))
    transform = datamodule.predict_transform()
    if registration:
        writer: L.Callback = RegistrationWriter(transform, inputs, output)
    elif datamodule.task == "segmentation":
        writer = MaskWriter(transform, inputs, mask_paths(inputs, output))
    elif datamodule.task == "detection":
        writer = BoxWriter(datamodule.file_boxes, datamodule.spatial_dims, datamodule.class_names)
    else:
        columns = _class_columns(datamodule, reserved=UNCERTAINTY_COLUMNS if method else ())
        writer = TableWriter(datamodule.task, columns, uncertainty=method is not None)
    items = [pair.item() for pair in inputs] if registration else [{"image": str(path)} for path in inputs]
    loader = DataLoader(
        Dataset(items, transform),
        batch_size=cfg.batch_size,
        num_workers=datamodule.num_workers,
    )
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[writer])
    log.info("predicting on %d image(s) from %s", len(inputs), cfg.input)
    if method is not None:
        log.info("uncertainty: %s over %d passes per image", method, model.passes(datamodule.spatial_dims))
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # the same seed, the same dropout masks
    trainer.predict(model, dataloaders=loader, return_predictions=False)
    table = output / "predictions.csv"
    writer.save(table)
    log.info("predictions: %s", table)
    return table


def check_uncertainty(cfg: DictConfig) -> str | None:
    """The ``uncertainty`` method asked for (None: plain predictions), ``samples`` checked.

    Raises:
        MedexpError: naming the key with a bad value.
    """
    method = cfg.get("uncertainty")
    if method is not None and method not in UNCERTAINTY:
        raise MedexpError(f"uncertainty={method!r}; expected null or one of {list(UNCERTAINTY)}")
    samples = cfg.get("samples")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise MedexpError(f"samples={samples!r}; expected an integer of at least 2 (the passes of uncertainty=mc_dropout)")
    return method


def dropout_layers(model: Any) -> list[Any]:
    """The dropout layers of ``model`` that drop something (probability above 0)."""
    from torch import nn

    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def flip_combinations(spatial_dims: int) -> list[tuple[int, ...]]:
    """The axes of ``(B, C, *spatial)`` batches that test-time augmentation flips, every
    combination of the spatial axes including none: 4 for images, 8 for volumes."""
    import itertools

    axes = range(2, 2 + spatial_dims)
    return [combo for k in range(spatial_dims + 1) for combo in itertools.combinations(axes, k)]


UNCERTAINTY_COLUMNS = ("entropy", "std")


class Sampled(L.LightningModule):
    """A classifier predicting over several passes per batch: :meth:`predict_step` returns the
    probabilities of every pass, ``(passes, B, num_classes)``.

    ``mc_dropout``: the model in evaluation mode (BatchNorm uses its running statistics) except
    its dropout layers, which keep dropping; ``samples`` passes, drawn from torch's global random
    state (seed it for repeatable results). ``tta``: one pass per combination of flips along the
    spatial axes (:func:`flip_combinations`); ``samples`` does not apply.

    Raises:
        MedexpError: for a model that is not a classifier, or mc_dropout without dropout layers.
    """

    def __init__(self, model: Any, method: str, samples: int) -> None:
        from medexp.tasks.classification import ClassificationTask

        if not isinstance(model, ClassificationTask):
            raise MedexpError(
                f"uncertainty={method}: supported for classifiers only; this checkpoint's model is a "
                f"{type(model).__name__} (predict without uncertainty=...)"
            )
        if getattr(model.net, "extra_inputs", ()):
            raise MedexpError(f"uncertainty={method}: not supported for sequence models ({type(model.net).__name__})")
        super().__init__()
        self.model, self.method, self.samples = model, method, samples
        self.dropouts = dropout_layers(model) if method == "mc_dropout" else []
        if method == "mc_dropout" and not self.dropouts:
            raise MedexpError(
                f"uncertainty=mc_dropout: the model ({type(model.net).__name__}) has no dropout layers with a "
                "probability above 0, so every pass would give the same result; train with dropout (e.g. "
                "model=cnn model.net.dropout=0.2) or use uncertainty=tta"
            )

    def passes(self, spatial_dims: int) -> int:
        return self.samples if self.method == "mc_dropout" else len(flip_combinations(spatial_dims))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        import torch

        model = self.model
        batch = model.prepare_batch(batch, "predict")
        x, extra = batch[model.input_key], model.net_extras(batch)
        model.eval()
        if self.method == "mc_dropout":
            for layer in self.dropouts:
                layer.train()
            passes = [model.postprocess(model.infer(x, **extra)) for _ in range(self.samples)]
            for layer in self.dropouts:
                layer.eval()
        else:
            passes = [
                model.postprocess(model.infer(x.flip(axes) if axes else x, **extra))
                for axes in flip_combinations(x.ndim - 2)
            ]
        return torch.stack(passes)


def _class_columns(datamodule: Any, reserved: tuple[str, ...] = ()) -> list[str]:
    names = datamodule.class_names
    columns = [str(name) for name in names] if names else []
    if len(set(columns)) != datamodule.num_classes or {"image", "prediction", *reserved} & set(columns):
        return [f"p_{index}" for index in range(datamodule.num_classes)]
    return columns


def _batch_files(batch: dict[str, Any], key: str = "image") -> list[str]:
    files = batch[key].meta["filename_or_obj"]
    return [files] if isinstance(files, str) else list(files)


class TableWriter(BasePredictionWriter):
    """Collect classification probabilities per image; :meth:`save` writes them as a CSV.

    Columns: ``image``, one probability per class (``columns``), ``prediction``: the most
    probable class index, or for multi-label tasks each label's 0/1 (probability above 0.5),
    separated by spaces.

    With ``uncertainty``, predictions are ``(passes, B, num_classes)`` (see :class:`Sampled`):
    the probabilities are their mean over the passes, and two columns follow ``prediction``:
    ``entropy``, the predictive entropy of the mean probabilities in nats (multi-label: summed
    over the labels, each a yes/no distribution), and ``std``, the standard deviation over the
    passes (population, ``correction=0``) of the predicted class's probability (multi-label: the
    mean over the labels of each label's).
    """

    def __init__(self, task: str, columns: list[str], uncertainty: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.task, self.columns, self.uncertainty = task, columns, uncertainty
        self.rows: list[list[Any]] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        import torch

        passes = prediction.float().cpu()
        probs = passes.mean(dim=0) if self.uncertainty else passes  # (B, num_classes)
        for index, (file, p) in enumerate(zip(_batch_files(batch), probs)):
            label = " ".join(str(int(v > 0.5)) for v in p) if self.task == "multilabel" else int(p.argmax())
            row = [file, *(f"{v:.6g}" for v in p.tolist()), label]
            if self.uncertainty:
                spread = passes[:, index].std(dim=0, correction=0)  # (num_classes,)
                if self.task == "multilabel":
                    entropy = float((torch.special.entr(p) + torch.special.entr(1 - p)).sum())
                    std = float(spread.mean())
                else:
                    entropy, std = float(torch.special.entr(p).sum()), float(spread[int(p.argmax())])
                row += [f"{entropy:.6g}", f"{std:.6g}"]
            self.rows.append(row)

    def save(self, path: Path) -> None:
        extra = list(UNCERTAINTY_COLUMNS) if self.uncertainty else []
        _write_csv(path, ["image", *self.columns, "prediction", *extra], self.rows)


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


class BoxWriter(BasePredictionWriter):
    """Collect each input's detected boxes; :meth:`save` writes ``predictions.csv``, one row per
    box (``image, label, score`` and the box: ``x_min, y_min, x_max, y_max``, 3D also ``z``), and
    ``boxes.json`` beside it: per image its ``spatial_size`` and its ``boxes``, ``labels`` and
    ``scores`` (images without detections included), plus the class names.

    Boxes are in the input file's index space as MONAI's ``LoadImage`` reads it (PNG: x the
    column, y the row; NIfTI: voxel indices), pixel edges (see :mod:`medexp.data.detection`).

    Args:
        to_file: maps boxes on the model's input back to the file's axes (the data module's ``file_boxes``).
        spatial_dims: 2 or 3; class_names: the lesion classes, where the data know them.
    """

    def __init__(self, to_file: Any, spatial_dims: int, class_names: list[str] | None = None) -> None:
        super().__init__(write_interval="batch")
        self.to_file, self.spatial_dims, self.class_names = to_file, spatial_dims, class_names
        self.rows: list[list[Any]] = []
        self.images: dict[str, dict[str, Any]] = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        import torch

        dims = self.spatial_dims
        for file, image, found in zip(_batch_files(batch), batch["image"], prediction):
            boxes = self.to_file(found["boxes"].detach().float().cpu())
            # the input's extent as a box from the origin, mapped like the boxes: the file's size
            size = self.to_file(torch.tensor([[0.0] * dims + list(image.shape[1:])]))[0, dims:].long().tolist()
            labels, scores = found["labels"].cpu().tolist(), found["labels_scores"].float().cpu().tolist()
            for box, label, score in zip(boxes.tolist(), labels, scores):
                self.rows.append([file, label, f"{score:.6g}", *(f"{v:.6g}" for v in box)])
            self.images[file] = {"spatial_size": size, "boxes": boxes.tolist(), "labels": labels, "scores": scores}

    def save(self, path: Path) -> None:
        import json

        axes = "xyz"[: self.spatial_dims]
        _write_csv(path, ["image", "label", "score", *(f"{a}_min" for a in axes), *(f"{a}_max" for a in axes)], self.rows)
        record = {"box_mode": "xyxy" if self.spatial_dims == 2 else "xyzxyz", "classes": self.class_names, "images": self.images}
        path.with_name("boxes.json").write_text(json.dumps(record, indent=1))


class RegistrationWriter(BasePredictionWriter):
    """Write each pair's warped moving image and displacement field (DDF) in the fixed image's
    format and geometry, and list them in ``predictions.csv`` (``fixed, moving, warped, ddf``).

    Per pair, named ``<moving>_to_<fixed>`` after the files' names in ``output``:

    - ``_warped``: the moving image as read (its own intensities, before ``data.transforms``)
      warped onto the fixed image's grid: NIfTI in, NIfTI out with the fixed image's affine;
      PNG/TIFF/JPEG in, PNG out (8-bit, 16-bit for values above 255); DICOM in, NIfTI out;
    - ``_ddf``: the displacement in voxels along each array axis (the warped image at ``x`` is
      the moving image at ``x + ddf(x)``). Beside NIfTI/DICOM: ``.nii.gz`` float32, components
      last, ``(X, Y, Z, 3)`` or ``(X, Y, 1, 2)``, the fixed image's affine. Beside raster images:
      ``.npy`` float32 ``(2, H, W)`` in numpy's axis order, ``[0]`` rows and ``[1]`` columns:
      ``warped[r, c] = moving[r + ddf[0, r, c], c + ddf[1, r, c]]``.

    The model's DDF lives on the grid of its prepared inputs; where ``data.image_size`` resampled
    them, it is resized back to the fixed image's grid and each component scaled by its axis's
    size ratio. Other spatial transforms cannot be undone this way and are refused.

    Args:
        transform: the chain that prepared the inputs (``predict_transform()``).
        pairs: the pairs (:class:`~medexp.data.registration.Pair`); output: the folder.

    Raises:
        MedexpError: for spatial transforms other than resizing in ``transform``, or pairs whose
            outputs would share a name.
    """

    def __init__(self, transform: Any, pairs: list[Any], output: Path) -> None:
        from monai.transforms import InvertibleTransform, Resized

        from medexp.data.files import RASTER_SUFFIXES, _stem
        from medexp.data.registration import PairReader

        super().__init__(write_interval="batch")
        steps = transform.flatten().transforms
        spatial = [type(t).__name__ for t in steps if isinstance(t, InvertibleTransform) and not isinstance(t, Resized)]
        if spatial:
            raise MedexpError(
                f"medexp predict maps a displacement field back onto the fixed image by resizing only; the data's "
                f"transforms also hold {spatial}, which it cannot undo"
            )
        self.reader = PairReader()
        self.paths: dict[tuple[str, str], tuple[Path, Path]] = {}
        for pair in pairs:
            raster = pair.fixed.name.lower().endswith(RASTER_SUFFIXES)
            image_ext = ".png" if raster else ".nii" if pair.fixed.name.lower().endswith(".nii") else ".nii.gz"
            name = f"{_stem(pair.moving)}_to_{_stem(pair.fixed)}"
            paths = (output.absolute() / f"{name}_warped{image_ext}", output.absolute() / f"{name}_ddf{'.npy' if raster else '.nii.gz'}")
            if paths in self.paths.values():
                raise MedexpError(f"two pairs would write {paths[0].name}: give the files of different pairs different names")
            self.paths[(str(pair.fixed), str(pair.moving))] = paths
        self.rows: list[list[str]] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        from monai.data import MetaTensor
        from monai.transforms import SaveImage

        from medexp.utils.privacy import geometry_only

        pairs = zip(_batch_files(batch, "fixed"), _batch_files(batch, "moving"))
        for ddf, (fixed_file, moving_file) in zip(prediction.detach().float().cpu(), pairs):
            # the files as stored: the warped image keeps the moving image's own intensities
            images = self.reader({"fixed": fixed_file, "moving": moving_file})
            fixed, moving = images["fixed"], images["moving"]
            ddf = _resize_ddf(ddf, tuple(fixed.shape[1:]))
            warped = pl_module.warp(moving.as_tensor()[None].float(), ddf[None])[0]
            warped_path, ddf_path = self.paths[(fixed_file, moving_file)]
            warped_path.parent.mkdir(parents=True, exist_ok=True)
            suffix = ".nii.gz" if warped_path.name.endswith(".nii.gz") else warped_path.suffix
            if suffix == ".png":
                dtype = np.uint8 if float(moving.max()) <= 255 else np.uint16
                warped = warped.round().clamp(0, np.iinfo(dtype).max)
                np.save(ddf_path, ddf.numpy()[::-1].swapaxes(1, 2).astype(np.float32))  # (x, y) -> (rows, columns)
            else:
                dtype = np.float32
                # only the geometry of the fixed image's metadata: never its DICOM tags
                SaveImage(output_ext=".nii.gz", output_dtype=np.float32, resample=False, print_log=False)(
                    geometry_only(MetaTensor(ddf, meta=fixed.meta)), filename=str(ddf_path)[: -len(".nii.gz")]
                )
            SaveImage(output_ext=suffix, output_dtype=dtype, resample=False, print_log=False)(
                geometry_only(MetaTensor(warped, meta=fixed.meta)), filename=str(warped_path)[: -len(suffix)]
            )
            self.rows.append([fixed_file, moving_file, str(warped_path), str(ddf_path)])

    def save(self, path: Path) -> None:
        _write_csv(path, ["fixed", "moving", "warped", "ddf"], self.rows)


def _resize_ddf(ddf: Any, shape: tuple[int, ...]) -> Any:
    """A ``(D, *spatial)`` displacement field in voxels, resized to ``shape`` with each component
    scaled by its axis's size ratio (pixel centres aligned, as MONAI's ``Resized`` maps them)."""
    import torch
    import torch.nn.functional as F

    if tuple(ddf.shape[1:]) == shape:
        return ddf
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    scale = torch.tensor([new / old for new, old in zip(shape, ddf.shape[1:])], dtype=ddf.dtype)
    resized = F.interpolate(ddf[None], size=shape, mode=mode, align_corners=False)[0]
    return resized * scale.view(-1, *[1] * len(shape))


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
