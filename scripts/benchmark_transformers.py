"""Transformers against the CNNs: model=vit, unetr and swin_unetr beside resnet18 and unet.

    python scripts/benchmark_transformers.py --stages medmnist drive volumes \
        --medmnist-root ../shared/data/medmnist --drive-root ../shared/data/drive

Stages:
    medmnist  BreastMNIST and RetinaMNIST at 28 px through the fast MedMNIST recipe
              (experiment=medmnist_fast: AdamW, one-cycle over 40 epochs, EMA, batch flips and
              shifts, label smoothing) with its network swapped: a small ViT (patch 4: 7x7 tokens,
              6 blocks of width 192, lr 1e-3) by default, ResNet-18 (28) with --medmnist-models
              resnet18; --seeds seeds each, checkpoint chosen on val AUROC: test AUROC and
              accuracy, CPU minutes of the run (the recipe's own ResNet rows are in
              docs/benchmark_medmnist_fast_final.jsonl)
    drive     DRIVE vessels, the drive_unet recipe (96 px patches, sliding windows, the same
              learning rate) with its U-Net, UNETR and SwinUNETR, each given the same wall-clock
              budget (--drive-max-time) with a cosine decay that ends with it: test Dice and
              AUROC, epochs reached, CPU minutes, peak memory (max RSS of the run)
    volumes   data=synthetic_seg data.spatial_dims=3 at 32^3 and 64^3: seconds per training step
              (forward, backward, optimiser step; batch --volume-batch, after one warm-up step)
              and peak memory, of model=unet, unetr, swin_unetr (with and without gradient
              checkpointing), each in its own process, on the CPU and, where there is one, the GPU
              (peak allocated CUDA memory); SwinUNETR at 32^3 with batch norm (its one-voxel
              bottleneck cannot be instance-normalised)

Rows go to --jsonl (appended); a Markdown table per stage is printed at the end. The medmnist
and drive stages are full trainings (hours on a CPU); --epochs shortens them for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUIET = ["callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false"]
# the networks swapped into experiment=medmnist_fast: a small ViT for 28 px (7x7 patches of 4 px,
# about ViT-Tiny's width, half its depth; half the recipe's learning rate) and ResNet-18 (28)
MEDMNIST_MODELS = {
    "vit": ["model=vit", "model.net.patch_size=4", "optimizer.lr=1e-3"],
    "resnet18": ["model=resnet18"],
}
# a cosine decay over the wall-clock budget (medexp/tasks/schedules.py), for every DRIVE model
BUDGET_COSINE = ["scheduler=onecycle", "scheduler.warmup=0", "scheduler.shape=cosine"]
# the volume models: (name, overrides at 32^3, overrides at 64^3)
VOLUME_MODELS = (
    ("unet", ["model=unet"], ["model=unet"]),
    ("unetr", ["model=unetr"], ["model=unetr"]),
    ("swin_unetr", ["model=swin_unetr", "model.net.norm_name=batch"], ["model=swin_unetr"]),
    (
        "swin_unetr checkpointed",
        ["model=swin_unetr", "model.net.norm_name=batch", "model.net.use_checkpoint=true"],
        ["model=swin_unetr", "model.net.use_checkpoint=true"],
    ),
)


def run(line: list[str]) -> tuple[float, float, float]:
    """Run a command; its wall seconds, CPU seconds (user + system) and peak memory (max RSS, MiB),
    all of this one process (os.wait4), not of every child so far."""
    print("+", " ".join(line), flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(line, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, line)
    # ru_maxrss is in KiB on Linux
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def train(run_dir: Path, overrides: list[str]) -> dict:
    """``medexp train`` into ``run_dir`` (skipped when its metrics.json exists): the tested metrics
    with the run's wall and CPU minutes and peak memory."""
    cost = {}
    if not (run_dir / "metrics.json").exists():
        wall, cpu, rss = run([sys.executable, "-m", "medexp.train", *overrides, f"hydra.run.dir={run_dir}", *QUIET])
        cost = {"wall_min": wall / 60, "cpu_min": cpu / 60, "peak_rss_mib": rss}
    return {**json.loads((run_dir / "metrics.json").read_text())["test"], **cost, "epochs": epochs_trained(run_dir)}


def epochs_trained(run_dir: Path) -> int | None:
    """Epochs the run trained: one more than the last epoch with training metrics in its CSV log
    (the test's row carries the epoch after the last)."""
    import csv

    logged = run_dir / "csv" / "metrics.csv"
    if not logged.exists():
        return None
    with open(logged) as file:
        epochs = [
            int(row["epoch"])
            for row in csv.DictReader(file)
            if row.get("epoch") and any(value and key.startswith("train/") for key, value in row.items())
        ]
    return max(epochs) + 1 if epochs else None


def record(args: argparse.Namespace, row: dict) -> dict:
    with open(args.jsonl, "a") as file:
        file.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def medmnist(args: argparse.Namespace) -> list[dict]:
    rows = []
    # one network per run: the networks are compared, not the recipe's ensemble
    recipe = ["experiment=medmnist_fast", "model.ensemble=1", f"data.root={args.medmnist_root}"]
    recipe += [f"trainer.max_epochs={args.epochs}"] if args.epochs else []
    for name in ("breastmnist", "retinamnist"):
        for model in args.medmnist_models:
            for seed in range(args.seeds):
                run_dir = Path(args.log_dir) / f"medmnist_{name}_{model}_seed{seed}"
                test = train(run_dir, [*recipe, f"data.name={name}", *MEDMNIST_MODELS[model], f"seed={seed}"])
                rows.append(
                    record(
                        args,
                        {
                            "stage": "medmnist",
                            "recipe": "medmnist_fast",
                            "data": name,
                            "model": model,
                            "seed": seed,
                            "test_auroc": test.get("test/auroc"),
                            "test_acc": test.get("test/accuracy"),
                            "cpu_min": test.get("cpu_min"),
                            "wall_min": test.get("wall_min"),
                        },
                    )
                )
    return rows


def drive(args: argparse.Namespace) -> list[dict]:
    rows = []
    for model in ("unet", "unetr", "swin_unetr"):
        run_dir = Path(args.log_dir) / f"drive_{model}"
        extra = [f"trainer.max_epochs={args.epochs}"] if args.epochs else []
        budget = [*BUDGET_COSINE, f"++trainer.max_time={args.drive_max_time}"]
        overrides = ["experiment=drive_unet", f"data.root={args.drive_root}", f"model={model}", *budget, *extra]
        test = train(run_dir, overrides)
        rows.append(
            record(
                args,
                {
                    "stage": "drive",
                    "model": model,
                    "test_dice": test.get("test/dice"),
                    "test_auroc": test.get("test/auroc"),
                    "epochs": test.get("epochs"),
                    "budget": args.drive_max_time,
                    "cpu_min": test.get("cpu_min"),
                    "wall_min": test.get("wall_min"),
                    "peak_rss_mib": test.get("peak_rss_mib"),
                },
            )
        )
    return rows


def time_steps(overrides: list[str], steps: int, device: str) -> dict:
    """Seconds per training step of the model the overrides compose (this process: called by
    ``--time-steps``), on synthetic volumes of the data they name."""
    import torch
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from medexp.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_module(config_module="medexp.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):  # no Hydra run: nothing is written, but the paths must resolve
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="benchmark_transformers_")
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    task = instantiate(cfg.model, _convert_="all").to(device).train()
    optimizer = torch.optim.AdamW(task.net.parameters(), lr=1e-4)
    images, labels = (torch.as_tensor(batch[key]).as_subclass(torch.Tensor).to(device) for key in ("image", "label"))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        task.compute_loss(task(images), labels).backward()
        optimizer.step()

    step()  # warm-up: allocations, kernels chosen
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    parameters = sum(p.numel() for p in task.net.parameters())
    return {
        "s_per_step": seconds,
        "peak_mib": peak,
        "parameters_m": parameters / 1e6,
        "threads": torch.get_num_threads(),
    }


def volumes(args: argparse.Namespace) -> list[dict]:
    import torch

    rows = []
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    for device in devices:
        for size in args.volume_sizes:
            for name, small, large in VOLUME_MODELS:
                overrides = [
                    "data=synthetic_seg",
                    "data.spatial_dims=3",
                    f"data.image_size={size}",
                    f"data.batch_size={args.volume_batch}",
                    f"data.num_samples={{train: {args.volume_batch}, val: 1, test: 1}}",
                    *(small if size <= 32 else large),
                ]
                line = [sys.executable, __file__, "--time-steps", json.dumps(overrides), str(args.volume_steps), device]
                print("+", " ".join(line), flush=True)
                done = subprocess.run(line, check=True, capture_output=True, text=True)
                measured = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(
                    record(
                        args,
                        {
                            "stage": "volumes",
                            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                            "size": size,
                            "model": name,
                            "batch": args.volume_batch,
                            **measured,
                        },
                    )
                )
    return rows


def table(rows: list[dict], columns: list[str]) -> str:
    def text(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(text(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Markdown: medmnist as mean +- sd over seeds, the other stages row by row."""
    parts = []
    med = [row for row in rows if row["stage"] == "medmnist"]
    if med:
        grouped: dict[tuple[str, str], list[dict]] = {}
        for row in med:
            grouped.setdefault((row["data"], row["model"]), []).append(row)
        lines = []
        for (data, model), group in grouped.items():

            def stat(key: str, group: list[dict] = group) -> str:
                values = [row[key] for row in group if row.get(key) is not None]
                if not values:
                    return ""
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                return f"{statistics.mean(values):.3f} +- {sd:.3f}"

            lines.append(
                {
                    "data": data,
                    "model": model,
                    "seeds": len(group),
                    **{k: stat(k) for k in ("test_auroc", "test_acc", "cpu_min")},
                }
            )
        parts.append(table(lines, ["data", "model", "seeds", "test_auroc", "test_acc", "cpu_min"]))
    stage = [row for row in rows if row["stage"] == "drive"]
    if stage:
        parts.append(table(stage, ["model", "test_dice", "test_auroc", "epochs", "cpu_min", "peak_rss_mib"]))
    stage = [row for row in rows if row["stage"] == "volumes"]
    if stage:
        parts.append(
            table(stage, ["device", "size", "model", "batch", "s_per_step", "peak_mib", "parameters_m", "threads"])
        )
    return "\n\n".join(parts)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--time-steps":  # one measurement, in its own process
        print(json.dumps(time_steps(json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=["volumes"], choices=["medmnist", "drive", "volumes"])
    parser.add_argument("--medmnist-root", default="../shared/data/medmnist")
    parser.add_argument("--drive-root", default="../shared/data/drive")
    parser.add_argument("--log-dir", default="logs/benchmark/transformers")
    parser.add_argument("--jsonl", default="logs/benchmark/transformers.jsonl")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--medmnist-models", nargs="+", default=["vit"], choices=sorted(MEDMNIST_MODELS))
    parser.add_argument("--drive-max-time", default="00:00:10:00", help="each DRIVE model's budget, DD:HH:MM:SS")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs (smoke runs)")
    parser.add_argument("--volume-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--volume-batch", type=int, default=2)
    parser.add_argument("--volume-steps", type=int, default=3)
    args = parser.parse_args()
    Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for stage in args.stages:
        rows += {"medmnist": medmnist, "drive": drive, "volumes": volumes}[stage](args)
    print(summary(rows))


if __name__ == "__main__":
    main()
