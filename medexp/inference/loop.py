"""The one loop that runs a model over data: batches of a split or of files, with the net's
extra inputs, on a device (or the trainer's device and precision), up to a batch limit; and the
sampled passes of ``uncertainty=mc_dropout|tta`` (:class:`Sampled`)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn

from medexp.utils.errors import MedexpError

# uncertainty=...: Monte Carlo dropout (dropout layers kept stochastic, `samples` passes) or
# test-time augmentation (every combination of flips along the spatial axes)
UNCERTAINTY = ("mc_dropout", "tta")


def batch_limit(trainer: Any, split: str, loader: Any) -> int | None:
    """How many batches of ``split`` the trainer's own loop evaluates (``limit_test_batches``)."""
    if trainer is None:
        return None
    stage = {"test": "test", "val": "val"}[split]
    counted = getattr(trainer, f"num_{stage}_batches", None)
    if trainer.world_size == 1 and counted:
        return int(counted[0])
    limit = getattr(trainer, f"limit_{stage}_batches", 1.0)
    if isinstance(limit, int):
        return limit
    if limit is None or float(limit) >= 1.0:
        return None
    return max(1, int(len(loader) * float(limit)))


def batches(loader: Any, limit: int | None = None) -> Iterator[Any]:
    """The first ``limit`` batches of ``loader`` (None: all of them)."""
    for index, batch in enumerate(loader):
        if limit is not None and index >= limit:
            return
        yield batch


def file_loader(items: Sequence[dict[str, Any]], transform: Any, batch_size: int, num_workers: int = 0) -> Any:
    """Batches of the files of ``items`` (``{"image": path}`` or a pair's ``{"fixed", "moving"}``),
    each prepared by ``transform`` (a data module's ``predict_transform()``), in order."""
    from monai.data import DataLoader, Dataset

    return DataLoader(Dataset(list(items), transform), batch_size=batch_size, num_workers=num_workers)


def split_loader(datamodule: Any, split: str, batch_size: int, limit: int | None = None) -> Any:
    """Batches of the first ``limit`` samples (None: all) of ``split`` of ``datamodule``, as its
    test loader prepares them, in order.

    Raises:
        MedexpError: when the data module has no such split.
    """
    from torch.utils.data import DataLoader, Subset

    datamodule.setup("test")
    datasets = getattr(datamodule, "datasets", {})
    if split not in datasets:
        raise MedexpError(f"split={split}: the checkpoint's data ({type(datamodule).__name__}) has no {split} split")
    dataset = datasets[split]
    count = len(dataset) if limit is None else min(limit, len(dataset))
    return DataLoader(Subset(dataset, range(count)), batch_size=batch_size, shuffle=False)


def prediction_pass(
    trainer: Any,
    model: Any,
    loader: Any,
    max_batches: int | None,
    visit: Callable[[Any, Any, dict[str, Any]], None],
    device: torch.device | None = None,
) -> None:
    """Run ``model`` over ``loader`` as its test step does (``prepare_batch``, ``infer`` with the
    net's extra inputs and ``postprocess``, under the trainer's precision, on the trainer's device
    (else ``device``, else the model's), in eval mode, no gradients) and call ``visit(outputs,
    probabilities, batch)`` for each of the first ``max_batches`` batches (None: all). The model
    goes back to its device and mode afterwards."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    device = trainer.strategy.root_device if trainer is not None else device or model.device
    precision = trainer.precision_plugin if trainer is not None else None
    context = precision.test_step_context if precision is not None else contextlib.nullcontext
    convert = precision.convert_input if precision is not None else (lambda data: data)  # e.g. 16-true: half inputs
    original_device, was_training = model.device, model.training
    model.to(device).eval()
    model.on_test_epoch_start()  # e.g. the seed of evaluation randomness
    try:
        with torch.no_grad():
            for batch in batches(loader, max_batches):
                batch = model.prepare_batch(move_data_to_device(convert(batch), device), "test")
                with context():
                    outputs = model.infer(batch[model.input_key], **model.net_extras(batch))
                    probs = model.postprocess(outputs)
                visit(outputs, probs, batch)
    finally:
        model.to(original_device)
        model.train(was_training)


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    """The dropout layers of ``model`` that drop something (probability above 0)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def flip_combinations(spatial_dims: int) -> list[tuple[int, ...]]:
    """The axes of ``(B, C, *spatial)`` batches that test-time augmentation flips, every
    combination of the spatial axes including none: 4 for images, 8 for volumes."""
    axes = range(2, 2 + spatial_dims)
    return [combo for k in range(spatial_dims + 1) for combo in itertools.combinations(axes, k)]


class Sampled(L.LightningModule):
    """A classifier predicting over several passes per batch: :meth:`predict_step` returns the
    probabilities of every pass, ``(passes, B, num_classes)``.

    ``mc_dropout``: the model in evaluation mode (BatchNorm uses its running statistics) except
    its dropout layers, which keep dropping; ``samples`` passes, drawn from torch's global random
    state (seed it for repeatable results). ``tta``: one pass per combination of flips along the
    spatial axes (:func:`flip_combinations`); ``samples`` does not apply.

    Raises:
        MedexpError: for a model whose task does not sample its predictions (not a classifier,
            see ``sampled_predictions``), a sequence model, or mc_dropout without dropout layers.
    """

    def __init__(self, model: Any, method: str, samples: int) -> None:
        if not getattr(model, "sampled_predictions", False):
            raise MedexpError(
                f"uncertainty={method}: supported for classifiers only; this checkpoint's model is a "
                f"{type(model).__name__} (predict without uncertainty=...)"
            )
        if model.extra_inputs:
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
