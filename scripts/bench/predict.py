"""Inference throughput: `medexp predict` on a folder of PNG files vs a bare loop that reads the
same files with PIL and calls the same net, `model(x)`, in batches of the same size; plus
`model(x)` alone on tensors already in memory (the ceiling).

Start-up (imports, loading the checkpoint) is left out of the figures: each side runs on N and
on 2N images and the throughput is N / (t(2N) - t(N)). Runs alternate A B A B.

    python scripts/bench/predict.py --pairs 3
    python scripts/bench/predict.py --tiny    # correctness only (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import medexp, run, save

THREADS = 2


def write_pngs(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / f"img{i:05d}.png")


def bare(ckpt: Path, folder: Path, batch_size: int, out: Path) -> None:
    """The hand-written loop (run as a subprocess): PIL, numpy, the net."""
    import torch
    from PIL import Image

    from medexp.checkpoints.checkpoint import Checkpoint

    model = Checkpoint(ckpt).build_model()
    files = sorted(folder.glob("*.png"))
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(files), batch_size):
            x = torch.stack(
                [
                    torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32) / 255.0)[None]
                    for f in files[i : i + batch_size]
                ]
            )
            torch.softmax(model(x), dim=1)
    elapsed = time.perf_counter() - start
    x = torch.rand(batch_size, 1, *np.asarray(Image.open(files[0])).shape)
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(0, len(files), batch_size):
            model(x)
    out.write_text(json.dumps({"loop_s": elapsed, "model_only_s": time.perf_counter() - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="N (runs use N and 2N)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="seconds-long: correctness only")
    parser.add_argument("--save", type=Path, default=None, help="append the result to this JSON-lines file")
    parser.add_argument("--bare", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        ckpt, folder, batch_size, out = args.bare
        bare(Path(ckpt), Path(folder), int(batch_size), Path(out))
        return
    global THREADS
    THREADS = args.threads
    if args.tiny:
        args.images, args.pairs = 32, 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # a checkpoint of the default model (its weights do not matter here)
        run(
            medexp(
                "train",
                f"hydra.run.dir={tmp / 'run'}",
                "trainer.max_epochs=1",
                f"data.image_size={args.size}",
                "data.num_samples={train: 64, val: 32, test: 32}",
                "test=false",
                "report=false",
            ),
            THREADS,
        )
        ckpt = tmp / "run" / "checkpoints" / "best.ckpt"
        folders = {n: tmp / f"images{n}" for n in (args.images, 2 * args.images)}
        for n, folder in folders.items():
            write_pngs(folder, n if not args.tiny or n == args.images else 0, args.size)

        def ours(n: int) -> float:
            return run(
                medexp(
                    "predict",
                    f"ckpt_path={ckpt}",
                    f"input={folders[n]}",
                    f"output={tmp / f'out{n}'}",
                    f"batch_size={args.batch_size}",
                    f"hydra.run.dir={tmp / f'predict{n}'}",
                ),
                THREADS,
            )

        def loop(n: int) -> dict:
            out = tmp / f"bare{n}.json"
            total = run(
                [sys.executable, __file__, "--bare", str(ckpt), str(folders[n]), str(args.batch_size), str(out)],
                THREADS,
            )
            return {"total": total, **json.loads(out.read_text())}

        # the tiny check runs each side once, on N images only
        sizes = (args.images,) if args.tiny else (args.images, 2 * args.images)
        rows = []
        for i in range(args.pairs):
            order = [("medexp", ours), ("bare", loop)] if i % 2 == 0 else [("bare", loop), ("medexp", ours)]
            row = {}
            for name, fn in order:
                row[name] = {n: fn(n) for n in sizes}
            rows.append(row)
        predictions = (tmp / f"out{args.images}").glob("*.csv")
        written = sum(len(p.read_text().splitlines()) - 1 for p in predictions)
    if written != args.images:
        raise SystemExit(f"medexp predict wrote {written} rows for {args.images} images")
    n, m = sizes[0], sizes[-1]

    def rate(times: dict) -> float:
        """Images per second without start-up (two sizes), or with it (the tiny check's one)."""
        return n / (times[m] - times[n]) if m != n else n / times[n]

    ours_ips = [rate(r["medexp"]) for r in rows]
    loop_ips = [rate({k: v["total"] for k, v in r["bare"].items()}) for r in rows]
    inner_ips = [m / r["bare"][m]["loop_s"] for r in rows]
    model_ips = [m / r["bare"][m]["model_only_s"] for r in rows]
    ratios = [b / a for a, b in zip(ours_ips, loop_ips)]
    result = {
        "benchmark": "predict",
        "threads": args.threads,
        "pairs": args.pairs,
        "images": n,
        "size": args.size,
        "batch_size": args.batch_size,
        "medexp_images_per_s": statistics.median(ours_ips),
        "bare_loop_images_per_s": statistics.median(loop_ips),
        "bare_loop_in_process_images_per_s": statistics.median(inner_ips),
        "model_only_images_per_s": statistics.median(model_ips),
        "time_ratio": statistics.median(ratios),
        "spread": [min(ratios), max(ratios)],
        "tiny": args.tiny,
    }
    save(args.save, result)
    print(
        f"\npredict: medexp {result['medexp_images_per_s']:.0f} img/s vs bare loop {result['bare_loop_images_per_s']:.0f} img/s "
        f"(time ratio {result['time_ratio']:.2f}x, {min(ratios):.2f}-{max(ratios):.2f}); "
        f"model(x) alone {result['model_only_images_per_s']:.0f} img/s"
    )


if __name__ == "__main__":
    main()
