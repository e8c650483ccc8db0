"""Measures of a registration: the Jacobian determinant of a displacement field and its folding,
per-pair image similarity and mask overlap, and their average over an epoch.

Displacement fields (DDFs) are ``(B, D, *spatial)`` in voxels, channel ``d`` the displacement
along spatial axis ``d``, as MONAI's ``Warp`` takes them: the warped image at ``x`` is the moving
image sampled at ``x + ddf(x)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """The determinant of the Jacobian of the transform ``x -> x + ddf(x)``.

    Derivatives are finite differences (central inside, one-sided at the borders), in voxels.
    A determinant at or below 0 means the transform folds space over itself there.

    Args:
        ddf: ``(B, D, *spatial)`` displacements in voxels, ``D`` = 2 or 3 spatial dims.

    Returns:
        ``(B, *spatial)`` determinants (1 everywhere for a zero field).
    """
    dims = ddf.shape[1]
    if ddf.ndim != dims + 2 or dims not in (2, 3):
        raise ValueError(
            f"expected a (B, D, *spatial) field with D = 2 or 3 spatial dims, got shape {tuple(ddf.shape)}"
        )
    # gradients[i][:, j] = d ddf_j / d x_i; every spatial axis needs 2 voxels for a difference
    gradients = torch.gradient(ddf.float(), dim=tuple(range(2, ddf.ndim)))
    # (B, *spatial, j, i): row j of the Jacobian holds the derivatives of component j
    jacobian = torch.stack(gradients, dim=-1).movedim(1, -2)
    return torch.linalg.det(jacobian + torch.eye(dims, device=ddf.device))


def folding_fraction(ddf: torch.Tensor) -> torch.Tensor:
    """``(B, D, *spatial)`` displacements -> ``(B,)`` share of voxels whose Jacobian determinant
    is at or below 0 (folded), in [0, 1]."""
    det = jacobian_determinant(ddf)
    return (det <= 0).flatten(1).float().mean(dim=1)


def pair_ncc(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Global normalised cross-correlation (Pearson's r over all voxels) of each pair.

    Args:
        a, b: ``(B, C, *spatial)`` images.

    Returns:
        ``(B,)`` values in [-1, 1]; 0 where an image is constant (no correlation to measure).
    """
    a = a.flatten(1).float()
    b = b.flatten(1).float()
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def pair_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` images -> ``(B,)`` mean squared difference of each pair."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def pair_dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dice overlap of each pair of binary masks.

    Args:
        a, b: ``(B, 1, *spatial)`` masks, foreground where nonzero.

    Returns:
        ``(B,)`` values in [0, 1]; NaN where both masks are empty (nothing to align: such pairs
        are left out of the average, see :class:`PairMean`).
    """
    a = a.flatten(1) > 0
    b = b.flatten(1) > 0
    both = (a & b).sum(dim=1).float()
    total = (a.sum(dim=1) + b.sum(dim=1)).float()
    return torch.where(total > 0, 2 * both / total.clamp(min=1), torch.full_like(total, float("nan")))


class PairMean(Metric):
    """The mean of per-pair values over an epoch, NaN values left out; NaN when no pair counted
    (e.g. Dice on data without masks), without the warning torchmetrics' ``MeanMetric`` gives.

    Input: ``(B,)`` values of one batch.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().flatten().to(torch.float64)
        kept = values[~values.isnan()]
        self.total += kept.sum().to(self.total.device)
        self.count += kept.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(float("nan"))
