"""Training faults: signals, a diverging loss, unwritable or full disks, loggers that cannot start."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch

from medexp.callbacks.faults import FaultTolerance, TrainingInterrupted
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, medexp_main, run_cli, start_cli
from tests.helpers import signal_when

# deterministic CPU runs: 16 batches an epoch, so a signal sent as epoch 1 starts lands inside it
RUN = [
    *QUIET,
    "data.image_size=16",
    "data.num_samples={train: 512, val: 64, test: 64}",
    "data.batch_size=32",
    "trainer.deterministic=true",
    "logger=csv",
]
# in-process runs (test_train.py style): a few batches
FAST = [*QUIET, "debug=limit", "trainer.max_epochs=2"]


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # as medexp eval loads them


def test_sigterm_mid_epoch_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    # shuffling, augmentation and a scheduler: every source of randomness of an epoch
    args = [*RUN, "trainer.max_epochs=3", "scheduler=cosine", "data/augmentations=basic", "seed=5"]
    whole = tmp_path / "whole"
    medexp_main("train", *args, f"hydra.run.dir={whole}", cwd=tmp_path)

    run = tmp_path / "run"
    proc = start_cli("train", *args, f"hydra.run.dir={run}", cwd=tmp_path, capture=True)
    last = run / "checkpoints" / "last.ckpt"
    # epoch 0 is saved (completely), so epoch 1 is under way
    signal_when(proc, lambda: _load(last)["epoch"] == 0, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    interrupted = run / "checkpoints" / "interrupted.ckpt"
    assert "medexp: interrupted: SIGTERM at epoch 1, after batch" in stderr
    assert f"Resume with: medexp train ckpt_path={interrupted}" in stderr and "Traceback" not in stderr
    saved = _load(interrupted)["medexp_resume"]
    assert saved["epoch"] == 1 and 0 < saved["batches_done"] < 16, "not saved in the middle of an epoch"
    assert _metrics(run)["status"] == "interrupted" and _metrics(run)["checkpoint"] == str(interrupted)

    # the command it printed: the run's own overrides and directory come from the checkpoint
    medexp_main("train", f"ckpt_path={interrupted}", cwd=tmp_path)
    resumed, uninterrupted = _metrics(run), _metrics(whole)
    assert resumed["status"] == "complete"
    assert resumed["test"] == uninterrupted["test"]
    assert resumed["best_score"] == uninterrupted["best_score"]
    assert resumed["fit"] == uninterrupted["fit"]  # the interrupted epoch's training metrics too
    assert (run / "csv" / "metrics.csv").read_text() == (whole / "csv" / "metrics.csv").read_text()
    assert not interrupted.exists(), "an out-of-date interrupted.ckpt was left behind"


class SendSignals(L.Callback):
    """Test-only: signal this process at the end of a batch, as a user's Ctrl-C would."""

    def __init__(self, signals: list[int], epoch: int, batch: int) -> None:
        self.signals, self.epoch, self.batch = signals, epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            for signum in self.signals:
                os.kill(os.getpid(), signum)


def _send(signals: str, epoch: int, batch: int) -> list[str]:
    return [
        "+callbacks.send._target_=tests.test_faults.SendSignals",
        f"+callbacks.send.signals={signals}",
        f"+callbacks.send.epoch={epoch}",
        f"+callbacks.send.batch={batch}",
    ]


def test_ctrl_c_in_an_epochs_last_batch_stops_after_the_next_batch_and_resumes_exactly(tmp_path):
    args = [*FAST, "trainer.deterministic=true", "data/augmentations=basic"]  # 4 batches an epoch
    uninterrupted = train(compose_config(args, output_dir=tmp_path / "whole"))
    run = tmp_path / "run"
    interrupted = run / "checkpoints" / "interrupted.ckpt"
    # the handler in force before the run: Python's, or SIG_IGN in a shell's background job
    before = signal.getsignal(signal.SIGINT)
    try:
        # the epoch's end comes first (validation, last.ckpt), then one batch of the next epoch
        with pytest.raises(TrainingInterrupted, match="SIGINT at epoch 1, after batch 1 of 4") as caught:
            train(compose_config([*args, *_send("[2]", epoch=0, batch=3)], output_dir=run))
        assert caught.value.exit_code == 128 + signal.SIGINT
        assert signal.getsignal(signal.SIGINT) == before, "Ctrl-C handler left installed"
        assert _load(interrupted)["medexp_resume"]["batches_done"] == 1
        assert _metrics(run)["status"] == "interrupted"
        resumed = train(compose_config([*args, f"ckpt_path={interrupted}"], output_dir=run))
        for key in ("test", "best_score", "fit"):
            assert resumed[key] == uninterrupted[key], key
        assert (run / "csv" / "metrics.csv").read_text() == (tmp_path / "whole" / "csv" / "metrics.csv").read_text()

        # Ctrl-C twice in one batch: Lightning's KeyboardInterrupt exit at once, nothing saved
        with pytest.raises(SystemExit):
            train(compose_config([*args, *_send("[2, 2]", epoch=0, batch=1)], output_dir=tmp_path / "twice"))
        assert not (tmp_path / "twice" / "checkpoints" / "interrupted.ckpt").exists()
    finally:
        signal.signal(signal.SIGINT, before)  # Lightning ignores SIGINT after a KeyboardInterrupt


def test_sigterm_outside_training_fails_the_run():
    # Lightning's own handler (sanity check, validate, test) raises SystemExit with status 0
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    exception = SIGTERMException()
    FaultTolerance().on_exception(L.Trainer(logger=False, enable_checkpointing=False), None, exception)
    assert exception.code == 128 + signal.SIGTERM


def test_a_diverging_loss_stops_with_the_last_good_checkpoint(tmp_path):
    # a real divergence: at epoch 2 the schedule multiplies SGD's learning rate by 1e9
    run = tmp_path / "run"
    proc = run_cli(
        "train",
        *RUN,
        "data.num_samples={train: 256, val: 64, test: 64}",
        "trainer.max_epochs=4",
        "optimizer=sgd",
        "scheduler=multistep",
        "scheduler.gamma=1e9",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    last, best = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "best.ckpt"
    message = proc.stderr.strip().splitlines()[-1]
    # the loss grows to about 1e35 before it becomes NaN: stopped as exploded, in the same epoch
    assert message.startswith("medexp: error: training diverged: the loss exploded to ") and " at epoch 2, " in message
    assert str(last) in message and "optimizer.lr" in message and "gradient_clip_val" in message
    assert "Traceback" not in proc.stderr
    assert _metrics(run)["status"] == "diverged" and _metrics(run)["checkpoint"] == str(last)
    # the checkpoints hold the last good epoch, not the diverged weights
    assert _load(last)["epoch"] == 1
    for path in (last, best):
        assert all(torch.isfinite(value).all() for value in _load(path)["state_dict"].values())
    assert not (run / "checkpoints" / "interrupted.ckpt").exists()


def test_the_loss_flag_read_every_n_steps_still_stops_before_a_checkpoint(compose_cfg, tmp_path):
    callback = FaultTolerance(check_every_n_steps=1000)  # only the checks before saving remain
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False, callbacks=[callback]
    )
    callback.on_before_backward(trainer, None, torch.tensor(1.0))
    callback.on_before_backward(trainer, None, torch.tensor(float("inf")))
    callback.on_before_backward(trainer, None, torch.tensor(float("nan")))
    with pytest.raises(MedexpError, match="the loss was inf at epoch 0, step 0"):
        callback.on_save_checkpoint(trainer, None, {})


def test_an_unwritable_checkpoint_directory_is_reported_before_anything_is_built(compose_cfg, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory under a regular file cannot be created, even by root
    with pytest.raises(
        MedexpError, match=f"cannot write to {blocker}/checkpoints .*callbacks.model_checkpoint.dirpath"
    ):
        train(compose_cfg(*FAST, f"callbacks.model_checkpoint.dirpath={blocker}/checkpoints"))
    assert not (tmp_path / "run_info.json").exists()
    if os.geteuid() != 0:  # permissions: only where they apply
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(MedexpError, match=f"cannot write to {locked}/csv .*logger.csv.save_dir"):
            train(compose_cfg(*FAST, f"logger.csv.save_dir={locked}"))


def test_too_little_disk_space_is_reported_at_start_up(compose_cfg, tmp_path, monkeypatch):
    needs = r"GB free on the disk holding .*a run needs 1000000000.00 GB.*preflight.min_free_gb"
    with pytest.raises(MedexpError, match=needs):
        train(compose_cfg(*FAST, "preflight.min_free_gb=1e9"))
    assert not (tmp_path / "run_info.json").exists()

    # past the floor, the checkpoints of this model must fit too: checked before the first epoch
    import medexp.utils.preflight as preflight

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(MedexpError, match="keeping 3 checkpoints of this model"):
        train(compose_cfg(*FAST, "preflight.min_free_gb=0"))
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_a_logger_that_cannot_start_is_dropped_with_a_warning(tmp_path, monkeypatch, caplog):
    import wandb
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from medexp.utils.loggers import start_loggers

    wandb.teardown()  # wandb keeps process-wide settings: an earlier offline run's would make this one offline
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no saved login
    csv = CSVLogger(save_dir=tmp_path, name="csv", version="")
    online = WandbLogger(save_dir=tmp_path, project="medexp", offline=False)
    with caplog.at_level(logging.WARNING, logger="medexp"):
        assert start_loggers([csv, online], fallback_dir=tmp_path) == [csv]
    assert "logger wandb could not start" in caplog.text and "continuing with: csv" in caplog.text


def test_a_run_whose_only_logger_cannot_start_logs_to_csv(compose_cfg, tmp_path, caplog):
    # a closed port: MLflow's client fails at once (medexp lowers its retries while starting)
    with caplog.at_level(logging.WARNING, logger="medexp"):
        metrics = train(compose_cfg(*FAST, "logger=mlflow", "logger.mlflow.tracking_uri=http://127.0.0.1:9"))
    assert metrics["status"] == "complete"
    assert "logger mlflow could not start" in caplog.text and "continuing with: csv" in caplog.text
    assert (tmp_path / "csv" / "metrics.csv").is_file()
