"""Saliency maps of a fixed watch-list of validation images during training: where does the
classifier look, and does that move onto the lesions as it learns?"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch

from medexp.utils.loggers import send_picture

log = logging.getLogger("medexp")


def _validation_dataset(trainer: L.Trainer) -> Any:
    datasets = getattr(trainer.datamodule, "datasets", None) if trainer.datamodule is not None else None
    if isinstance(datasets, dict) and "val" in datasets:
        return datasets["val"]
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    return getattr(loader, "dataset", None)


class SaliencyWatch(L.Callback):
    """Every ``every_n_epochs`` validation epochs (None: never, the default in
    ``conf/callbacks/default.yaml``), compute the saliency maps (:class:`medexp.explain.SaliencyMaps`)
    of the first ``num_images`` validation images (always the same ones), save them over the
    images as ``<run>/saliency/epoch_<n>.png`` and send the picture to the loggers: TensorBoard, a
    local MLflow store, and, only with ``remote_images`` (``logger.log_images=true``), remote
    loggers such as wandb or an MLflow server (see :mod:`medexp.utils.privacy`).

    Where the validation samples carry lesion masks (``sample["mask"]``, e.g. synthetic data),
    it logs ``val/saliency_in_mask``, the mean share of the maps' mass inside the masks over the
    watched images with a lesion (:func:`medexp.metrics.saliency.pointing_mass`), and
    ``val/saliency_in_mask_lift``, that mean over the mean mask area fraction (what a uniform
    map would score): 1 means the maps know nothing of the lesions.

    Acts on classification tasks only (nets that take one image); for other tasks it does nothing.
    Turn it on with ``callbacks.saliency_watch.every_n_epochs=1`` (or 5, ...).

    Args:
        num_images: validation images watched (the first ones).
        every_n_epochs: how often; None or 0: never.
        method: ``gradcam``, ``gradcampp`` or ``occlusion`` (slow: one forward pass per patch).
        layer: the Grad-CAM layer (a module name of ``model.net``); None: the net's last feature map.
        class_index: the class whose map is drawn; None: each image's predicted class.
        remote_images: send the pictures, which show patients' images, to remote loggers too.
    """

    # what callbacks may monitor (see medexp.utils.validation.check_monitors)
    logged_metrics = ("val/saliency_in_mask", "val/saliency_in_mask_lift")

    def __init__(
        self,
        num_images: int = 8,
        every_n_epochs: int | None = None,
        method: str = "gradcam",
        layer: str | None = None,
        class_index: int | None = None,
        dirname: str = "saliency",
        remote_images: bool = False,
    ) -> None:
        from medexp.explainability.maps import METHODS

        if num_images < 1 or (every_n_epochs is not None and every_n_epochs < 0):
            raise ValueError(
                f"num_images should be >= 1 and every_n_epochs >= 0 or None, got {num_images}, {every_n_epochs}."
            )
        if method not in METHODS:
            raise ValueError(f"method should be one of {list(METHODS)}, got {method!r}.")
        self.num_images, self.every_n_epochs = num_images, every_n_epochs
        self.method, self.layer, self.class_index = method, layer, class_index
        self.dirname, self.remote_images = dirname, remote_images
        self._withheld_noted = False
        self._described = False

    def _due(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        return (
            bool(self.every_n_epochs)
            and getattr(pl_module, "explainable", False)
            and not pl_module.extra_inputs
            and not trainer.sanity_checking
            and trainer.state.fn == "fit"
            and trainer.is_global_zero
            and trainer.current_epoch % self.every_n_epochs == 0
        )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer, pl_module):
            return
        from medexp.explainability.maps import SaliencyMaps, mask_scores

        dataset = _validation_dataset(trainer)
        if dataset is None or len(dataset) == 0:
            return
        with torch.inference_mode(False):
            cases = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
            images = torch.stack([torch.as_tensor(case["image"]).clone() for case in cases]).to(pl_module.device)
            with SaliencyMaps(pl_module, self.method, self.layer) as maps:
                probabilities = maps.probabilities(images)
                predicted = probabilities.argmax(dim=1)
                explained = predicted if self.class_index is None else torch.full_like(predicted, self.class_index)
                saliency = maps(images, explained).cpu()
                if not self._described:
                    log.info("saliency watch: %s, %d validation images", maps.describe(), len(cases))
                    self._described = True
        masks = [case.get("mask") for case in cases]
        masks = [m if m is not None and tuple(m.shape[1:]) == tuple(images.shape[2:]) else None for m in masks]
        scores = [mask_scores(s, m) if m is not None and bool((m > 0).any()) else None for s, m in zip(saliency, masks)]
        scored = [s for s in scores if s is not None and not math.isnan(s["pointing_mass"])]
        if scored:
            mass = sum(s["pointing_mass"] for s in scored) / len(scored)
            fraction = sum(s["mask_fraction"] for s in scored) / len(scored)
            pl_module.log("val/saliency_in_mask", mass, rank_zero_only=True)
            pl_module.log("val/saliency_in_mask_lift", mass / fraction, rank_zero_only=True)
        titles = []
        for case, p, e, score in zip(cases, probabilities.cpu(), explained.cpu(), scores):
            label = case.get("label")
            text = f"label {_label(label)}, " if label is not None else ""
            text += f"class {int(e)}: p={float(p[e]):.2f}"
            if score is not None and not math.isnan(score["pointing_mass"]):
                text += f", in lesion {score['pointing_mass']:.2f}"
            titles.append(text)
        path = Path(trainer.default_root_dir) / self.dirname / f"epoch_{trainer.current_epoch:03d}.png"
        self._draw(images.cpu(), saliency, masks, titles, path)
        self._withheld_noted = send_picture(trainer, "val/saliency", path, self.remote_images, self._withheld_noted)

    @staticmethod
    def _draw(images: torch.Tensor, saliency: torch.Tensor, masks: list, titles: list[str], path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on training machines
        import matplotlib.pyplot as plt

        from medexp.explainability.maps import overlay_picture

        columns = 2 if len(titles) > 1 else 1
        rows = math.ceil(len(titles) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 2.8 * rows), squeeze=False)
        for axis in axes.flat:
            axis.set_axis_off()
        for axis, image, smap, mask, title in zip(axes.flat, images, saliency, masks, titles):
            axis.imshow(overlay_picture(image, smap, mask, min_side=96))
            axis.set_title(title, fontsize=8)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        plt.close(figure)


def _label(label: Any) -> str:
    label = torch.as_tensor(label)
    return " ".join(str(int(v)) for v in label.reshape(-1)) if label.numel() > 1 else str(int(label))
