"""3D CNNs against CNN+LSTM over slices (2.5D), and sequence models over time, through `medexp train`.

    python scripts/benchmark_sequences.py --seeds 0 1

Runs (each ``python -m medexp.train ...`` as a user would start it; rows appended to ``--jsonl``,
a Markdown table printed at the end):
    volumes       data=synthetic_3d at 16^3 (512/64/128 volumes, is a lesion present): model=resnet18_3d
                  at widen_factor 0.25 (full width costs ~12x more per volume: minutes per epoch
                  on 2 CPU cores) against model=cnn_lstm reading the 16 slices (attention pooling)
    longitudinal  data=synthetic_longitudinal (does the lesion grow; 2-6 visits 30-300 days apart):
                  model=cnn_lstm with LSTM (last step), GRU, attention pooling, and with the time
                  gaps as features
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

QUIET = ["callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false", "logger=csv"]
VOLUMES = ["data=synthetic_3d", "data.num_samples={train: 512, val: 64, test: 128}", "trainer.max_epochs=10"]
SMALL_LSTM = [
    "model=cnn_lstm",
    "model.net.encoder.channels=[8,16]",
    "model.net.feature_size=16",
    "model.net.hidden_size=16",
]
RUNS = {
    "volumes": {
        "ResNet-18 3D (widen_factor 0.25)": [
            *VOLUMES,
            "model=resnet18_3d",
            "model.net.widen_factor=0.25",
            "optimizer.lr=1e-4",
        ],
        "CNN+LSTM over slices (2.5D, attention)": [
            *VOLUMES,
            *SMALL_LSTM,
            "model.net.pooling=attention",
            "optimizer.lr=3e-3",
        ],
    },
    "longitudinal": {
        "CNN+LSTM, last step": [
            "data=synthetic_longitudinal",
            "model=cnn_lstm",
            "trainer.max_epochs=10",
            "optimizer.lr=1e-3",
        ],
        "CNN+GRU, last step": [
            "data=synthetic_longitudinal",
            "model=cnn_lstm",
            "model.net.rnn=gru",
            "trainer.max_epochs=10",
            "optimizer.lr=1e-3",
        ],
        "CNN+LSTM, attention": [
            "data=synthetic_longitudinal",
            "model=cnn_lstm",
            "model.net.pooling=attention",
            "trainer.max_epochs=10",
            "optimizer.lr=1e-3",
        ],
        "CNN+LSTM, last step, time gaps as features": [
            "data=synthetic_longitudinal",
            "model=cnn_lstm",
            "model.net.time_features=true",
            "trainer.max_epochs=10",
            "optimizer.lr=1e-3",
        ],
    },
}


def run(stage: str, name: str, seed: int, args: argparse.Namespace) -> dict:
    slug = "".join(char if char.isalnum() else "_" for char in name)
    run_dir = Path(args.log_dir) / f"{stage}_{slug}_seed{seed}"
    wall = 0.0
    if not (run_dir / "metrics.json").exists():
        command = [
            sys.executable,
            "-m",
            "medexp.train",
            *RUNS[stage][name],
            f"seed={seed}",
            f"hydra.run.dir={run_dir}",
            *QUIET,
        ]
        print("+", " ".join(command), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    host = json.loads((run_dir / "run_info.json").read_text())["host"]
    row = {
        "stage": stage,
        "method": name,
        "seed": seed,
        "wall_s": wall,
        "test_auroc": metrics["test"]["test/auroc"],
        "test_accuracy": metrics["test"]["test/accuracy"],
        "val_auroc": metrics["best_score"],
        "device": host["gpus"][0] if host["gpus"] else f"CPU, {host['cpu_threads']} threads",
    }
    with open(args.jsonl, "a") as file:
        file.write(json.dumps(row) + "\n")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", default="logs/benchmark_sequences")
    parser.add_argument("--jsonl", default="docs/benchmark_sequences.jsonl")
    parser.add_argument("--stages", nargs="+", default=list(RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = parser.parse_args()
    rows = [run(stage, name, seed, args) for stage in args.stages for name in RUNS[stage] for seed in args.seeds]
    print("| data | method | test AUROC | test ACC | wall time per run | device |\n|---|---|---|---|---|---|")
    for stage in args.stages:
        for name in RUNS[stage]:
            group = [row for row in rows if row["stage"] == stage and row["method"] == name]
            aucs, accs = [r["test_auroc"] for r in group], [r["test_accuracy"] for r in group]
            spread = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
            print(
                f"| {stage} | {name} ({len(group)} seeds) | {statistics.mean(aucs):.3f} ± {spread(aucs):.3f} "
                f"| {statistics.mean(accs):.3f} ± {spread(accs):.3f} "
                f"| {statistics.mean(r['wall_s'] for r in group) / 60:.1f} min | {group[0]['device']} |"
            )


if __name__ == "__main__":
    main()
