"""Images with lesion boxes, for detection: built-in phantoms (``data=synthetic_det``) and image
files listed in a CSV manifest (``data=files_det``).

Box convention (MONAI's standard mode, ``xyxy`` in 2D, ``xyzxyz`` in 3D): a box is
``[min_0, min_1, max_0, max_1]`` or ``[min_0, min_1, min_2, max_0, max_1, max_2]`` in the index
space of the image's spatial axes as MONAI's ``LoadImage`` reads the file (PNG/JPEG/TIFF:
axis 0 is x, the column; axis 1 is y, the row; NIfTI/DICOM: voxel indices i, j, k). Coordinates
are pixel edges: pixel ``k`` spans ``[k, k + 1)``, so the minimum is the first pixel inside the
box and the maximum is one past the last (a lesion covering columns 3 to 7 has ``min_0 = 3``,
``max_0 = 8``); ``0 <= min < max <= size`` along each axis. Labels are lesion classes
``0..num_classes-1`` (no background class).

A sample is ``{"image": (C, *spatial) float32, "boxes": (N, 2 * spatial_dims) float32,
"labels": (N,) int64}``, ``N`` varying per image (0 is allowed: an image without lesions). A batch
(:func:`collate_boxes`) stacks images, padded with zeros at the far end of each axis to the
largest image of the batch (which leaves every box where it was), and keeps ``boxes`` and
``labels`` as lists, one tensor per image.

Transforms that move pixels must move the boxes too: use MONAI's box transforms
(``monai.apps.detection.transforms.dictionary``, e.g. ``RandFlipBoxd``, ``RandRotateBox90d``,
``ZoomBoxd``, with ``box_keys: [boxes]``); plain spatial transforms are refused.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, EnsureTyped, LoadImaged, ScaleIntensityRanged, Transform, Transposed

from medexp.data import validation
from medexp.data.base import SPLITS, DataModule
from medexp.data.manifest import assign_splits, read_csv_rows
from medexp.data.paths import file_digest, listing, located, resolve_path
from medexp.data.phantoms import make_detection_phantoms
from medexp.data.reading import CaseReader
from medexp.utils.errors import MedexpError

log = logging.getLogger(__name__)

TASK = "detection"
BOX_KEYS = ("boxes", "labels")
# MONAI transform modules that move pixels without knowing about boxes
_SPATIAL_MODULES = ("monai.transforms.spatial", "monai.transforms.croppad")


class BoxDataset(torch.utils.data.Dataset):
    """Images and their boxes held in memory, served as detection samples (see the module).

    Args:
        images: ``(N, C, *spatial)``; ``uint8`` is scaled to [0, 1].
        boxes: per image ``(N_i, 2 * spatial_dims)``; labels: per image ``(N_i,)``.
        transform: applied to each sample dict.
    """

    def __init__(
        self, images: np.ndarray, boxes: list[np.ndarray], labels: list[np.ndarray], transform: Callable | None = None
    ) -> None:
        if not len(images) == len(boxes) == len(labels):
            raise ValueError(f"{len(images)} images, {len(boxes)} box lists and {len(labels)} label lists")
        self.images, self.boxes, self.labels, self.transform = images, boxes, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = torch.from_numpy(self.images[index])
        sample = {
            "image": image.float().div_(255) if image.dtype == torch.uint8 else image.float(),
            "boxes": torch.from_numpy(self.boxes[index]),
            "labels": torch.from_numpy(self.labels[index]),
        }
        return self.transform(sample) if self.transform is not None else sample


def collate_boxes(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> a batch: ``image`` ``(B, C, *spatial)`` (zero-padded at the far end of each axis
    to the largest image), ``boxes`` and ``labels`` lists of ``B`` tensors."""
    images = [sample["image"] for sample in samples]
    largest = torch.tensor([image.shape for image in images]).amax(dim=0).tolist()
    padded = []
    for image in images:
        # F.pad takes (before, after) pairs from the last axis backwards
        pad = [p for extent, full in zip(reversed(image.shape[1:]), reversed(largest[1:])) for p in (0, full - extent)]
        padded.append(torch.nn.functional.pad(image, pad) if any(pad) else image)
    batch = {"image": torch.stack(padded)}
    for key in BOX_KEYS:
        batch[key] = [sample[key] for sample in samples]
    return batch


def check_box_safe(transforms: Sequence[Callable], key: str) -> None:
    """Refuse MONAI transforms that move pixels without their boxes.

    Raises:
        MedexpError: naming ``data.<key>``, the transform and the box-aware alternatives.
    """
    for transform in Compose(list(transforms)).flatten().transforms:
        module = type(transform).__module__
        if module.startswith(_SPATIAL_MODULES):
            raise MedexpError(
                f"data.{key}: {type(transform).__name__} moves pixels but not the lesion boxes; use MONAI's box "
                "transforms (monai.apps.detection.transforms.dictionary: RandFlipBoxd, RandRotateBox90d, ZoomBoxd, "
                "... with box_keys: [boxes]) or intensity transforms"
            )


def box_extent_problem(boxes: np.ndarray, spatial_shape: Sequence[int]) -> str | None:
    """Why ``boxes`` do not fit an image of ``spatial_shape`` (a box reaching beyond it), or None."""
    dims = len(spatial_shape)
    if boxes.shape[1] != 2 * dims:
        return f"boxes of {boxes.shape[1]} numbers on a {dims}D image; expected {2 * dims}"
    beyond = np.flatnonzero((boxes[:, dims:] > np.asarray(spatial_shape)).any(axis=1))
    if len(beyond):
        return (
            f"box {boxes[beyond[0]].tolist()} reaches beyond the image of spatial size {list(spatial_shape)} "
            f"({len(beyond)} such box(es)); boxes are [min..., max...] in pixel (voxel) index space"
        )
    return None


class DetectionDataModule(DataModule):
    """Base of the detection data modules: samples and batches as the module describes.

    Subclasses implement :meth:`dataset` (one split), :meth:`predict_transform` and
    :meth:`fingerprint` (see :class:`~medexp.data.base.DataModule`).

    Args:
        num_classes: lesion classes (labels ``0..num_classes-1``; no background class).
        in_channels: image channels; spatial_dims: 2 or 3. Model configs read these.
        batch_size: images per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        transforms: MONAI dictionary transforms for every split (intensity, or box-aware spatial ones).
        augmentations: the same, for training samples only, before ``transforms``.
        task: ``detection`` (the data property model configs and checks read).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        spatial_dims: int = 2,
        batch_size: int = 16,
        num_workers: int = 0,
        transforms: Sequence[Callable] = (),
        augmentations: Sequence[Callable] = (),
        task: str = TASK,
    ) -> None:
        if task != TASK:
            raise MedexpError(f"data.task={task!r}; detection data serve data.task={TASK}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise MedexpError(f"data.num_classes={num_classes!r}; expected the number of lesion classes (at least 1)")
        if spatial_dims not in (2, 3):
            raise MedexpError(f"data.spatial_dims={spatial_dims}; detection data are 2D or 3D")
        if batch_size < 1:
            raise MedexpError(f"data.batch_size={batch_size}; expected a positive integer")
        check_box_safe(transforms, "transforms")
        check_box_safe(augmentations, "augmentations")
        super().__init__(TASK, num_classes, in_channels, spatial_dims, batch_size, num_workers)
        self.transforms, self.augmentations = list(transforms), list(augmentations)

    def dataset(self, split: str) -> torch.utils.data.Dataset:
        """The samples of ``split``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = {split: self.dataset(split) for split in SPLITS}

    def transform(self, split: str, head: Sequence[Callable] = ()) -> Compose:
        """The per-sample chain of ``split``: ``head`` (e.g. a file reader), augmentations
        (training only), transforms, then plain tensors (``predict``: the image stays a
        MetaTensor that names its file)."""
        augmentations = self.augmentations if split == "train" else []
        ensure = EnsureTyped(
            keys=["image", *BOX_KEYS],
            dtype=[torch.float32, torch.float32, torch.long],
            track_meta=split == "predict",
            allow_missing_keys=True,
        )
        transform = Compose([*head, *augmentations, *self.transforms, ensure])
        # MONAI's random transforms draw from their own generator; tie it to the run's seed
        transform.set_random_state(seed=int(torch.initial_seed() % 2**32))
        return transform

    def file_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes found on a :meth:`predict_transform` output, in the input file's index space
        (the convention of the module); the chain keeps the file's axes unless a subclass says otherwise."""
        return boxes

    def _loader_type(
        self, dataset: torch.utils.data.Dataset
    ) -> tuple[type[torch.utils.data.DataLoader], dict[str, Any]]:
        # images of a batch may differ in size, and box lists in length (see collate_boxes)
        return torch.utils.data.DataLoader, {"collate_fn": collate_boxes}


class SyntheticDetectionDataModule(DetectionDataModule):
    """Phantom images with 1-3 lesions each and their boxes, generated from ``seed`` (see
    :func:`~medexp.data.phantoms.make_detection_phantoms`); offline.

    Arrays are ``(rows, columns)``: box axis 0 is the row. Prediction on PNG files transposes
    them to that order, and :meth:`file_boxes` maps the boxes back to the file's (x = column).

    Args:
        image_size: pixels (voxels) per side.
        num_samples: images per split, ``{"train": ..., "val": ..., "test": ...}``.
        lesion_contrast: lower is harder (see :func:`medexp.data.phantoms.make_phantoms`).
        seed: data seed, independent of the training seed.
        **kwargs: see :class:`DetectionDataModule`; ``num_classes`` 1 (bright lesions) or 2
            (bright, class 0, and dark, class 1).
    """

    def __init__(
        self,
        image_size: int = 64,
        num_samples: dict[str, int] | None = None,
        lesion_contrast: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        num_samples = dict(num_samples or {"train": 320, "val": 64, "test": 64})
        if sorted(num_samples) != sorted(SPLITS) or min(num_samples.values()) < 1:
            raise MedexpError(f"data.num_samples={num_samples}; expected positive counts for {list(SPLITS)}")
        if self.num_classes not in (1, 2):
            raise MedexpError(
                f"data.num_classes={self.num_classes}; synthetic detection has 1 (bright lesions) or 2 (bright, dark) classes"
            )
        if self.in_channels != 1:
            raise MedexpError(f"data.in_channels={self.in_channels}; synthetic images are grey (1 channel)")
        if image_size < 16:
            raise MedexpError(f"data.image_size={image_size}; expected at least 16 pixels")
        self.image_size, self.num_samples = image_size, num_samples
        self.lesion_contrast, self.seed = lesion_contrast, seed
        self.class_names = ["bright", "dark"][: self.num_classes]

    def dataset(self, split: str) -> BoxDataset:
        rng = np.random.default_rng([self.seed, SPLITS.index(split)])
        arrays = make_detection_phantoms(
            self.num_samples[split], self.image_size, self.num_classes, rng, self.lesion_contrast, self.spatial_dims
        )
        return BoxDataset(*arrays, transform=self.transform(split))

    def predict_transform(self) -> Compose:
        """An image file (8-bit grey, as the phantoms) -> ``(1, *spatial)`` in [0, 1], axes in the arrays' order."""
        with warnings.catch_warnings():
            # LoadImage registers MONAI's GPU DICOM decoder too, which warns wherever nvImageCodec is absent
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
            head: list[Callable] = [LoadImaged(keys="image", image_only=True, ensure_channel_first=True)]
        if self.spatial_dims == 2:  # PIL reads (x, y) = (columns, rows); the phantoms are (rows, columns)
            head.append(Transposed(keys="image", indices=[0, 2, 1]))
        head.append(ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0))
        return self.transform("predict", head=head)

    def file_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims == 2:  # undo predict_transform's transpose: (row, column) -> (x, y)
            return boxes[:, [1, 0, 3, 2]]
        return boxes

    def fingerprint(self) -> str:
        """SHA-256 of the generated splits (images, boxes, labels), for the run record."""
        self.setup()
        digest = hashlib.sha256()
        for split in SPLITS:
            data = self.datasets[split]
            digest.update(split.encode() + data.images.tobytes())
            for boxes, labels in zip(data.boxes, data.labels):
                digest.update(boxes.tobytes() + labels.tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class BoxCase:
    """One image file and its lesions; ``where`` names the manifest line."""

    image: Path
    boxes: np.ndarray
    labels: np.ndarray
    split: str | None = None
    patient_id: str = ""
    where: str = ""

    def item(self) -> dict[str, Any]:
        return {"image": str(self.image), "boxes": self.boxes, "labels": self.labels, "where": self.where}


def parse_lesions(
    boxes_text: str, labels_text: str, base: Path, spatial_dims: int, num_classes: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """A manifest row's lesions: ``boxes`` (inline JSON, or a JSON sidecar file) and ``labels``.

    ``boxes_text`` is a JSON list of boxes (``[]``: no lesion), or the path of a ``.json`` file
    (relative to ``base``) holding such a list or ``{"boxes": [...], "labels": [...]}``.
    ``labels_text`` is a JSON list of class indices, one per box; empty: every box is class 0
    (allowed with ``num_classes=1`` only). A sidecar's own labels take precedence.

    Raises:
        MedexpError: naming ``where`` and what is wrong (unreadable JSON, a missing sidecar, a box
            of the wrong length or with ``min >= max`` or a negative minimum, labels that are not
            class indices or do not pair up with the boxes).
    """
    text = boxes_text.strip()
    if text.lower().endswith(".json"):
        sidecar = Path(text).expanduser()
        sidecar = sidecar if sidecar.is_absolute() else base / sidecar
        if not sidecar.is_file():
            raise MedexpError(f"{where}: box file {text!r} not found (relative paths resolve against {base})")
        where, text = f"{where} ({sidecar})", sidecar.read_text()
    try:
        content = json.loads(text or "[]")
        labels = json.loads(labels_text) if labels_text.strip() else None
    except json.JSONDecodeError as exc:
        raise MedexpError(f"{where}: cannot read the boxes or labels as JSON ({exc})") from exc
    if isinstance(content, dict):
        labels = content.get("labels", labels)
        content = content.get("boxes")
    width = 2 * spatial_dims
    example = "[[x0, y0, x1, y1]]" if spatial_dims == 2 else "[[x0, y0, z0, x1, y1, z1]]"
    try:
        boxes = np.asarray(content, dtype=np.float64).reshape(-1, width) if content is not None else None
    except (TypeError, ValueError):
        boxes = None
    if boxes is None or (len(content) and np.asarray(content, dtype=object).ndim != 2):
        raise MedexpError(
            f"{where}: boxes {str(content)[:80]}; expected a JSON list of {width}-number boxes, e.g. {example}"
        )
    low, high = boxes[:, :spatial_dims], boxes[:, spatial_dims:]
    bad = np.flatnonzero(~np.isfinite(boxes).all(axis=1) | (low < 0).any(axis=1) | (high <= low).any(axis=1))
    if len(bad):
        raise MedexpError(
            f"{where}: box {boxes[bad[0]].tolist()} is not [min..., max...] with 0 <= min < max "
            f"({len(bad)} such box(es))"
        )
    if labels is None:
        if num_classes > 1 and len(boxes):
            raise MedexpError(f"{where}: no labels; with data.num_classes={num_classes} every box needs a class label")
        labels = [0] * len(boxes)
    values = np.asarray(labels)
    if (
        values.ndim != 1
        or len(values) != len(boxes)
        or not all(isinstance(v, int) and 0 <= v < num_classes for v in labels)
    ):
        raise MedexpError(
            f"{where}: labels {labels}; expected one class index in 0..{num_classes - 1} per box ({len(boxes)} boxes)"
        )
    return boxes.astype(np.float32), values.astype(np.int64)


def read_box_manifest(path: Path, spatial_dims: int, num_classes: int) -> list[BoxCase]:
    """The cases of a detection manifest: columns ``image``, ``boxes``, optional ``labels``,
    ``split``, ``patient_id`` (see :func:`parse_lesions`); relative paths resolve against the
    manifest's folder.

    Raises:
        MedexpError: for a missing manifest or columns, unknown splits, bad boxes or labels, or
            listed images that do not exist (every such line counted, the first few quoted).
    """
    required, optional = ("image", "boxes"), ("labels", "split", "patient_id")
    if not path.is_file():
        raise MedexpError(
            f"manifest not found: {path}. Point data.manifest at a CSV file with columns {list(required)}"
        )
    columns, rows = read_csv_rows(
        path, required, f"a detection manifest needs {list(required)} and may have {list(optional)}"
    )
    base = path.absolute().parent
    cases, missing, bad_splits = [], [], []
    for line, row in rows:
        where = f"{path} line {line}"
        split = row.get("split") or None if "split" in columns else None
        if split is not None and split not in SPLITS:
            bad_splits.append(f"line {line}: {split!r}")
        image = resolve_path(base, row["image"])
        if not row["image"] or not image.exists():
            missing.append(f"line {line}: {row['image']!r}")
        boxes, labels = parse_lesions(row["boxes"], row.get("labels", ""), base, spatial_dims, num_classes, where)
        cases.append(BoxCase(image, boxes, labels, split, row.get("patient_id", ""), where))
    if bad_splits:
        raise MedexpError(f"{path}: unknown split value(s) {listing(bad_splits)}; expected one of {list(SPLITS)}")
    if missing:
        raise MedexpError(
            f"{path}: {len(missing)} listed image(s) do not exist (relative paths resolve against {base}): {listing(missing)}"
        )
    if len({case.split is None for case in cases}) > 1:
        raise MedexpError(f"{path}: the split column is empty on some lines; fill it on every line or drop the column")
    return cases


class BoxCaseReader(Transform):
    """Load one case ``{"image": path, "boxes", "labels", "where"}`` -> a detection sample whose
    image is a ``(C, *spatial)`` MetaTensor (see :class:`~medexp.data.reading.CaseReader`).

    Raises:
        MedexpError: naming the file (and manifest line) when it cannot be read, its channels or
            dimensions differ from the data's, or a box reaches beyond it.
    """

    def __init__(self, in_channels: int, spatial_dims: int) -> None:
        # reads images only: items carry no "label", as when predicting
        self.images = CaseReader("binary", 2)
        self.in_channels, self.spatial_dims = in_channels, spatial_dims

    def problem(self, image: Any, boxes: np.ndarray) -> str | None:
        """Why a loaded image and its boxes do not fit the data's properties, or None."""
        if image.ndim - 1 != self.spatial_dims or image.shape[0] != self.in_channels:
            return (
                f"image of shape {tuple(image.shape)} (channels, *spatial); data.in_channels={self.in_channels} and "
                f"data.spatial_dims={self.spatial_dims} expect ({', '.join([str(self.in_channels)] + ['S'] * self.spatial_dims)})"
            )
        return box_extent_problem(boxes, image.shape[1:])

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        image = self.images.read(data["image"], data.get("where", ""))
        if "boxes" not in data:  # an image to predict on
            return {"image": image}
        problem = self.problem(image, data["boxes"])
        if problem:
            raise MedexpError(f"{data['image']} ({data.get('where', '')}): {problem}")
        return {"image": image, "boxes": torch.as_tensor(data["boxes"]), "labels": torch.as_tensor(data["labels"])}


class FileDetectionDataModule(DetectionDataModule):
    """Image files and their lesion boxes from a CSV manifest (see :func:`read_box_manifest`).

    Without a ``split`` column, patients (images without ``patient_id``) are split at random
    from ``split_seed`` (:func:`~medexp.data.manifest.assign_splits`); the split used is written to
    ``<output_dir>/splits.csv``, itself a manifest. :meth:`setup` first checks the data (see
    :mod:`medexp.data.validation`): ``scan="sample"`` reads ``scan_sample`` images per split,
    ``"all"`` every one: unreadable files, NaN/Inf, constant images, wrong channels or
    dimensions, boxes beyond their image, images in two splits; ``on_bad`` says what then.

    Args:
        manifest: the CSV file.
        output_dir: where ``splits.csv`` and ``skipped.csv`` go; None writes nothing.
        split_seed, val_fraction, test_fraction: the random split, fractions of patients.
        scan, scan_sample, on_bad: the data check (see :class:`~medexp.data.base.ArrayDataModule`).
        **kwargs: see :class:`DetectionDataModule`.
    """

    def __init__(
        self,
        manifest: str | Path,
        output_dir: str | Path | None = None,
        split_seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        scan: str = "sample",
        scan_sample: int = 256,
        on_bad: str = "fail",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.scan = validation.check_options(scan, scan_sample, on_bad)
        self.scan_sample, self.on_bad = scan_sample, on_bad
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise MedexpError(
                f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}; expected each in (0, 1) "
                "and a sum below 1"
            )
        self.manifest = Path(manifest).expanduser()
        self.output_dir = Path(output_dir).expanduser() if output_dir else None
        self.reader = BoxCaseReader(self.in_channels, self.spatial_dims)
        cases = read_box_manifest(self.manifest, self.spatial_dims, self.num_classes)
        if cases[0].split is None:
            cases = assign_splits(cases, split_seed, val_fraction, test_fraction, stratify=False)
        self.cases = {split: [case for case in cases if case.split == split] for split in SPLITS}
        empty = [split for split, members in self.cases.items() if not members]
        if empty:
            raise MedexpError(
                f"{self.manifest}: the {empty[0]} split is empty ({len(cases)} images); every split needs at least one "
                "image: add data, raise data.val_fraction/data.test_fraction, or fix the split column"
            )
        self.skipped: list[validation.Finding] = []
        log.info("%s: %s images", self.manifest, "/".join(f"{len(self.cases[s])} {s}" for s in SPLITS))

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self._scan()
        super().setup(stage)
        if self.output_dir is not None and (self.trainer is None or self.trainer.is_global_zero):
            self._write_splits(self.output_dir / "splits.csv")

    def dataset(self, split: str) -> torch.utils.data.Dataset:
        from monai.data import Dataset

        return Dataset([case.item() for case in self.cases[split]], self.transform(split, head=[self.reader]))

    def _scan(self) -> None:
        """Check the cases through the reader training uses; with ``on_bad="skip"`` leave the bad
        ones out (and list them in ``skipped.csv``)."""
        if self.scan == "off":
            return
        start, findings, hashes, scanned = time.perf_counter(), [], {}, {}
        for split, cases in self.cases.items():
            rows = validation.scan_indices(len(cases), self.scan, self.scan_sample, split)
            scanned[split] = (len(rows), len(cases))
            for index in rows.tolist():
                case = cases[index]
                problems, image = self.reader.images.inspect({"image": str(case.image), "where": case.where})
                found = [validation.Finding(kind, split, index, name, detail) for kind, name, detail in problems]
                detail = self.reader.problem(image, case.boxes) if image is not None and not problems else None
                if detail:
                    found.append(
                        validation.Finding("label_range", split, index, located(case.image, case.where), detail)
                    )
                elif image is not None and not found:
                    hashes[(split, index)] = validation.pixel_hash(image.as_tensor().numpy())
                findings += found
        findings += validation.duplicate_findings(
            hashes, lambda s, i: located(self.cases[s][i].image, self.cases[s][i].where)
        )
        drop = validation.resolve(
            findings,
            scanned,
            time.perf_counter() - start,
            source=str(self.manifest),
            scan=self.scan,
            on_bad=self.on_bad,
        )
        if not drop:
            return
        self.skipped = [finding for finding in findings if (finding.split, finding.index) in drop]
        images = {(split, index): str(self.cases[split][index].image) for split, index in drop}
        for split in SPLITS:
            self.cases[split] = [case for index, case in enumerate(self.cases[split]) if (split, index) not in drop]
            if not self.cases[split]:
                raise MedexpError(
                    f"{self.manifest}: every case of the {split} split is bad (data.on_bad=skip); nothing is left"
                )
        if self.output_dir is not None and (self.trainer is None or self.trainer.is_global_zero):
            validation.write_skipped(
                self.output_dir / "skipped.csv", self.skipped, "image", lambda s, i: images[(s, i)]
            )

    def _write_splits(self, path: Path) -> None:
        """The split used, as a manifest (absolute image paths, inline boxes and labels)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["image", "boxes", "labels", "split", "patient_id"])
            for split in SPLITS:
                writer.writerows(
                    [
                        c.image.absolute(),
                        json.dumps(c.boxes.tolist()),
                        json.dumps(c.labels.tolist()),
                        split,
                        c.patient_id,
                    ]
                    for c in self.cases[split]
                )

    def predict_transform(self) -> Compose:
        """``{"image": path}`` -> ``(C, *spatial)``: the reader, then ``transforms``."""
        return self.transform("predict", head=[self.reader])

    def fingerprint(self) -> str:
        """SHA-256 of each split's image files (their bytes), boxes and labels."""
        digest = hashlib.sha256()
        for split in SPLITS:
            for case in self.cases[split]:
                digest.update(split.encode() + file_digest(case.image) + case.boxes.tobytes() + case.labels.tobytes())
        return digest.hexdigest()

    def describe(self) -> str:
        return str(self.manifest)


__all__ = [
    "BoxCase",
    "BoxDataset",
    "DetectionDataModule",
    "FileDetectionDataModule",
    "SyntheticDetectionDataModule",
    "collate_boxes",
    "parse_lesions",
    "read_box_manifest",
]
