"""``medexp eval ckpt_path=...`` (or ``python -m medexp.eval``): evaluate a checkpoint.

Data and model are rebuilt from the run config stored in the checkpoint, so no config tree or
overrides from training are needed. When the checkpoint sits in a run directory with a
``metrics.json``, the recorded metrics are printed next to the new ones. ``report=true`` writes
the evaluation report (:mod:`medexp.reports.evaluation`) into ``<eval run>/report/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from medexp.resolvers import register_resolvers
from medexp.utils.config import CONFIG_PATH
from medexp.utils.distributed import ddp_workers_join_this_job
from medexp.utils.errors import user_errors
from medexp.utils.validation import Rule, check_options

log = logging.getLogger("medexp")
register_resolvers()

SPLITS = ("val", "test")
RULES = (Rule("splits", SPLITS, sequence=True, message=f"expected a non-empty subset of {list(SPLITS)}"),)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on the splits in ``cfg.splits``.

    Returns:
        The contents of the eval run's ``metrics.json``: ``{split: {metric: value}}`` plus the
        ``recorded`` metrics of the training run when available.
    """
    from medexp.utils.config import check_config

    check_config(cfg)
    check_options(cfg, RULES)

    import lightning.pytorch as L
    from hydra.utils import instantiate

    from medexp.checkpoints.checkpoint import Checkpoint
    from medexp.utils.config import instantiate_dict
    from medexp.utils.loggers import start_loggers
    from medexp.utils.run_info import to_floats, write_json
    from medexp.utils.runtime import tidy_library_output

    tidy_library_output()
    ckpt_path = Path(cfg.ckpt_path).expanduser()
    checkpoint = Checkpoint(ckpt_path, cfg.allowed_targets)
    datamodule, model = checkpoint.build(cfg.data, data_output_dir=cfg.paths.output_dir)
    # a logger that cannot start (wandb offline from the network, say) is dropped, not fatal
    loggers = start_loggers(instantiate_dict(cfg.get("logger")), fallback_dir=cfg.paths.output_dir)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False)

    results: dict[str, Any] = {"checkpoint": str(ckpt_path)}
    for split in cfg.splits:
        run = trainer.validate if split == "val" else trainer.test
        results[split] = to_floats(run(model, datamodule=datamodule)[0])

    if cfg.get("report") and trainer.is_global_zero:
        from medexp.reports import write_report
        from medexp.reports.calibration import CALIBRATION_KEY

        split = "test" if "test" in cfg.splits else cfg.splits[0]
        write_report(
            trainer,
            model,
            datamodule,
            Path(cfg.paths.output_dir) / "report",
            split=split,
            metrics=results[split],
            remote_images=bool(cfg.get("logger", {}).get("log_images", False)),
            calibration=checkpoint.contents.get(CALIBRATION_KEY),
            checkpoint=str(ckpt_path),
        )

    recorded_file = ckpt_path.resolve().parent.parent / "metrics.json"
    if recorded_file.is_file():
        recorded = json.loads(recorded_file.read_text())
        results["recorded"] = {split: recorded.get(split, {}) for split in cfg.splits}
        _print_comparison(results)
    if trainer.is_global_zero:
        write_json(Path(cfg.paths.output_dir) / "metrics.json", results)
    return results


def _print_comparison(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="recorded at training vs now")
    for column in ("metric", "recorded", "now", "difference"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for split, recorded in results["recorded"].items():
        for name, now in results[split].items():
            before = recorded.get(name)
            diff = "" if before is None or now is None else f"{now - before:+.2e}"
            table.add_row(name, "-" if before is None else f"{before:.6f}", f"{now:.6f}", diff)
    Console().print(table)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors(), ddp_workers_join_this_job("medexp.eval"):
        evaluate(cfg)


if __name__ == "__main__":
    main()
