"""Training faults: a diverged loss, and SIGTERM/SIGINT (cluster pre-emption, Ctrl-C).

A NaN or Inf loss stops the run at once, before the diverged weights reach any checkpoint, and
names the last good one; so does a loss that explodes while staying finite (see
:class:`FaultTolerance`). A signal saves ``checkpoints/interrupted.ckpt`` at the next batch
boundary and exits; ``medexp train ckpt_path=<that file>`` continues the run exactly where it
stopped, even in the middle of an epoch (see :class:`FaultTolerance`). On SLURM, the signal sent
before a job's time limit (SIGUSR1, or submitit's SIGUSR2) saves the same checkpoint and requeues
the job, which resumes from it in the same directory (:func:`requeued_checkpoint`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import subprocess
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from medexp.utils.errors import MedexpError

log = logging.getLogger("medexp")

# where an interrupted checkpoint keeps what Lightning does not: see FaultTolerance
RESUME_KEY = "medexp_resume"
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(MedexpError):
    """Training stopped by a fault; ``record`` is what ``metrics.json`` says about it."""

    status = "failed"

    def __init__(self, message: str, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.record = {"status": self.status, "error": message, "checkpoint": checkpoint}


class TrainingDiverged(RunStopped):
    """The training loss became NaN or Inf, or exploded (see :class:`FaultTolerance`). One run's
    failure: a sweep goes on without it."""

    status = "diverged"
    ends_sweep = False


class TrainingInterrupted(RunStopped):
    """SIGTERM or SIGINT: a resumable checkpoint was saved. Exit status 128 + signal number,
    as a shell reports a process ended by that signal (143 for SIGTERM, 130 for Ctrl-C)."""

    status = "interrupted"
    kind = "interrupted"

    def __init__(self, message: str, checkpoint: str | None, signum: int) -> None:
        super().__init__(message, checkpoint)
        self.exit_code = 128 + signum


class TrainingRequeued(TrainingInterrupted):
    """SLURM's warning before the time limit: a resumable checkpoint was saved and the job was put
    back in SLURM's queue; when it starts again it resumes from that checkpoint."""

    status = "requeued"
    kind = "requeued"


def slurm_job_id() -> str | None:
    """This SLURM job's id as ``scontrol requeue`` takes it (``<array job>_<task>`` in an array);
    None outside SLURM."""
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeued_checkpoint(checkpoint_dir: Path, filename: str = "interrupted.ckpt") -> Path | None:
    """The checkpoint a requeued SLURM job resumes from: ``filename`` in its checkpoint directory,
    when SLURM says the job was restarted (``SLURM_RESTART_COUNT`` >= 1); None otherwise.

    A requeued job runs its command again (submitit: the same job, with the same overrides, so
    the same run directory and Optuna trial; plain ``sbatch``: the same script, which needs a fixed
    ``hydra.run.dir``), and finds the checkpoint its previous start saved.
    """
    try:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        restarts = 0
    path = Path(checkpoint_dir) / filename
    return path if restarts >= 1 and path.is_file() else None


class FaultTolerance(L.Callback):
    """Stop on a non-finite loss; on SIGTERM/SIGINT save a checkpoint to resume from, then exit.

    **Diverged loss.** The loss of every training step is checked before its backward pass, so
    no optimiser step is taken with it, and the run stops with the step, the value, the last
    good checkpoints (``last.ckpt``/``best.ckpt``, saved at earlier epochs' ends and never
    overwritten with diverged weights) and what to try. On a GPU, reading the loss on the host
    waits for the step's kernels; the tasks' loss metric (torchmetrics ``MeanMetric``, which
    checks for NaN) already does so every step, so this costs nothing measurable. With
    ``check_every_n_steps > 1`` the steps in between are flagged on the device and read every
    n steps, and always before validation and before any checkpoint is written, so a diverged
    model is still never saved; the run then stops up to n-1 steps after the bad one. Under DDP
    the ranks' answers are combined (one small collective per check), so all stop together.

    **Exploded loss.** A loss can blow up without becoming NaN (``optimizer.lr=1e6``: a finite
    validation loss of 1e17) and the run would end "complete". A step's loss counts as exploded
    when its magnitude exceeds ``explode_factor`` times that of the first step of this fit (at
    least 1, so a loss that starts near 0 may still grow to ``explode_factor``); after
    ``explode_steps`` such steps (not necessarily in a row: an exploded model's loss jumps about)
    the run stops as diverged. Training that works stays far below: a loss that starts near 1
    would have to reach a million. Losses of GANs, segmentation and the other tasks start and stay
    within a few orders of magnitude of their first value.

    **Signals.** From the start of training, SIGTERM (a cluster pre-empting or ending a job) and
    SIGINT (Ctrl-C) are noted, the current batch is finished, and ``interrupted.ckpt`` is saved
    next to the other checkpoints (written to a temporary file first, so a second, hard kill
    cannot leave a broken one). The run then stops with exit status 143 or 130 and the command
    that resumes it.

    **SLURM requeue.** In a SLURM job, ``requeue_signals`` (SLURM's warning before the time
    limit: ``#SBATCH --signal=USR1@120``, or SIGUSR2, which submitit asks for) are handled the same
    way, and then the job is requeued: by the handler in force before training when there is one
    (submitit's, which resubmits the same job), else with ``scontrol requeue <job id>``. The
    requeued job resumes from the checkpoint (:func:`requeued_checkpoint`, used by ``medexp
    train``). Lightning's own SLURM requeue (an ``hpc_ckpt_<n>.ckpt`` saved in the middle of a
    step) is turned off, so that only one checkpoint, resumable exactly, is written. A second Ctrl-C stops at once, without saving. A signal during an epoch's
    last batch or its validation is acted on after the next epoch's first batch (or when
    training ends: the checkpoint then resumes to testing).

    Resuming from a checkpoint saved mid-epoch replays the rest of the epoch exactly as an
    uninterrupted run would see it, which Lightning alone does not do for plain DataLoaders: the
    checkpoint also holds the random generators' states (torch, NumPy, Python, and the training
    transforms' own MONAI generators) and the training metrics accumulated so far, and
    :class:`medexp.data.sampling.EpochShuffleSampler` skips the batches already trained on. With
    ``data.num_workers > 0`` or several devices the rest of the epoch is replayed only
    approximately (a warning says so).

    Args:
        check_every_n_steps: how often (in optimiser steps) the flag of a non-finite loss is
            read from the device; 1 reads every loss.
        filename: the interrupted checkpoint's file name, in the checkpoint directory.
        explode_factor: how many times the first step's loss magnitude (at least 1) a loss may
            reach before it counts as exploded; null turns the check off.
        explode_steps: exploded steps that stop the run.
        requeue_signals: in a SLURM job, the signals that save the checkpoint and requeue the job.
    """

    def __init__(
        self,
        check_every_n_steps: int = 1,
        filename: str = "interrupted.ckpt",
        explode_factor: float | None = 1e6,
        explode_steps: int = 3,
        requeue_signals: list[str] | tuple[str, ...] = ("SIGUSR1", "SIGUSR2"),
    ) -> None:
        if check_every_n_steps < 1:
            raise MedexpError(f"check_every_n_steps={check_every_n_steps}; expected an integer >= 1")
        if explode_factor is not None and (isinstance(explode_factor, bool) or not explode_factor > 1):
            raise MedexpError(f"explode_factor={explode_factor!r}; expected a number > 1 (e.g. 1e6) or null")
        if isinstance(explode_steps, bool) or not isinstance(explode_steps, int) or explode_steps < 1:
            raise MedexpError(f"explode_steps={explode_steps!r}; expected an integer >= 1")
        known = {item.name for item in signal.Signals}
        for name in requeue_signals or ():
            if name not in known or name in ("SIGKILL", "SIGSTOP"):
                raise MedexpError(f"requeue_signals: {name!r} is not a signal that can be caught; e.g. SIGUSR1")
        self.requeue_signals = tuple(signal.Signals[name] for name in requeue_signals or ())
        self.check_every_n_steps = check_every_n_steps
        self.filename = filename
        self.explode_factor = explode_factor
        self.explode_steps = explode_steps
        # on the device: the loss magnitude that counts as exploded, and exploded steps so far
        self._ceiling: torch.Tensor | None = None
        self._exploded: torch.Tensor | None = None
        self._signal: int | None = None
        self._handlers: dict[int, Any] = {}
        self._flag: dict[str, torch.Tensor] | None = None  # non-finite loss seen on the device
        self._payload: dict[str, Any] | None = None  # added to the checkpoint being saved
        self._resume: dict[str, Any] | None = None  # read from the checkpoint resumed from
        self._rng_at_batch: tuple[int, dict[str, Any]] | None = None
        self._callback_metrics: dict[str, torch.Tensor] = {}

    def _restore_callback_metrics(self, trainer: L.Trainer) -> None:
        # resumed from an interrupted checkpoint: the metrics logged so far, as Lightning had them
        # (after the sanity check, which clears them; or at the end of a fit with nothing left)
        for key, value in self._callback_metrics.items():
            trainer.callback_metrics.setdefault(key, value)
        self._callback_metrics = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before Lightning sets its signal handlers: its SLURM requeue would save hpc_ckpt_<n>.ckpt
        # in the middle of a step (not resumable exactly) and requeue; ours saves at a batch boundary
        from lightning.fabric.plugins.environments import SLURMEnvironment

        if not self._requeueing():
            return
        # a single-device strategy has none of its own: the trainer's (what Lightning asks) counts
        for environment in (
            getattr(trainer.strategy, "cluster_environment", None),
            getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None),
        ):
            if isinstance(environment, SLURMEnvironment):
                environment.auto_requeue = False

    def _requeueing(self) -> bool:
        return bool(self.requeue_signals) and slurm_job_id() is not None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ceiling = self._exploded = None  # the scale of an exploded loss: from this fit's first step
        # the floor (preflight.min_free_gb) was checked before anything was built; now that the
        # model exists: room for the checkpoints this run keeps (best ones, last, interrupted)?
        from medexp.utils.preflight import check_free_space, checkpoint_bytes

        callback = trainer.checkpoint_callback
        if callback is None or not getattr(callback, "dirpath", None):
            return  # (every DDP rank checks, so that all stop together)
        top_k = callback.save_top_k if callback.save_top_k >= 0 else (trainer.max_epochs or 1)
        kept = top_k + 2
        check_free_space(
            Path(callback.dirpath),
            checkpoint_bytes(pl_module.parameters()) * kept,
            "callbacks.model_checkpoint.dirpath",
            f"keeping {kept} checkpoints of this model",
        )

    # ----------------------------------------------------------------------- diverged loss

    def _bad(self, loss: torch.Tensor) -> torch.Tensor:
        """Whether this step's loss makes the run diverged, on the device: not finite, or the
        ``explode_steps``-th exploded one (no host sync)."""
        bad = ~torch.isfinite(loss).all()
        if self.explode_factor is None:
            return bad
        size = loss.float().mean().abs()
        if self._ceiling is None:  # the first step of this fit sets the scale
            self._ceiling = torch.nan_to_num(size, nan=float("inf")).clamp_min(1.0) * self.explode_factor
            self._exploded = torch.zeros((), dtype=torch.long, device=loss.device)
        self._exploded = self._exploded + (torch.isfinite(size) & (size > self._ceiling)).long()
        return bad | (self._exploded >= self.explode_steps)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach()
        if self.check_every_n_steps == 1:
            if _any_rank(trainer, bool(self._bad(loss))):
                self._diverged(trainer, float(loss.float().mean()), trainer.global_step)
            return
        # flag the first bad step on the device; read it in _check_flag (no host sync here)
        bad = self._bad(loss)
        if self._flag is None:
            zero = torch.zeros((), device=loss.device)
            self._flag = {"bad": zero.bool(), "value": zero.float(), "step": zero.long()}
        first = bad & ~self._flag["bad"]
        self._flag["value"] = torch.where(first, loss.float().mean(), self._flag["value"])
        # torch.full is a fill kernel; torch.tensor(step, device=...) would be a copy that waits
        step = torch.full((), trainer.global_step, dtype=torch.long, device=loss.device)
        self._flag["step"] = torch.where(first, step, self._flag["step"])
        self._flag["bad"] = self._flag["bad"] | bad

    def _check_flag(self, trainer: L.Trainer) -> None:
        if self._flag is not None and _any_rank(trainer, bool(self._flag["bad"])):
            self._diverged(trainer, float(self._flag["value"]), int(self._flag["step"]))

    def _diverged(self, trainer: L.Trainer, value: float, step: int) -> None:
        self._restore_handlers()
        callback = trainer.checkpoint_callback
        good = []
        for path in (_last_checkpoint(trainer), getattr(callback, "best_model_path", "")):
            if path and Path(path).is_file() and path not in good:
                good.append(path)
        saved = "no checkpoint had been saved yet"
        if good:
            saved = f"the last good checkpoints are {' and '.join(good)} (not overwritten)"
        lr = trainer.optimizers[0].param_groups[0].get("lr") if trainer.optimizers else None
        hints = [
            "a lower learning rate (optimizer.lr" + (f"; {lr:g} at this step)" if isinstance(lr, float) else ")"),
            "gradient clipping (+trainer.gradient_clip_val=1.0)",
        ]
        if str(trainer.precision) not in ("32-true", "32", "64-true", "64"):
            hints.append(f"full precision (trainer.precision=32; now {trainer.precision})")
        if not math.isfinite(value):
            loss = f"the loss was {value}"
        elif self._exploded is not None and int(self._exploded) >= self.explode_steps:
            loss = (
                f"the loss exploded to {value:.3g} without becoming NaN ({int(self._exploded)} steps above "
                f"{float(self._ceiling):.3g}, {self.explode_factor:g} x max(1, the first step's loss))"
            )
        else:
            loss = "another process's loss was not finite or exploded"
        raise TrainingDiverged(
            f"training diverged: {loss} at epoch {trainer.current_epoch}, step {step}; stopped "
            + ("before it was used" if step == trainer.global_step else f"at step {trainer.global_step}")
            + f", {saved}. Try {', '.join(hints[:-1])} or {hints[-1]}",
            good[0] if good else None,
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._flag is not None and trainer.global_step % self.check_every_n_steps == 0:
            self._check_flag(trainer)
        if not self._stop_requested(trainer):
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            # the epoch's end (validation, epoch-end metrics, last.ckpt) comes first, then the
            # next epoch's first batch: Lightning resumes exactly from the end of a batch that
            # is not an epoch's last, not from an epoch's start
            return
        where = f"at epoch {trainer.current_epoch}, after batch {batch_idx + 1} of {trainer.num_training_batches}"
        self._interrupt(trainer, pl_module, where, batch_idx + 1)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_flag(trainer)  # ModelCheckpoint saves after validation

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_flag(trainer)  # ... or at the epoch's end

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._check_flag(trainer)  # raising here leaves the file unwritten
        if self._payload is not None:
            checkpoint[RESUME_KEY] = self._payload

    # ----------------------------------------------------------------------------- signals

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's own SIGTERM handler (set up just before) would stop in the middle of a
        # validation, from where it cannot resume exactly; ours waits for a batch boundary.
        # A SIGTERM it already noted (during the sanity check) is taken over.
        self._restore_callback_metrics(trainer)
        if trainer.received_sigterm:
            self._signal = signal.SIGTERM
        for signum in (*_SIGNALS, *(self.requeue_signals if self._requeueing() else ())):
            try:
                self._handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave signals to Lightning
                self._handlers.pop(signum, None)
        if self._resume is not None:
            self._resume_mid_epoch(trainer)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            # a second Ctrl-C: stop now, with the handlers in force before training back (not
            # Python's default ones: a shell's background job, for one, starts with SIGINT ignored)
            self._restore_handlers()
            raise KeyboardInterrupt
        if self._signal is None:
            log.warning(
                "received %s: finishing this batch, then saving %s (Ctrl-C again to stop at once without saving)",
                signal.Signals(signum).name,
                self.filename,
            )
        self._signal = signum

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        stop = _any_rank(trainer, self._signal is not None)
        if stop and self._signal is None:  # another DDP rank got it
            self._signal = signal.SIGTERM
        return stop

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        if self._signal is not None:
            self._interrupt(trainer, pl_module, "after the last epoch, before testing", 0)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_callback_metrics(trainer)
        # training finished: a checkpoint saved by an earlier interruption is out of date
        if trainer.is_global_zero:
            (self._path(trainer) / self.filename).unlink(missing_ok=True)

    def _path(self, trainer: L.Trainer) -> Path:
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"

    def _interrupt(self, trainer: L.Trainer, pl_module: L.LightningModule, where: str, batches_done: int) -> None:
        """Save the interrupted checkpoint and stop (the signal arrived; we are at ``where``)."""
        self._check_flag(trainer)
        requeue = self._signal in self.requeue_signals
        previous = self._handlers.get(self._signal) if requeue else None
        self._restore_handlers()
        path = self._path(trainer) / self.filename
        tmp = path.with_name(path.name + ".tmp")
        self._payload = {
            "epoch": trainer.current_epoch,
            "batches_done": batches_done,
            # what metrics.json's "fit" reports: e.g. the learning rate, logged at an epoch's start
            "callback_metrics": {key: _cpu(value) for key, value in trainer.callback_metrics.items()},
        }
        if batches_done:
            self._payload.update(_mid_epoch_state(trainer, pl_module))
        try:
            trainer.save_checkpoint(tmp)
        finally:
            self._payload = None
        if trainer.is_global_zero:
            os.replace(tmp, path)
        name = signal.Signals(self._signal or signal.SIGTERM).name
        if requeue:
            self._requeue(trainer, previous, f"{name} {where}; saved {path}", str(path))
        log.info("resume with: medexp train ckpt_path=%s", path)
        raise TrainingInterrupted(
            f"{name} {where}; saved {path}. Resume with: medexp train ckpt_path={path}",
            str(path),
            int(self._signal or signal.SIGTERM),
        )

    def _requeue(self, trainer: L.Trainer, previous: Any, saved: str, path: str) -> None:
        """Put this SLURM job back in the queue (the checkpoint is saved): through the handler in
        force before training (submitit's resubmits the job and exits), else ``scontrol requeue``."""
        signum = int(self._signal)
        # (not Lightning's: it would save a second checkpoint, mid-step, and requeue again)
        if callable(previous) and not type(previous).__module__.startswith("lightning"):
            log.info("%s; handing the requeue to %s", saved, getattr(previous, "__qualname__", previous))
            previous(signum, None)  # submitit's exits here; one that returns leaves the rest to us
        job = slurm_job_id()
        if not trainer.is_global_zero:
            raise TrainingRequeued(f"{saved}; rank 0 requeues SLURM job {job}", path, signum)
        try:
            done = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True, timeout=60)
            problem = (done.stderr or done.stdout).strip() if done.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as exc:
            problem = str(exc)
        if problem:
            raise TrainingInterrupted(
                f"{saved}; `scontrol requeue {job}` failed ({problem}). Resume with: medexp train ckpt_path={path}",
                path,
                signum,
            )
        log.info("requeued SLURM job %s: it resumes from %s", job, path)
        raise TrainingRequeued(f"{saved}; requeued SLURM job {job}, which resumes from it", path, signum)

    def _restore_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            # None: a handler not set from Python, which cannot be put back
            if handler is not None and signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, handler)
        self._handlers = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if isinstance(exception, SIGTERMException):
            # Lightning's handler (outside training: sanity check, validate, test) exits with
            # status 0 and says nothing; a job ended by SIGTERM should say so and fail
            exception.code = 128 + signal.SIGTERM
            last = _last_checkpoint(trainer)
            log.error(
                "SIGTERM while %s; nothing new was saved%s",
                trainer.state.stage or "starting",
                f"; resume with: medexp train ckpt_path={last}" if last else "",
            )
        elif isinstance(exception, KeyboardInterrupt):
            last = _last_checkpoint(trainer)
            log.error(
                "stopped by Ctrl-C without saving%s", f"; resume with: medexp train ckpt_path={last}" if last else ""
            )

    # ------------------------------------------------------------------ resuming mid-epoch

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        payload = checkpoint.get(RESUME_KEY)
        if not payload:
            return
        self._callback_metrics = payload.get("callback_metrics", {})
        if not payload.get("batches_done"):
            return  # saved when training had ended: nothing to replay
        self._resume = payload
        if trainer.world_size > 1:
            return  # the metrics accumulated by rank 0 only: each rank's would be needed
        metrics = dict(pl_module.named_modules())
        for name, saved in payload.get("metrics", {}).items():
            _set_metric_state(metrics.get(name), saved)

    def _resume_mid_epoch(self, trainer: L.Trainer) -> None:
        resume, self._resume = self._resume, None
        epoch, done = resume["epoch"], resume["batches_done"]
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        exact = (
            epoch == trainer.current_epoch
            and hasattr(sampler, "skip_next")
            and getattr(loader, "batch_size", None) == resume.get("batch_size")
            and getattr(loader, "num_workers", 0) == 0
            and trainer.world_size == 1
        )
        if not exact:
            log.warning(
                "resuming in the middle of epoch %d: its remaining batches are not replayed exactly (exact with "
                "one device, data.num_workers=0 and an unchanged data.batch_size)",
                epoch,
            )
            return
        sampler.skip_next(done * loader.batch_size)  # read when the epoch's first index is drawn
        _set_transform_states(trainer, resume.get("transform_rng", []))
        self._rng_at_batch = (done, resume["rng"])
        # Lightning warns that a plain DataLoader cannot resume mid-epoch; here it does
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        log.info("resuming epoch %d after batch %d of %d", epoch, done, trainer.num_training_batches)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # the generators as they were when the interrupted run finished the previous batch
        if self._rng_at_batch is not None and batch_idx == self._rng_at_batch[0]:
            _set_rng_states(self._rng_at_batch[1])
            self._rng_at_batch = None


def _any_rank(trainer: L.Trainer, flag: bool) -> bool:
    """``flag`` of any DDP rank, so that every rank stops at the same step (one small collective;
    without it, the others would wait forever for the one that stopped)."""
    if trainer.world_size > 1:
        return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))
    return flag


# ------------------------------------------------------------ state that Lightning does not keep
# Everything is stored as tensors and plain Python values, so the checkpoint still loads with
# torch.load(weights_only=True).


def _mid_epoch_state(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    from torchmetrics import Metric

    if hasattr(pl_module, "flush_metrics"):  # batches medexp's tasks hold back (BaseTask.feed_metrics)
        pl_module.flush_metrics()
    metrics = {
        name: {"update_count": module._update_count, "state": {k: _cpu(v) for k, v in module.metric_state.items()}}
        for name, module in pl_module.named_modules()
        if isinstance(module, Metric) and module._update_count  # e.g. the epoch's training metrics so far
    }
    return {
        "batch_size": getattr(trainer.train_dataloader, "batch_size", None),
        "rng": _rng_states(),
        "transform_rng": [_numpy_state(generator) for generator in _transform_generators(trainer)],
        "metrics": metrics,
    }


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, list):
        return [_cpu(item) for item in value]
    return value


def _set_metric_state(metric: Any, saved: dict[str, Any]) -> None:
    if metric is None:
        return
    for key, value in saved["state"].items():
        setattr(metric, key, value)
    metric._update_count = saved["update_count"]
    metric._computed = None


def _numpy_state(generator: np.random.RandomState) -> list[Any]:
    name, keys, pos, has_gauss, cached = generator.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _set_numpy_state(generator: np.random.RandomState, state: list[Any]) -> None:
    name, keys, pos, has_gauss, cached = state
    generator.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _rng_states() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(np.random.mtrand._rand),
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    _set_numpy_state(np.random.mtrand._rand, states["numpy"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _transform_generators(trainer: L.Trainer) -> list[np.random.RandomState]:
    """The generators of the training transforms' random steps (MONAI ``Randomizable.R``), in a
    fixed order; the same duck-typed place as :class:`medexp.callbacks.seed.SeedEachEpoch`."""
    datasets = getattr(trainer.datamodule, "datasets", None) or {}
    transform = getattr(datasets.get("train"), "transform", None)
    if not type(transform).__module__.startswith("monai."):  # no MONAI chain: nothing random to find
        return []
    from monai.transforms import Randomizable, Transform

    found: list[np.random.RandomState] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable) and isinstance(obj.R, np.random.RandomState) and id(obj.R) not in seen:
            seen.add(id(obj.R))
            found.append(obj.R)
        for value in vars(obj).values():  # nested steps: Compose.transforms, RandAffined.rand_affine, ...
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, (Transform, Randomizable)):
                    visit(item)

    if isinstance(transform, (Transform, Randomizable)):
        visit(transform)
    return found


def _set_transform_states(trainer: L.Trainer, states: list[list[Any]]) -> None:
    generators = _transform_generators(trainer)
    if len(generators) != len(states):
        log.warning("the training transforms differ from the interrupted run's; their randomness is not replayed")
        return
    for generator, state in zip(generators, states):
        _set_numpy_state(generator, state)


def _last_checkpoint(trainer: L.Trainer) -> str:
    """The path of the latest checkpoint saved: ``save_last``'s, or that of a checkpoint callback
    without a monitor (``callbacks.last_checkpoint``, which keeps only the latest); "" if none."""
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "last_model_path", "") or (
            getattr(callback, "best_model_path", "") if getattr(callback, "monitor", "") is None else ""
        )
        if path:
            return path
    return ""
