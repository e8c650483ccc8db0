"""Start-up checks: the directories a run writes to, and the free space on their disks.

A full disk or an unwritable directory would otherwise surface after the first epoch, when the
first checkpoint is saved. Kept free of torch/lightning imports: it runs before anything heavy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medexp.utils.errors import MedexpError

GB = 1024**3
DEFAULT_MIN_FREE_GB = 1.0


def output_dirs(config: dict[str, Any]) -> list[tuple[str, Path]]:
    """``(config key, directory)`` for every directory the run writes to: the run directory,
    the checkpoints, and the loggers' folders (a local MLflow store included)."""
    dirs = [("hydra.run.dir", config["paths"]["output_dir"])]
    checkpoint = (config.get("callbacks") or {}).get("model_checkpoint") or {}
    if checkpoint.get("dirpath"):
        dirs.append(("callbacks.model_checkpoint.dirpath", checkpoint["dirpath"]))
    for name, logger in (config.get("logger") or {}).items():
        if not isinstance(logger, dict):
            continue  # group settings such as logger.log_images
        if logger.get("save_dir"):
            dirs.append((f"logger.{name}.save_dir", logger["save_dir"]))
        uri = str(logger.get("tracking_uri") or "")
        if uri.startswith("sqlite:///"):
            dirs.append((f"logger.{name}.tracking_uri", str(Path(uri.removeprefix("sqlite:///")).parent)))
        elif uri.startswith("file:") or (uri and "://" not in uri):
            dirs.append((f"logger.{name}.tracking_uri", uri.removeprefix("file://").removeprefix("file:")))
    seen, unique = set(), []
    for key, path in dirs:
        path = Path(path).expanduser().absolute()
        if path not in seen:
            seen.add(path)
            unique.append((key, path))
    return unique


def check_writable(path: Path, key: str) -> None:
    """Write, then delete, a file in ``path``; directories created for it are removed again.

    Permission bits alone do not tell (root writes anywhere, read-only mounts, quotas), so this
    tries.

    Raises:
        MedexpError: naming the directory, the reason and the key that sets it.
    """
    created = []  # deepest first
    parent = path
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".medexp-write-test-") as probe:
            probe.write(b"medexp")
            probe.flush()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MedexpError(
            f"cannot write to {path} ({reason}: {exc.filename or path}), set by {key}; "
            f"choose a writable directory ({key}=...) or fix its permissions"
        ) from exc
    finally:
        for directory in created:  # the run creates them when it writes there
            with contextlib.suppress(OSError):
                directory.rmdir()


def check_free_space(path: Path, needed_bytes: float, key: str, what: str, setting: str | None = None) -> None:
    """Raise unless the disk holding ``path`` has ``needed_bytes`` free.

    Args:
        path: a directory (need not exist yet).
        needed_bytes: the space needed.
        key: the config key that sets ``path``.
        what: what needs the space, for the message.
        setting: the config key of the threshold, if it is one.

    Raises:
        MedexpError: naming the directory, the free and the needed space and what to do.
    """
    free = shutil.disk_usage(_existing(path)).free
    if free < needed_bytes:
        raise MedexpError(
            f"only {free / GB:.2f} GB free on the disk holding {path} ({key}); {what} needs "
            f"{needed_bytes / GB:.2f} GB. Free some space or point {key} at another disk"
            + (f" (or lower {setting}=...)" if setting else "")
        )


def check_run_dirs(config: dict[str, Any]) -> None:
    """The run's directories are writable and their disks have ``preflight.min_free_gb`` free.

    Args:
        config: the resolved run config.

    Raises:
        MedexpError: for the first directory that fails.
    """
    min_free_gb = float((config.get("preflight") or {}).get("min_free_gb", DEFAULT_MIN_FREE_GB))
    disks = set()
    for key, path in output_dirs(config):
        check_writable(path, key)
        disk = os.stat(_existing(path)).st_dev
        if disk not in disks:
            disks.add(disk)
            check_free_space(path, min_free_gb * GB, key, "a run", setting="preflight.min_free_gb")


def checkpoint_bytes(parameters: Any, optimizer_states: int = 2) -> int:
    """An estimate of one checkpoint's size: the weights plus ``optimizer_states`` tensors of
    the same size per weight (Adam keeps two)."""
    return sum(p.numel() * p.element_size() for p in parameters) * (1 + optimizer_states)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
