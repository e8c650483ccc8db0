"""``medexp train`` (or ``python -m medexp.train``): fit a model, then test its best checkpoint.

Writes into the run directory: Hydra's config and overrides (``.hydra/``), the resolved config
(``resolved_config.yaml``), ``run_info.json``
(seed, git commit, package versions), ``checkpoints/{best,last}.ckpt``, logger files and
``metrics.json`` (the best checkpoint's val and test metrics).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from medexp.utils.config import CONFIG_PATH, register_resolvers
from medexp.utils.errors import user_errors

log = logging.getLogger("medexp")
register_resolvers()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit ``cfg.model`` on ``cfg.data`` with ``cfg.trainer``; test the best checkpoint.

    Returns:
        The contents of ``metrics.json``.
    """
    from medexp.utils.config import check_config

    check_config(cfg)  # all config errors before anything heavy is imported or built

    import lightning.pytorch as L
    from hydra.utils import instantiate

    from medexp.utils.checkpoint import StoreConfig
    from medexp.utils.config import instantiate_dict
    from medexp.utils.run_info import run_info, to_floats, write_json
    from medexp.utils.runtime import tidy_library_output

    tidy_library_output()
    # Always seed (a drawn seed when cfg.seed is null), and keep the seed actually used.
    seed = L.seed_everything(cfg.seed, workers=True)
    with open_dict(cfg):
        cfg.seed = seed
    resolved = check_config(cfg)
    out = Path(cfg.paths.output_dir)

    # plain lists and dicts, not OmegaConf containers: hyperparameters are saved in checkpoints
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    callbacks = [*instantiate_dict(cfg.get("callbacks")), StoreConfig(resolved)]
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    if trainer.is_global_zero:
        write_json(out / "run_info.json", run_info(seed))
        # Hydra's .hydra/config.yaml keeps interpolations; this is what actually ran
        OmegaConf.save(resolved, out / "resolved_config.yaml")
    for logger in loggers:
        logger.log_hyperparams(_flatten(resolved))

    metrics: dict[str, Any] = {"seed": seed}
    try:
        if cfg.train:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
            metrics["fit"] = to_floats(trainer.callback_metrics)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if cfg.train and best:
            metrics.update(
                monitor=model.monitor,
                best_score=float(trainer.checkpoint_callback.best_model_score),
                best_checkpoint=best,
            )
        if cfg.test:
            # without training (train=false), test the checkpoint given as ckpt_path
            ckpt = best or cfg.ckpt_path
            if not ckpt:
                log.warning("no best checkpoint was saved; evaluating the current weights")
            metrics["val"] = to_floats(trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt)[0])
            metrics["test"] = to_floats(trainer.test(model, datamodule=datamodule, ckpt_path=ckpt)[0])
    finally:
        _finish_wandb()

    if trainer.is_global_zero:
        write_json(out / "metrics.json", metrics)
        log.info("run directory: %s", out)
    return metrics


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


def _finish_wandb() -> None:
    # a wandb run left open, e.g. after an exception, would swallow the next job of a multirun
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def lookup_metric(metrics: dict[str, Any], name: str | None) -> float | None:
    """The value of ``name`` (e.g. ``val/auroc_best``) in any section of ``metrics``."""
    for section in ("fit", "val", "test"):
        if name in metrics.get(section, {}):
            return metrics[section][name]
    return None


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        metrics = train(cfg)
    # the value a Hydra sweeper optimises
    return lookup_metric(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
