"""``medexp federate`` (or ``python -m medexp.federate``): federated learning over simulated sites.

The data are dealt to ``federated.sites`` sites (:mod:`medexp.federated.sites`); each round,
every site trains the global model on its own samples and the server averages the results
(FedAvg, or FedProx with ``federated.algorithm=fedprox``; see :mod:`medexp.federated.simulation`).

Writes into the run directory: Hydra's config (``.hydra/``), ``resolved_config.yaml``,
``run_info.json`` (as ``medexp train``), ``federated.csv`` (per round, one row per site and a
``global`` row: the local updates' training metrics and the global model's validation metrics),
``metrics.json`` (the final global model's ``val`` and ``test`` metrics on the whole splits, and
under ``sites`` each site's sample counts and metrics on its own val and test samples) and
``checkpoints/global.ckpt``, a checkpoint like ``medexp train``'s: ``medexp eval``, ``predict``
and ``export`` take it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from medexp.resolvers import register_resolvers
from medexp.utils.config import CONFIG_PATH
from medexp.utils.errors import user_errors

log = logging.getLogger("medexp")
register_resolvers()


def federate(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.model`` over simulated sites of ``cfg.data`` as ``cfg.federated`` says.

    Returns:
        The contents of ``metrics.json``: ``status``, ``seed``, ``federated`` (the settings and
        site names), ``checkpoint``, ``val`` and ``test`` (global) and ``sites`` (per site).
    """
    _check_before_building(cfg)
    # imported before tidy_library_output, which removes the console handler lightning attaches
    import lightning.pytorch as L

    from medexp.federated.simulation import quiet_trainers, simulate
    from medexp.utils.config import build
    from medexp.utils.run_info import write_json
    from medexp.utils.runtime import tidy_library_output

    tidy_library_output()
    seed = L.seed_everything(cfg.seed if cfg.seed is not None else secrets.randbelow(2**31), workers=True)
    with open_dict(cfg):
        cfg.seed = seed
    resolved = _check_resolved(cfg)
    out = Path(cfg.paths.output_dir)

    datamodule = build(cfg.data)
    model = build(cfg.model)
    datamodule.setup("fit")
    settings = cfg.federated
    plan, labels = _plan_sites(datamodule, settings)
    _write_run_record(out, resolved, seed, datamodule)

    local_trainer, eval_trainer = _trainers(cfg, resolved)
    results = simulate(
        model,
        datamodule,
        plan,
        rounds=settings.rounds,
        algorithm=settings.algorithm,
        mu=settings.mu,
        seed=seed,
        local_trainer=local_trainer,
        eval_trainer=eval_trainer,
        history=out / "federated.csv",
    )
    checkpoint = out / "checkpoints" / "global.ckpt"
    with quiet_trainers():  # Lightning notes that the full state (not weights only) is saved
        eval_trainer.save_checkpoint(checkpoint)

    metrics = _metrics(seed, settings, plan.names, labels, checkpoint, results)
    write_json(out / "metrics.json", metrics)
    tested = "test/" + model.monitor.removeprefix("val/")
    log.info("global model: %s %s; run directory: %s", tested, metrics["test"].get(tested), out)
    return metrics


def _check_before_building(cfg: DictConfig) -> None:
    """Every config problem at once, before anything is built."""
    from medexp.federated.checks import check_federated
    from medexp.utils.config import check_config
    from medexp.utils.validation import validate_config

    config = check_config(cfg)
    validate_config(config, extra=check_federated(config))


def _check_resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as it will run (seed drawn), with its run directories checked."""
    from medexp.utils.config import check_config
    from medexp.utils.preflight import check_run_dirs

    resolved = check_config(cfg)
    check_run_dirs(resolved)
    return resolved


def _plan_sites(datamodule: Any, settings: DictConfig) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Deal the set-up data to the sites; log each site's training samples.

    Returns:
        ``(plan, labels)``: the :class:`~medexp.federated.sites.SitePlan` and each site's label
        counts per split.
    """
    from medexp.federated.sites import label_counts, plan_sites

    plan = plan_sites(datamodule, settings.sites, settings.split, settings.alpha, settings.seed)
    labels = label_counts(datamodule, plan)
    log.info(
        "%d sites (%s split), training samples (per class): %s",
        len(plan.names),
        settings.split,
        "; ".join(
            f"{name} {count} {labels[name].get('train', '')}" for name, count in zip(plan.names, plan.counts("train"))
        ),
    )
    return plan, labels


def _write_run_record(out: Path, resolved: dict[str, Any], seed: int, datamodule: Any) -> None:
    """``run_info.json`` (with the data fingerprint) and ``resolved_config.yaml``, as ``medexp train``."""
    from medexp.utils.run_info import run_info, write_json

    info = run_info(seed)
    info["data_fingerprint"] = datamodule.fingerprint()
    write_json(out / "run_info.json", info)
    OmegaConf.save(resolved, out / "resolved_config.yaml")


def _trainers(cfg: DictConfig, resolved: dict[str, Any]) -> tuple[Callable[[list[Any]], Any], Any]:
    """The sites' trainers (a factory: one per local update) and the server's evaluation trainer.

    Returns:
        ``(local_trainer, eval_trainer)``.
    """
    import lightning.pytorch as L
    from hydra.utils import instantiate

    from medexp.checkpoints.checkpoint import StoreConfig

    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)

    def local_trainer(callbacks: list[L.Callback]) -> L.Trainer:
        # a site's update: training only, no checkpoints, logs or validation
        return instantiate(
            cfg.trainer,
            **quiet,
            callbacks=callbacks,
            enable_checkpointing=False,
            max_epochs=cfg.federated.local_epochs,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )

    # StoreConfig: the global checkpoint carries the run config, as medexp train's do
    eval_trainer: L.Trainer = instantiate(
        cfg.trainer, **quiet, callbacks=[StoreConfig(resolved)], enable_checkpointing=False
    )
    return local_trainer, eval_trainer


def _metrics(
    seed: int,
    settings: DictConfig,
    site_names: list[str],
    labels: dict[str, dict[str, Any]],
    checkpoint: Path,
    results: dict[str, Any],
) -> dict[str, Any]:
    """The contents of ``metrics.json`` (see :func:`federate`), from what :func:`simulate` returned."""
    return {
        "status": "complete",
        "seed": seed,
        "federated": {**OmegaConf.to_container(settings, resolve=True), "site_names": site_names},
        "checkpoint": str(checkpoint),
        "val": results["val"],
        "test": results["test"],
        "sites": {name: {"labels": labels[name], **site} for name, site in results["sites"].items()},
    }


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="federate")
def main(cfg: DictConfig) -> dict[str, Any]:
    with user_errors():
        return federate(cfg)


if __name__ == "__main__":
    main()
