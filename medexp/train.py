"""``medexp train`` (or ``python -m medexp.train``): fit a model, then test its best (or, with
``test_checkpoint=last``, its last) checkpoint.

Writes into the run directory: Hydra's config and overrides (``.hydra/``), the resolved config
(``resolved_config.yaml``, and as the tree printed at the start, ``config_tree.log``, unless
``extras.print_config=false``), ``run_info.json``
(seed, git commit, package versions, data fingerprint, logger run ids),
``checkpoints/{best,last}.ckpt``, logger files, ``metrics.json`` (the tested checkpoint's val
and test metrics; with ``model.calibrate=true`` the temperature fitted on the validation split,
under ``calibration``) and, with ``report=true``, ``report/`` (the evaluation report of the tested
checkpoint on the test split: see :mod:`medexp.reports.evaluation`).
``ckpt_path=<run>/checkpoints/last.ckpt`` resumes that run in its directory
(see :func:`medexp.utils.rundir.resume_arguments`).
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from hydra_plugins.medexp import register_plugins
from medexp.resolvers import register_resolvers
from medexp.utils.config import CONFIG_PATH
from medexp.utils.distributed import ddp_workers_join_this_job
from medexp.utils.errors import user_errors
from medexp.utils.run_info import lookup_metric
from medexp.utils.rundir import CsvHistory, read_json, resume_arguments

log = logging.getLogger("medexp")
register_resolvers()
register_plugins()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit ``cfg.model`` on ``cfg.data`` with ``cfg.trainer``; test the best (or last) checkpoint.

    Returns:
        The contents of ``metrics.json``: ``status`` (``complete``, or ``pruned`` when an Optuna
        pruner stopped the run), ``seed``, ``fit``, ``monitor``, ``best_score``,
        ``best_checkpoint``, ``tested_checkpoint`` (with ``test_checkpoint=last``), ``calibration``
        (with ``model.calibrate=true``), ``val`` and ``test``.
    """
    _resume_requeued_job(cfg)
    _check_before_building(cfg)
    # imported before tidy_library_output, which removes the console handler lightning attaches
    import lightning.pytorch as L

    from medexp.callbacks.faults import RunStopped
    from medexp.utils.run_info import write_json
    from medexp.utils.runtime import tidy_library_output

    tidy_library_output()
    # Always seed (a drawn seed when cfg.seed is null), and keep the seed actually used.
    seed = L.seed_everything(_seed(cfg.seed), workers=True)
    with open_dict(cfg):
        cfg.seed = seed
    out = Path(cfg.paths.output_dir)
    resumed = bool(cfg.train and cfg.ckpt_path)
    previous = read_json(out / "run_info.json")  # present when resuming this run's directory
    if resumed:
        log.info("resuming from %s", cfg.ckpt_path)
        _continue_logger_runs(cfg, previous.get("loggers", {}))
    resolved = _check_resolved(cfg)
    if OmegaConf.select(cfg, "extras.print_config", default=True):
        from medexp.utils.config_tree import print_config_tree

        print_config_tree(resolved, out)  # rank 0 only; also <run>/config_tree.log
    datamodule, model, loggers, trainer = _build(cfg, resolved, seed)
    info = (
        _write_run_record(cfg, resolved, seed, loggers, previous, model.init_report) if trainer.is_global_zero else {}
    )
    # before the loggers start: CSVLogger deletes the metrics.csv of the run being resumed
    csv_history = CsvHistory(loggers if resumed and trainer.is_global_zero else [])
    csv_history.read()
    _log_hyperparams(loggers, resolved, previous.get("loggers", {}) if resumed else {})

    metrics: dict[str, Any] = {"status": "complete", "seed": seed}
    try:
        _fit_and_test(cfg, trainer, model, datamodule, info, metrics)
    except RunStopped as exc:  # a diverged loss or SIGTERM/SIGINT (medexp.callbacks.faults)
        if trainer.is_global_zero:
            write_json(out / "metrics.json", {**metrics, **exc.record})
        raise
    finally:
        _finish_wandb()
        csv_history.restore()

    os.environ.pop(_DRAWN_SEED, None)  # the next job of a multirun draws its own
    if trainer.is_global_zero:
        write_json(out / "metrics.json", metrics)
        _log_hyperparams_with_metrics(loggers, resolved, metrics)
        log.info("run directory: %s", out)
    return metrics


_DRAWN_SEED = "MEDEXP_DRAWN_SEED"


def _resume_requeued_job(cfg: DictConfig) -> None:
    """A SLURM job requeued before its time limit resumes from the checkpoint it saved then, in
    this run directory (see :mod:`medexp.callbacks.faults`)."""
    if not cfg.train or cfg.get("ckpt_path"):
        return
    from medexp.callbacks.faults import requeued_checkpoint

    folder = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath") or Path(cfg.paths.output_dir) / "checkpoints"
    filename = OmegaConf.select(cfg, "callbacks.fault_tolerance.filename", default="interrupted.ckpt")
    path = requeued_checkpoint(Path(folder), filename)
    if path is not None:
        log.info("requeued SLURM job (restart %s): resuming from %s", os.environ["SLURM_RESTART_COUNT"], path)
        with open_dict(cfg):
            cfg.ckpt_path = str(path)


def _check_before_building(cfg: DictConfig) -> None:
    """Every config problem at once, before anything is built (the seed may still be null); a
    missing, foreign or unsafe ``ckpt_path`` in one line now, not after building."""
    from medexp.privacy import check_config as check_privacy
    from medexp.tasks.finetuning import config_problems as check_finetuning
    from medexp.utils.config import check_config
    from medexp.utils.validation import validate_config

    config = check_config(cfg)
    validate_config(config, extra=[*check_privacy(config), *check_finetuning(config), *_tested_problems(config)])
    if config.get("ckpt_path"):
        from medexp.checkpoints.checkpoint import Checkpoint

        Checkpoint(config["ckpt_path"]).check_builds_like(config)


def _tested_problems(config: dict[str, Any]) -> list[str]:
    """``test_checkpoint=last`` needs the callback that writes ``last.ckpt``."""
    if (
        config.get("test_checkpoint") == "last"
        and config.get("train")
        and not (config.get("callbacks") or {}).get("last_checkpoint")
    ):
        return [
            "test_checkpoint=last tests checkpoints/last.ckpt, which callbacks.last_checkpoint writes, but that "
            "callback is off; keep callbacks.last_checkpoint or set test_checkpoint=best"
        ]
    return []


def _check_resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as it will run (seed drawn, logger runs continued), checked once more."""
    from medexp.utils.config import check_config
    from medexp.utils.preflight import check_run_dirs

    resolved = check_config(cfg)
    _check_recorded(resolved)
    check_run_dirs(resolved)  # a full disk or unwritable directory now, not at the first checkpoint
    return resolved


def _check_recorded(resolved: dict[str, Any]) -> None:
    """A reproduction trains from a recorded config (see :mod:`medexp.reproduce`): check what its
    interpolations resolved to as well, against what medexp builds and what the user trusts."""
    import json

    from medexp.checkpoints.allowlist import RECORDED_CONFIG_ENV, check_targets

    trusted = os.environ.get(RECORDED_CONFIG_ENV)
    if trusted is not None:
        check_targets(resolved, json.loads(trusted), where="the recorded config (resolved)")


def _build(cfg: DictConfig, resolved: dict[str, Any], seed: int) -> tuple[Any, Any, list[Any], Any]:
    """The DataModule, task, loggers and Trainer, in this order: the order draws from the seed.

    Returns:
        ``(datamodule, model, loggers, trainer)``; ``loggers`` are those that started.
    """
    import lightning.pytorch as L
    from hydra.utils import instantiate

    from medexp.callbacks.moved_checkpoints import RestoreMovedCheckpoints
    from medexp.callbacks.seed import SeedEachEpoch
    from medexp.checkpoints.checkpoint import StoreConfig
    from medexp.utils.config import build, instantiate_dict
    from medexp.utils.loggers import start_loggers
    from medexp.utils.validation import check_monitors

    # plain lists and dicts, not OmegaConf containers: hyperparameters are saved in checkpoints
    datamodule = build(cfg.data)
    model = _build_model(cfg, resolved)
    # callbacks' monitors against what this task logs: now, not when the first epoch ends
    check_monitors(resolved, model.logged_metrics(), type(model).__name__)
    # privacy=dp: Opacus-compatible layers before the optimiser exists; its callback goes first, so
    # it sees each loss before the fault check does (see medexp.privacy.dp)
    privacy = [build(cfg.privacy)] if cfg.get("privacy") else []
    for dp in privacy:
        dp.prepare(model)
    callbacks = [
        *privacy,
        *instantiate_dict(cfg.get("callbacks")),
        StoreConfig(resolved),
        SeedEachEpoch(seed),
        RestoreMovedCheckpoints(),
    ]  # a resumed run whose directory moved keeps its best checkpoint
    out = Path(cfg.paths.output_dir)
    loggers = start_loggers(instantiate_dict(cfg.get("logger")), fallback_dir=out)  # drops those that fail
    if not loggers:  # logger=none: Lightning refuses a learning-rate monitor with nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, L.callbacks.LearningRateMonitor)]
    # trainer.enable_progress_bar=false (enable_model_summary=false) turns the bar (the summary) off:
    # Lightning would refuse the one callbacks configure (callbacks.rich_progress_bar)
    for switch, kind in (
        ("enable_progress_bar", L.callbacks.ProgressBar),
        ("enable_model_summary", L.callbacks.ModelSummary),
    ):
        if cfg.trainer.get(switch) is False:
            callbacks = [c for c in callbacks if not isinstance(c, kind)]
    if cfg.trainer.get("strategy") == "ddp" and getattr(model, "ddp_strategy", None):
        log.info("%s under DDP: trainer.strategy=%s", type(model).__name__, model.ddp_strategy)
        cfg.trainer.strategy = model.ddp_strategy
    from medexp.privacy.encryption import EncryptedCheckpointIO

    # checkpoints encrypted with encryption.key_env's key; encrypted ones are read in any case
    checkpoint_io = EncryptedCheckpointIO((cfg.get("encryption") or {}).get("key_env"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[checkpoint_io])
    return datamodule, model, loggers, trainer


def _build_model(cfg: DictConfig, resolved: dict[str, Any]) -> Any:
    """The task (loading ``model.init_weights``); a net whose ``pretrained=true`` cannot download
    its weights is refused in one line that says which file to fetch and how to pass it."""
    from medexp.checkpoints.weights import pretrained_download_failed
    from medexp.utils.config import build

    try:
        return build(cfg.model)
    except Exception as exc:
        cause: BaseException | None = exc
        seen = set()  # a re-raised cause can be its wrapper's context: the chain may loop
        while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        cause = cause if isinstance(cause, OSError) else None
        problem = None if cause is None else pretrained_download_failed(resolved["model"].get("net") or {}, cause)
        if problem is None:
            raise
        raise problem from None


def _write_run_record(
    cfg: DictConfig,
    resolved: dict[str, Any],
    seed: int,
    loggers: list[Any],
    previous: dict[str, Any],
    init_report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``run_info.json`` and ``resolved_config.yaml`` (rank 0 only).

    Returns:
        The run info, which gains the data fingerprint once the data are set up.
    """
    from medexp.utils.run_info import run_info, write_json

    out = Path(cfg.paths.output_dir)
    info = run_info(seed)
    info["loggers"] = {**previous.get("loggers", {}), **_logger_run_ids(loggers)}
    if init_report:  # what model.init_weights loaded, as the log's table says
        info["init_weights"] = init_report
    if cfg.train and cfg.ckpt_path:
        info["resumed_from"] = [*previous.get("resumed_from", []), str(cfg.ckpt_path)]
    write_json(out / "run_info.json", info)
    # Hydra's .hydra/config.yaml keeps interpolations; this is what actually ran
    OmegaConf.save(resolved, out / "resolved_config.yaml")
    return info


def _log_hyperparams(loggers: list[Any], resolved: dict[str, Any], continued: dict[str, str]) -> None:
    """The resolved config as each logger's hyperparameters.

    Args:
        continued: the logger run ids a resumed run continues (empty for a fresh run).
    """
    for logger in loggers:
        if type(logger).__name__ == "MLFlowLogger" and continued.get("mlflow") == logger.run_id:
            continue  # MLflow refuses to change a run's params: they stay as the run started
        logger.log_hyperparams(_hyperparams(logger, resolved))


def _hyperparams(logger: Any, resolved: dict[str, Any]) -> dict[str, Any]:
    """The flattened config as ``logger``'s hyperparameters: remote loggers (wandb, an MLflow
    server) get file paths as pseudonyms (``logger.hash_paths``)."""
    from medexp.utils.privacy import hyperparams_for

    return hyperparams_for(logger, _flatten(resolved), resolved.get("logger"))


def _log_hyperparams_with_metrics(loggers: list[Any], resolved: dict[str, Any], metrics: dict[str, Any]) -> None:
    """TensorBoard's HParams view: the hyperparameters with the tested checkpoint's val and test
    metrics as ``final/val/...`` and ``final/test/...`` (own names: the curves of ``val/...`` keep
    their steps), one session per run, so the runs of a sweep compare side by side."""
    from lightning.pytorch.loggers import TensorBoardLogger

    final = {f"final/{name}": value for split in ("val", "test") for name, value in (metrics.get(split) or {}).items()}
    final = {name: value for name, value in final.items() if isinstance(value, int | float)}
    if not final:  # test=false, or a pruned run: nothing tested
        return
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        try:
            logger.log_hyperparams(_hyperparams(logger, resolved), final)
            logger.finalize("success")  # Lightning closed its writer after testing: flush this file too
        except Exception:  # an addition to the run's record, not part of its result (metrics.json)
            log.warning("TensorBoard's hyperparameters with the final metrics could not be written", exc_info=True)


def _fit_and_test(
    cfg: DictConfig, trainer: Any, model: Any, datamodule: Any, info: dict[str, Any], metrics: dict[str, Any]
) -> None:
    """Fit, calibrate and test as ``cfg`` says, recording into ``metrics`` as each step ends (a
    stopped run writes what it has so far)."""
    from medexp.utils.run_info import to_floats, write_json

    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        metrics["fit"] = to_floats(trainer.callback_metrics)
        if any(getattr(callback, "pruned", False) for callback in trainer.callbacks):
            metrics["status"] = "pruned"
    if hasattr(datamodule, "fingerprint") and trainer.is_global_zero:
        datamodule.setup()  # done by fit; a test-only run (train=false) has not set it up yet
        info["data_fingerprint"] = datamodule.fingerprint()
        write_json(Path(cfg.paths.output_dir) / "run_info.json", info)
    tested = _tested_checkpoint(cfg, trainer, _best_checkpoint(cfg, trainer, model, metrics), metrics)
    if cfg.train and metrics["status"] != "pruned" and model.hparams.get("calibrate"):
        # temperature scaling of the tested checkpoint on the validation split, written into it
        from medexp.reports.calibration import calibrate_checkpoint

        key_env = OmegaConf.select(cfg, "encryption.key_env")
        metrics["calibration"] = calibrate_checkpoint(trainer, model, datamodule, tested or None, key_env)
    if cfg.test and metrics["status"] != "pruned":
        _test(cfg, trainer, model, datamodule, metrics, tested)


def _best_checkpoint(cfg: DictConfig, trainer: Any, model: Any, metrics: dict[str, Any]) -> str:
    """The best checkpoint's path (``""`` if none), with its monitor and score in ``metrics``."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    # without medexp's checkpoint callbacks (callbacks=none), Lightning's default one keeps
    # the latest checkpoint, scored by nothing
    if cfg.train and best and trainer.checkpoint_callback.best_model_score is not None:
        metrics.update(
            monitor=model.monitor,
            best_score=float(trainer.checkpoint_callback.best_model_score),
            best_checkpoint=best,
        )
    return best


def _tested_checkpoint(cfg: DictConfig, trainer: Any, best: str, metrics: dict[str, Any]) -> str:
    """The checkpoint that validation, calibration and test use (``test_checkpoint``): ``best``,
    or with ``test_checkpoint=last`` the latest one the unmonitored checkpoint callback saved
    (``last.ckpt``), recorded in ``metrics`` as ``tested_checkpoint``."""
    if not cfg.train or cfg.get("test_checkpoint", "best") != "last":
        return best
    from lightning.pytorch.callbacks import ModelCheckpoint

    latest = [
        c.best_model_path
        for c in trainer.checkpoint_callbacks
        if isinstance(c, ModelCheckpoint) and c.monitor is None and c.best_model_path
    ]
    if not latest:
        log.warning("test_checkpoint=last, but no last checkpoint was saved; testing the best one")
        return best
    metrics["tested_checkpoint"] = latest[0]
    return latest[0]


def _test(cfg: DictConfig, trainer: Any, model: Any, datamodule: Any, metrics: dict[str, Any], tested: str) -> None:
    """Validate and test the ``tested`` checkpoint into ``metrics``; with ``report=true``, its report."""
    from medexp.utils.run_info import to_floats

    # without training (train=false), test the checkpoint given as ckpt_path
    ckpt = tested or cfg.ckpt_path
    if not ckpt:
        log.warning("no checkpoint was saved; evaluating the current weights")
    metrics["val"] = to_floats(trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt)[0])
    metrics["test"] = to_floats(trainer.test(model, datamodule=datamodule, ckpt_path=ckpt)[0])
    if cfg.get("report") and trainer.is_global_zero:
        _write_report(cfg, trainer, model, datamodule, metrics, ckpt)


def _write_report(
    cfg: DictConfig, trainer: Any, model: Any, datamodule: Any, metrics: dict[str, Any], ckpt: str | None
) -> None:
    """``<run>/report/``: the evaluation report of the tested checkpoint on the test split (see
    :mod:`medexp.reports.evaluation`). A failure is logged, never fatal: the run's metrics stand."""
    from medexp.reports import write_report

    try:
        write_report(
            trainer,
            model,
            datamodule,
            Path(cfg.paths.output_dir) / "report",
            split="test",
            metrics=metrics["test"],
            remote_images=bool(cfg.get("logger", {}).get("log_images", False)),
            calibration=metrics.get("calibration"),
            checkpoint=str(ckpt) if ckpt else None,
        )
    except Exception:  # the report is an addition to the run, not part of its result
        log.warning("the evaluation report could not be written", exc_info=True)


def _seed(seed: int | None) -> int:
    """``seed``, or for null a drawn one (Lightning would take 0), shared with the DDP worker
    processes that Lightning starts for this run through their inherited environment."""
    if seed is not None:
        return seed
    if _DRAWN_SEED not in os.environ:
        os.environ[_DRAWN_SEED] = str(secrets.randbelow(2**31))
    return int(os.environ[_DRAWN_SEED])


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` for loggers' hyperparameter tables."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _logger_run_ids(loggers: list[Any]) -> dict[str, str]:
    """The run ids of loggers that can continue a run (wandb, MLflow), by config name."""
    ids = {}
    for logger in loggers:
        name = type(logger).__name__
        if name == "WandbLogger":  # its id exists once the run has started
            ids["wandb"] = logger.experiment.id
        elif name == "MLFlowLogger":
            ids["mlflow"] = logger.run_id
    return {key: value for key, value in ids.items() if value}


def _continue_logger_runs(cfg: DictConfig, ids: dict[str, str]) -> None:
    """Point wandb and MLflow at the runs this run directory logged to before it was resumed."""
    loggers = cfg.get("logger") or {}
    with open_dict(cfg):
        if ids.get("wandb") and loggers.get("wandb") and not loggers.wandb.get("id"):
            loggers.wandb.id = ids["wandb"]
            loggers.wandb.resume = "allow"
        if ids.get("mlflow") and loggers.get("mlflow") and not loggers.mlflow.get("run_id"):
            loggers.mlflow.run_id = ids["mlflow"]


def _finish_wandb() -> None:
    # a wandb run left open, e.g. after an exception, would swallow the next job of a multirun
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    # ddp_workers_join_this_job: DDP workers (strategy=ddp) run this multirun job, in its directory
    with user_errors(), ddp_workers_join_this_job("medexp.train"):
        metrics = train(cfg)
    # what a sweeper optimises (hydra_plugins.medexp.optuna_sweeper reads objective and status)
    return {**metrics, "objective": lookup_metric(metrics, cfg.get("optimized_metric"))}


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *resume_arguments(sys.argv[1:])]
    main()
