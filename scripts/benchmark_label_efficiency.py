"""Label efficiency on BreastMNIST: from scratch vs started from other weights (model.init_weights).

Every run goes through ``python -m medexp.train`` as a user's would. One network for all arms,
``model=autoencoder_classifier`` (the encoder of MONAI's AutoEncoder and a linear head), trained on
10%, 30% and 100% of BreastMNIST's training labels (``data.label_fraction``, per class, the same
images for every seed), 3 seeds each, started:

- ``scratch``: from its random initialisation;
- ``pneumonia``: from a classifier of the same network trained on PneumoniaMNIST (its encoder; the
  head is excluded);
- ``autoencoder``: from ``model=autoencoder`` trained to reconstruct all BreastMNIST training images
  without their labels (its encoder, by name).

The checkpoint is chosen on validation AUROC (the full validation split), and the test AUROC and
accuracy of that checkpoint are reported (mean +/- std over seeds), with the CPU minutes of each
run (user + system time of its process). Results go to a JSON-lines file and a Markdown table.

    python scripts/benchmark_label_efficiency.py --data-root ../shared/data/medmnist \
        --out docs/benchmark_label_efficiency.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

NET = [
    "model=autoencoder_classifier",
    "model.net.channels=[32,64,128]",
    "model.net.strides=[2,2,1]",
    "model.net.num_res_units=1",
]
AUTOENCODER = [
    "model=autoencoder",
    "model.net.channels=[32,64,128]",
    "model.net.strides=[2,2,1]",
    "+model.net.num_res_units=1",
]
COMMON = [
    "callbacks.rich_progress_bar=null",
    "callbacks.rich_model_summary=null",
    "trainer.enable_progress_bar=false",
    "report=false",
    "logger=csv",
]


def medexp_train(run_dir: Path, overrides: list[str]) -> tuple[dict, float]:
    """Run ``medexp train`` into ``run_dir``; its metrics and the CPU minutes it took."""
    command = [sys.executable, "-m", "medexp.train", f"hydra.run.dir={run_dir}", *COMMON, *overrides]
    print("+", " ".join(command), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / 60
    return json.loads((run_dir / "metrics.json").read_text()), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/medmnist")
    parser.add_argument("--log-dir", default="logs/label_efficiency")
    parser.add_argument("--out", default="docs/benchmark_label_efficiency.jsonl")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    args = parser.parse_args()
    logs, root = Path(args.log_dir), f"data.root={Path(args.data_root).resolve()}"
    breast = ["data=medmnist", "data.name=breastmnist", root]
    start = time.time()

    sources, pretraining = {}, {}
    runs = {
        "pneumonia": [*NET, "data=medmnist", "data.name=pneumoniamnist", root, "test=false"],
        "autoencoder": [*AUTOENCODER, *breast, "test=false"],
    }
    for name, overrides in runs.items():
        run_dir = logs / f"pretrain_{name}"
        metrics, cpu = medexp_train(run_dir, [*overrides, f"trainer.max_epochs={args.pretrain_epochs}", "seed=0"])
        sources[name] = run_dir / "checkpoints" / "best.ckpt"
        pretraining[name] = {"cpu_min": cpu, "best_val": metrics.get("best_score"), "monitor": metrics.get("monitor")}

    starts = {
        "scratch": [],
        "pneumonia": [f"model.init_weights.path={sources['pneumonia']}", "model.init_weights.exclude=[head.*]"],
        "autoencoder": [f"model.init_weights.path={sources['autoencoder']}"],
    }
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as file:
        file.write(json.dumps({"pretraining": pretraining, "epochs": args.epochs}) + "\n")
        for fraction in args.fractions:
            for start_name, init in starts.items():
                for seed in args.seeds:
                    run_dir = logs / f"breast_{fraction:g}_{start_name}_seed{seed}"
                    label = [] if fraction >= 1 else [f"data.label_fraction={fraction}"]
                    metrics, cpu = medexp_train(
                        run_dir, [*NET, *breast, *label, *init, f"seed={seed}", f"trainer.max_epochs={args.epochs}"]
                    )
                    row = {
                        "fraction": fraction,
                        "start": start_name,
                        "seed": seed,
                        "val_auc": metrics["best_score"],
                        "test_auc": metrics["test"]["test/auroc"],
                        "test_acc": metrics["test"]["test/accuracy"],
                        "cpu_min": cpu,
                    }
                    rows.append(row)
                    file.write(json.dumps(row) + "\n")
                    file.flush()
    print(table(rows, pretraining))
    print(f"total wall time: {(time.time() - start) / 60:.1f} min")


def table(rows: list[dict], pretraining: dict) -> str:
    def mean_std(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"

    lines = [
        "| labels | start | val AUC | test AUC | test ACC | CPU min/run |",
        "|---|---|---|---|---|---|",
    ]
    for fraction in sorted({r["fraction"] for r in rows}):
        for start in dict.fromkeys(r["start"] for r in rows):
            group = [r for r in rows if r["fraction"] == fraction and r["start"] == start]
            lines.append(
                f"| {fraction:.0%} | {start} | {mean_std([r['val_auc'] for r in group])} | "
                f"{mean_std([r['test_auc'] for r in group])} | {mean_std([r['test_acc'] for r in group])} | "
                f"{statistics.mean(r['cpu_min'] for r in group):.2f} |"
            )
    lines.append("")
    lines += [f"pretraining {name}: {info['cpu_min']:.1f} CPU min" for name, info in pretraining.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
