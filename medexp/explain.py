"""``medexp explain ckpt_path=... input=... method=gradcam output=...`` (or ``python -m
medexp.explain``): saliency maps of a classifier, drawn over its inputs and scored.

The model and the data preprocessing are rebuilt from the run config stored in the checkpoint,
as ``medexp predict`` does. For each image, the map of one class (the predicted one, or
``class_index``) is computed with MONAI's ``monai.visualize``:

- ``gradcam`` (Grad-CAM, Selvaraju et al. 2017) and ``gradcampp`` (Grad-CAM++, Chattopadhyay et
  al. 2018) on a layer of the net (``layer=<module name>``, names as in ``model.net``; by
  default the net's last feature map: the output of the last module whose output still has a
  spatial extent, i.e. the last convolutional block after its normalisation and activation,
  e.g. ``features.5`` of ``model=cnn`` or ``layer4`` of a MONAI ResNet);
- ``occlusion`` (occlusion sensitivity): how much the class's probability drops when a patch
  around each pixel is occluded (negative drops count as 0).

Maps are upsampled (bi/trilinear) to the input's size and scaled to [0, 1] per image. Written
into ``output``:

- ``overlays/<image>.png``: the input next to the map over it (3D: the slice with the most
  saliency), the lesion's outline in green where a mask is known;
- ``saliency.csv``: one row per image: ``image``, ``label`` (``split=`` only),
  ``predicted_class`` (the most probable class; multi-label: label) and its ``probability``,
  ``explained_class`` and ``explained_probability``, and the scores of
  :mod:`medexp.metrics.saliency`: ``pointing_mass``, ``mask_fraction`` (the pointing mass of a
  uniform map), ``pointing_lift`` (their ratio) and ``pointing_hit`` where a mask has a lesion;
  ``deletion_auc``, ``insertion_auc`` and, with ``random_reference``, the same for a random
  ordering of the pixels (``*_random``); ``overlay``: the picture's path;
- ``summary.json``: the means of those scores (also logged).

Inputs are image files (``input=``: a file, folder, glob or CSV, see
:func:`medexp.predict.find_inputs`, prepared by the data module's ``predict_transform``), with
lesion masks from ``mask=`` (a column of the input CSV or a folder of masks named like the
images; scored in the image file's own geometry, the map mapped back through the data's
spatial transforms), or a split of the checkpoint's own data (``split=test``), whose lesion
masks the synthetic data serve.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from medexp.utils.config import CONFIG_PATH, register_resolvers
from medexp.utils.errors import MedexpError, user_errors

log = logging.getLogger("medexp")
register_resolvers()

METHODS = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "occlusion": "occlusion sensitivity"}
SPLITS = ("val", "test")
# MONAI's occlusion sensitivity indexes with lists, which torch >= 2.8 warns about on every call
_MONAI_INDEXING = r"Using a non-tuple sequence for multidimensional indexing"


def check_explainable(model: Any) -> None:
    """Refuse models whose maps :class:`SaliencyMaps` cannot make: anything but a classifier
    of single images.

    Raises:
        MedexpError: naming the model's kind and what is supported.
    """
    from medexp.tasks.classification import ClassificationTask

    if not isinstance(model, ClassificationTask):
        kind = type(model).__name__
        raise MedexpError(
            f"medexp explain explains classifiers (ClassificationTask); this checkpoint holds a {kind}. "
            "Segmentation models already show where they look: medexp predict writes their masks"
        )
    extra = getattr(model.net, "extra_inputs", ())
    if extra:
        raise MedexpError(
            f"medexp explain needs a net that takes one image; {type(model.net).__name__} also takes {list(extra)}"
        )


def feature_layers(net: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The modules of ``net`` whose output on ``example`` (``(1, C, *spatial)``) is a feature map
    ``(1, channels, *spatial)`` with more than one position, by name, in the order their forward
    passes finish (a module called twice counts at its last call); values: ``(channels, *spatial)``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.ndim == example.ndim and math.prod(output.shape[2:]) > 1:
                shapes.pop(name, None)  # re-inserted: the order is that of the last call
                shapes[name] = tuple(output.shape[1:])

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in net.named_modules() if name]
    training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(example)
    finally:
        net.train(training)
        for handle in handles:
            handle.remove()
    return shapes


def default_layer(net: nn.Module, shapes: dict[str, tuple[int, ...]]) -> str:
    """The layer Grad-CAM uses unless told: the last module to produce a feature map (see
    :func:`feature_layers`), the net's last convolutional block with its normalisation and
    activation (``layer4`` of a ResNet, the last ``features`` block of ``SimpleCNN``).

    Raises:
        MedexpError: when the net has no convolution or no feature map larger than one pixel.
    """
    if not any(isinstance(module, nn.modules.conv._ConvNd) for module in net.modules()):
        raise MedexpError(f"{type(net).__name__} has no convolutional layer for Grad-CAM; use method=occlusion")
    if not shapes:
        raise MedexpError(
            f"no layer of {type(net).__name__} keeps a spatial extent of more than one pixel for these inputs; "
            "use method=occlusion or larger images"
        )
    return list(shapes)[-1]


def _hooks_class() -> type:
    from monai.visualize.class_activation_maps import ModelWithHooks

    class Hooks(ModelWithHooks):
        """MONAI's ``ModelWithHooks`` for one layer, changed where Grad-CAM of batches and of a
        model in training needs it:

        - the class score is each image's own logit (MONAI's ``logits[:, class_idx]`` takes, for
          a batch, every image's logit of every image's class);
        - the layer's gradient comes from ``torch.autograd.grad``, so the parameters' ``.grad``
          (a training run's accumulated gradients) are left alone, also under inference mode;
        - the forward hook can be removed again (:meth:`remove`).
        """

        def __init__(self, net: nn.Module, layer: str) -> None:
            self.model = net
            self.target_layers = (layer,)
            self.gradients: dict[str, torch.Tensor] = {}
            self.activations: dict[str, torch.Tensor] = {}
            self.score: torch.Tensor | None = None
            self.class_idx: Any = None
            self.register_forward = self.register_backward = True
            module = dict(net.named_modules())[layer]
            self._handle = module.register_forward_hook(self.forward_hook(layer))

        def class_score(self, logits: torch.Tensor, class_idx: Any) -> torch.Tensor:
            index = torch.as_tensor(class_idx, device=logits.device).long().reshape(-1)
            return logits.gather(1, index.expand(logits.shape[0])[:, None]).squeeze(1)

        def __call__(self, x: torch.Tensor, class_idx: Any = None, retain_graph: bool = False, **kwargs: Any):
            (layer,) = self.target_layers
            training = self.model.training
            self.model.eval()
            try:
                with torch.inference_mode(False), torch.enable_grad():
                    x = x.detach().clone().requires_grad_(True)
                    logits = self.model(x, **kwargs)
                    activation = self.activations.pop(layer)
                    self.class_idx = logits.argmax(dim=1) if class_idx is None else class_idx
                    score = self.class_score(logits, self.class_idx)
                    (gradient,) = torch.autograd.grad(score.sum(), activation)
            finally:
                self.model.train(training)
            # Grad-CAM++ scales each image's map by exp(score): a per-image factor that the
            # normalisation to [0, 1] removes; 0 keeps it from overflowing for large logits
            self.score = torch.zeros((x.shape[0],) + (1,) * (activation.ndim - 1), device=x.device)
            return logits.detach(), (activation.detach(),), (gradient.detach(),)

        def remove(self) -> None:
            self._handle.remove()
            self.activations.clear()

    return Hooks


class SaliencyMaps:
    """Saliency maps of a classifier's images with ``monai.visualize``.

    Call it with images ``(B, C, *spatial)`` and the classes to explain ``(B,)``; it returns
    ``(B, 1, *spatial)`` maps in [0, 1] (see :func:`medexp.metrics.saliency.normalise`). Use it
    as a context manager, or call :meth:`close`, to take its hooks off the net.

    Args:
        model: a :class:`~medexp.tasks.classification.ClassificationTask`.
        method: ``gradcam``, ``gradcampp`` or ``occlusion``.
        layer: the Grad-CAM layer, a module name of ``model.net``; None: :func:`default_layer`.
        patch: occlusion: the side of the occluded patch in pixels; None: 1/8 of the image's
            smallest side (3D: 1/4), odd, at least 3.
        occlusion_mode: occlusion: ``gaussian``, ``mean_img`` or ``mean_patch`` (MONAI's modes).
        overlap: occlusion: overlap of neighbouring patches, in [0, 1).
        occlusion_batch: occlusion: occluded images per forward pass.

    Raises:
        MedexpError: an unknown method, or a layer that does not exist or has no feature map
            (listing the layers that do).
    """

    def __init__(
        self,
        model: Any,
        method: str = "gradcam",
        layer: str | None = None,
        patch: int | None = None,
        occlusion_mode: str = "gaussian",
        overlap: float = 0.6,
        occlusion_batch: int = 32,
    ) -> None:
        check_explainable(model)
        if method not in METHODS:
            raise MedexpError(f"method={method!r}; expected one of {list(METHODS)}")
        if occlusion_mode not in ("gaussian", "mean_img", "mean_patch"):
            raise MedexpError(f"occlusion.mode={occlusion_mode!r}; expected one of ['gaussian', 'mean_img', 'mean_patch']")
        if not 0.0 <= overlap < 1.0:
            raise MedexpError(f"occlusion.overlap={overlap}; expected a value in [0, 1)")
        if patch is not None and patch < 1:
            raise MedexpError(f"occlusion.patch={patch}; expected a positive number of pixels")
        self.model, self.net, self.method = model, model.net, method
        self.layer = layer
        self.patch, self.occlusion_mode, self.overlap = patch, occlusion_mode, overlap
        self.occlusion_batch = max(1, int(occlusion_batch))
        self.layer_shape: tuple[int, ...] | None = None
        self._cam: Any = None
        self._hooks: Any = None

    def describe(self) -> str:
        """The method and its layer (or patch), for logs."""
        if self.method == "occlusion":
            return f"{METHODS[self.method]} (patch {self.patch or 'auto'} px, {self.occlusion_mode})"
        if self.layer is None:
            return METHODS[self.method]
        kind = type(dict(self.net.named_modules())[self.layer]).__name__
        shape = "x".join(str(v) for v in self.layer_shape or ())
        return f"{METHODS[self.method]} on layer {self.layer} ({kind}, output {shape})"

    def prepare(self, example: torch.Tensor) -> None:
        """Pick and check the layer with one input ``(1, C, *spatial)``; the first call does it."""
        if self.method == "occlusion" or self._cam is not None:
            return
        shapes = feature_layers(self.net, example[:1])
        if self.layer is None:
            self.layer = default_layer(self.net, shapes)
        elif self.layer not in shapes:
            names = dict(self.net.named_modules())
            problem = "has no feature map output" if self.layer in names else "does not exist"
            raise MedexpError(
                f"layer={self.layer!r} {problem} in {type(self.net).__name__}; layers with a feature map "
                f"(names as in model.net, last one the default): {', '.join(shapes)}"
            )
        self.layer_shape = shapes[self.layer]
        from monai.visualize import GradCAM, GradCAMpp

        from medexp.metrics.saliency import normalise

        self._hooks = _hooks_class()(self.net, self.layer)
        cam = GradCAMpp if self.method == "gradcampp" else GradCAM
        self._cam = cam(nn_module=self._hooks, target_layers=self.layer, postprocessing=normalise)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, num_classes)`` class probabilities (the task's softmax or sigmoid)."""
        training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                return self.model.postprocess(self.net(images))
        finally:
            self.net.train(training)

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        from medexp.metrics.saliency import normalise

        classes = torch.as_tensor(classes, device=images.device).long().reshape(-1)
        if self.method == "occlusion":
            return normalise(self._occlusion(images, classes))
        self.prepare(images)
        return self._cam(images, class_idx=classes).float()

    def _occlusion(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        from monai.visualize import OcclusionSensitivity

        # 2D: 1/8 of the smallest side; 3D: 1/4, as the patches to try grow with the cube of the side
        side = min(images.shape[2:]) / (8 if images.ndim == 4 else 4)
        patch = self.patch or max(3, round(side) // 2 * 2 + 1)
        occlusion = OcclusionSensitivity(
            nn_module=self.net, mask_size=min(patch, *images.shape[2:]), n_batch=self.occlusion_batch,
            verbose=False, mode=self.occlusion_mode, overlap=self.overlap, activate=self.model.postprocess,
        )
        before = self.probabilities(images)
        maps = []
        training = self.net.training
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.filterwarnings("ignore", message=_MONAI_INDEXING, category=UserWarning)
                for image, cls, p in zip(images, classes, before):
                    occluded, _ = occlusion(image[None].as_subclass(torch.Tensor))
                    # the drop in the class's probability when the patch around a pixel is hidden
                    maps.append((p[cls] - occluded.as_tensor()[:, cls]).clamp_min(0)[:, None])
        finally:
            self.net.train(training)
        return torch.cat(maps)

    def close(self) -> None:
        """Take the hooks off the net."""
        if self._hooks is not None:
            self._hooks.remove()
        self._hooks = self._cam = None

    def __enter__(self) -> SaliencyMaps:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def explain_batch(
    maps: SaliencyMaps,
    images: torch.Tensor,
    class_index: int | None = None,
    steps: int = 20,
    baseline: str = "mean",
    random_reference: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Maps and mask-free scores of a batch: ``probabilities`` ``(B, num_classes)``,
    ``predicted`` and ``explained`` classes ``(B,)``, ``saliency`` ``(B, 1, *spatial)`` and,
    with ``steps`` > 0, ``deletion_auc`` and ``insertion_auc`` ``(B,)``, plus ``*_random`` for
    a random pixel order with ``random_reference`` (see
    :func:`medexp.metrics.saliency.deletion_insertion`)."""
    from medexp.metrics.saliency import deletion_insertion, random_maps

    probabilities = maps.probabilities(images)
    predicted = probabilities.argmax(dim=1)
    explained = predicted if class_index is None else torch.full_like(predicted, class_index)
    out = {"probabilities": probabilities, "predicted": predicted, "explained": explained}
    out["saliency"] = maps(images, explained)
    if steps > 0:
        scores = deletion_insertion(maps.probabilities, images, out["saliency"], explained, steps, baseline, generator)
        out.update(deletion_auc=scores["deletion_auc"], insertion_auc=scores["insertion_auc"])
        if random_reference:
            noise = random_maps(out["saliency"], generator)
            scores = deletion_insertion(maps.probabilities, images, noise, explained, steps, baseline, generator)
            out.update(deletion_auc_random=scores["deletion_auc"], insertion_auc_random=scores["insertion_auc"])
    return out


def mask_scores(saliency: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Pointing scores of one map ``(1, *spatial)`` against its mask ``(1, *spatial)`` (any
    value above 0 is lesion): ``pointing_mass``, ``mask_fraction``, ``pointing_lift``
    (``pointing_mass / mask_fraction``, 1 for a uniform map) and ``pointing_hit``; NaN where
    the mask has no lesion."""
    from medexp.metrics.saliency import mask_fraction, pointing_hit, pointing_mass

    s, m = saliency[None].float().cpu(), mask[None].cpu()
    mass, fraction = float(pointing_mass(s, m)[0]), float(mask_fraction(m)[0])
    return {
        "pointing_mass": mass,
        "mask_fraction": fraction,
        "pointing_lift": mass / fraction if fraction > 0 else float("nan"),
        "pointing_hit": float(pointing_hit(s, m)[0]),
    }


# --- pictures ---------------------------------------------------------------------------------


def _view(image: np.ndarray, saliency: np.ndarray, mask: np.ndarray | None):
    """2D views of ``(C, *spatial)``, ``(*spatial)``, ``(*spatial)``: 3D shows the slice (first
    axis) with the most saliency."""
    if saliency.ndim == 3:
        index = int(saliency.reshape(saliency.shape[0], -1).sum(axis=1).argmax())
        return image[:, index], saliency[index], None if mask is None else mask[index]
    return image, saliency, mask


def overlay_picture(
    image: torch.Tensor, saliency: torch.Tensor, mask: torch.Tensor | None = None, min_side: int = 192, alpha: float = 0.5
) -> np.ndarray:
    """``uint8`` RGB picture ``(H, 2 W + 4, 3)``: the image (scaled by its own range; grey, or
    RGB for 3 channels) next to it with the map in the ``jet`` colours blended over it (``alpha``),
    the mask's outline in green when given; enlarged (nearest) so the shorter side is at least
    ``min_side`` pixels.

    Args:
        image: ``(C, *spatial)``; saliency: ``(1, *spatial)`` in [0, 1]; mask: ``(1, *spatial)``.
    """
    from matplotlib import colormaps

    picture, heat, outline = _view(
        image.detach().float().cpu().numpy(),
        saliency.detach().float().cpu().numpy()[0],
        None if mask is None else (mask.detach().cpu().numpy()[0] > 0),
    )
    grey = picture[:3] if picture.shape[0] == 3 else picture[:1].repeat(3, axis=0)
    low, high = float(grey.min()), float(grey.max())
    grey = np.moveaxis((grey - low) / (high - low) if high > low else np.zeros_like(grey), 0, -1)
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    blended = (1 - alpha) * grey + alpha * colour
    if outline is not None and outline.any():
        edge = outline & ~_erode(outline)
        blended[edge] = (0.0, 1.0, 0.0)
    pad = np.ones((grey.shape[0], 4, 3))
    both = (np.concatenate([grey, pad, blended], axis=1) * 255).round().astype(np.uint8)
    scale = max(1, math.ceil(min_side / min(heat.shape)))
    return both.repeat(scale, axis=0).repeat(scale, axis=1)


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    out = padded[1:-1, 1:-1].copy()
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        out &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


# --- inputs -----------------------------------------------------------------------------------


@dataclass
class Batch:
    """What :func:`explain` gets per step: model inputs, their names, known labels, and per
    image the mask (``(1, *spatial)``, None when unknown) and how to bring a map into the mask's
    geometry."""

    names: list[str]
    images: torch.Tensor
    labels: list[str] | None = None
    masks: list[torch.Tensor | None] = field(default_factory=list)
    # per image: (1, *spatial) map in the model's space -> map in the mask's space
    to_mask_space: Any = None
    # per image: the mask in the model's space, for the picture's outline (None: not drawn)
    outlines: list[torch.Tensor | None] = field(default_factory=list)


def _label_text(label: torch.Tensor) -> str:
    return " ".join(str(int(v)) for v in label.reshape(-1)) if label.numel() > 1 else str(int(label))


def split_batches(datamodule: Any, split: str, batch_size: int, limit: int | None) -> Iterator[Batch]:
    """Batches of a split of the checkpoint's data, as its test loader prepares them; masks
    where the data serve ``mask`` of the images' size."""
    from torch.utils.data import DataLoader, Subset

    datamodule.setup("test")
    datasets = getattr(datamodule, "datasets", {})
    if split not in datasets:
        raise MedexpError(f"split={split}: the checkpoint's data ({type(datamodule).__name__}) has no {split} split")
    dataset = datasets[split]
    count = len(dataset) if limit is None else min(limit, len(dataset))
    loader = DataLoader(Subset(dataset, range(count)), batch_size=batch_size, shuffle=False)
    digits = len(str(max(count - 1, 1)))
    start = 0
    warned = False
    for batch in loader:
        images = batch["image"]
        n = images.shape[0]
        masks: list[torch.Tensor | None] = [None] * n
        if "mask" in batch:
            if tuple(batch["mask"].shape[2:]) == tuple(images.shape[2:]):
                masks = list(batch["mask"])
            elif not warned:
                log.warning("the %s masks (%s) do not match the images (%s); no mask scores", split,
                            tuple(batch["mask"].shape[2:]), tuple(images.shape[2:]))
                warned = True
        labels = [_label_text(label) for label in batch["label"]] if "label" in batch else None
        yield Batch(
            names=[f"{split}_{index:0{digits}d}" for index in range(start, start + n)],
            images=images.as_subclass(torch.Tensor) if hasattr(images, "as_tensor") else images,
            labels=labels,
            masks=masks,
            to_mask_space=lambda index, saliency: saliency,
            outlines=masks,
        )
        start += n


def mask_files(inputs: list[Path], spec: str, input_spec: str) -> list[Path | None]:
    """The mask file of each input named by ``mask=spec``: a column of the input CSV (empty cells:
    none; relative paths resolve against the CSV's folder), or a folder holding files named like
    the images (the same file name, or the same stem with any image extension).

    Raises:
        MedexpError: when ``spec`` is neither, or listed masks do not exist.
    """
    from medexp.data.files import _resolve, _stem
    from medexp.predict import _is_image

    source = Path(input_spec).expanduser()
    if source.is_file() and source.suffix.lower() == ".csv":
        with source.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            columns = [name.strip() for name in reader.fieldnames or []]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
        if spec in columns:
            base = source.absolute().parent
            found = [_resolve(base, row[spec]) if row[spec] else None for row in rows]
            missing = [str(path) for path in found if path is not None and not path.is_file()]
            if missing:
                raise MedexpError(f"mask={spec!r}: {len(missing)} listed mask(s) do not exist, e.g. {missing[:3]}")
            return found
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise MedexpError(
            f"mask={spec!r}: neither a folder of masks nor a column of the input CSV"
            + ("" if source.suffix.lower() == ".csv" else " (input is not a CSV file)")
        )
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and _is_image(path):
            by_stem.setdefault(_stem(path), []).append(path)
    found: list[Path | None] = []
    for image in inputs:
        candidates = by_stem.get(_stem(image), [])
        exact = [path for path in candidates if path.name == image.name]
        found.append((exact or candidates or [None])[0])
    return found


def file_batches(
    datamodule: Any, inputs: list[Path], masks: list[Path | None], batch_size: int, limit: int | None
) -> Iterator[Batch]:
    """Batches of image files prepared by ``predict_transform``; masks read as the images are
    (channel first, any channel above 0 is lesion) and scored in the file's geometry: the map
    goes back through the spatial transforms (``monai.transforms.Invertd``)."""
    from monai.data import DataLoader, Dataset, MetaTensor, decollate_batch
    from monai.transforms import Invertd, LoadImage

    if limit is not None:
        inputs, masks = inputs[:limit], masks[:limit]
    transform = datamodule.predict_transform()
    invert = Invertd(keys="saliency", transform=transform, orig_keys="image", nearest_interp=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
        read = LoadImage(image_only=True, ensure_channel_first=True)
    root = Path(os.path.commonpath([path.absolute().parent for path in inputs]))
    names = [str((path.absolute().parent / path.name).relative_to(root)) for path in inputs]
    loader = DataLoader(Dataset([{"image": str(path)} for path in inputs], transform), batch_size=batch_size)
    start = 0
    try:
        for batch in loader:
            images = batch["image"]
            n = images.shape[0]
            items = decollate_batch(images.detach().cpu())
            batch_masks = []
            outlines = []
            for mask_path in masks[start : start + n]:
                mask = None if mask_path is None else read(str(mask_path)).as_tensor().gt(0).any(dim=0, keepdim=True)
                batch_masks.append(mask)
                # the model's space of 2D files is transposed (see ArrayDataModule.predict_transform)
                view = None if mask is None else (mask.transpose(1, 2) if datamodule.spatial_dims == 2 else mask)
                outlines.append(view if view is not None and view.shape[1:] == images.shape[2:] else None)

            def to_mask_space(index: int, saliency: torch.Tensor, items=items) -> torch.Tensor:
                # Invertd takes the transforms to undo from `image`, given a MetaTensor to invert
                mapped = invert({"image": items[index], "saliency": MetaTensor(saliency.cpu())})["saliency"]
                return mapped.as_tensor()

            yield Batch(
                names=[names[k] for k in range(start, start + n)],
                images=images.as_tensor(),
                masks=batch_masks,
                to_mask_space=to_mask_space,
                outlines=outlines,
            )
            start += n
    except RuntimeError as exc:
        if "stack expects each tensor to be equal size" in str(exc):
            raise MedexpError(f"the inputs differ in size after data.transforms; use batch_size=1 ({exc})") from exc
        raise


# --- the command ------------------------------------------------------------------------------

SCORES = (
    "pointing_mass", "mask_fraction", "pointing_lift", "pointing_hit",
    "deletion_auc", "insertion_auc", "deletion_auc_random", "insertion_auc_random",
)
POINTING = ("pointing_mass", "mask_fraction", "pointing_lift", "pointing_hit")


def _check_options(cfg: DictConfig) -> None:
    if cfg.method not in METHODS:
        raise MedexpError(f"method={cfg.method!r}; expected one of {list(METHODS)}")
    if (cfg.input is None) == (cfg.split is None):
        raise MedexpError("give either input=<image file, folder, glob or CSV> or split=test|val (not both)")
    if cfg.split is not None and cfg.split not in SPLITS:
        raise MedexpError(f"split={cfg.split!r}; expected one of {list(SPLITS)}")
    if cfg.split is not None and cfg.mask is not None:
        raise MedexpError("mask= applies to input= files; split= uses the masks its data serve")
    from medexp.metrics.saliency import BASELINES

    if cfg.baseline not in BASELINES:
        raise MedexpError(f"baseline={cfg.baseline!r}; expected one of {list(BASELINES)}")
    if cfg.steps < 0:
        raise MedexpError(f"steps={cfg.steps}; expected 0 (no deletion/insertion curves) or more")
    if cfg.batch_size < 1:
        raise MedexpError(f"batch_size={cfg.batch_size}; expected a positive integer")
    if cfg.limit is not None and cfg.limit < 1:
        raise MedexpError(f"limit={cfg.limit}; expected a positive number of images or null (all)")
    if cfg.method == "occlusion" and cfg.layer is not None:
        log.warning("layer=%s is ignored: occlusion sensitivity has no layer", cfg.layer)


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(spec)
    except RuntimeError as exc:
        raise MedexpError(f"device={spec!r}; expected auto, cpu, cuda or cuda:<n>") from exc


def _text(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of the scores of ``rows`` (NaNs left out); the pointing scores over the images whose
    pointing mass is defined (a lesion in the mask and a map with mass), so ``mask_fraction``
    is the uniform map's pointing mass on the same images."""
    def mean(name: str, subset: Sequence[dict[str, Any]]) -> float | None:
        values = [row[name] for row in subset if isinstance(row.get(name), float) and not math.isnan(row[name])]
        return float(np.mean(values)) if values else None

    scored = [row for row in rows if isinstance(row.get("pointing_mass"), float) and not math.isnan(row["pointing_mass"])]
    means = {name: mean(name, scored if name in POINTING else rows) for name in SCORES}
    means["probability"] = mean("probability", rows)
    mass, fraction = means["pointing_mass"], means["mask_fraction"]
    return {
        "images": len(rows),
        "images_scored_with_mask": len(scored),
        "mean": means,
        "pointing_mass_over_uniform": mass / fraction if mass is not None and fraction else None,
    }


def explain(cfg: DictConfig) -> dict[str, Any]:
    """Explain ``cfg.ckpt_path``'s predictions on ``cfg.input`` files or ``cfg.split``; write
    overlays, ``saliency.csv`` and ``summary.json`` into ``cfg.output``.

    Returns:
        The contents of ``summary.json``.
    """
    from medexp.utils.config import check_config

    check_config(cfg)
    _check_options(cfg)

    from medexp.predict import find_inputs
    from medexp.utils.checkpoint import load_checkpoint, rebuild
    from medexp.utils.images import save_png
    from medexp.utils.runtime import tidy_library_output

    tidy_library_output()
    checkpoint = load_checkpoint(cfg.ckpt_path)
    inputs = find_inputs(str(cfg.input)) if cfg.input is not None else []
    masks = mask_files(inputs, str(cfg.mask), str(cfg.input)) if cfg.mask is not None else [None] * len(inputs)
    datamodule, model = rebuild(
        checkpoint, cfg.data, data_output_dir=None, model_overrides={"class_weights": None},
        allowed_targets=cfg.allowed_targets,
    )
    check_explainable(model)
    num_classes = int(model.num_classes)
    if cfg.class_index is not None and not 0 <= cfg.class_index < num_classes:
        raise MedexpError(f"class_index={cfg.class_index}; the model has classes 0..{num_classes - 1}")
    if cfg.mask is not None and not any(path is not None for path in masks):
        log.warning("mask=%s: no mask found for any of the %d input(s); no mask scores", cfg.mask, len(inputs))
    elif cfg.mask is not None and None in masks:
        log.warning("mask=%s: %d of %d input(s) have no mask", cfg.mask, masks.count(None), len(inputs))
    device = _device(str(cfg.device))
    model = model.to(device).eval()
    output = Path(cfg.output).expanduser()
    generator = torch.Generator().manual_seed(int(cfg.seed))
    batches = (
        split_batches(datamodule, cfg.split, cfg.batch_size, cfg.limit)
        if cfg.split is not None
        else file_batches(datamodule, inputs, masks, cfg.batch_size, cfg.limit)
    )
    occlusion = cfg.get("occlusion") or {}
    rows: list[dict[str, Any]] = []
    has_labels = False
    with SaliencyMaps(
        model, cfg.method, cfg.layer, patch=occlusion.get("patch"), occlusion_mode=occlusion.get("mode", "gaussian"),
        overlap=occlusion.get("overlap", 0.6), occlusion_batch=occlusion.get("batch_size", 32),
    ) as maps:
        for batch in batches:
            images = batch.images.to(device)
            if not rows:
                maps.prepare(images)
                default = cfg.layer is None and cfg.method != "occlusion"
                note = " (the net's last feature map; layer=<module name of model.net> picks another)" if default else ""
                log.info("explaining with %s%s", maps.describe(), note)
            out = explain_batch(maps, images, cfg.class_index, cfg.steps, cfg.baseline, cfg.random_reference, generator)
            probabilities = out["probabilities"].cpu()
            for k, name in enumerate(batch.names):
                predicted, explained = int(out["predicted"][k]), int(out["explained"][k])
                row: dict[str, Any] = {"image": name}
                if batch.labels is not None:
                    row["label"] = batch.labels[k]
                    has_labels = True
                row.update(
                    predicted_class=predicted,
                    probability=float(probabilities[k, predicted]),
                    explained_class=explained,
                    explained_probability=float(probabilities[k, explained]),
                )
                saliency = out["saliency"][k].cpu()
                mask = batch.masks[k] if batch.masks else None
                if mask is not None:
                    mapped = batch.to_mask_space(k, saliency)
                    if tuple(mapped.shape[1:]) != tuple(mask.shape[1:]):
                        raise MedexpError(
                            f"the mask of {name} has shape {tuple(mask.shape[1:])}; its image {tuple(mapped.shape[1:])}"
                        )
                    row.update(mask_scores(mapped, mask))
                for score in ("deletion_auc", "insertion_auc", "deletion_auc_random", "insertion_auc_random"):
                    if score in out:
                        row[score] = float(out[score][k])
                if cfg.overlays:
                    outline = batch.outlines[k] if batch.outlines else None
                    picture = overlay_picture(batch.images[k], saliency, outline)
                    path = save_png(picture, output / "overlays" / f"{_overlay_name(name)}.png")
                    row["overlay"] = str(path.relative_to(output))
                rows.append(row)
    if not rows:
        raise MedexpError("nothing to explain: no images")
    header = ["image", *(["label"] if has_labels else []), "predicted_class", "probability", "explained_class",
              "explained_probability", *(s for s in SCORES if any(s in row for row in rows)),
              *(["overlay"] if cfg.overlays else [])]
    output.mkdir(parents=True, exist_ok=True)
    table = output / "saliency.csv"
    with table.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows([[_text(row.get(column, float("nan"))) for column in header] for row in rows])
    summary = {
        "checkpoint": str(cfg.ckpt_path),
        "method": cfg.method,
        "layer": maps.layer if cfg.method != "occlusion" else None,
        "class_index": cfg.class_index,
        "source": f"split={cfg.split}" if cfg.split is not None else f"input={cfg.input}",
        "steps": cfg.steps,
        "baseline": cfg.baseline,
        **summarise(rows),
        "csv": str(table),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _log_summary(summary)
    log.info("saliency scores: %s", table)
    return summary


def _overlay_name(name: str) -> str:
    from medexp.data.files import _stem

    path = Path(name)
    return str(path.parent / _stem(path)) if path.suffix else name


def _log_summary(summary: dict[str, Any]) -> None:
    means = summary["mean"]

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    log.info("%d image(s) explained, mean probability of the predicted class %s", summary["images"], fmt(means["probability"]))
    if summary["images_scored_with_mask"]:
        log.info(
            "pointing mass %s inside the lesion masks vs %s for a uniform map (%.2fx) over %d image(s) with a lesion; "
            "pointing game %s",
            fmt(means["pointing_mass"]), fmt(means["mask_fraction"]), summary["pointing_mass_over_uniform"] or float("nan"),
            summary["images_scored_with_mask"], fmt(means["pointing_hit"]),
        )
    if means["deletion_auc"] is not None:
        log.info(
            "deletion AUC %s (random order %s, lower is better); insertion AUC %s (random order %s, higher is better)",
            fmt(means["deletion_auc"]), fmt(means["deletion_auc_random"]),
            fmt(means["insertion_auc"]), fmt(means["insertion_auc_random"]),
        )


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="explain")
def main(cfg: DictConfig) -> None:
    with user_errors():
        explain(cfg)


if __name__ == "__main__":
    main()
