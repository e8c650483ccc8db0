"""Starting the experiment loggers so that one that cannot start does not stop the run."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("medexp")

# while an MLflow server is first contacted: fail within seconds, not after MLflow's default
# 7 retries with exponential backoff (minutes); a user's own settings win
_MLFLOW_START = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def logger_name(logger: Any) -> str:
    """``WandbLogger`` -> ``wandb``, ``MLFlowLogger`` -> ``mlflow``: the names of ``conf/logger``."""
    return type(logger).__name__.removesuffix("Logger").lower()


def start_loggers(loggers: list[Any], fallback_dir: str | Path) -> list[Any]:
    """Start each logger now and drop, with a warning, those that fail; never fail the run.

    wandb without network or API key, or an MLflow server that cannot be reached, raise when
    their run is created, which Lightning would do inside ``fit``. CSV loggers are left to start
    with training: starting one clears the ``metrics.csv`` that a resumed run still has to read
    (:class:`medexp.utils.rundir.CsvHistory`); they write local files, which the start-up checks
    (:mod:`medexp.utils.preflight`) have already tried.

    Args:
        loggers: instantiated Lightning loggers.
        fallback_dir: where a CSV logger writes (``<dir>/csv``) when every logger failed.

    Returns:
        The loggers that started, or the fallback CSV logger.
    """
    started, failed = [], []
    # wandb first, as Lightning does: it must start before TensorBoard writers to sync them
    for logger in sorted(loggers, key=lambda item: logger_name(item) != "wandb"):
        if logger_name(logger) == "csv":
            started.append(logger)
            continue
        try:
            with _environment(_MLFLOW_START):
                _ = logger.experiment
        except Exception as exc:  # whatever the service's client raises
            failed.append((logger_name(logger), exc))
        else:
            started.append(logger)
    started = [logger for logger in loggers if logger in started]  # the configured order
    remaining = ", ".join(logger_name(logger) for logger in started)
    if failed and not started:
        from lightning.pytorch.loggers import CSVLogger

        started = [CSVLogger(save_dir=str(fallback_dir), name="csv", version="")]
        remaining = f"csv (fallback, {Path(fallback_dir) / 'csv'})"
    for name, exc in failed:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        log.warning(
            "logger %s could not start (%s: %s); continuing with: %s", name, type(exc).__name__, reason, remaining
        )
    if any(name == "wandb" for name, _ in failed):
        _finish_failed_wandb()
    return started


@contextlib.contextmanager
def _environment(defaults: dict[str, str]) -> Iterator[None]:
    added = [key for key in defaults if key not in os.environ]
    os.environ.update({key: defaults[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _finish_failed_wandb() -> None:
    # a half-started wandb run would take over the next wandb.init of a multirun
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        with contextlib.suppress(Exception):
            wandb.finish(exit_code=1)
    # and its process-wide state (settings, the service) would make the next offline run write nothing
    if wandb is not None and hasattr(wandb, "teardown"):
        with contextlib.suppress(Exception):
            wandb.teardown()


def send_picture(trainer: Any, key: str, path: Path, remote_images: bool, withheld_noted: bool = False) -> bool:
    """Send the PNG picture at ``path`` to the trainer's loggers under ``key``: TensorBoard, a
    local MLflow store, and, only with ``remote_images`` (``logger.log_images=true``), remote
    loggers such as wandb or an MLflow server (see :mod:`medexp.utils.privacy`): pictures made
    from patients' images (overlays, a GAN's samples, which can reproduce training images) stay
    on this machine unless asked.

    Returns:
        Whether a note about withheld pictures has been logged (pass it back as ``withheld_noted``
        so the note appears once per run).
    """
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    from medexp.utils.privacy import may_send_images

    withheld = []
    for logger in trainer.loggers:
        if not may_send_images(logger, remote_images):
            withheld.append(type(logger).__name__)
        elif isinstance(logger, TensorBoardLogger):
            import numpy as np
            from PIL import Image

            picture = np.asarray(Image.open(path).convert("RGB"))
            logger.experiment.add_image(key, picture, global_step=trainer.global_step, dataformats="HWC")
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=key.replace("/", "_"))
        elif callable(getattr(logger, "log_image", None)):  # wandb, and loggers like it
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
    if withheld and not withheld_noted:
        log.info("%s pictures are not sent to remote logger(s) %s; logger.log_images=true sends them", key, withheld)
        return True
    return withheld_noted
