"""Domain shift and test-time BatchNorm adaptation on synthetic sites.

    python scripts/benchmark_domain_shift.py --seeds 0 1 2

For each shift (a second site ``b`` whose scanner differs from site ``a``) and seed, trains the
default CNN on site ``a`` only (``python -m medexp.train data.sites=... data.train_sites=[a]``, as
a user would start it), then tests its best checkpoint on both sites three ways:

    none      the checkpoint's BatchNorm statistics (what ``medexp train`` reports by default)
    bn/site   ``callbacks.bn_adapt.enabled=true``: statistics re-estimated on each site's
              unlabelled test images (:class:`medexp.callbacks.adaptation.BatchNormAdaptation`)
    bn/split  the same with ``per_site=false``: one set for the whole (mixed) test split

The "none" row is checked against the training run's own ``metrics.json``. Rows are appended to
``--jsonl``; a Markdown table of means (± standard deviation over seeds) is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUIET = [
    "callbacks.rich_progress_bar=null",
    "callbacks.rich_model_summary=null",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "report=false",
]
SHIFTS = {
    "contrast 0.5, brightness +0.25": "{contrast: 0.5, brightness: 0.25}",
    "contrast 1.6, brightness -0.3": "{contrast: 1.6, brightness: -0.3}",
    "gamma 2, bias field 0.5": "{gamma: 2.0, bias: 0.5}",
}
METHODS = {"none": None, "bn/site": True, "bn/split": False}
SITES = ("a", "b")


def train(shift: str, seed: int, args: argparse.Namespace) -> Path:
    slug = "".join(char if char.isalnum() else "_" for char in shift)
    run_dir = Path(args.log_dir) / f"{slug}_seed{seed}"
    if not (run_dir / "metrics.json").exists():
        command = [
            sys.executable,
            "-m",
            "medexp.train",
            f"data.sites={{a: {{}}, b: {SHIFTS[shift]}}}",
            "data.train_sites=[a]",
            f"trainer.max_epochs={args.epochs}",
            f"seed={seed}",
            f"hydra.run.dir={run_dir}",
            *QUIET,
        ]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL)
    return run_dir


def evaluate(run_dir: Path, per_site: bool | None) -> dict[str, float]:
    """The test metrics of the run's best checkpoint, with BatchNorm adaptation per site
    (True), over the whole test split (False) or none (None)."""
    import lightning.pytorch as L

    from medexp.callbacks.adaptation import BatchNormAdaptation
    from medexp.checkpoints.checkpoint import Checkpoint

    datamodule, model = Checkpoint(run_dir / "checkpoints" / "best.ckpt").build()
    callbacks = [BatchNormAdaptation(enabled=True, per_site=per_site)] if per_site is not None else []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return trainer.test(model, datamodule=datamodule, verbose=False)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", default="logs/benchmark_domain_shift")
    parser.add_argument("--jsonl", default="logs/benchmark_domain_shift/results.jsonl")
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for shift in args.shifts:
        for seed in args.seeds:
            start = time.perf_counter()
            run_dir = train(shift, seed, args)
            recorded = json.loads((run_dir / "metrics.json").read_text())["test"]
            for method, per_site in METHODS.items():
                metrics = evaluate(run_dir, per_site)
                if method == "none":  # the same checkpoint and data as the training run's own test
                    for key in ("test/site_a/auroc", "test/site_b/auroc"):
                        if abs(metrics[key] - recorded[key]) > 1e-5:
                            raise SystemExit(
                                f"{run_dir}: {key} {metrics[key]} differs from metrics.json's {recorded[key]}"
                            )
                row = {"shift": shift, "seed": seed, "method": method, "wall_s": round(time.perf_counter() - start, 1)}
                for site in SITES:
                    for name in ("auroc", "accuracy", "balanced_accuracy"):
                        row[f"{site}_{name}"] = metrics[f"test/site_{site}/{name}"]
                rows.append(row)
                with open(args.jsonl, "a") as file:
                    file.write(json.dumps(row) + "\n")
    print("\n| shift of site b | adaptation | site a AUROC | site b AUROC | site a bal. acc. | site b bal. acc. |")
    print("|---|---|---|---|---|---|")
    for shift in args.shifts:
        for method in METHODS:
            group = [row for row in rows if row["shift"] == shift and row["method"] == method]

            def cell(key: str, group: list[dict] = group) -> str:
                values = [row[key] for row in group]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                return f"{statistics.mean(values):.3f} ± {spread:.3f}"

            print(
                f"| {shift} | {method} | {cell('a_auroc')} | {cell('b_auroc')} | {cell('a_balanced_accuracy')} "
                f"| {cell('b_balanced_accuracy')} |"
            )
    print(
        f"\n{len(args.seeds)} seeds; trained on site a only ({args.epochs} epochs, default data sizes); test split: "
        "half site a, half site b"
    )


if __name__ == "__main__":
    main()
