"""Overlay pictures of a fixed set of validation cases: image, truth and prediction."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch

from medexp.utils.loggers import send_picture


def middle_slice(volume: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 2D view of a ``(*spatial)`` array: itself in 2D; in 3D the slice (first axis) with the
    most foreground in ``mask``, or the middle one when there is none."""
    if volume.ndim == 2:
        return volume, mask
    area = mask.reshape(mask.shape[0], -1).sum(axis=1)
    index = int(area.argmax()) if area.any() else volume.shape[0] // 2
    return volume[index], mask[index]


class SegmentationOverlays(L.Callback):
    """Every ``every_n_epochs`` validation epochs, draw the first ``num_cases`` validation cases
    (always the same ones) with the true mask (green outline) and the prediction (red), save the
    grid as ``<run>/overlays/epoch_<n>.png`` and send it to the loggers: TensorBoard, a local
    MLflow store, and, only with ``remote_images`` (``logger.log_images=true``), remote loggers
    such as wandb or an MLflow server (see :mod:`medexp.utils.privacy`).

    Acts on segmentation tasks only; for other tasks it does nothing.

    Args:
        remote_images: send the pictures, which show patients' images, to remote loggers too.
    """

    def __init__(
        self, num_cases: int = 4, every_n_epochs: int = 1, dirname: str = "overlays", remote_images: bool = False
    ) -> None:
        if num_cases < 1 or every_n_epochs < 1:
            raise ValueError(f"num_cases and every_n_epochs should be >= 1, got {num_cases}, {every_n_epochs}.")
        self.num_cases = num_cases
        self.every_n_epochs = every_n_epochs
        self.dirname = dirname
        self.remote_images = remote_images
        self._withheld_noted = False

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            not getattr(pl_module, "pixel_classes", False)  # a task predicting a class per pixel
            or trainer.sanity_checking
            or not trainer.is_global_zero
            or trainer.current_epoch % self.every_n_epochs
        ):
            return
        dataset = trainer.datamodule.datasets["val"]
        cases = [dataset[i] for i in range(min(self.num_cases, len(dataset)))]
        images = torch.stack([case["image"] for case in cases]).to(pl_module.device)
        with torch.no_grad():
            predictions = pl_module.infer(images).argmax(dim=1).cpu().numpy()
        figure = self._draw(images.cpu().numpy(), [case["label"][0].numpy() for case in cases], predictions)
        path = Path(trainer.default_root_dir) / self.dirname / f"epoch_{trainer.current_epoch:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        import matplotlib.pyplot as plt

        plt.close(figure)
        self._withheld_noted = send_picture(trainer, "val/overlays", path, self.remote_images, self._withheld_noted)

    @staticmethod
    def _draw(images: np.ndarray, truths: list[np.ndarray], predictions: np.ndarray):
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on training machines
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, len(truths), figsize=(3 * len(truths), 3.2), squeeze=False)
        for axis, image, truth, prediction in zip(axes[0], images, truths, predictions):
            picture, truth_2d = middle_slice(image[0], truth)
            prediction_2d, _ = middle_slice(prediction, truth)
            axis.imshow(picture, cmap="gray")
            axis.imshow(np.ma.masked_equal(prediction_2d, 0), cmap="autumn", alpha=0.5, interpolation="nearest")
            if truth_2d.any():
                axis.contour(truth_2d > 0, levels=[0.5], colors="lime", linewidths=1)
            axis.set_axis_off()
        axes[0][0].set_title("truth: green outline, prediction: red", fontsize=8, loc="left")
        figure.tight_layout()
        return figure
