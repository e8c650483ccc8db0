"""The LightningModule base shared by every task: optimiser wiring, per-stage metrics, one step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection, MinMetric

from medexp.nets.ensemble import Ensemble, check_members
from medexp.tasks.finetuning import Finetuning
from medexp.tasks.sharpness import check_rho, sharpness_aware_closure
from medexp.utils.config import metric_mode
from medexp.utils.errors import MedexpError

log = logging.getLogger(__name__)


class OutputSelection:
    """A forward hook that replaces a net's output by one of its parts: ``output[which]`` of a
    tuple or list (an index), or of a dict (a key). One place for every net that returns more
    than the task uses, rather than a wrapper per model (which would rename its weights).

    Raises:
        MedexpError: when the output has no such part, naming ``model.select_output`` and the
            parts there are.
    """

    def __init__(self, which: int | str) -> None:
        if isinstance(which, bool) or not isinstance(which, int | str):
            raise MedexpError(
                f"model.select_output={which!r}; expected an index (of a tuple output), a key (of a dict output) or null"
            )
        self.which = which

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        name, which = type(module).__name__, self.which
        if isinstance(output, dict):
            if which not in output:
                raise MedexpError(f"model.select_output={which!r}; {name} returns a dict with keys {sorted(output)}")
            return output[which]
        if isinstance(output, tuple | list):
            if not isinstance(which, int) or not -len(output) <= which < len(output):
                raise MedexpError(
                    f"model.select_output={which!r}; {name} returns {len(output)} outputs: an index in 0..{len(output) - 1}"
                )
            return output[which]
        raise MedexpError(
            f"model.select_output={which!r}, but {name} returns one {type(output).__name__}; set model.select_output=null"
        )


class BaseTask(L.LightningModule):
    """Base of all tasks.

    Subclasses implement :meth:`configure_metrics`, :meth:`compute_loss` and
    :meth:`postprocess`, and may override :meth:`prepare_batch` (derive inputs/targets),
    :meth:`batch_loss` and :meth:`update_metrics`; the train/val/test steps are one :meth:`_shared_step`. Metrics are
    accumulated over an epoch and logged as ``<stage>/<name>``, plus ``<monitor>_best``.

    Args:
        net: the network; ``net(batch[input_key])`` gives the outputs the loss expects.
        optimizer: a partial optimiser (Hydra ``_partial_: true``), called with the parameters.
        scheduler: a partial LR scheduler called with the optimiser, or None; stepped per epoch.
        monitor: the validation metric that selects checkpoints and drives ReduceLROnPlateau.
        init_weights: weights the net starts from (``model.init_weights``, see
            :mod:`medexp.checkpoints.weights`); None or no ``path``: its own initialisation.
        freeze, unfreeze_at_epoch, pretrained_lr_scale: fine-tuning controls (see
            :mod:`medexp.tasks.finetuning`).
        compile: ``torch.compile`` the net in place when training starts (true, or its options);
            evaluation of a rebuilt model runs uncompiled.
        channels_last: keep the net's weights and its 4D/5D inputs in channels-last memory format.
        select_output: which of the net's outputs the task uses, for nets that return several
            (MONAI's ``ViT`` returns ``(logits, hidden_states)``): an index of a tuple or list, or
            a key of a dict; None: the output as it is. Applied by a forward hook on the net
            (:class:`OutputSelection`), so every caller of the net gets that tensor: the steps,
            sliding windows, saliency maps and exports.
        ensemble: train this many copies of the net side by side, each on its own loss, and
            evaluate the mean of their probabilities (:class:`medexp.nets.ensemble.Ensemble`);
            1: one net. Tasks that say how to average their outputs (:attr:`ensemble_combine`)
            take it.
        sam_rho: sharpness-aware minimisation: every step's gradient is taken at the weights moved
            this far uphill (:mod:`medexp.tasks.sharpness`), at twice the cost of a step; None: off.
    """

    input_key = "image"
    target_key = "label"
    # the data property the net's outputs must equal (checked before anything is built)
    net_outputs = "num_classes"
    # constructor arguments that are objects built from the config (nets, losses, optimisers):
    # rebuilt from the run config stored in checkpoints, never pickled into their hyperparameters
    injected = ("net", "loss", "optimizer", "scheduler")
    # the seed of the randomness of validation and test (e.g. a denoiser's input noise, a GAN's
    # latent codes), so every evaluation draws the same and its metrics are deterministic
    eval_seed = 12345
    # values (predictions) pending before the metrics are fed (see :meth:`feed_metrics`)
    metric_chunk = 2**20
    # a task that generates images from random codes names the model overrides that rebuild it
    # for generating alone (see Checkpoint.build_generator); None: it does not generate
    generator_overrides: dict[str, Any] | None = None
    # a task whose net's features can measure images (FID/KID of generated ones, see
    # medexp.metrics.domain): a classifier
    measures_features = False

    # What the task can do besides training. Commands, reports and callbacks ask these (never
    # the task's class), so a new task type declares them here rather than editing each command.
    # How `medexp predict` writes predictions (medexp.inference.writers.prediction_writer):
    # "table" (class probabilities per image), "masks", "boxes", "registration"; None: it does
    # not predict, for the reason `not_predicted` ("{name}": the class, "{ckpt}": the checkpoint)
    prediction_writer: str | None = None
    not_predicted = "medexp predict does not write the predictions of a {name}"
    # what one prediction reads: "images" (a file each) or "pairs" (a CSV of fixed and moving)
    prediction_inputs = "images"
    # uncertainty=mc_dropout|tta: class probabilities averaged over several passes
    sampled_predictions = False
    # the evaluation report (medexp.reports.evaluation): "classification", "segmentation",
    # "detection"; None: no report
    report_kind: str | None = None
    # `medexp export`: None where the prediction (`postprocess(infer(x))`) exports as one graph,
    # else why not ("{name}": the class, "{target}": the recorded model target, "{supported}":
    # what exports); instances may refuse more (:meth:`export_problem`)
    not_exported: str | None = "cannot export a {name}; exportable: {supported}"
    # the prediction is a class probability per pixel (voxel) rather than per image
    pixel_classes = False
    # saliency maps of its predictions (medexp explain, callbacks.saliency)
    explainable = False
    # how model.ensemble averages its members' outputs (medexp.nets.ensemble.COMBINES: "softmax"
    # over dim 1, "sigmoid", "mean"); None: the task takes no ensemble
    ensemble_combine: str | None = None

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/loss",
        init_weights: dict[str, Any] | None = None,
        freeze: list[str] | None = None,
        unfreeze_at_epoch: int | None = None,
        pretrained_lr_scale: float | None = 1.0,
        compile: bool | dict[str, Any] = False,
        channels_last: bool = False,
        select_output: int | str | None = None,
        ensemble: int = 1,
        sam_rho: float | None = None,
    ) -> None:
        if not isinstance(compile, bool | dict) and not hasattr(compile, "keys"):
            raise MedexpError(f"model.compile={compile!r}; expected true, false or the options of torch.compile")
        super().__init__()
        self.save_hyperparameters(ignore=list(self.injected), logger=False)
        self.net = net
        if select_output is not None:
            net.register_forward_hook(OutputSelection(select_output))
        # what model.init_weights loaded (run_info.json records it), then the frozen parameters
        self.init_report: dict[str, Any] | None = None
        if init_weights and init_weights.get("path"):
            from medexp.checkpoints.weights import load_initial_weights

            self.init_report = load_initial_weights(net, init_weights)
        loaded = self.init_report["loaded"] if self.init_report else []
        if check_members(ensemble) > 1:
            if self.ensemble_combine is None:
                raise MedexpError(
                    f"model.ensemble={ensemble}: a {type(self).__name__} does not average several networks; "
                    "set model.ensemble=1 (ensembles: classifiers and segmenters)"
                )
            net = self.net = Ensemble(net, ensemble, self.ensemble_combine, keep=loaded)
            loaded = [f"members.{k}.{name}" for k in range(ensemble) for name in loaded]
        self.finetuning = Finetuning(net, loaded, freeze, unfreeze_at_epoch, pretrained_lr_scale)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.sam_rho = check_rho(sam_rho)
        # true during SAM's second pass of a step, whose loss and outputs are not the step's
        self.sharpness_pass = False
        self.channels_last = channels_last
        if channels_last:
            # 4D weights (2D convolutions) channels-last, 5D ones (3D) channels-last-3D
            for tensor in [*net.parameters(), *net.buffers()]:
                if tensor.ndim in (4, 5):
                    layout = torch.channels_last if tensor.ndim == 4 else torch.channels_last_3d
                    tensor.data = tensor.data.contiguous(memory_format=layout)
        metrics = self.configure_metrics()
        valid = sorted(["val/loss", *(f"val/{name}" for name in metrics)])
        if monitor not in valid:
            raise MedexpError(f"model.monitor={monitor!r}; {type(self).__name__} logs {valid}")
        self.monitor = monitor
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # no NaN check: it would wait for the GPU every step; a non-finite training loss is
        # medexp.callbacks.faults.FaultTolerance's to stop (a NaN mean is reported as it is)
        self.train_loss, self.val_loss, self.test_loss = (MeanMetric(nan_strategy="disable") for _ in range(3))
        self.monitor_best = MaxMetric() if metric_mode(monitor) == "max" else MinMetric()
        # kept in checkpoints so a resumed run continues the same best value
        self.monitor_best.persistent(True)
        self._eval_rng: torch.Generator | None = None
        # per stage's metric prefix: the collection and its (predictions, targets) not yet fed
        self._pending: dict[str, tuple[MetricCollection, list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def configure_metrics(self) -> MetricCollection:
        """The metrics of one stage, keyed by name (cloned with ``train/``, ``val/``, ``test/``)."""
        raise NotImplementedError

    def logged_metrics(self) -> list[str]:
        """What callbacks may monitor (checked before training, see
        :func:`medexp.utils.validation.check_monitors`): each epoch's ``train/`` and ``val/``
        loss and metrics, and ``<monitor>_best``."""
        return sorted(
            {"train/loss", "val/loss", *self.train_metrics.keys(), *self.val_metrics.keys(), f"{self.monitor}_best"}
        )

    def compute_loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training objective for a batch of network outputs."""
        raise NotImplementedError

    def postprocess(self, outputs: torch.Tensor) -> torch.Tensor:
        """Network outputs -> predictions the metrics take (e.g. probabilities)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim in (4, 5):
            x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
        return self.net(x, **extra)

    def on_fit_start(self) -> None:
        if self.sam_rho is not None and not self.automatic_optimization:
            raise MedexpError(
                f"model.sam_rho={self.sam_rho}: a {type(self).__name__} steps its own optimisers, which SAM does "
                "not wrap; set model.sam_rho=null"
            )
        if self.sam_rho is not None and self.trainer.accumulate_grad_batches != 1:
            raise MedexpError(
                f"model.sam_rho={self.sam_rho} with trainer.accumulate_grad_batches="
                f"{self.trainer.accumulate_grad_batches}: SAM moves the weights by each batch's own gradient; "
                "set trainer.accumulate_grad_batches=1 (or model.sam_rho=null)"
            )
        # after the callbacks' setup (an EMA copies the net uncompiled), before the first step
        options = self.hparams.get("compile")
        if options:
            options = {} if options is True else dict(options)
            self.net.compile(**options)
            log.info(
                "model.compile: %s compiled with torch.compile(%s)",
                type(self.net).__name__,
                ", ".join(f"{k}={v!r}" for k, v in options.items()),
            )

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """The batch entries the net takes besides its input (its ``extra_inputs``, e.g. a
        sequence model's ``length`` and ``time``); empty for a net of single images."""
        return tuple(getattr(self.net, "extra_inputs", ()))

    def net_extras(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch entries of :attr:`extra_inputs` present in ``batch``."""
        return {key: batch[key] for key in self.extra_inputs if key in batch}

    def export_problem(self) -> str | None:
        """Why this model (its net, its options) cannot be exported although its task can
        (``"{supported}"``: what exports), or None."""
        if self.extra_inputs:
            return (
                f"cannot export {type(self.net).__name__}: a sequence model that takes {list(self.extra_inputs)} "
                "besides the images (series of frames over time); exportable: single-image {supported}"
            )
        return None

    def eval_rng(self, device: torch.device) -> torch.Generator:
        """The random generator of evaluation on ``device``: seeded with :attr:`eval_seed` at the
        start of every validation and test epoch."""
        if self._eval_rng is None or self._eval_rng.device != device:
            self._eval_rng = torch.Generator(device=device)
            self._eval_rng.manual_seed(self.eval_seed)
        return self._eval_rng

    def on_train_epoch_start(self) -> None:
        self._pending.pop("train/", None)  # left by an epoch that did not finish
        self.finetuning.on_train_epoch_start(self.current_epoch)

    def on_validation_epoch_start(self) -> None:
        self._eval_rng = None
        self._pending.pop("val/", None)

    def on_test_epoch_start(self) -> None:
        self._eval_rng = None
        self._pending.pop("test/", None)

    def infer(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """Network outputs at evaluation time (validation, test, predict); tasks may override
        this, e.g. with sliding-window inference over whole volumes."""
        return self(x, **extra)

    def prepare_batch(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """A batch as the step uses it; tasks may derive inputs or targets here (e.g. corrupt
        the input of a denoiser and keep the clean image as the target)."""
        return batch

    def batch_loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of a batch; tasks that need more of the batch than the target (e.g. which
        samples count) override this instead of :meth:`compute_loss`."""
        return self.compute_loss(outputs, batch[self.target_key])

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        batch = self.prepare_batch(batch, stage)
        inputs = batch[self.input_key]
        extra = self.net_extras(batch)
        outputs = self(inputs, **extra) if stage == "train" else self.infer(inputs, **extra)
        if stage == "train" and isinstance(self.net, Ensemble):
            # each member on its own loss (their mean); the metrics see the ensemble's output
            loss = torch.stack([self.batch_loss(member, batch) for member in outputs]).mean()
            outputs = self.net.combine(outputs)
        else:
            loss = self.batch_loss(outputs, batch)
        if stage == "train" and self.sharpness_pass:
            return loss  # SAM's second pass (medexp.tasks.sharpness): counted once, in the first
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=inputs.shape[0])
        # networks may return several tensors (a VAE: reconstruction, mean, log-variance, latent)
        detached = tuple(o.detach() for o in outputs) if isinstance(outputs, tuple) else outputs.detach()
        self.update_metrics(getattr(self, f"{stage}_metrics"), detached, batch)
        return loss

    def update_metrics(self, metrics: MetricCollection, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Accumulate a batch into a stage's metrics (tasks may restrict what is counted)."""
        self.feed_metrics(metrics, self.postprocess(outputs), batch[self.target_key])

    def feed_metrics(self, metrics: MetricCollection, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``metrics.update(preds, target)``, deferred: a torchmetrics update costs about 1 ms of
        checks and bookkeeping whatever the batch size (a tenth of a small CNN's training step),
        so batches are concatenated and fed together once they hold :attr:`metric_chunk`
        predicted values, and before the stage's metrics are computed. The result is the same.

        Args:
            preds: ``(B, ...)`` predictions; target: ``(B, ...)`` targets.
        """
        pending = self._pending.setdefault(metrics.prefix, (metrics, []))[1]
        pending.append((preds, target))
        if len(pending) * preds.numel() >= self.metric_chunk:  # batches of about equal size
            self.flush_metrics(metrics.prefix)

    def flush_metrics(self, prefix: str | None = None) -> None:
        """Feed the pending batches of :meth:`feed_metrics` to the metrics of stage ``prefix``
        (e.g. ``"train/"``; None: every stage), e.g. before their state is saved mid-epoch."""
        for key in [prefix] if prefix is not None else list(self._pending):
            metrics, pending = self._pending.pop(key, (None, []))
            if pending:
                metrics.update(torch.cat([p for p, _ in pending]), torch.cat([t for _, t in pending]))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch = self.prepare_batch(batch, "predict")
        return self.postprocess(self.infer(batch[self.input_key], **self.net_extras(batch)))

    def _log_epoch(self, stage: str) -> dict[str, torch.Tensor]:
        # torchmetrics syncs across DDP processes in compute(), so every rank logs the same value
        metrics, loss = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_loss")
        self.flush_metrics(metrics.prefix)
        values = {f"{stage}/loss": loss.compute(), **metrics.compute()}
        metrics.reset()
        loss.reset()
        self.log_dict(values, prog_bar=stage != "train")
        return values

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch("val")
        # only epochs of fit count: not the sanity check before it, nor validate() after it
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            # an undefined score (NaN: e.g. AUROC of a split of one class) is never the best one;
            # while no epoch has had a defined score the best is undefined too, not -inf
            if not torch.isnan(values[self.monitor]):
                self.monitor_best.update(values[self.monitor])
            # its max_value/min_value state (the same on every DDP rank: validation metrics are synced)
            (best,) = self.monitor_best.metric_state.values()
            best = best if torch.isfinite(best) else torch.full_like(best, float("nan"))
            self.log(f"{self.monitor}_best", best, prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if self.sam_rho is not None and optimizer_closure is not None:
            optimizer_closure = sharpness_aware_closure(self.sam_rho, self, optimizer, optimizer_closure)
        optimizer.step(closure=optimizer_closure)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.finetuning.groups(self))
        self.finetuning.scale_groups(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        # schedules over the run's budget (medexp.tasks.schedules) read it from the Trainer
        if hasattr(scheduler, "attach_budget"):
            scheduler.attach_budget(self.trainer)
        interval = getattr(scheduler, "interval", "epoch")
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": self.monitor, "interval": interval},
        }
