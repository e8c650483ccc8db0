"""The base every DataModule follows (:class:`DataModule`), and in-memory image datasets served as
dict batches with the DataModule they share (:class:`ArrayDataModule`)."""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, default_collate

from medexp.data import validation
from medexp.data.folds import assign_folds, check_fold_by, check_folds, split_by_fold, strata, write_folds
from medexp.data.sampling import EpochShuffleSampler, epoch_seed
from medexp.utils.errors import MedexpError

SPLITS = ("train", "val", "test")
TASKS = ("binary", "multiclass", "multilabel", "segmentation")
SAMPLERS = (None, "balanced")


log = logging.getLogger("medexp")


class ArrayDataset(Dataset):
    """Images and labels held in memory, served as ``{"image": (C, *spatial), "label": ...}``.

    Args:
        images: ``(N, C, *spatial)``; ``uint8`` arrays are scaled to [0, 1], float arrays are
            used as they are.
        labels: ``(N,)`` class indices, ``(N, L)`` 0/1 indicators for multi-label tasks, or
            ``(N, 1, *spatial)`` masks of class indices for segmentation.
        transform: applied to each sample dict (MONAI dictionary transforms).

    Attributes:
        masks: None, or ``(N, 1, *spatial)`` ``uint8`` lesion masks of a classification split,
            served as ``sample["mask"]`` (``uint8``, untouched by ``transform`` unless its keys
            name ``mask``) for scoring saliency maps (:mod:`medexp.metrics.saliency`); the model
            and its metrics never read them. Set by data modules that know their lesions.
        sites: None, or ``(N,)`` site index of each sample (see ``site_names`` of the data
            module), served as ``sample["site"]`` (an int64 scalar) for per-site metrics and
            test-time adaptation. Set by data modules whose data have sites.

    With a deterministic ``transform`` (no random step), :meth:`prebuild` (called when a data
    module makes the loader) runs every sample through it once and keeps the results as
    tensors: epochs then index them, whole batches at once (:meth:`__getitems__`), as fast as
    tensors built by hand.
    """

    # the most memory the prebuilt tensors may take (beyond it, samples are made per epoch)
    prebuild_limit_bytes = 2**30

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = torch.as_tensor(labels)
        self.transform = transform
        self.masks: np.ndarray | None = None
        self.sites: np.ndarray | None = None
        self.prebuilt: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def prebuild(self) -> bool:
        """Keep every sample, transformed, as stacked tensors (when ``transform`` has no random
        step and they fit in :attr:`prebuild_limit_bytes`). Returns whether it did."""
        if self.prebuilt is not None:
            return True
        if len(self) == 0 or not _deterministic(self.transform):
            return False
        first = self[0]
        size = sum(value.element_size() * value.numel() for value in first.values() if isinstance(value, torch.Tensor))
        if (
            not all(isinstance(value, torch.Tensor) for value in first.values())
            or size * len(self) > self.prebuild_limit_bytes
        ):
            return False
        samples = [first, *(self[index] for index in range(1, len(self)))]
        self.prebuilt = {key: torch.stack([sample[key] for sample in samples]) for key in first}
        return True

    def __getitems__(self, indices: list[int]) -> Sequence[dict[str, torch.Tensor]]:
        """The samples of a batch: prebuilt, indexed at once (a :class:`PrebuiltBatch`), else
        one by one."""
        if self.prebuilt is None:
            return [self[index] for index in indices]
        rows = torch.as_tensor(indices)
        return PrebuiltBatch({key: value[rows] for key, value in self.prebuilt.items()})

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.prebuilt is not None:  # copies: a consumer may change a sample in place
            return {key: value[index].clone() for key, value in self.prebuilt.items()}
        image = torch.from_numpy(self.images[index])
        image = image.float().div_(255) if image.dtype == torch.uint8 else image.float()
        label = self.labels[index]
        # masks are stored compactly as uint8 and travel as float through MONAI's spatial
        # transforms; the chain's last step (see ArrayDataModule.transform) makes them int64
        sample = {"image": image, "label": label.float() if label.dtype == torch.uint8 else label}
        if self.masks is not None:
            sample["mask"] = torch.from_numpy(self.masks[index])
        if self.sites is not None:
            sample["site"] = torch.tensor(int(self.sites[index]))
        return self.transform(sample) if self.transform is not None else sample


def monai_chain(steps: Sequence[Callable], predict: bool = False) -> Callable:
    """``steps`` as one MONAI ``Compose`` whose random steps draw from the run's seed. With
    ``predict`` (samples without a label), steps skip the keys a sample lacks (e.g.
    ``Resized(keys=[image, label])`` given an image alone)."""
    from monai.transforms import Compose, MapTransform

    transform = Compose(list(steps))
    if predict:
        for step in transform.flatten().transforms:
            if isinstance(step, MapTransform):
                step.allow_missing_keys = True
    # MONAI's random transforms draw from their own generator; tie it to the run's seed
    transform.set_random_state(seed=int(torch.initial_seed() % 2**32))
    return transform


def _deterministic(transform: Callable | None) -> bool:
    """Whether ``transform`` gives a sample the same result every time (no MONAI random step)."""
    if transform is None or isinstance(transform, PlainTensors):
        return True
    if not type(transform).__module__.startswith("monai."):
        return False  # unknown: assume random
    from monai.transforms import Compose, Randomizable

    steps = transform.flatten().transforms if isinstance(transform, Compose) else (transform,)
    return not any(isinstance(step, Randomizable) for step in steps)


class PrebuiltBatch(Sequence):
    """A batch indexed at once from prebuilt tensors: :func:`collate` takes its ``tensors`` as
    they are, and any other collate function sees the sequence of samples it expects.

    Args:
        tensors: ``{key: (B, ...)}``.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch (a :class:`PrebuiltBatch` is stacked already)."""
    if isinstance(batch, PrebuiltBatch):
        return batch.tensors
    return default_collate(batch)


class PlainTensors:
    """The end of every sample chain without MONAI: ``image`` float32, ``label`` int64 (class
    indices, 0/1 indicators, masks), ``roi`` bool, as ``EnsureTyped`` makes them in a MONAI chain."""

    dtypes = {"image": torch.float32, "label": torch.long, "roi": torch.bool}

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        for key, dtype in self.dtypes.items():
            if key in sample:
                sample[key] = torch.as_tensor(sample[key]).to(dtype)
        return sample


def _prebuild(dataset: Dataset) -> None:
    """:meth:`ArrayDataset.prebuild` every in-memory dataset that ``dataset`` serves."""
    for part in dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]:
        part = part.dataset if isinstance(part, Subset) else part
        if isinstance(part, ArrayDataset):
            part.prebuild()


def _plain(dataset: Dataset) -> bool:
    """Whether every sample of ``dataset`` is prebuilt or goes through :class:`PlainTensors`
    alone (no MONAI transform at batch time)."""
    if isinstance(dataset, Subset):
        return _plain(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        return all(_plain(part) for part in dataset.datasets)
    return getattr(dataset, "prebuilt", None) is not None or isinstance(
        getattr(dataset, "transform", None), PlainTensors
    )


class BalancedSampler(EpochShuffleSampler):
    """``data.sampler=balanced``: each epoch ``len(data)`` indices drawn with replacement, every
    stratum (class) equally likely, so rare classes fill as many batches as common ones.

    Drawn from ``(seed, epoch)`` like :class:`~medexp.data.sampling.EpochShuffleSampler` (whose
    epoch and mid-epoch skipping it keeps), so a resumed run draws the same batches.

    Args:
        data: the dataset (only its length is used).
        strata: ``(N,)`` stratum of each sample, e.g. its class (see :func:`~medexp.data.folds.strata`).
        seed: the run's seed.
    """

    def __init__(self, data: Sized, strata: np.ndarray, seed: int) -> None:
        super().__init__(data, seed)
        if len(strata) != len(data):
            raise ValueError(f"{len(strata)} strata for {len(data)} samples")
        _, stratum, counts = np.unique(np.asarray(strata), return_inverse=True, return_counts=True)
        # each stratum's samples share its probability equally: 1 / (strata * its size)
        self.weights = torch.as_tensor(1.0 / (len(counts) * counts[stratum.ravel()]), dtype=torch.float64)

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        draws = torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator)
        yield from draws[skip:].tolist()


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """The labels of a training dataset in index order: :class:`ArrayDataset` and generated
    images hold them, MONAI datasets of file cases list them in their items, and a
    ``ConcatDataset`` joins its parts', a ``Subset`` (a federated site's share) takes its rows'."""
    if isinstance(dataset, ConcatDataset):
        return np.concatenate([dataset_labels(part) for part in dataset.datasets])
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if hasattr(dataset, "labels"):
        return np.asarray(dataset.labels)
    return np.asarray([item["label"] for item in dataset.data])


def read_8bit_images(spatial_dims: int) -> list[Callable]:
    """MONAI transforms that read the ``image`` files of a prediction as in-memory samples are
    served: 8-bit values scaled to [0, 1], in numpy's axis order."""
    from monai.transforms import LoadImaged, ScaleIntensityRanged, Transposed

    with warnings.catch_warnings():
        # LoadImage registers MONAI's GPU DICOM decoder too, which warns wherever nvImageCodec is absent
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
        read = LoadImaged(keys="image", image_only=True, ensure_channel_first=True)
    head: list[Callable] = [read]
    if spatial_dims == 2:
        # PIL reads (W, H) (MONAI's reverse_indexing); arrays are (H, W). An invertible
        # transpose, so masks written back come out in the file's own orientation.
        head.append(Transposed(keys="image", indices=[0, 2, 1]))
    head.append(ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0))
    return head


def check_num_samples(num_samples: dict[str, int] | None) -> dict[str, int]:
    """``data.num_samples`` of synthetic data (default 400/100/100), checked: a positive count per split."""
    num_samples = dict(num_samples or {"train": 400, "val": 100, "test": 100})
    if sorted(num_samples) != sorted(SPLITS) or min(num_samples.values()) < 1:
        raise MedexpError(f"data.num_samples={num_samples}; expected positive counts for {list(SPLITS)}")
    return num_samples


class DataModule(L.LightningDataModule):
    """The base every medexp DataModule follows: what tasks, commands and model configs read from
    the data, and loaders over its splits.

    Subclasses fill :attr:`datasets` in :meth:`setup` and implement :meth:`predict_transform` and
    :meth:`fingerprint`; they change how a loader batches samples through :meth:`_loader_type`.
    Training batches are shuffled from the run's seed and the epoch
    (:class:`~medexp.data.sampling.EpochShuffleSampler`), so a resumed run sees the same batches.

    Args:
        task: the data's task (``binary``, ``segmentation``, ``detection``, ``registration``, ...),
            which tasks and model configs check.
        num_classes: classes (or labels); in_channels: image channels; spatial_dims: 2 or 3.
            Model configs read these.
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader worker processes.

    Attributes:
        class_names: names of the classes (labels) in index order, where the data know them.
        datasets: ``train``, ``val`` and ``test`` datasets, after :meth:`setup`.
    """

    def __init__(
        self, task: str, num_classes: int, in_channels: int, spatial_dims: int, batch_size: int, num_workers: int
    ) -> None:
        super().__init__()
        self.task = task
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.class_names: list[str] | None = None
        self.datasets: dict[str, Dataset] = {}

    def predict_transform(self) -> Callable:
        """The chain that turns one input (``{"image": path}``, or the files of a pair) into a
        model input, as the test split prepares its samples (used by ``medexp predict``)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """SHA-256 of what the splits hold, so a reproduction can tell whether it trained on the
        same data."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short name of the data for messages."""
        return type(self).__name__

    def _loader_type(self, dataset: Dataset) -> tuple[type[DataLoader], dict[str, Any]]:
        """The DataLoader class that batches ``dataset`` and its extra arguments (e.g. ``collate_fn``)."""
        return DataLoader, {}

    def _make_loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        loader, options = self._loader_type(dataset)
        return loader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._shuffler(dataset) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            **options,
        )

    def _shuffler(self, dataset: Dataset) -> EpochShuffleSampler:
        # seeded like MONAI's random transforms (see monai_chain): from the run's seed. The epoch
        # is set now too: worker processes draw indices as soon as the loader's iterator exists,
        # before Lightning's set_epoch, and a resumed run's first epoch is not epoch 0.
        sampler = EpochShuffleSampler(dataset, int(torch.initial_seed() % 2**32))
        sampler.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        return sampler

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return self._make_loader(self.datasets[split], shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def subset_loader(self, split: str, indices: Sequence[int], shuffle: bool) -> DataLoader:
        """A loader over the samples ``indices`` of ``split``, batched like the split's own
        (e.g. one simulated site's share in ``medexp federate``). Call after :meth:`setup`."""
        return self._make_loader(Subset(self.datasets[split], [int(i) for i in indices]), shuffle)

    def resolve_findings(
        self,
        findings: list[validation.Finding],
        scanned: dict[str, tuple[int, int]],
        start: float,
        verb: str = "checked",
    ) -> set[tuple[str, int]]:
        """Report the data check's ``findings`` as ``on_bad`` says (see
        :func:`~medexp.data.validation.resolve`); the ``(split, index)`` of the cases to leave out,
        kept in :attr:`skipped` for ``skipped.csv``. For data modules with a data check (``scan``,
        ``on_bad``, ``describe``); ``verb``: how the log says the cases were scanned."""
        drop = validation.resolve(
            findings,
            scanned,
            time.perf_counter() - start,
            source=self.describe(),
            scan=self.scan,
            on_bad=self.on_bad,
            verb=verb,
        )
        self.skipped = [finding for finding in findings if (finding.split, finding.index) in drop]
        return drop


def check_moves_masks(augmentations: Sequence[Callable]) -> None:
    """Batch augmentations of segmentation data must move a label mask with its image without
    mixing label values: those that say so (``moves_masks = True``: flips and whole-pixel shifts),
    or leave the mask alone (``image_only = True``: intensity changes)."""
    for index, augment in enumerate(augmentations):
        if not getattr(augment, "moves_masks", False) and not getattr(augment, "image_only", False):
            raise MedexpError(
                f"data.batch_augmentations.{index}: {type(augment).__name__} cannot move segmentation masks with "
                "their images (it interpolates between label values); use BatchFlip or BatchTranslate there, or a "
                "MONAI spatial transform of image and label in data.augmentations"
            )


class ArrayDataModule(DataModule):
    """Base of DataModules whose splits fit in memory as arrays (synthetic data, MedMNIST).

    Subclasses implement :meth:`load_split`. Augmentations run on training samples only, before
    ``transforms``, which run on every split.

    Args:
        task: ``binary``, ``multiclass`` or ``multilabel``.
        num_classes: classes (binary: 2), or labels for multi-label tasks.
        in_channels: image channels; spatial_dims: 2 or 3. Model configs read these four.
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        transforms: MONAI dictionary transforms for every split (e.g. intensity normalisation).
        augmentations: MONAI dictionary transforms for training samples only.
        batch_augmentations: callables ``(B, C, *spatial) -> same`` applied to the images of whole
            training batches after they reach the device (e.g. :mod:`medexp.data.batch_augment`'s
            per-sample flips and shifts, vectorised), after ``augmentations`` and ``transforms``.
            A segmentation mask moves with its image in the same call; only augmentations that
            never blend label values (``moves_masks``: flips, whole-pixel shifts) are accepted there.
        fold: k-fold cross-validation: train on the other folds of the training split, validate
            on fold ``fold`` (the validation split is not used; the test split is kept); None:
            the usual splits. See :mod:`medexp.data.folds`.
        num_folds: folds of the training split (at least 2).
        fold_seed: seed of the fold assignment, independent of the training seed so every job
            of a sweep over ``fold`` (or over seeds) sees the same folds.
        output_dir: where the fold assignment used is written (``folds.csv``, with ``fold``
            set) and the cases left out by ``on_bad="skip"`` (``skipped.csv``); None writes nothing.
        scan: the data check in :meth:`setup` (see :mod:`medexp.data.validation`): ``sample``
            checks ``scan_sample`` cases per split (drawn from a fixed seed, the first always),
            ``all`` every case, ``off`` none. Labels are checked for every sample either way.
        scan_sample: cases per split a ``sample`` scan checks.
        on_bad: ``fail``: stop with an error that lists every problem found; ``skip``: leave the
            bad cases out of their split (see :data:`~medexp.data.validation.KEEP_FIRST` for
            duplicates across splits) and list them in ``<output_dir>/skipped.csv``; ``warn``:
            keep the cases whose problems are tolerable (see
            :data:`~medexp.data.validation.TOLERABLE_KINDS`) with a warning, stop for the others.
        intensity_range: ``[low, high]`` of image values after ``transforms`` (a derived property
            that models producing images read; checked against a GAN's for ``generated``).
        generated: GAN-augmented training: images from a class-conditional GAN checkpoint mixed
            into the training split, ``{ckpt, ratio, labels, seed}``; see
            :class:`~medexp.data.generated.GeneratedImages`. None or ``ratio: 0``: real data only.
        sampler: how training batches are drawn: None (a shuffle of the split per epoch) or
            ``balanced`` (with replacement, every class equally likely; multi-label: by each
            sample's rarest positive label, see :func:`~medexp.data.folds.strata`), from
            ``(seed, epoch)`` so a resumed run draws the same batches (:class:`BalancedSampler`).
        fold_by: None, or ``site``: leave-one-site-out cross-validation, fold ``k`` being site
            ``k`` of ``site_names`` (``num_folds`` is then not used).

    Attributes:
        site_names: the acquisition sites (scanners, hospitals) of data that have them, in index
            order; None otherwise. Subclasses set it and, in :meth:`load_split`, the site index
            of each row returned in ``loaded_sites[split]``; samples then carry ``site``.
    """

    def __init__(
        self,
        task: str,
        num_classes: int,
        in_channels: int,
        spatial_dims: int,
        batch_size: int = 64,
        num_workers: int = 0,
        transforms: Sequence[Callable] = (),
        augmentations: Sequence[Callable] = (),
        batch_augmentations: Sequence[Callable] = (),
        fold: int | None = None,
        num_folds: int = 5,
        fold_seed: int = 0,
        output_dir: str | Path | None = None,
        scan: str = "sample",
        scan_sample: int = 256,
        on_bad: str = "fail",
        intensity_range: Sequence[float] | None = None,
        generated: dict[str, Any] | None = None,
        sampler: str | None = None,
        fold_by: str | None = None,
        label_fraction: float | None = None,
    ) -> None:
        scan = validation.check_options(scan, scan_sample, on_bad)
        if label_fraction is not None and (
            isinstance(label_fraction, bool)
            or not isinstance(label_fraction, (int, float))
            or not 0 < label_fraction <= 1
        ):
            raise MedexpError(f"data.label_fraction={label_fraction!r}; expected a fraction in (0, 1], or null for all")
        if sampler not in SAMPLERS:
            raise MedexpError(f"data.sampler={sampler!r}; expected one of {list(SAMPLERS)}")
        if sampler is not None and task == "segmentation":
            raise MedexpError(
                f"data.sampler={sampler} balances the classes of images (binary, multiclass, multilabel), not "
                "data.task=segmentation; for lesions in patches use data/augmentations=patches"
            )
        if task not in TASKS:
            raise MedexpError(f"data.task={task!r}; expected one of {list(TASKS)}")
        if num_classes < 2:
            raise MedexpError(f"data.num_classes={num_classes}; a classifier needs at least 2 classes")
        if task == "binary" and num_classes != 2:
            raise MedexpError(f"data.num_classes={num_classes} with data.task=binary; binary means 2 classes")
        if batch_size < 1:
            raise MedexpError(f"data.batch_size={batch_size}; expected a positive integer")
        # leave-one-site-out folds are the sites, checked once the sites are known (see setup)
        check_folds(fold if fold_by is None else None, num_folds)
        super().__init__(task, num_classes, in_channels, spatial_dims, batch_size, num_workers)
        self.transforms = list(transforms)
        self.augmentations = list(augmentations)
        self.batch_augmentations = list(batch_augmentations)
        if task == "segmentation":
            check_moves_masks(self.batch_augmentations)
        self.datasets: dict[str, ArrayDataset] = {}
        self.fold, self.num_folds, self.fold_seed, self.fold_by = fold, num_folds, fold_seed, fold_by
        self.sampler = sampler
        self.label_fraction = label_fraction
        self.site_names: list[str] | None = None
        self.loaded_sites: dict[str, np.ndarray] = {}
        self.output_dir = Path(output_dir).expanduser() if output_dir else None
        # with fold set: one row per training sample and the fold it is in (see :meth:`save_folds`)
        self.fold_table: list[dict[str, Any]] | None = None
        self.scan, self.scan_sample, self.on_bad = scan, scan_sample, on_bad
        # the errors of the cases on_bad=skip left out (see :meth:`save_skipped`)
        self.skipped: list[validation.Finding] = []
        self.intensity_range = None if intensity_range is None else [float(v) for v in intensity_range]
        from medexp.data.generated import GeneratedImages

        self.generated = GeneratedImages.from_config(generated)

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Images ``(N, C, *spatial)`` and labels (see :class:`ArrayDataset`) of one split."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        arrays = {}
        for split in SPLITS:
            if split == "val" and self.fold is not None:
                continue  # replaced by a fold of the training split
            arrays[split] = self.load_split(split)
            self._check_split(split, *arrays[split])
        # rows of the loaded splits kept by the data check (all of them unless on_bad=skip)
        kept = self._scan_arrays(arrays)
        self.check_sites()
        sites = {split: self.loaded_sites[split][rows] for split, rows in kept.items()} if self.site_names else {}
        if self.fold is not None:
            images, labels = arrays["train"]
            if self.fold_by == "site":
                folds = sites["train"]
                held_out = split_by_fold(folds, self.fold, f"site {self.site_names[self.fold]!r}")
            else:
                folds = assign_folds(strata(labels, self.task), None, self.num_folds, self.fold_seed)
                held_out = folds == self.fold
            self.fold_table = [
                {"index": int(index), "label": self._label_text(label), "fold": int(fold)}
                for index, label, fold in zip(kept["train"], labels, folds)
            ]
            if sites:
                for row, site in zip(self.fold_table, sites["train"]):
                    row["site"] = self.site_names[site]
                sites["val"], sites["train"] = sites["train"][held_out], sites["train"][~held_out]
            # boolean indexing copies: where a subclass keeps its arrays (MedMNIST), the training split is held twice
            arrays["val"] = images[held_out], labels[held_out]
            arrays["train"] = images[~held_out], labels[~held_out]
        if self.label_fraction is not None and self.label_fraction < 1:
            rows = self.labelled_rows(arrays["train"][1])
            arrays["train"] = arrays["train"][0][rows], arrays["train"][1][rows]
            if sites:
                sites["train"] = sites["train"][rows]
        for split in SPLITS:
            self.datasets[split] = ArrayDataset(*arrays[split], self.transform(split))
            self.datasets[split].sites = sites.get(split)
        self.save_folds()
        self.save_skipped("index", lambda split, index: index)

    def labelled_rows(self, labels: np.ndarray) -> np.ndarray:
        """The rows of the training split kept by ``label_fraction`` (label-efficiency studies: a
        model trained on part of the labels): that fraction of each class (stratum, see
        :func:`~medexp.data.folds.strata`), at least one, drawn with ``fold_seed`` so every seed
        of a sweep trains on the same images."""
        groups = strata(labels, self.task)
        groups = np.zeros(len(labels), dtype=np.int64) if groups is None else groups
        rng = np.random.default_rng(self.fold_seed)
        rows = []
        for group in np.unique(groups):
            members = np.flatnonzero(groups == group)
            count = max(1, round(self.label_fraction * len(members)))
            rows.append(rng.choice(members, size=count, replace=False))
        kept = np.sort(np.concatenate(rows))
        log.info(
            "data.label_fraction=%g: %d of %d training images keep their labels",
            self.label_fraction,
            len(kept),
            len(labels),
        )
        return kept

    def check_sites(self) -> None:
        """Check the options that depend on the sites, once ``site_names`` is known."""
        check_fold_by(self.fold_by, self.fold, self.site_names)
        if self.site_names and self.generated is not None:
            raise MedexpError(
                "data.generated cannot join data with sites (data.sites, or a site column): generated images have no site"
            )

    def _scan_arrays(self, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """Check the loaded splits (see :mod:`medexp.data.validation`); with ``on_bad="skip"``
        remove the bad rows from ``arrays`` in place. Returns the rows kept of each split."""
        kept = {split: np.arange(len(images)) for split, (images, _) in arrays.items()}
        if self.scan == "off":
            return kept
        start = time.perf_counter()

        def name(split: str, index: int) -> str:
            return f"{split} sample {index}"

        findings: list[validation.Finding] = []
        hashes: dict[tuple[str, int], bytes] = {}
        scanned = {}
        for split, (images, labels) in arrays.items():
            rows = validation.scan_indices(len(images), self.scan, self.scan_sample, split)
            scanned[split] = (len(rows), len(images))
            found = [
                validation.Finding(kind, split, row, name(split, row), detail)
                for row, kind, detail in validation.content_problems(images, rows)
            ]
            found += [
                validation.Finding("label_range", split, row, name(split, row), detail)
                for row, detail in validation.label_problems(labels, self.task, self.num_classes)
            ]
            bad = {finding.index for finding in found}
            hashes.update({(split, int(row)): validation.pixel_hash(images[row]) for row in rows if row not in bad})
            findings += found
        findings += validation.duplicate_findings(hashes, name)
        drop = self.resolve_findings(findings, scanned, start)
        if not drop:
            return kept
        for split, (images, labels) in arrays.items():
            keep = np.ones(len(images), dtype=bool)
            keep[[index for where, index in drop if where == split]] = False
            if not keep.any():
                raise MedexpError(
                    f"{self.describe()}: all {len(images)} samples of the {split} split are bad (data.on_bad=skip "
                    "left them out); nothing is left to use"
                )
            arrays[split] = images[keep], labels[keep]
            kept[split] = kept[split][keep]
        return kept

    def save_skipped(self, key_column: str, key: Callable[[str, int], Any]) -> None:
        """Write the cases ``on_bad="skip"`` left out to ``<output_dir>/skipped.csv`` (see
        :func:`~medexp.data.validation.write_skipped`), from one process; with ``on_bad=skip``
        the file is written even when nothing was left out, so its absence never means "none"."""
        if self.on_bad != "skip" or self.scan == "off" or self.output_dir is None:
            return
        if self.trainer is None or self.trainer.is_global_zero:
            validation.write_skipped(self.output_dir / "skipped.csv", self.skipped, key_column, key)

    def _label_text(self, label: np.ndarray) -> str | int:
        # folds.csv: class index; multi-label 0/1 indicators; segmentation: does the mask have foreground
        match self.task:
            case "multilabel":
                return " ".join(str(int(v)) for v in label)
            case "segmentation":
                return "foreground" if label.any() else "empty"
            case _:
                return int(label)

    def save_folds(self) -> None:
        """Write ``fold_table`` to ``<output_dir>/folds.csv`` (when both exist), from one process.

        The assignment is the same in every process (drawn from ``fold_seed``), so under DDP the
        global rank zero records it for all.
        """
        if self.fold_table is None or self.output_dir is None:
            return
        if self.trainer is None or self.trainer.is_global_zero:
            write_folds(self.output_dir / "folds.csv", self.fold_table)

    def transform(self, split: str, head: Sequence[Callable] = ()) -> Callable:
        """The per-sample chain of ``split``: ``head`` (e.g. a file reader), augmentations
        (training only), transforms, then plain tensors: float32 images, int64 labels.

        ``split="predict"`` is the evaluation chain for samples without a label: keys missing
        from a sample are skipped, and images stay MetaTensors that record the spatial transforms
        applied, so predictions can be mapped back onto their input (``monai.transforms.Invertd``).

        With nothing to apply but the types (in-memory data without transforms or augmentations,
        the default command), the chain is :class:`PlainTensors`: MONAI is not imported (about
        2 s of start-up) and samples skip its per-call bookkeeping.
        """
        augmentations = self.augmentations if split == "train" else []
        predict = split == "predict"
        if not (head or augmentations or self.transforms or predict):
            return PlainTensors()
        from monai.transforms import EnsureTyped

        # plain tensors in batches: MONAI transforms otherwise return MetaTensors
        # "roi": an optional region where metrics are computed (see SegmentationTask)
        ensure = EnsureTyped(
            keys=["image", "label", "roi"],
            dtype=[torch.float32, torch.long, torch.bool],
            track_meta=predict,
            allow_missing_keys=True,
        )
        return monai_chain([*head, *augmentations, *self.transforms, ensure], predict)

    def predict_transform(self) -> Callable:
        """The chain that turns one image file into a model input ``{"image": (C, *spatial)}``,
        as the test split prepares its samples (see :meth:`transform` with ``split="predict"``).

        In-memory samples are ``uint8`` arrays in numpy's axis order that :class:`ArrayDataset`
        scales to [0, 1]; files are read and scaled the same way.
        """
        return self.transform("predict", head=read_8bit_images(self.spatial_dims))

    def _check_split(self, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        where = f"{self.describe()} {split} split"
        if images.ndim != 2 + self.spatial_dims or images.shape[1] != self.in_channels:
            raise MedexpError(
                f"{where}: images of shape {images.shape}; expected (N, {self.in_channels}, "
                f"{', '.join('S' * self.spatial_dims)}) for in_channels={self.in_channels}"
            )
        if self.task == "segmentation":
            if labels.shape != (len(images), 1, *images.shape[2:]):
                raise MedexpError(f"{where}: masks of shape {labels.shape} do not match images {images.shape}")
            if self.scan != "off":
                return  # the data check reports each bad sample (see _scan_arrays)
            if labels.max() >= self.num_classes:
                raise MedexpError(
                    f"{where}: mask values up to {labels.max()}; expected classes 0..{self.num_classes - 1}"
                )
        elif self.task == "multilabel":
            if labels.ndim != 2 or labels.shape[1] != self.num_classes:
                raise MedexpError(f"{where}: multi-label targets must be 0/1 of shape (N, {self.num_classes})")
            if self.scan == "off" and not np.isin(labels, (0, 1)).all():
                raise MedexpError(f"{where}: multi-label targets must be 0/1 of shape (N, {self.num_classes})")
        elif labels.ndim != 1:
            raise MedexpError(f"{where}: labels must be class indices of shape (N,); got shape {labels.shape}")
        elif self.scan == "off" and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise MedexpError(
                f"{where}: labels must be class indices in [0, {self.num_classes - 1}] of shape (N,); "
                f"got shape {labels.shape}, range [{labels.min()}, {labels.max()}]"
            )

    def label_counts(self) -> tuple[np.ndarray, int]:
        """Training samples per class (positives per label for multi-label tasks, voxels per class
        for segmentation), and their total; with ``fold`` set, of the folds trained on."""
        self.setup()
        labels = self.datasets["train"].labels.numpy()
        if self.task == "multilabel":
            return labels.sum(axis=0), len(labels)
        labels = labels.ravel()  # segmentation: voxels per class
        return np.bincount(labels, minlength=self.num_classes), len(labels)

    def _make_loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        _prebuild(dataset)  # now: the data modules have attached everything a sample carries
        return super()._make_loader(dataset, shuffle)

    def _loader_type(self, dataset: Dataset) -> tuple[type[DataLoader], dict[str, Any]]:
        if _plain(dataset):
            return DataLoader, {"collate_fn": collate}
        # MONAI's collates lists of samples (patches) and seeds random transforms in workers
        from monai.data import DataLoader as MonaiDataLoader

        return MonaiDataLoader, {}

    def _shuffler(self, dataset: Dataset) -> EpochShuffleSampler:
        if self.sampler != "balanced":
            return super()._shuffler(dataset)
        # drawn from the run's seed and the epoch, as DataModule._shuffler's shuffle
        sampler = BalancedSampler(
            dataset, strata(dataset_labels(dataset), self.task), int(torch.initial_seed() % 2**32)
        )
        sampler.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        return sampler

    def train_dataloader(self) -> DataLoader:
        if self.generated is None:
            return self._loader("train", shuffle=True)
        # generated images join the training split after its augmentations and transforms: they
        # are made in the space of the transformed images (see medexp.data.generated)
        dataset = ConcatDataset([self.datasets["train"], self.generated.dataset(self)])
        return self._make_loader(dataset, shuffle=True)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # training batches only: never validation, test or prediction
        trainer = self.trainer
        if not self.batch_augmentations or trainer is None or not trainer.training:
            return batch
        images, label = batch["image"], batch.get("label")
        if not (isinstance(label, torch.Tensor) and label.ndim == images.ndim and label.shape[2:] == images.shape[2:]):
            for augment in self.batch_augmentations:
                images = augment(images)
            return {**batch, "image": images}
        # a mask (B, 1, *spatial) moves with its image: both go through each augmentation in one call
        check_moves_masks(self.batch_augmentations)
        joint, channels = torch.cat([images, label.to(images.dtype)], dim=1), images.shape[1]
        for augment in self.batch_augmentations:
            if getattr(augment, "image_only", False):
                joint = torch.cat([augment(joint[:, :channels]), joint[:, channels:]], dim=1)
            else:
                joint = augment(joint)
        return {**batch, "image": joint[:, :channels], "label": joint[:, channels:].round().to(label.dtype)}

    def fingerprint(self) -> str:
        """SHA-256 of what the splits hold (images and labels, in order), so a reproduction can
        tell whether it trained on the same data. Call after :meth:`setup`."""
        digest = hashlib.sha256()
        for split in SPLITS:
            dataset = self.datasets[split]
            digest.update(split.encode())
            for array in (np.ascontiguousarray(dataset.images), dataset.labels.contiguous().numpy()):
                digest.update(f"{array.dtype}{array.shape}".encode())
                digest.update(array.tobytes())
        if self.generated is not None:
            self.generated.fingerprint(digest, self)
        return digest.hexdigest()
