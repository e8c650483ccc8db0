"""A deep ensemble trained in one run: ``model.ensemble=K`` trains K copies of a task's network
side by side, on the same batches, each on its own loss, and evaluates the average of their
predicted probabilities (Lakshminarayanan et al., 2017).

The copies differ in their starting weights: copy 1..K-1 starts from the first one's initial
weights with every trainable tensor's values shuffled, a new draw from the same distribution
whatever the network's own initialisation (Kaiming, truncated normal, constants stay constant).
Weights that ``model.init_weights`` loaded are not shuffled: every copy starts from them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection

import torch
from torch import nn

from medexp.utils.errors import MedexpError

# how the members' outputs are averaged: their probabilities over dim 1 (softmax), each value's
# probability (sigmoid), or the outputs themselves (mean)
COMBINES = ("softmax", "sigmoid", "mean")


def check_members(members: object) -> int:
    """``model.ensemble`` as a number of networks >= 1."""
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise MedexpError(f"model.ensemble={members!r}; expected a number of networks >= 1 (1: no ensemble)")
    return members


@torch.no_grad()
def redraw(net: nn.Module, keep: Collection[str] = ()) -> None:
    """Shuffle the values of each trainable parameter of ``net`` whose name is not in ``keep``,
    in place (random with the global generator, so a seeded run draws the same)."""
    for name, parameter in net.named_parameters():
        if parameter.requires_grad and name not in keep and parameter.numel() > 1:
            flat = parameter.reshape(-1)
            parameter.copy_(flat[torch.randperm(flat.numel(), device=flat.device)].view_as(parameter))


class Ensemble(nn.Module):
    """K networks of the same architecture; in training mode the stacked outputs ``(K, B, ...)``
    (the task takes each member's loss), in evaluation mode their combination ``(B, ...)``, in
    the task's output space (logits), so everything downstream (probabilities, metrics, export)
    is unchanged.

    Args:
        net: the first member; the others are copies of it with redrawn weights (see :func:`redraw`).
        members: the number of networks, >= 2.
        combine: ``softmax``: the log of the members' mean class probabilities (over dim 1), whose
            softmax is that mean; ``sigmoid``: the logit of their mean probabilities; ``mean``:
            the mean output.
        keep: parameter names every member keeps as ``net`` has them (loaded weights).
    """

    def __init__(self, net: nn.Module, members: int, combine: str, keep: Collection[str] = ()) -> None:
        super().__init__()
        if check_members(members) < 2:
            raise MedexpError(f"model.ensemble={members}: an ensemble has 2 or more networks")
        if combine not in COMBINES:
            raise MedexpError(f"ensemble combine={combine!r}; expected one of {list(COMBINES)}")
        copies = [net]
        for _ in range(members - 1):
            member = copy.deepcopy(net)
            redraw(member, set(keep))
            copies.append(member)
        self.members = nn.ModuleList(copies)
        self.combine_kind = combine
        if hasattr(net, "extra_inputs"):
            self.extra_inputs = tuple(net.extra_inputs)

    def forward(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([member(x, **extra) for member in self.members])
        return outputs if self.training else self.combine(outputs)

    def combine(self, outputs: torch.Tensor) -> torch.Tensor:
        """The members' stacked outputs ``(K, B, ...)`` -> one output ``(B, ...)``."""
        if self.combine_kind == "softmax":
            return torch.logsumexp(outputs.float().log_softmax(dim=2), dim=0).to(outputs.dtype) - math.log(len(outputs))
        if self.combine_kind == "sigmoid":
            # logit(mean p) = log(mean p) - log(mean (1 - p)), both in log space
            logits = outputs.float()
            positive = torch.logsumexp(nn.functional.logsigmoid(logits), dim=0)
            negative = torch.logsumexp(nn.functional.logsigmoid(-logits), dim=0)
            return (positive - negative).to(outputs.dtype)
        return outputs.mean(dim=0)
