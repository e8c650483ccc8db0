"""What a run directory records besides Hydra's config: seed, code version, packages, metrics."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import math
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import medexp

PACKAGES = ("torch", "lightning", "monai", "torchmetrics", "hydra-core", "omegaconf", "numpy", "optuna", "medexp")


def git_state(directory: Path) -> dict[str, Any] | None:
    """Commit and dirty flag of the git work tree holding ``directory``; None outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return {
            "root": git("rev-parse", "--show-toplevel"),
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# what a run started from Python (medexp.api) records as its command: the call and its
# overrides, e.g. ["medexp.train", "model=resnet18"], rather than the interpreter's arguments
API_CALL: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("medexp_api_call", default=None)


def run_info(seed: int) -> dict[str, Any]:
    """The facts needed to reproduce a run: seed, command, code version, packages, hardware."""
    import torch

    import __main__

    code = git_state(Path(medexp.__file__).resolve().parent)
    cwd = git_state(Path.cwd())
    spec = getattr(__main__, "__spec__", None)
    program = ["python", "-m", spec.name] if spec else [sys.argv[0]]
    return {
        "seed": seed,
        "command": API_CALL.get() or [*program, *sys.argv[1:]],
        "cwd": str(Path.cwd()),
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": {"medexp": code, "cwd": cwd if cwd != code else None},
        "versions": package_versions(),
        "host": {
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        },
    }


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Logged metric tensors -> floats (NaN becomes None in JSON)."""
    return {key: float(value) for key, value in sorted(metrics.items())}


def write_json(path: Path, data: dict[str, Any]) -> None:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(data), indent=2) + "\n")


def lookup_metric(metrics: dict[str, Any], name: str | None) -> float | None:
    """The value of ``name`` (e.g. ``val/auroc_best``) in any section of ``metrics``."""
    for section in ("fit", "val", "test"):
        if name in metrics.get(section, {}):
            return metrics[section][name]
    return None
