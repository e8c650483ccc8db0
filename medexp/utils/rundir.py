"""Reading a past run directory: where it is, how it was launched, what it recorded.

A run directory (``logs/train/runs/<time>`` or a job of a multirun) holds ``.hydra/`` (Hydra's
composed config and the command-line overrides), ``run_info.json``, ``metrics.json`` and
``checkpoints/``. Resuming and reproducing both start from here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from medexp.utils.errors import MedexpError

log = logging.getLogger("medexp")


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory holding ``path`` (a run directory, or a checkpoint in its
    ``checkpoints/``); None when ``path`` is not inside one."""
    path = Path(path).expanduser().resolve()
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / ".hydra" / "overrides.yaml").is_file():
            return candidate
    return None


def read_json(path: Path) -> dict[str, Any]:
    """``path`` as a dict; an empty dict when it does not exist."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MedexpError(f"{path}: not valid JSON ({exc})") from exc


def recorded_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides the run was launched with (a sweep job's: its own values)."""
    from omegaconf import OmegaConf

    return [str(item) for item in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]


def override_key(override: str) -> str:
    """``"+a.b=1"`` -> ``"a.b"``; ``"data=files"`` -> ``"data"``."""
    return override.split("=", 1)[0].lstrip("+~")


def resume_arguments(arguments: list[str]) -> list[str]:
    """Command-line overrides for ``medexp train ckpt_path=<run>/checkpoints/last.ckpt``.

    Resuming continues the run the checkpoint belongs to: with the overrides that run was
    launched with (those given now win, e.g. ``trainer.max_epochs=20``), in that run's directory,
    so its best checkpoint, early stopping and logs carry on as if never interrupted. Nothing
    changes for multiruns, ``train=false``, an explicit ``hydra.run.dir``, or a checkpoint
    outside a run directory.
    """
    given = {override_key(a): a.split("=", 1)[1] for a in arguments if "=" in a and not a.startswith("-")}
    ckpt = given.get("ckpt_path")
    if (
        not ckpt
        or ckpt == "null"
        or given.get("train") == "false"
        or "hydra.run.dir" in given
        or any(a in ("-m", "--multirun") for a in arguments)
    ):
        return arguments
    run_dir = run_dir_of(ckpt)
    if run_dir is None:
        return arguments
    recorded = [o for o in recorded_overrides(run_dir) if override_key(o) not in given]
    log.info("resuming %s with its overrides %s", run_dir, recorded)
    return [*recorded, *arguments, f"hydra.run.dir={run_dir}"]


class CsvHistory:
    """Keeps a resumed run's CSV log whole.

    Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts; a run resumed in its
    own directory would lose the epochs before the interruption. :meth:`read` keeps the rows
    before training, :meth:`restore` puts back those that precede the resumed part's first step.
    """

    def __init__(self, loggers: list[Any]) -> None:
        self.files = [
            Path(logger.log_dir) / "metrics.csv" for logger in loggers if type(logger).__name__ == "CSVLogger"
        ]
        self.rows: dict[Path, list[dict[str, str]]] = {}

    def read(self) -> None:
        import csv

        for path in self.files:
            if path.is_file():
                with path.open(newline="") as file:
                    self.rows[path] = list(csv.DictReader(file))

    def restore(self) -> None:
        import csv

        for path, old in self.rows.items():
            with path.open(newline="") as file:
                new = list(csv.DictReader(file)) if path.is_file() else []
            first = min((int(row["step"]) for row in new if row.get("step")), default=None)
            kept = [row for row in old if first is None or (row.get("step") and int(row["step"]) < first)]
            fields = sorted({key for row in kept + new for key in row})
            with path.open("w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=fields)
                writer.writeheader()
                writer.writerows(kept + new)
