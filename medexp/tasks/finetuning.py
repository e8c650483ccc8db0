"""Fine-tuning controls of every task: frozen weights, unfreezing at an epoch, and a learning-rate
factor for the weights loaded by ``model.init_weights`` (see :mod:`medexp.checkpoints.weights`).

- ``model.freeze``: name patterns (``fnmatch``) of the network's parameters that do not train, e.g.
  ``[layer1.*, layer2.*]``; ``loaded`` stands for every weight ``init_weights`` loaded. Norm layers
  whose parameters are all frozen keep their running statistics too (they stay in eval mode), as a
  frozen backbone should.
- ``model.unfreeze_at_epoch``: from this epoch on everything trains (Lightning's
  ``BackboneFinetuning`` does the same with a callback). The frozen weights stay in the optimiser
  all along without gradients (optimisers skip them), so a run resumed after that epoch finds the
  optimiser state it saved.
- ``model.pretrained_lr_scale``: the loaded weights train at this factor of the learning rate (a
  second parameter group), e.g. 0.1; schedulers scale both groups alike.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medexp.checkpoints.weights import LOADED
from medexp.utils.errors import MedexpError

log = logging.getLogger("medexp")


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """What is wrong with the fine-tuning settings of a resolved run config, before anything is
    built (the patterns are checked against the net once it is)."""
    model = config.get("model") or {}
    freeze, unfreeze, scale = (
        model.get("freeze") or [],
        model.get("unfreeze_at_epoch"),
        model.get("pretrained_lr_scale"),
    )
    init = model.get("init_weights") or {}
    loads = isinstance(init, Mapping) and bool(init.get("path"))
    problems = []
    try:
        from medexp.checkpoints.weights import options

        options(init)
    except MedexpError as exc:
        problems.append(str(exc))
    path = init.get("path") if isinstance(init, Mapping) else None
    if path and not Path(str(path)).expanduser().exists():
        problems.append(f"model.init_weights.path={str(path)!r}: no such file or directory")
    if isinstance(freeze, str) or not all(isinstance(p, str) for p in freeze):
        problems.append(
            f"model.freeze={freeze!r}: expected a list of parameter name patterns, e.g. [layer1.*] or [loaded]"
        )
    elif LOADED in freeze and not loads:
        problems.append(
            "model.freeze names `loaded`, the weights model.init_weights loads, and model.init_weights.path is null"
        )
    if unfreeze is not None:
        if isinstance(unfreeze, bool) or not isinstance(unfreeze, int) or unfreeze < 1:
            problems.append(f"model.unfreeze_at_epoch={unfreeze!r}: expected an epoch >= 1, or null")
        elif not freeze:
            problems.append("model.unfreeze_at_epoch is set and model.freeze is empty: nothing to unfreeze")
        strategy = str((config.get("trainer") or {}).get("strategy") or "")
        if "ddp" in strategy or "fsdp" in strategy:
            problems.append(
                f"model.unfreeze_at_epoch with trainer.strategy={strategy}: DDP synchronises only the parameters that "
                "train when it starts; freeze without unfreezing, or train on one device"
            )
    if scale is not None and scale != 1:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
            problems.append(f"model.pretrained_lr_scale={scale!r}: expected a number >= 0 (1: the same learning rate)")
        elif not loads:
            problems.append(
                f"model.pretrained_lr_scale={scale}: it scales the learning rate of the weights model.init_weights "
                "loads, and model.init_weights.path is null"
            )
    return problems


class Finetuning:
    """The frozen parameters of a task's network and its parameter groups.

    Args:
        net: the task's network.
        loaded: the state names ``init_weights`` loaded into it (parameters and buffers).
        freeze: name patterns of the parameters to freeze; ``loaded`` for all loaded ones.
        unfreeze_at_epoch: the epoch from which everything trains (None: never).
        pretrained_lr_scale: the learning-rate factor of the loaded parameters.

    Raises:
        MedexpError: for a pattern that names no parameter of the net.
    """

    def __init__(
        self,
        net: nn.Module,
        loaded: Sequence[str] = (),
        freeze: Sequence[str] | None = (),
        unfreeze_at_epoch: int | None = None,
        pretrained_lr_scale: float | None = 1.0,
    ) -> None:
        self.net = net
        names = [name for name, _ in net.named_parameters()]
        self.loaded = [name for name in names if name in set(loaded)]
        self.frozen: list[str] = []
        for pattern in freeze or []:
            chosen = self.loaded if pattern == LOADED else [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not chosen:
                raise MedexpError(
                    f"model.freeze: {pattern!r} names no parameter of {type(net).__name__}; its parameters are e.g. "
                    f"{names[:4]}"
                )
            self.frozen += [name for name in chosen if name not in self.frozen]
        if names and len(self.frozen) == len(names):
            raise MedexpError(
                f"model.freeze={list(freeze or [])} freezes every parameter of {type(net).__name__}: nothing would train; "
                "leave its head out, e.g. with model.init_weights.exclude for the head and model.freeze=[loaded]"
            )
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.lr_scale = 1.0 if pretrained_lr_scale is None else float(pretrained_lr_scale)
        self._set_trainable(False)
        if self.frozen:
            log.info("model.freeze: %d of %d parameter tensors frozen", len(self.frozen), len(names))

    def _set_trainable(self, trainable: bool) -> None:
        parameters = dict(self.net.named_parameters())
        for name in self.frozen:
            parameters[name].requires_grad_(trainable)

    def frozen_norms(self) -> list[nn.Module]:
        """Norm layers with running statistics whose parameters are all frozen."""
        frozen = set(self.frozen)
        norms = []
        for prefix, module in self.net.named_modules():
            own = [f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters(recurse=False)]
            if isinstance(module, nn.modules.batchnorm._NormBase) and own and all(n in frozen for n in own):
                norms.append(module)
        return norms

    def on_train_epoch_start(self, epoch: int) -> None:
        """Unfreeze from ``unfreeze_at_epoch`` on; until then keep frozen norm layers in eval mode."""
        if not self.frozen:
            return
        if self.unfreeze_at_epoch is not None and epoch >= self.unfreeze_at_epoch:
            self._set_trainable(True)
            log.info("epoch %d: model.unfreeze_at_epoch, %d parameter tensors unfrozen", epoch, len(self.frozen))
            self.frozen = []
            return
        for module in self.frozen_norms():
            module.eval()

    def groups(self, module: nn.Module, prefix: str = "net.") -> Any:
        """``module``'s parameters as the optimiser takes them: all together, or with a
        ``pretrained_lr_scale`` (and loaded weights) the loaded ones in a second group."""
        if self.lr_scale == 1.0 or not self.loaded:
            return module.parameters()
        loaded = {prefix + name for name in self.loaded}
        named = list(module.named_parameters())
        return [
            {"params": [p for n, p in named if n not in loaded]},
            {"params": [p for n, p in named if n in loaded], "lr_scale": self.lr_scale},
        ]

    @staticmethod
    def scale_groups(optimizer: torch.optim.Optimizer) -> None:
        """Multiply the learning rate of the groups marked with an ``lr_scale`` by it (before a
        scheduler records the initial rates)."""
        for group in optimizer.param_groups:
            if "lr_scale" in group:
                group["lr"] = group["lr"] * group["lr_scale"]
