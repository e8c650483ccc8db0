"""Resuming a run whose directory moved: copied to another disk or machine, or renamed.

Lightning's ``ModelCheckpoint`` restores its best score only when the checkpoint was written to
the same ``dirpath``; otherwise it warns ("The dirpath has changed ... won't be reloaded") and
starts over, so the first epoch after resuming replaces ``best.ckpt`` however bad it is, and its
``best_model_path`` still names the old directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as L

log = logging.getLogger("medexp")

# what ModelCheckpoint.state_dict stores as paths inside its dirpath
_PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")


class RestoreMovedCheckpoints(L.Callback):
    """Before the checkpoint callbacks load their state from a resumed checkpoint, move what they
    stored from the checkpoint's old directory to their new one, so the best score and the best
    checkpoint carry on as if the run had never moved.

    A monitored callback whose checkpoints were not copied along (e.g. only ``last.ckpt``) is left
    as Lightning leaves it, with a warning: its best is then chosen again among the epochs to come.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        for callback in trainer.checkpoint_callbacks:
            state = states.get(callback.state_key)
            old, new = (state or {}).get("dirpath"), getattr(callback, "dirpath", None)
            if not isinstance(state, dict) or not old or not new or Path(old) == Path(new):
                continue
            moved = rerooted(state, Path(old), Path(new))
            kept = [moved[key] for key in ("best_model_path",) if moved.get(key)] + list(
                moved.get("best_k_models") or {}
            )
            missing = sorted({path for path in kept if not Path(path).is_file()})
            if callback.monitor is not None and state.get("best_model_score") is not None and missing:
                log.warning(
                    "the run moved from %s to %s, but %s %s not there: the best checkpoint by %s (%s) is chosen "
                    "again among the epochs from now on",
                    old,
                    new,
                    ", ".join(missing),
                    "is" if len(missing) == 1 else "are",
                    callback.monitor,
                    _score(state["best_model_score"]),
                )
                continue
            states[callback.state_key] = moved
            log.info("the run moved from %s to %s; its checkpoints' record follows it", old, new)


def rerooted(state: dict[str, Any], old: Path, new: Path) -> dict[str, Any]:
    """``state`` (a ModelCheckpoint's) with every path directly inside ``old`` moved into ``new``."""

    def move(path: Any) -> Any:
        if isinstance(path, str) and path and Path(path).parent == old:
            return str(new / Path(path).name)
        return path

    moved = {**state, "dirpath": str(new), **{key: move(state.get(key)) for key in _PATH_KEYS if key in state}}
    if isinstance(state.get("best_k_models"), dict):
        moved["best_k_models"] = {move(path): score for path, score in state["best_k_models"].items()}
    return moved


def _score(value: Any) -> str:
    return f"{float(value):.4g}" if value is not None else "none"
