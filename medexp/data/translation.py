"""Image-to-image translation data: a source image and its target in another modality, as dict
batches ``{"image": (C_in, *spatial), "target": (C_out, *spatial)}`` float32.

:class:`TranslationDataModule` is the base of every translation data module (what model configs
read: ``paired``, ``truth``, ``in_channels``, ``out_channels``, ``intensity_range``,
``target_intensity_range``; unpaired training); :class:`SyntheticTranslationDataModule` renders
the phantoms of :mod:`medexp.data.phantoms` in two "modalities" with different intensity
mappings, noise and blur, so the true translation of every source image is known.

Unpaired training (``paired=False``): each training sample's target comes from an independent
permutation of the split drawn per epoch (:class:`UnpairedSampler` over an
:class:`UnpairedDataset`), so a model cannot rely on alignment (CycleGAN's setting); validation
and test keep their aligned targets wherever ``truth`` holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medexp.data.base import SPLITS, DataModule, check_num_samples, monai_chain, read_8bit_images
from medexp.data.phantoms import make_phantoms
from medexp.data.sampling import EpochShuffleSampler, epoch_seed
from medexp.utils.errors import MedexpError

KEYS = ("image", "target")

# The synthetic "modalities", as mappings of a phantom's clean intensity p in [0, 1] (air about
# 0.05, lungs 0.3, soft tissue 0.5, spine and bright lesions 0.6-1). The source keeps the
# phantom's contrast (a T1-like image); the target inverts lungs against soft tissue and darkens
# lesions (a non-monotone mapping, as between MRI and CT), so the identity is a poor translation.
SOURCE_CURVE = ((0.0, 0.15, 0.3, 0.5, 0.7, 1.0), (0.0, 0.12, 0.3, 0.5, 0.72, 1.0))
TARGET_CURVE = ((0.0, 0.12, 0.3, 0.5, 0.65, 1.0), (0.02, 0.05, 0.85, 0.3, 0.15, 0.95))
# tissue classes of a clean phantom intensity (upper bounds): air, lungs, soft tissue, bright
TISSUE_BOUNDS = (0.15, 0.4, 0.58)


class TranslationDataset(Dataset):
    """Source and target images held in memory, served as ``{"image", "target"}`` float32.

    Args:
        arrays: ``image`` ``(N, C_in, *spatial)`` and ``target`` ``(N, C_out, *spatial)`` arrays.
        transform: applied to each sample dict (MONAI dictionary transforms).
        tissues: ``(N, 1, *spatial)`` tissue class of every pixel where known (synthetic data,
            see :data:`TISSUE_BOUNDS`); never served in batches.
    """

    def __init__(
        self, arrays: dict[str, np.ndarray], transform: Callable | None = None, tissues: np.ndarray | None = None
    ) -> None:
        if sorted(arrays) != sorted(KEYS) or len(arrays["image"]) != len(arrays["target"]):
            raise ValueError(f"expected {KEYS} arrays of one length; got { ({k: len(v) for k, v in arrays.items()}) }")
        self.arrays, self.transform, self.tissues = arrays, transform, tissues

    def __len__(self) -> int:
        return len(self.arrays["image"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {
            key: torch.from_numpy(np.asarray(array[index], dtype=np.float32)) for key, array in self.arrays.items()
        }
        return self.transform(sample) if self.transform is not None else sample


class UnpairedDataset(Dataset):
    """A paired dataset served unpaired: index ``(i, j)`` gives sample ``i``'s source with
    sample ``j``'s target (see :class:`UnpairedSampler`). Works over any dataset of
    ``{"image", "target"}`` samples (each sample is read whole; the unused half is dropped).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: tuple[int, int]) -> dict[str, torch.Tensor]:
        source, target = index
        sample = dict(self.dataset[source])
        sample["target"] = self.dataset[target]["target"] if target != source else sample["target"]
        return sample


class UnpairedSampler(EpochShuffleSampler):
    """``(source, target)`` index pairs: the sources in the epoch's shuffled order (as
    :class:`~medexp.data.sampling.EpochShuffleSampler`), the targets from a second, independent
    permutation of the same epoch, both drawn from ``(seed, epoch)``: reproducible, other every
    epoch."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, self._skip = self._skip, 0
        n = len(self.data)
        sources = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        targets = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(self.seed + 1, self.epoch)))
        yield from list(zip(sources.tolist(), targets.tolist()))[skip:]


class TranslationDataModule(DataModule):
    """Base of the translation data modules: their shared options, sample chain and unpaired
    training split.

    Subclasses fill ``self.datasets`` (``train``, ``val``, ``test``: datasets of ``{"image",
    "target"}`` samples) in :meth:`setup` and implement :meth:`predict_transform` and
    :meth:`fingerprint` (see :class:`~medexp.data.base.DataModule`).

    Args:
        task: must be ``translation`` (model configs read it).
        paired: the training pairs are aligned (pix2pix needs this); False: training targets
            come from an independent per-epoch permutation (see the module).
        truth: the validation and test targets are the true translations of their sources
            (then translated-vs-target metrics mean something).
        num_classes: 1 (read by model configs; translation has no classes).
        in_channels: source channels; out_channels: target channels; spatial_dims: 2 or 3.
        batch_size: pairs per batch (per process under DDP); num_workers: loader processes.
        transforms: MONAI dictionary transforms for every split, on keys ``image`` and ``target``.
        intensity_range: ``[low, high]`` of source values after ``transforms``.
        target_intensity_range: ``[low, high]`` of target values after ``transforms`` (where
            translated images are mapped).
        seed: data seed; also seeds the unpaired permutations with the run's seed.
    """

    def __init__(
        self,
        task: str = "translation",
        paired: bool = True,
        truth: bool = True,
        num_classes: int = 1,
        in_channels: int = 1,
        out_channels: int = 1,
        spatial_dims: int = 2,
        batch_size: int = 16,
        num_workers: int = 0,
        transforms: Sequence[Callable] = (),
        intensity_range: Sequence[float] = (0.0, 1.0),
        target_intensity_range: Sequence[float] = (0.0, 1.0),
        seed: int = 0,
    ) -> None:
        if task != "translation":
            raise MedexpError(f"data.task={task!r}; translation data serve data.task=translation")
        for key, value in (("paired", paired), ("truth", truth)):
            if not isinstance(value, bool):
                raise MedexpError(f"data.{key}={value!r}; expected true or false")
        if num_classes != 1:
            raise MedexpError(f"data.num_classes={num_classes}; translation data have no classes: 1")
        if spatial_dims not in (2, 3):
            raise MedexpError(f"data.spatial_dims={spatial_dims}; translation data are 2D or 3D")
        if min(in_channels, out_channels, batch_size) < 1 or num_workers < 0:
            raise MedexpError(
                f"data.in_channels={in_channels}, data.out_channels={out_channels}, data.batch_size={batch_size}, "
                f"data.num_workers={num_workers}; expected positive channels and batch size, and workers >= 0"
            )
        ranges = {}
        for key, values in (("intensity_range", intensity_range), ("target_intensity_range", target_intensity_range)):
            values = [float(v) for v in values]
            if len(values) != 2 or not values[1] > values[0]:
                raise MedexpError(f"data.{key}={values}; expected [low, high] with high > low")
            ranges[key] = values
        super().__init__(task, num_classes, in_channels, spatial_dims, batch_size, num_workers)
        self.paired, self.truth, self.out_channels, self.seed = paired, truth, out_channels, seed
        self.transforms = list(transforms)
        self.intensity_range, self.target_intensity_range = ranges["intensity_range"], ranges["target_intensity_range"]

    def transform(self, head: Sequence[Callable] = (), predict: bool = False) -> Callable:
        """The per-sample chain: ``head`` (e.g. a file reader), ``transforms``, then float32
        tensors; with ``predict``, MetaTensors that keep their metadata (affine, file name).
        Without anything to apply, plain tensors as they are (MONAI is not imported)."""
        if not (head or self.transforms or predict):
            return _float_tensors
        from monai.transforms import EnsureTyped

        ensure = EnsureTyped(keys=list(KEYS), dtype=torch.float32, track_meta=predict, allow_missing_keys=True)
        return monai_chain([*head, *self.transforms, ensure], predict)

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        return self._make_loader(dataset if self.paired else UnpairedDataset(dataset), shuffle=True)

    def _shuffler(self, dataset: Dataset) -> EpochShuffleSampler:
        if not isinstance(dataset, UnpairedDataset):
            return super()._shuffler(dataset)
        # the run's seed (as the shuffle) and the data's
        seed = int(np.random.SeedSequence([int(torch.initial_seed() % 2**32), self.seed]).generate_state(1)[0])
        sampler = UnpairedSampler(dataset, seed)
        sampler.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        return sampler

    def _loader_type(self, dataset: Dataset) -> tuple[type[DataLoader], dict[str, Any]]:
        if not self.transforms:
            return DataLoader, {}
        # MONAI's loader seeds the random transforms of each worker
        from monai.data import DataLoader as MonaiDataLoader

        return MonaiDataLoader, {}


def _float_tensors(sample: dict[str, Any]) -> dict[str, Any]:
    """The chain's end without MONAI: float32 ``image`` and ``target``."""
    return {key: torch.as_tensor(value).float() if key in KEYS else value for key, value in sample.items()}


def tissue_classes(phantoms: np.ndarray) -> np.ndarray:
    """``(N, 1, *spatial)`` clean phantom intensities in [0, 1] -> ``uint8`` tissue classes:
    0 air, 1 lungs, 2 soft tissue, 3 spine and bright lesions (see :data:`TISSUE_BOUNDS`)."""
    return np.digitize(phantoms, TISSUE_BOUNDS).astype(np.uint8)


def render_modality(
    phantoms: np.ndarray,
    curve: tuple[Sequence[float], Sequence[float]],
    noise: float,
    blur: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Phantoms ``(N, 1, *spatial)`` in [0, 1] seen by a "modality": intensities mapped through
    ``curve`` (piecewise linear, ``(points, values)``), blurred by a Gaussian of ``blur`` pixels
    (0: none), plus Gaussian noise of std ``noise``, clipped to [0, 1]; float32."""
    image = np.interp(phantoms, *curve).astype(np.float32)
    if blur > 0:
        from scipy.ndimage import gaussian_filter

        image = gaussian_filter(image, sigma=(0, 0) + (blur,) * (image.ndim - 2), mode="nearest")
    if noise > 0:
        image = image + rng.normal(0.0, noise, size=image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


class SyntheticTranslationDataModule(TranslationDataModule):
    """Phantom pairs generated deterministically from ``seed``: each phantom of
    :func:`~medexp.data.phantoms.make_phantoms` (with 0-3 bright and 0-2 dark lesions) is
    rendered as a source (:data:`SOURCE_CURVE`, ``source_noise``, ``source_blur``) and a target
    (:data:`TARGET_CURVE`, ``target_noise``, no blur): the target is the true translation of its
    source (``truth`` always holds). Grey (one channel each), intensities in [0, 1].

    Args:
        image_size: pixels (voxels) per side, at least 16.
        num_samples: pairs per split, e.g. ``{"train": 400, "val": 100, "test": 100}``.
        source_noise, target_noise: the std of each modality's Gaussian noise.
        source_blur: the source's Gaussian blur in pixels (0: none).
        **kwargs: see :class:`TranslationDataModule` (``paired``: false serves the training
            split unpaired).
    """

    def __init__(
        self,
        image_size: int = 32,
        num_samples: dict[str, int] | None = None,
        source_noise: float = 0.05,
        target_noise: float = 0.01,
        source_blur: float = 0.7,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        num_samples = check_num_samples(num_samples)
        if not self.truth:
            raise MedexpError("data.truth=false; synthetic pairs always have their true targets (data.truth=true)")
        if (self.in_channels, self.out_channels) != (1, 1):
            raise MedexpError(
                f"data.in_channels={self.in_channels}, data.out_channels={self.out_channels}; synthetic pairs are "
                "grey (1 channel each)"
            )
        if self.intensity_range != [0.0, 1.0] and not self.transforms:
            raise MedexpError(
                f"data.intensity_range={self.intensity_range}; synthetic images are in [0, 1] (change it only "
                "with data.transforms that rescale them)"
            )
        if image_size < 16:
            raise MedexpError(f"data.image_size={image_size}; expected at least 16 pixels")
        for key, value in (
            ("source_noise", source_noise),
            ("target_noise", target_noise),
            ("source_blur", source_blur),
        ):
            if not value >= 0:
                raise MedexpError(f"data.{key}={value}; expected a number >= 0")
        self.image_size, self.num_samples = image_size, num_samples
        self.source_noise, self.target_noise, self.source_blur = source_noise, target_noise, source_blur

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for split in SPLITS:
            rng = np.random.default_rng([self.seed, SPLITS.index(split)])
            images, _, _ = make_phantoms(
                self.num_samples[split], self.image_size, "segmentation", 3, rng, 1.0, self.spatial_dims
            )
            phantoms = images.astype(np.float32) / 255
            arrays = {
                "image": render_modality(phantoms, SOURCE_CURVE, self.source_noise, self.source_blur, rng),
                "target": render_modality(phantoms, TARGET_CURVE, self.target_noise, 0.0, rng),
            }
            self.datasets[split] = TranslationDataset(arrays, self.transform(), tissue_classes(phantoms))

    def predict_transform(self) -> Callable:
        """Image files read as the sources are served: 8-bit values scaled to [0, 1], 2D images
        in numpy's axis order (see :meth:`~medexp.data.base.ArrayDataModule.predict_transform`)."""
        return self.transform(head=read_8bit_images(self.spatial_dims), predict=True)

    def fingerprint(self) -> str:
        """SHA-256 of the pairs of every split (sources and targets, in order). Call after :meth:`setup`."""
        digest = hashlib.sha256()
        for split in SPLITS:
            digest.update(split.encode())
            for key, array in self.datasets[split].arrays.items():
                array = np.ascontiguousarray(array)
                digest.update(f"{key}{array.dtype}{array.shape}".encode())
                digest.update(array.tobytes())
        return digest.hexdigest()

    def describe(self) -> str:
        return f"synthetic translation pairs ({'paired' if self.paired else 'unpaired'} training)"
