"""Start-up: how long `medexp train --help` and `medexp train --cfg job` take, and how long the
default `medexp train` takes to reach its first training step, against
`python -c "import torch, lightning"` measured alternately with it.

Targets (issue 9): --help <= 1.0 s, --cfg job <= 0.5 s, first step <= 1.0 s after the import.

    python scripts/bench/startup.py --pairs 5
    python scripts/bench/startup.py --tiny    # correctness only (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import interleave, medexp, run, save

THREADS = 2


def first_step(tmp: Path, index: int, extra: list[str]) -> float:
    """Seconds from starting the default `medexp train` to its first training batch."""
    out = tmp / f"run{index}"
    timing = out / "timing.json"
    start = time.time()
    run(
        medexp(
            "train",
            f"hydra.run.dir={out}",
            "+callbacks.step_timer._target_=common.StepTimer",
            f"+callbacks.step_timer.path={timing}",
            *extra,
        ),
        THREADS,
    )
    return json.loads(timing.read_text())["first_step"] - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="one pair of a 1-epoch run: correctness only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", type=Path, default=None, help="append the result to this JSON-lines file")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    pairs = 1 if args.tiny else args.pairs
    # the default run; the tiny check stops after one short epoch
    extra = (
        ["trainer.max_epochs=1", "data.num_samples={train: 64, val: 32, test: 32}", "test=false", "report=false"]
        if args.tiny
        else []
    )
    imports = [sys.executable, "-c", "import torch, lightning"]
    bare = [sys.executable, "-c", "pass"]
    counter = iter(range(10**6))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        step = interleave(pairs, lambda: first_step(tmp, next(counter), extra), lambda: run(imports, THREADS))
    help_ = interleave(pairs, lambda: run(medexp("train", "--help"), THREADS), lambda: run(bare, THREADS))
    job = interleave(pairs, lambda: run(medexp("train", "--cfg", "job"), THREADS), lambda: run(bare, THREADS))
    above = [a - b for a, b in zip(step["a"], step["b"])]
    result = {
        "benchmark": "startup",
        "pairs": pairs,
        "threads": args.threads,
        "help_s": help_["median_a"],
        "cfg_job_s": job["median_a"],
        "python_s": job["median_b"],
        "import_torch_lightning_s": step["median_b"],
        "first_step_s": step["median_a"],
        "first_step_above_import_s": statistics.median(above),
        "first_step_above_import_spread": [min(above), max(above)],
        "tiny": args.tiny,
    }
    save(args.save, result)
    print(
        f"\n--help {help_['median_a']:.2f} s, --cfg job {job['median_a']:.2f} s (python alone {job['median_b']:.2f} s); "
        f"first step {step['median_a']:.2f} s = import torch, lightning {step['median_b']:.2f} s "
        f"+ {result['first_step_above_import_s']:.2f} s ({min(above):.2f}-{max(above):.2f})"
    )


if __name__ == "__main__":
    main()
