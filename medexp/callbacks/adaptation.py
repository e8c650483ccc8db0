"""Test-time adaptation: BatchNorm statistics re-estimated on the test images, per site.

A network trained on one scanner's images normalises every BatchNorm layer's input with the
training images' statistics. On another scanner (other contrast, brightness, noise) those
statistics are off, and so are the features after them. Re-estimating them on the unlabelled
test images of each domain (AdaBN, Li et al. 2016; Schneider et al. 2020) undoes much of the
shift without labels or gradient steps.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medexp.utils.errors import MedexpError

log = logging.getLogger("medexp")


def batchnorm_layers(module: nn.Module) -> dict[str, _BatchNorm]:
    """The BatchNorm layers of ``module`` that keep running statistics, by module name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


class _Statistics:
    """Per-domain running sums of one BatchNorm layer's input, in float64 on the layer's
    device: ``(K, C)`` sums and sums of squares, ``(K,)`` values per channel and samples."""

    KEYS = ("total", "squares", "count", "samples")

    def __init__(self, domains: int, layer: _BatchNorm) -> None:
        device = layer.running_mean.device
        self.total = torch.zeros(domains, layer.num_features, dtype=torch.float64, device=device)
        self.squares = torch.zeros_like(self.total)
        self.count = torch.zeros(domains, dtype=torch.float64, device=device)
        self.samples = torch.zeros_like(self.count)

    def add(self, domain: int, x: torch.Tensor) -> None:
        """Add ``x`` ``(B, C, *spatial)`` (or ``(B, C)``) of one domain."""
        values = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        self.total[domain] += values.sum(dim=1)
        self.squares[domain] += values.square().sum(dim=1)
        self.count[domain] += values.shape[1]
        self.samples[domain] += len(x)

    def mean_var(self, domain: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The domain's mean and unbiased variance per channel (as BatchNorm's running
        statistics), or None without at least two values."""
        n = self.count[domain]
        if n < 2:
            return None
        mean = self.total[domain] / n
        var = ((self.squares[domain] - n * mean.square()) / (n - 1)).clamp_min(0)
        return mean, var


class BatchNormAdaptation(L.Callback):
    """Before testing, re-estimate the net's BatchNorm statistics on the test images (no labels
    are read), one set per site where batches carry each sample's ``site`` (the task's
    ``current_sites``, see :class:`~medexp.tasks.classification.ClassificationTask`), one for the
    whole test split otherwise.

    The estimate is one pass over the test split (the trainer's test batches) in eval mode: each
    BatchNorm layer adds each domain's inputs to that domain's running mean and variance, then
    normalises them with it, so deeper layers see features normalised as they will be when
    tested. The checkpoint's statistics (``running_mean``, ``running_var``) are never changed:
    the adapted ones apply through forward hooks in eval mode during the test, and again inside
    :meth:`applied` (the evaluation report after the test uses it, so it scores the model that
    was tested). A domain without test images keeps the checkpoint's statistics.

    Off by default; ``callbacks.bn_adapt.enabled=true`` turns it on. Under DDP the sums are
    added over processes, so all of them use the same statistics.

    Args:
        enabled: adapt before every test.
        per_site: one set of statistics per site (when the batches name sites); False: one for
            the whole test split.

    Attributes:
        domains: the last test's domains (site names, or ``["test split"]``).
        counts: the test images of each domain that the statistics were estimated on.

    Raises:
        MedexpError: when enabled and the net has no BatchNorm layers (nothing to adapt), or with
            ``per_site`` when a layer's batch is not one row per sample (e.g. the frames of a
            sequence model), so sites cannot be told apart.
    """

    def __init__(self, enabled: bool = False, per_site: bool = True) -> None:
        self.enabled, self.per_site = enabled, per_site
        self._handles: list[Any] = []
        self._statistics: dict[str, _Statistics] = {}
        self._estimating = False
        self.domains: list[str] = []
        self.counts: list[int] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled and not batchnorm_layers(pl_module):
            net = type(getattr(pl_module, "net", pl_module)).__name__
            raise MedexpError(
                f"callbacks.bn_adapt.enabled=true, but the net ({net}) has no BatchNorm layers with running statistics; "
                "nothing to adapt: choose a net with BatchNorm (e.g. model=cnn, resnet18) or set it to false"
            )

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()
        self._statistics = {}
        if self.enabled:
            self.adapt(trainer, pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the model leaves the test with the checkpoint's statistics; applied() brings the adapted ones back
        self._remove_hooks()

    @contextlib.contextmanager
    def applied(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Evaluate ``pl_module`` with the last test's adapted statistics (none: unchanged)."""
        if not self._statistics or self._handles:
            yield
            return
        self._install(pl_module)
        try:
            yield
        finally:
            self._remove_hooks()

    def adapt(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Estimate the statistics on the trainer's test batches and install the hooks."""
        from medexp.inference.loop import batch_limit, prediction_pass

        names = getattr(pl_module, "site_names", None) if self.per_site else None
        self.domains = list(names) if names else ["test split"]
        self._statistics = {
            name: _Statistics(len(self.domains), layer) for name, layer in batchnorm_layers(pl_module).items()
        }
        self._install(pl_module)
        loaders = trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        self._estimating = True
        try:
            prediction_pass(trainer, pl_module, loader, batch_limit(trainer, "test", loader), lambda *_: None)
        finally:
            self._estimating = False
        if trainer.world_size > 1:
            for statistics in self._statistics.values():
                for key in statistics.KEYS:
                    setattr(statistics, key, trainer.strategy.reduce(getattr(statistics, key), reduce_op="sum"))
        # the first layer sees one row per image (later ones may see more, e.g. a sequence's frames)
        self.counts = [int(n) for n in next(iter(self._statistics.values())).samples.tolist()]
        log.info(
            "bn_adapt: BatchNorm statistics of %d layers re-estimated on the test images (%s)",
            len(self._statistics),
            ", ".join(f"{name}: {n}" for name, n in zip(self.domains, self.counts)),
        )

    def statistics(self, layer: str, domain: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The adapted mean and variance ``(C,)`` of BatchNorm layer ``layer`` (a module name of
        the LightningModule) for ``domain`` (an index of :attr:`domains`), or None."""
        return self._statistics[layer].mean_var(domain) if layer in self._statistics else None

    def _install(self, pl_module: L.LightningModule) -> None:
        layers = batchnorm_layers(pl_module)
        self._handles = [layers[name].register_forward_hook(self._hook(name, pl_module)) for name in self._statistics]

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _domains(self, pl_module: L.LightningModule, rows: int) -> torch.Tensor | None:
        """The domain of each row of a layer's input, or None for one domain."""
        sites = getattr(pl_module, "current_sites", None) if len(self.domains) > 1 else None
        if sites is None:
            return None
        if len(sites) != rows:
            raise MedexpError(
                f"callbacks.bn_adapt.per_site=true: a BatchNorm layer sees {rows} rows for {len(sites)} samples (e.g. "
                "the frames of a sequence model), so sites cannot be told apart; set callbacks.bn_adapt.per_site=false"
            )
        return sites

    def _hook(self, name: str, pl_module: L.LightningModule) -> Any:
        def hook(layer: _BatchNorm, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            if layer.training:
                return None  # training normalises with batch statistics: nothing to replace
            x = args[0]
            statistics = self._statistics[name]
            sites = self._domains(pl_module, len(x))
            result = output.clone()
            for key in [0] if sites is None else sites.unique().tolist():
                rows = slice(None) if sites is None else sites == key
                if self._estimating:
                    statistics.add(key, x[rows])
                found = statistics.mean_var(key)
                if found is not None:
                    mean, var = (value.to(x.dtype) for value in found)
                    result[rows] = F.batch_norm(x[rows], mean, var, layer.weight, layer.bias, False, 0.0, layer.eps)
            return result

        return hook
