"""Calibration of classifiers: expected calibration error, NLL and temperature scaling.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) divides a
classifier's logits by one scalar ``T`` fitted on held-out data: ``T > 1`` softens an
overconfident model, ``T < 1`` sharpens an underconfident one. Accuracy is unchanged (the argmax
is), and so are binary and per-label AUROCs (a monotone map of each score).

``medexp train model.calibrate=true`` fits ``T`` on the validation split of the best checkpoint
(:func:`calibrate_checkpoint`), writes it into ``checkpoints/best.ckpt`` (the
:class:`~medexp.tasks.classification.ClassificationTask` buffer ``temperature``) and records the
fit under ``calibration`` in ``metrics.json``; testing, ``medexp eval`` and ``medexp predict`` then
use the calibrated probabilities.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("medexp")

N_BINS = 15
# the range a fitted temperature is kept in (a degenerate validation set must not give 0 or inf)
T_RANGE = (1e-2, 1e2)
# where a checkpoint records the fit (besides the temperature in its state_dict)
CALIBRATION_KEY = "medexp_calibration"


def probabilities(logits: torch.Tensor, task: str, temperature: float = 1.0) -> torch.Tensor:
    """``(N, C)`` logits -> probabilities of ``logits / temperature`` (sigmoid for multi-label)."""
    scaled = logits.float() / temperature
    return scaled.sigmoid() if task == "multilabel" else scaled.softmax(dim=1)


def nll(
    logits: torch.Tensor, targets: torch.Tensor, task: str, temperature: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Mean negative log-likelihood of the targets under ``logits / temperature``: cross-entropy,
    or for multi-label tasks binary cross-entropy averaged over samples and labels."""
    scaled = logits / temperature
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(scaled, targets.to(scaled.dtype))
    return F.cross_entropy(scaled, targets.long())


def ece(probs: torch.Tensor, targets: torch.Tensor, task: str, n_bins: int = N_BINS) -> float:
    """Expected calibration error (L1, ``n_bins`` equal-width bins) with torchmetrics.

    Binary and multi-class: *top-label* ECE (``MulticlassCalibrationError``: the confidence of the
    predicted class against whether it is right). Multi-label: the mean over labels of each
    label's ECE (``BinaryCalibrationError``: the probability of the label against its presence).
    """
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    probs, targets = probs.float().cpu(), targets.cpu()
    if task == "multilabel":
        values = [
            binary_calibration_error(probs[:, k].contiguous(), targets[:, k].long().contiguous(), n_bins=n_bins)
            for k in range(probs.shape[1])
        ]
        return float(torch.stack(values).mean())
    return float(multiclass_calibration_error(probs, targets.long(), probs.shape[1], n_bins=n_bins))


def reliability_bins(
    probs: torch.Tensor, targets: torch.Tensor, task: str, n_bins: int = N_BINS
) -> dict[str, list[float]]:
    """The reliability diagram behind :func:`ece`: per equal-width confidence bin, the mean
    confidence, the accuracy (the fraction of positives for multi-label) and the count.

    Binned as torchmetrics bins (``bucketize(..., right=True) - 1``), except that a confidence of
    exactly 1, which torchmetrics keeps in a bin of its own, is shown in the last bin.
    Multi-label: every (sample, label) probability, pooled.
    """
    probs, targets = probs.float().cpu(), targets.cpu()
    if task == "multilabel":
        confidence, correct = probs.flatten(), targets.flatten().float()
    else:
        confidence, predicted = probs.max(dim=1)
        correct = predicted.eq(targets.long()).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins).scatter_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros(n_bins).scatter_add_(0, index, confidence)
    acc_sum = torch.zeros(n_bins).scatter_add_(0, index, correct)
    nonzero = count.clamp(min=1)
    return {
        "edges": edges.tolist(),
        "confidence": [float(v) if n else float("nan") for v, n in zip(conf_sum / nonzero, count)],
        "accuracy": [float(v) if n else float("nan") for v, n in zip(acc_sum / nonzero, count)],
        "count": [int(n) for n in count],
    }


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, task: str, max_iter: int = 100) -> float:
    """The temperature minimising the NLL of ``logits / T`` on ``targets``: LBFGS (strong Wolfe
    line search) on ``log T`` from ``T = 1``, in float64 on the CPU; kept in :data:`T_RANGE`.
    Returns 1 when the fit does not lower the NLL (e.g. a single class in ``targets``)."""
    logits = logits.detach().double().cpu()
    targets = targets.detach().cpu()
    targets = targets.double() if task == "multilabel" else targets.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-12
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nll(logits, targets, task, log_t.exp())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_t.detach().exp().clamp(*T_RANGE))
    if not torch.isfinite(torch.tensor(temperature)):
        return 1.0
    with torch.no_grad():
        if nll(logits, targets, task, temperature) > nll(logits, targets, task, 1.0):
            return 1.0
    return temperature


def collect_logits(trainer: Any, model: Any, loader: Any, max_batches: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A classifier's ``(N, C)`` logits (before its temperature) and targets over ``loader``."""
    logits, _, targets, _ = collect_classification(trainer, model, loader, max_batches)
    return logits, targets


def collect_classification(
    trainer: Any, model: Any, loader: Any, max_batches: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Logits, probabilities, targets and, where batches carry them, site indices ``(N,)``."""
    logits, probs, targets, sites = [], [], [], []

    def visit(outputs: torch.Tensor, p: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        logits.append(outputs.float().cpu())
        probs.append(p.float().cpu())
        targets.append(batch[model.target_key].cpu())
        if "site" in batch:
            sites.append(batch["site"].cpu())

    from medexp.inference.loop import prediction_pass

    prediction_pass(trainer, model, loader, max_batches, visit)
    return torch.cat(logits), torch.cat(probs), torch.cat(targets), torch.cat(sites) if sites else None


def calibration_record(logits: torch.Tensor, targets: torch.Tensor, task: str, temperature: float) -> dict[str, float]:
    """ECE and NLL of ``logits`` before (``T = 1``) and after temperature scaling."""
    with torch.no_grad():
        return {
            "temperature": float(temperature),
            "nll_before": float(nll(logits.double(), targets, task, 1.0)),
            "nll_after": float(nll(logits.double(), targets, task, temperature)),
            "ece_before": ece(probabilities(logits, task), targets, task),
            "ece_after": ece(probabilities(logits, task, temperature), targets, task),
        }


def calibrate_checkpoint(
    trainer: Any, model: Any, datamodule: Any, ckpt_path: str | Path | None, key_env: str | None = None
) -> dict[str, Any]:
    """Fit ``model``'s temperature on the validation split with the weights of ``ckpt_path``,
    set it in ``model`` and write it into the checkpoint file (its ``state_dict`` and, as a
    record of the fit, :data:`CALIBRATION_KEY`).

    Every process computes the same temperature from the whole validation split; the global rank
    zero writes the file, the others wait for it.

    Returns:
        ``{"split": "val", "n", "temperature", "nll_before", "nll_after", "ece_before",
        "ece_after", "ece_kind", "n_bins"}``.
    """
    from medexp.inference.loop import batch_limit

    task = model.task
    if ckpt_path:
        from medexp.checkpoints.checkpoint import Checkpoint

        checkpoint = Checkpoint(ckpt_path).contents  # decrypted when the run encrypts them
        state = dict(checkpoint["state_dict"])
        state["temperature"] = torch.ones(())
        model.load_state_dict(state)
    else:
        log.warning("model.calibrate: no best checkpoint was saved; calibrating the current weights, stored nowhere")
        model.temperature.fill_(1.0)
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    # the validation batches the trainer uses (fewer with trainer.limit_val_batches)
    logits, targets = collect_logits(trainer, model, loader, batch_limit(trainer, "val", loader))
    temperature = fit_temperature(logits, targets, task)
    record = {
        "split": "val",
        "n": int(len(targets)),
        **calibration_record(logits, targets, task, temperature),
        "ece_kind": ECE_KIND[task],
        "n_bins": N_BINS,
    }
    model.temperature.fill_(temperature)
    if temperature in T_RANGE:
        log.warning(
            "model.calibrate: the temperature reached its bound (%g): on the validation split the scores carry "
            "little information (or the model is far from calibrated); check the model before trusting it",
            temperature,
        )
    log.info(
        "temperature scaling on the validation split: T=%.4g, NLL %.4f -> %.4f, ECE %.4f -> %.4f",
        temperature,
        record["nll_before"],
        record["nll_after"],
        record["ece_before"],
        record["ece_after"],
    )
    if ckpt_path:
        if trainer is None or trainer.is_global_zero:
            checkpoint["state_dict"]["temperature"] = torch.tensor(temperature, dtype=torch.float32)
            checkpoint[CALIBRATION_KEY] = record
            from medexp.privacy.encryption import save_torch

            # through a temporary file; sealed again with the run's key (encryption.key_env)
            save_torch(checkpoint, ckpt_path, key_env)
        if trainer is not None and trainer.world_size > 1:
            trainer.strategy.barrier("medexp-calibration")
    return record


ECE_KIND = {
    "binary": "top-label",
    "multiclass": "top-label",
    "multilabel": "per-label mean",
}
