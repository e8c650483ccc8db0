"""Saliency maps of classifiers (MONAI's Grad-CAM, Grad-CAM++, occlusion sensitivity; attention
rollout of vision transformers), their scores against lesion masks, and pictures of them; used by ``medexp explain`` and the
:class:`~medexp.callbacks.saliency.SaliencyWatch` callback."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from medexp.utils.errors import MedexpError

METHODS = {
    "gradcam": "Grad-CAM",
    "gradcampp": "Grad-CAM++",
    "occlusion": "occlusion sensitivity",
    "attention": "attention rollout",
}
# methods without a layer to pick
LAYERLESS = ("occlusion", "attention")
# MONAI's occlusion sensitivity indexes with lists, which torch >= 2.8 warns about on every call
_MONAI_INDEXING = r"Using a non-tuple sequence for multidimensional indexing"


def check_explainable(model: Any) -> None:
    """Refuse models whose maps :class:`SaliencyMaps` cannot make: a task that does not declare
    itself ``explainable`` (classifiers do), or a net that takes more than one image.

    Raises:
        MedexpError: naming the model's kind and what is supported.
    """
    if not getattr(model, "explainable", False):  # what its task declares
        kind = type(model).__name__
        raise MedexpError(
            f"medexp explain explains classifiers (ClassificationTask); this checkpoint holds a {kind}. "
            "Segmentation models already show where they look: medexp predict writes their masks"
        )
    extra = model.extra_inputs
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


def attention_blocks(net: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The self-attention blocks of a MONAI vision transformer (``SABlock``, in forward order)
    and its patch embedding (``PatchEmbeddingBlock``).

    Raises:
        MedexpError: for a net without them or without a class token (what rollout reads).
    """
    from monai.networks.blocks.patchembedding import PatchEmbeddingBlock
    from monai.networks.blocks.selfattention import SABlock

    blocks = [module for module in net.modules() if isinstance(module, SABlock)]
    embedding = next((module for module in net.modules() if isinstance(module, PatchEmbeddingBlock)), None)
    if not blocks or embedding is None or not hasattr(net, "cls_token"):
        raise MedexpError(
            f"method=attention needs a vision transformer with a class token (model=vit); {type(net).__name__} "
            "has none: use method=gradcam or method=occlusion"
        )
    if any(getattr(block, "use_flash_attention", False) for block in blocks):
        raise MedexpError(
            f"method=attention: {type(net).__name__} uses flash attention, which keeps no attention weights; "
            "set model.net.use_flash_attention=false"
        )
    return blocks, embedding


def attention_rollout(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema 2020) of a ViT: the attention of each block averaged
    over its heads, plus the identity for the residual connection (``0.5 A + 0.5 I``, rows
    normalised), multiplied through the blocks; the class token's row, over the patches, is
    how much each patch flows into the token the classifier reads. It is the same map for
    every class (the attention does not depend on the class explained).

    Args:
        net: a MONAI ``ViT`` with ``classification=True`` (its class token first).
        images: ``(B, C, *spatial)``.

    Returns:
        ``(B, 1, *spatial)`` maps, upsampled (bi/trilinear) from the patch grid, not normalised.
    """
    import torch.nn.functional as F

    blocks, embedding = attention_blocks(net)
    saved = [block.save_attn for block in blocks]
    training = net.training
    try:
        for block in blocks:
            block.save_attn = True
        net.eval()
        with torch.no_grad():
            net(images)
        matrices = [block.att_mat for block in blocks]
    finally:
        net.train(training)
        for block, flag in zip(blocks, saved, strict=True):
            block.save_attn = flag
            block.att_mat = torch.Tensor()
    tokens = matrices[0].shape[-1]
    identity = torch.eye(tokens, device=images.device)
    rollout = identity.expand(images.shape[0], tokens, tokens)
    for attention in matrices:
        mixed = 0.5 * attention.float().mean(dim=1) + 0.5 * identity
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    spatial = images.shape[2:]
    kernel = getattr(getattr(embedding, "patch_embeddings", None), "kernel_size", None)
    if kernel is None:  # perceptron patches: the same size on every axis
        side = round((math.prod(spatial) / (tokens - 1)) ** (1 / len(spatial)))
        kernel = (side,) * len(spatial)
    grid = [size // patch for size, patch in zip(spatial, kernel, strict=True)]
    if math.prod(grid) != tokens - 1:
        raise MedexpError(
            f"method=attention: {tokens - 1} patch tokens do not fit a {'x'.join(map(str, grid))} grid of "
            f"{'x'.join(map(str, spatial))} images"
        )
    maps = rollout[:, 0, 1:].reshape(images.shape[0], 1, *grid)
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    return F.interpolate(maps, size=tuple(spatial), mode=mode, align_corners=False)


class SaliencyMaps:
    """Saliency maps of a classifier's images with ``monai.visualize``.

    Call it with images ``(B, C, *spatial)`` and the classes to explain ``(B,)``; it returns
    ``(B, 1, *spatial)`` maps in [0, 1] (see :func:`medexp.metrics.saliency.normalise`). Use it
    as a context manager, or call :meth:`close`, to take its hooks off the net.

    Args:
        model: a :class:`~medexp.tasks.classification.ClassificationTask`.
        method: ``gradcam``, ``gradcampp``, ``occlusion`` or ``attention`` (attention rollout
            of a vision transformer, :func:`attention_rollout`; the same map for every class).
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
            raise MedexpError(
                f"occlusion.mode={occlusion_mode!r}; expected one of ['gaussian', 'mean_img', 'mean_patch']"
            )
        if not 0.0 <= overlap < 1.0:
            raise MedexpError(f"occlusion.overlap={overlap}; expected a value in [0, 1)")
        members = model.hparams.get("ensemble", 1)
        if members > 1 and method != "occlusion":
            raise MedexpError(
                f"method={method} reads one network's layers or attention, and this model averages {members} "
                "(model.ensemble); method=occlusion explains the ensemble's prediction as a whole"
            )
        if patch is not None and patch < 1:
            raise MedexpError(f"occlusion.patch={patch}; expected a positive number of pixels")
        self.model, self.net, self.method = model, model.net, method
        self.layer = layer
        self.patch, self.occlusion_mode, self.overlap = patch, occlusion_mode, overlap
        self.occlusion_batch = max(1, int(occlusion_batch))
        if method == "attention":
            attention_blocks(self.net)  # refuses nets without attention weights to read
        self.layer_shape: tuple[int, ...] | None = None
        self._cam: Any = None
        self._hooks: Any = None

    def describe(self) -> str:
        """The method and its layer (or patch), for logs."""
        if self.method == "occlusion":
            return f"{METHODS[self.method]} (patch {self.patch or 'auto'} px, {self.occlusion_mode})"
        if self.method == "attention":
            return f"{METHODS[self.method]} over {len(attention_blocks(self.net)[0])} attention blocks"
        if self.layer is None:
            return METHODS[self.method]
        kind = type(dict(self.net.named_modules())[self.layer]).__name__
        shape = "x".join(str(v) for v in self.layer_shape or ())
        return f"{METHODS[self.method]} on layer {self.layer} ({kind}, output {shape})"

    def prepare(self, example: torch.Tensor) -> None:
        """Pick and check the layer with one input ``(1, C, *spatial)``; the first call does it."""
        if self.method in LAYERLESS or self._cam is not None:
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
        if self.method == "attention":
            return normalise(attention_rollout(self.net, images))
        self.prepare(images)
        return self._cam(images, class_idx=classes).float()

    def _occlusion(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        from monai.visualize import OcclusionSensitivity

        # 2D: 1/8 of the smallest side; 3D: 1/4, as the patches to try grow with the cube of the side
        side = min(images.shape[2:]) / (8 if images.ndim == 4 else 4)
        patch = self.patch or max(3, round(side) // 2 * 2 + 1)
        occlusion = OcclusionSensitivity(
            nn_module=self.net,
            mask_size=min(patch, *images.shape[2:]),
            n_batch=self.occlusion_batch,
            verbose=False,
            mode=self.occlusion_mode,
            overlap=self.overlap,
            activate=self.model.postprocess,
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
    image: torch.Tensor,
    saliency: torch.Tensor,
    mask: torch.Tensor | None = None,
    min_side: int = 192,
    alpha: float = 0.5,
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
