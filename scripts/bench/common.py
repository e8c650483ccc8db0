"""Shared by the benchmarks in scripts/bench/: interleaved A/B timing, a step-timing callback for
`medexp train`, and the markdown/JSON output.

Every figure is a ratio of two measurements taken side by side: A and B alternate (A B A B ...,
the order flipping each pair) in fresh processes, and the median ratio and its spread (min-max)
over the pairs are reported, because a shared machine drifts by more than the differences measured.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BENCH = Path(__file__).resolve().parent


def env(threads: int) -> dict[str, str]:
    """The environment of a benchmark subprocess: ``threads`` compute threads, this folder importable
    (for :class:`StepTimer`), no remote logging."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([str(BENCH), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "WANDB_MODE": "offline",
    }


def run(command: list[str], threads: int, cwd: Path | None = None) -> float:
    """Run ``command``; returns its wall time in seconds. A failure stops the benchmark with the
    command's output."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env(threads), cwd=cwd or REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(
            f"benchmark command failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return elapsed


def interleave(pairs: int, a: Callable[[], float], b: Callable[[], float]) -> dict[str, Any]:
    """Measure ``a`` and ``b`` alternately ``pairs`` times (order flipped every pair).

    Returns:
        ``a``/``b``: every value, ``ratio``: the median of the per-pair ratios a/b, ``spread``: their
        min and max, plus the medians of a and b.
    """
    values_a, values_b = [], []
    for i in range(pairs):
        if i % 2 == 0:
            values_a.append(a())
            values_b.append(b())
        else:
            values_b.append(b())
            values_a.append(a())
    ratios = [x / y for x, y in zip(values_a, values_b)]
    return {
        "a": values_a,
        "b": values_b,
        "median_a": statistics.median(values_a),
        "median_b": statistics.median(values_b),
        "ratio": statistics.median(ratios),
        "spread": [min(ratios), max(ratios)],
    }


def medexp(command: str, *overrides: str) -> list[str]:
    """The command line of ``medexp <command> <overrides>`` in this interpreter."""
    return [sys.executable, "-m", "medexp", command, *overrides]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import platform

    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def save(path: Path | None, record: dict[str, Any]) -> None:
    """Append ``record`` (with the machine) as one JSON line to ``path`` and print it."""
    record = {"machine": machine(), **record}
    print(json.dumps(record, indent=1))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def fmt_ratio(result: dict[str, Any]) -> str:
    low, high = result["spread"]
    return f"{result['ratio']:.3f}x ({low:.3f}-{high:.3f})"


try:  # the callback needs Lightning; the parent process of a benchmark does not
    import lightning.pytorch as L
except ImportError:  # pragma: no cover
    L = None


if L is not None:

    class StepTimer(L.Callback):
        """Record, inside a real `medexp train` run, what a benchmark compares (added with
        ``+callbacks.step_timer._target_=common.StepTimer +callbacks.step_timer.path=...``).

        Writes JSON with: ``first_step`` (``time.time()`` when the first training batch starts),
        ``epochs`` (wall seconds of each training epoch, from its first hook to its last batch's
        end: steps, data loading, callbacks, logging and the progress bar, not validation),
        ``cpu_epochs`` (the same in process CPU time: with one thread, a measure that other
        processes on the machine disturb far less), ``steps`` per epoch and the ``losses`` of every step.
        """

        def __init__(self, path: str) -> None:
            self.path = Path(path)
            self.record: dict[str, Any] = {"epochs": [], "cpu_epochs": [], "steps": [], "losses": []}

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self._start, self._cpu_start, self._steps = time.perf_counter(), time.process_time(), 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.record.setdefault("first_step", time.time())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._steps += 1
            self._end, self._cpu_end = time.perf_counter(), time.process_time()
            self.record["losses"].append(float(outputs["loss"]))

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.record["epochs"].append(self._end - self._start)
            self.record["cpu_epochs"].append(self._cpu_end - self._cpu_start)
            self.record["steps"].append(self._steps)

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.path.write_text(json.dumps(self.record))
