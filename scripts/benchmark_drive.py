"""DRIVE retinal vessel segmentation through `medexp train experiment=drive_unet`.

Trains on the 16 training images left after the validation draw, selects the checkpoint on
validation Dice, tests on the 20 official test images (metrics inside the field of view), and
prints a Markdown row with test Dice, AUROC, HD95 and the wall time.

    python scripts/benchmark_drive.py --data-root ../shared/data/drive [hydra overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/drive")
    parser.add_argument("--run-dir", default="logs/benchmark/drive_unet")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()

    command = [
        sys.executable,
        "-m",
        "medexp.train",
        "experiment=drive_unet",
        f"data.root={args.data_root}",
        f"hydra.run.dir={args.run_dir}",
        "callbacks.rich_progress_bar=null",
        "trainer.enable_progress_bar=false",
        *args.overrides,
    ]
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    run = Path(args.run_dir)
    test = json.loads((run / "metrics.json").read_text())["test"]
    host = json.loads((run / "run_info.json").read_text())["host"]
    device = host["gpus"][0] if host["gpus"] else f"CPU, {host['cpu_threads']} threads"
    print("| method | test Dice | test AUROC | test HD95 (px) | wall time | device |")
    print("|---|---|---|---|---|---|")
    print(
        f"| medexp drive_unet {' '.join(args.overrides)} | {test['test/dice']:.3f} | {test['test/auroc']:.3f} "
        f"| {test['test/hd95']:.1f} | {wall / 60:.1f} min | {device} |"
    )


if __name__ == "__main__":
    main()
