"""What ``medexp predict`` writes, per kind of prediction a task declares (its
``prediction_writer``): class probabilities in a table (:class:`TableWriter`), masks in the
inputs' geometry (:class:`MaskWriter`), boxes (:class:`BoxWriter`), warped images and
displacement fields (:class:`RegistrationWriter`), translated images in the inputs' format and
geometry (:class:`ImageWriter`); :func:`prediction_writer` picks one."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from medexp.utils.errors import MedexpError

WRITERS = ("table", "masks", "boxes", "registration", "images")
# the columns that uncertainty=... adds to the table (see TableWriter)
UNCERTAINTY_COLUMNS = ("entropy", "std")


def prediction_writer(
    kind: str, datamodule: Any, transform: Any, inputs: list[Any], output: Path, uncertainty: bool = False
) -> BasePredictionWriter:
    """The writer of a task's ``prediction_writer`` kind.

    Args:
        kind: one of :data:`WRITERS`.
        datamodule: the checkpoint's data module (classes, dimensions, how boxes map to files).
        transform: the chain that prepares the inputs (``predict_transform()``).
        inputs: the input files (registration: the pairs); output: the output folder.
        uncertainty: the table holds the mean over sampled passes and their spread.

    Raises:
        ValueError: for an unknown kind.
    """
    from medexp.inference.inputs import mask_paths

    match kind:
        case "table":
            columns = class_columns(datamodule, reserved=UNCERTAINTY_COLUMNS if uncertainty else ())
            return TableWriter(datamodule.task, columns, uncertainty=uncertainty)
        case "masks":
            return MaskWriter(transform, inputs, mask_paths(inputs, output))
        case "boxes":
            return BoxWriter(datamodule.file_boxes, datamodule.spatial_dims, datamodule.class_names)
        case "registration":
            return RegistrationWriter(transform, inputs, output)
        case "images":
            return ImageWriter(transform, inputs, mask_paths(inputs, output), datamodule.target_intensity_range)
        case _:
            raise ValueError(f"prediction_writer={kind!r}; expected one of {list(WRITERS)}")


def class_columns(datamodule: Any, reserved: tuple[str, ...] = ()) -> list[str]:
    names = datamodule.class_names
    columns = [str(name) for name in names] if names else []
    if len(set(columns)) != datamodule.num_classes or {"image", "prediction", *reserved} & set(columns):
        return [f"p_{index}" for index in range(datamodule.num_classes)]
    return columns


def batch_files(batch: dict[str, Any], key: str = "image") -> list[str]:
    files = batch[key].meta["filename_or_obj"]
    return [files] if isinstance(files, str) else list(files)


class TableWriter(BasePredictionWriter):
    """Collect classification probabilities per image; :meth:`save` writes them as a CSV.

    Columns: ``image``, one probability per class (``columns``), ``prediction``: the most
    probable class index, or for multi-label tasks each label's 0/1 (probability above 0.5),
    separated by spaces.

    With ``uncertainty``, predictions are ``(passes, B, num_classes)`` (see :class:`~medexp.inference.loop.Sampled`):
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
        for index, (file, p) in enumerate(zip(batch_files(batch), probs)):
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
        write_csv(path, ["image", *self.columns, "prediction", *extra], self.rows)


class MaskWriter(BasePredictionWriter):
    """Write each input's predicted classes ``(1, *spatial)`` as a ``uint8`` mask in the input's
    geometry: the spatial transforms of ``transform`` (resizing, resampling, reorienting) are
    undone with nearest-neighbour interpolation, and the input's affine travels with the mask.

    Args:
        transform: the chain that prepared the inputs (``predict_transform()``).
        inputs: the input files; masks: where their masks go (see :func:`~medexp.inference.inputs.mask_paths`).
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
        for item, mask, file in zip(decollate_batch(batch["image"].cpu()), classes, batch_files(batch)):
            inverted = self.invert({"image": item, "mask": mask})["mask"]
            path = self.mask_of[file]
            suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
            if suffix not in self.savers:
                self.savers[suffix] = SaveImage(
                    output_ext=suffix, output_dtype=np.uint8, resample=False, print_log=False
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            # only the geometry of the input's metadata: never its DICOM tags (patient name, ID...)
            self.savers[suffix](geometry_only(inverted), filename=str(path)[: -len(suffix)])
            self.rows.append([file, str(path)])

    def save(self, path: Path) -> None:
        write_csv(path, ["image", "mask"], self.rows)


class ImageWriter(BasePredictionWriter):
    """Write each input's predicted image ``(C_out, *spatial)`` (a translation) in the input's
    format and geometry, and list them in ``predictions.csv`` (``image, translated``).

    The spatial transforms of ``transform`` (e.g. the resize to ``data.image_size``) are undone
    (``monai.transforms.Invertd``, linear interpolation), so the output has the input's shape,
    and the input's affine travels with it. NIfTI stays NIfTI (float32, the predicted values);
    raster inputs (PNG, JPEG, TIFF, ...) become 8-bit PNG, ``value_range`` mapped onto 0..255;
    anything else (DICOM) becomes NIfTI.

    Args:
        transform: the chain that prepared the inputs (``predict_transform()``).
        inputs: the input files; paths: where their outputs go (see
            :func:`~medexp.inference.inputs.mask_paths`).
        value_range: ``[low, high]`` of the predicted values (the data's ``target_intensity_range``).
    """

    def __init__(self, transform: Any, inputs: list[Path], paths: list[Path], value_range: Any) -> None:
        from monai.transforms import Invertd

        super().__init__(write_interval="batch")
        self.invert = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=False)
        self.path_of = {str(image): path for image, path in zip(inputs, paths)}
        self.low, self.high = (float(v) for v in value_range)
        self.savers: dict[str, Any] = {}
        self.rows: list[list[str]] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        from monai.data import MetaTensor, decollate_batch
        from monai.transforms import SaveImage

        from medexp.utils.privacy import geometry_only

        images = prediction.detach().float().cpu()  # (B, C_out, *spatial)
        for item, image, file in zip(decollate_batch(batch["image"].cpu()), images, batch_files(batch)):
            if item.applied_operations:  # spatial transforms to undo
                inverted = self.invert({"image": item, "pred": image})["pred"]
            else:
                inverted = MetaTensor(image, meta=item.meta)
            path = self.path_of[file]
            suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
            if suffix == ".png":
                scaled = (inverted - self.low) / (self.high - self.low) * 255
                inverted = scaled.clamp(0, 255).round()
            if suffix not in self.savers:
                dtype = np.uint8 if suffix == ".png" else np.float32
                self.savers[suffix] = SaveImage(output_ext=suffix, output_dtype=dtype, resample=False, print_log=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            # only the geometry of the input's metadata: never its DICOM tags (patient name, ID...)
            self.savers[suffix](geometry_only(inverted), filename=str(path)[: -len(suffix)])
            self.rows.append([file, str(path)])

    def save(self, path: Path) -> None:
        write_csv(path, ["image", "translated"], self.rows)


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
        for file, image, found in zip(batch_files(batch), batch["image"], prediction):
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
        write_csv(
            path, ["image", "label", "score", *(f"{a}_min" for a in axes), *(f"{a}_max" for a in axes)], self.rows
        )
        record = {
            "box_mode": "xyxy" if self.spatial_dims == 2 else "xyzxyz",
            "classes": self.class_names,
            "images": self.images,
        }
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

        from medexp.data.paths import RASTER_SUFFIXES, file_stem
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
            name = f"{file_stem(pair.moving)}_to_{file_stem(pair.fixed)}"
            paths = (
                output.absolute() / f"{name}_warped{image_ext}",
                output.absolute() / f"{name}_ddf{'.npy' if raster else '.nii.gz'}",
            )
            if paths in self.paths.values():
                raise MedexpError(
                    f"two pairs would write {paths[0].name}: give the files of different pairs different names"
                )
            self.paths[(str(pair.fixed), str(pair.moving))] = paths
        self.rows: list[list[str]] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        from monai.data import MetaTensor
        from monai.transforms import SaveImage

        from medexp.utils.privacy import geometry_only

        pairs = zip(batch_files(batch, "fixed"), batch_files(batch, "moving"))
        for ddf, (fixed_file, moving_file) in zip(prediction.detach().float().cpu(), pairs):
            # the files as stored: the warped image keeps the moving image's own intensities
            images = self.reader({"fixed": fixed_file, "moving": moving_file})
            fixed, moving = images["fixed"], images["moving"]
            ddf = resize_ddf(ddf, tuple(fixed.shape[1:]))
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
        write_csv(path, ["fixed", "moving", "warped", "ddf"], self.rows)


def resize_ddf(ddf: Any, shape: tuple[int, ...]) -> Any:
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


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
