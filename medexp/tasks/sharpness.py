"""Sharpness-aware minimisation (SAM; Foret et al., 2021), ``model.sam_rho``.

Each optimiser step takes its gradient at the weights moved a distance ``rho`` uphill, along the
batch's normalised gradient: the loss of the worst weights near the current ones, so the optimiser
is led to flat minima, which generalise better from few images. Any optimiser then steps with that
gradient from the unmoved weights. A step costs a second forward and backward pass of the batch.

The second pass is the first pass's training step run again (Lightning's closure): it feeds no
metrics and no training loss (:attr:`BaseTask.sharpness_pass`), and BatchNorm layers keep the
running statistics of the first pass. One norm is taken over every parameter the optimiser steps
(an ensemble's members together), as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from medexp.utils.errors import MedexpError


def check_rho(rho: object) -> float | None:
    """``model.sam_rho`` as a radius > 0, or None (off)."""
    if rho is None:
        return None
    if isinstance(rho, bool) or not isinstance(rho, int | float) or not 0 < rho < float("inf"):
        raise MedexpError(f"model.sam_rho={rho!r}; expected a radius > 0 (e.g. 0.05), or null for plain steps")
    return float(rho)


@contextmanager
def running_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Within it, BatchNorm layers in training mode normalise by the batch as usual but leave their
    running mean, variance and count as they were."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, count) in zip(norms, saved):
            norm.momentum = momentum
            if count is not None:
                norm.num_batches_tracked.copy_(count)


def sharpness_aware_closure(
    rho: float, module: Any, optimizer: torch.optim.Optimizer, closure: Callable[[], Any]
) -> Callable[[], Any]:
    """The closure an optimiser steps with under SAM: ``closure`` (forward, backward) at the
    weights ``w``, then again at ``w + rho * g / |g|``, leaving that second gradient on ``w``.
    Returns what the first pass returned (the step's loss). A gradient that is not finite (an
    overflow under mixed precision) is left as it is, for the optimiser's scaler to skip."""

    def step() -> Any:
        loss = closure()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            if not torch.isfinite(norm) or norm == 0:
                return loss
            weights = [p.detach().clone() for p in params]
            torch._foreach_add_(params, torch._foreach_mul([p.grad for p in params], rho / float(norm)))
        module.sharpness_pass = True
        try:
            with running_statistics_kept(module):
                closure()
        finally:
            module.sharpness_pass = False
            with torch.no_grad():
                torch._foreach_copy_(params, weights)
        return loss

    return step
