"""MedMNIST v2 benchmark protocol on BreastMNIST and RetinaMNIST through `medexp train`.

Runs each recipe on each dataset as a user would (``python -m medexp.train experiment=...``),
reads the run's metrics.json and run_info.json, and writes a Markdown table next to the
published MedMNIST v2 results.

    python scripts/benchmark_medmnist.py --data-root ../shared/data/medmnist --out docs/benchmarks.md

Recipes:
    protocol  the published protocol: ResNet-18 (28), Adam 1e-3, batch 128, 100 epochs,
              lr x0.1 at epochs 50 and 75, checkpoint chosen on val AUROC
    tuned     the same with label smoothing 0.1 and a cosine learning-rate schedule
    augmented the same with flips/affine/noise augmentation (data/augmentations=basic),
              AdamW and label smoothing 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# test AUC / ACC at 28x28 from MedMNIST v2 (Yang et al., Scientific Data 2023), Table 3
PUBLISHED = {
    "breastmnist": {
        "ResNet-18 (28)": (0.901, 0.863),
        "ResNet-50 (28)": (0.857, 0.812),
        "AutoKeras": (0.871, 0.831),
        "Google AutoML Vision": (0.919, 0.861),
    },
    "retinamnist": {
        "ResNet-18 (28)": (0.717, 0.524),
        "ResNet-50 (28)": (0.726, 0.528),
        "AutoKeras": (0.719, 0.503),
        "Google AutoML Vision": (0.750, 0.531),
    },
}
RECIPES = {
    "protocol": [],
    "tuned": ["model.label_smoothing=0.1", "scheduler=cosine"],
    "augmented": ["data/augmentations=basic", "optimizer=adamw", "optimizer.lr=1e-3", "model.label_smoothing=0.1"],
}


def run(dataset: str, recipe: str, args: argparse.Namespace) -> dict:
    run_dir = Path(args.log_dir) / f"{dataset}_{recipe}_seed{args.seed}"
    command = [
        sys.executable,
        "-m",
        "medexp.train",
        f"experiment={dataset}_resnet18",
        f"data.root={args.data_root}",
        f"seed={args.seed}",
        f"trainer.max_epochs={args.epochs}",
        f"hydra.run.dir={run_dir}",
        "callbacks.rich_progress_bar=null",
        "trainer.enable_progress_bar=false",
        *RECIPES[recipe],
        *args.overrides,
    ]
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    host = json.loads((run_dir / "run_info.json").read_text())["host"]
    device = host["gpus"][0] if host["gpus"] else f"CPU, {host['cpu_threads']} threads"
    return {
        "dataset": dataset,
        "recipe": recipe,
        "seed": args.seed,
        "epochs": args.epochs,
        "test_auc": metrics["test"]["test/auroc"],
        "test_acc": metrics["test"]["test/accuracy"],
        "val_auc": metrics["best_score"],
        "wall_s": wall,
        "device": device,
        "overrides": " ".join(args.overrides),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | method | test AUC | test ACC | val AUC (best) | wall time | device |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        for row in (r for r in rows if r["dataset"] == dataset):
            extra = f" `{row['overrides']}`" if row.get("overrides") else ""
            lines.append(
                f"| {dataset} | medexp ResNet-18 (28), {row['recipe']}{extra}, seed {row['seed']}, {row['epochs']} epochs "
                f"| **{row['test_auc']:.3f}** | **{row['test_acc']:.3f}** | {row['val_auc']:.3f} "
                f"| {row['wall_s'] / 60:.1f} min | {row['device']} |"
            )
        for method, (auc, acc) in PUBLISHED[dataset].items():
            lines.append(f"| {dataset} | {method} (published) | {auc:.3f} | {acc:.3f} | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/medmnist")
    parser.add_argument("--datasets", nargs="+", default=["breastmnist", "retinamnist"], choices=sorted(PUBLISHED))
    parser.add_argument("--recipes", nargs="+", default=["protocol", "tuned"], choices=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="logs/benchmark")
    parser.add_argument("--out", default=None, help="write the table here (Markdown); also printed")
    parser.add_argument("--json", default=None, help="append the raw rows to this JSON-lines file")
    parser.add_argument("--from-json", default=None, help="only write the table of rows saved with --json")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()

    if args.from_json:
        rows = [json.loads(line) for line in Path(args.from_json).read_text().splitlines() if line.strip()]
    else:
        rows = [run(dataset, recipe, args) for dataset in args.datasets for recipe in args.recipes]
    markdown = table(rows)
    print(markdown)
    if args.json and not args.from_json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown + "\n")


if __name__ == "__main__":
    main()
