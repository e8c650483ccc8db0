"""Training-step overhead: `medexp train` with its default callbacks, loggers and progress bar vs a
raw PyTorch loop with the same net, seed (so initial weights), data loader, optimiser, seed and threads.

A = the medexp run's training-epoch time (from its first hook to the end of its last batch, so
validation is not counted), measured by ``common.StepTimer``; B = the same epochs of the raw loop
(`python overhead.py --raw`). Epochs after the first are timed (the first warms caches up).
Also checks that the per-step losses of every pair agree to 1e-5 (same seed, weights, batches).

    python scripts/bench/overhead.py --model cnn --pairs 5
    python scripts/bench/overhead.py --model resnet18 --pairs 3 --epochs 2
    python scripts/bench/overhead.py --tiny    # correctness only (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import fmt_ratio, interleave, medexp, run, save

MODELS = {
    # the default tiny CNN (about 10-15 ms a step on 2 cores)
    "cnn": ["model=cnn", "data.image_size=32"],
    # MONAI ResNet-18 on MedMNIST-sized 28x28 images
    "resnet18": ["model=resnet18", "data.image_size=28"],
}


def overrides(model: str, epochs: int, train: int, tiny: bool) -> list[str]:
    """What both sides share: the data, the net and the batch size."""
    n = {"train": train, "val": 64, "test": 64}
    return [
        *MODELS[model],
        f"data.num_samples={{train: {n['train']}, val: {n['val']}, test: {n['test']}}}",
        f"trainer.max_epochs={epochs}",
        *(["model.net.channels=[4,8]"] if tiny and model == "cnn" else []),
    ]


def medexp_run(shared: list[str], out: Path, extra: list[str] = ()) -> dict:
    """One `medexp train` (defaults otherwise; no test and report: they come after the timed part)."""
    timing = out / "timing.json"
    command = medexp(
        "train",
        *shared,
        "test=false",
        "report=false",
        f"hydra.run.dir={out}",
        "+callbacks.step_timer._target_=common.StepTimer",
        f"+callbacks.step_timer.path={timing}",
        *extra,
    )
    run(command, THREADS)
    return json.loads(timing.read_text())


def raw_run(shared: list[str], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    timing = out / "raw.json"
    command = [sys.executable, __file__, "--raw", "--out", str(timing), "--", *shared]
    run(command, THREADS)
    return json.loads(timing.read_text())


def raw_loop(shared: list[str], out: Path) -> None:
    """The hand-written loop: medexp's config only chooses the same parts, then plain PyTorch."""
    import lightning.pytorch as L
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate
    from lightning.fabric.utilities.seed import seed_everything
    from omegaconf import open_dict

    from medexp.data.sampling import epoch_seed
    from medexp.resolvers import register_resolvers
    from medexp.utils.config import build

    register_resolvers()
    with initialize_config_module(config_module="medexp.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=shared)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out.parent)
    seed = L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build(cfg.data)
    datamodule.setup("fit")
    net = instantiate(cfg.model.net)  # drawn from the seed, as in medexp
    optimizer = instantiate(cfg.optimizer)(params=net.parameters())
    loader = datamodule.train_dataloader()
    record: dict = {"epochs": [], "cpu_epochs": [], "steps": [], "losses": [], "threads": torch.get_num_threads()}
    net.train()
    for epoch in range(cfg.trainer.max_epochs):
        loader.sampler.set_epoch(epoch)
        start, cpu_start, steps = time.perf_counter(), time.process_time(), 0
        for i, batch in enumerate(loader):
            if i == 0:  # as medexp's SeedEachEpoch: dropout draws from (seed, epoch)
                seed_everything(epoch_seed(seed, epoch), workers=True, verbose=False)
            optimizer.zero_grad()
            loss = F.cross_entropy(net(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            record["losses"].append(float(loss))
            steps += 1
        record["epochs"].append(time.perf_counter() - start)
        record["cpu_epochs"].append(time.process_time() - cpu_start)
        record["steps"].append(steps)
    out.write_text(json.dumps(record))


def step_ms(record: dict) -> float:
    """Milliseconds per training step over every epoch but the first (by :data:`CLOCK`)."""
    epochs, steps = record[CLOCK][1:], record["steps"][1:]
    return 1000 * sum(epochs) / sum(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4, help="timed: all but the first")
    parser.add_argument("--train", type=int, default=2048, help="training images per epoch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time, steadier on a busy machine (use with --threads 1)",
    )
    parser.add_argument(
        "--medexp",
        nargs="*",
        default=[],
        metavar="OVERRIDE",
        help="overrides of the medexp side only, e.g. callbacks.rich_progress_bar=null (what it costs)",
    )
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run: correctness only")
    parser.add_argument("--save", type=Path, default=None, help="append the result to this JSON-lines file")
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("shared", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw:
        raw_loop(args.shared, args.out)
        return
    global THREADS, CLOCK
    THREADS, CLOCK = args.threads, {"wall": "epochs", "cpu": "cpu_epochs"}[args.clock]
    if args.tiny:
        args.pairs, args.epochs, args.train = 1, 2, 128
    shared = overrides(args.model, args.epochs, args.train, args.tiny)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        counter = iter(range(10**6))
        ours: list[dict] = []
        raws: list[dict] = []
        timing = interleave(
            args.pairs,
            lambda: step_ms(ours.append(medexp_run(shared, tmp / f"medexp{next(counter)}", args.medexp)) or ours[-1]),
            lambda: step_ms(raws.append(raw_run(shared, tmp / f"raw{next(counter)}")) or raws[-1]),
        )
    # same seed, net, data order and optimiser: every run must take the same steps
    steps = min(len(r["losses"]) for r in ours + raws)
    diff = max(abs(a - b) for o, r in zip(ours, raws) for a, b in zip(o["losses"], r["losses"]))
    result = {
        "benchmark": "overhead",
        "model": args.model,
        "threads": args.threads,
        "clock": args.clock,
        "pairs": args.pairs,
        "train_images": args.train,
        "medexp_ms_per_step": timing["median_a"],
        "raw_ms_per_step": timing["median_b"],
        "ratio": timing["ratio"],
        "spread": timing["spread"],
        "loss_steps_compared": steps,
        "loss_max_abs_diff": diff,
        "losses_agree_1e-5": diff <= 1e-5,
        "medexp_overrides": args.medexp,
        "tiny": args.tiny,
    }
    save(args.save, result)
    print(
        f"\n{args.model}: medexp {timing['median_a']:.2f} ms/step vs raw {timing['median_b']:.2f} ms/step = "
        f"{fmt_ratio(timing)}; losses of {steps} steps agree to {diff:.1e}"
    )
    if diff > 1e-5:
        raise SystemExit(f"the losses differ by {diff:.2e} > 1e-5")


THREADS = 2
CLOCK = "epochs"

if __name__ == "__main__":
    main()
