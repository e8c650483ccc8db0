"""Sampling speed of the generative models: images per second of a diffusion model (``model=ddpm``)
with the DDPM sampler (every training timestep) and DDIM at a few step counts, beside the DCGAN
(``model=gan``), at MedMNIST's 28 pixels.

    python scripts/benchmark_sampling.py --ddim-steps 10 25 50 --images 16 --threads 2

The models are composed from medexp's config tree as ``medexp train`` composes them (BreastMNIST's
shape: 1 channel, 2 classes; ``--conditional`` adds the class embedding and classifier-free
guidance ``--guidance``, which doubles each step's batch) and keep their random initial weights:
speed does not depend on training. Each setting first generates a warm-up image, then is timed
over ``--repeats`` calls of ``model.sample(--images)``; the median is reported. Each setting
becomes a JSON line in ``--jsonl`` and a row of the Markdown table printed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
from common import REPO, save  # noqa: E402  (scripts/bench/common.py)

SHAPE = ["data.image_size=28", "data.in_channels=1", "data.num_classes=2"]


def build(overrides: list[str]) -> Any:
    """The task of ``medexp train <overrides>`` on synthetic data of MedMNIST's shape, untrained."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from medexp.resolvers import register_resolvers
    from medexp.utils.config import build as build_node

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="medexp.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*SHAPE, *overrides])
    with open_dict(cfg):  # nothing is written: no run directory to resolve
        cfg.paths.output_dir = cfg.paths.log_dir = str(REPO / "logs" / "benchmark_sampling")
    return build_node(cfg.model)


def time_sampling(model: Any, images: int, repeats: int, device: str) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``model.sample(images)`` after a warm-up call."""
    import torch

    model.to(device).eval()
    labels = torch.arange(images) % model.num_classes if model.conditional else None

    def once(seed: int, n: int = images) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.sample(n, None if labels is None else labels[:n], torch.Generator().manual_seed(seed), batch_size=n)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once(0, n=1)  # warm-up: one image
    return [once(seed) for seed in range(1, repeats + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--timesteps", type=int, default=1000, help="the diffusion model's training timesteps")
    parser.add_argument("--images", type=int, default=16, help="images per sample() call (one batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-ddpm", action="store_true", help="leave out the (slow) all-step DDPM sampler")
    parser.add_argument("--conditional", action="store_true")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jsonl", type=Path, default=REPO / "docs" / "benchmark_sampling.jsonl")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    diffusion = [
        "model=ddpm",
        f"model.noise_scheduler.num_train_timesteps={args.timesteps}",
        f"model.conditional={str(args.conditional).lower()}",
        f"model.guidance_scale={args.guidance}",
        f"model.val_sample_steps={min(10, args.timesteps)}",
    ]
    settings: list[tuple[str, int, list[str]]] = [("gan (DCGAN)", 1, ["model=gan"])]
    settings += [
        (f"ddpm, DDIM {s} steps", s, [*diffusion, "model.sampler=ddim", f"model.sample_steps={s}"])
        for s in args.ddim_steps
    ]
    if not args.skip_ddpm:
        settings.append(
            (
                f"ddpm, DDPM {args.timesteps} steps",
                args.timesteps,
                [*diffusion, "model.sampler=ddpm", f"model.sample_steps={min(50, args.timesteps)}"],
            )
        )
    rows = []
    for name, steps, overrides in settings:
        model = build(overrides)
        seconds = time_sampling(model, args.images, args.repeats, args.device)
        median = statistics.median(seconds)
        record = {
            "benchmark": "sampling",
            "model": name,
            "net_passes": steps,
            "images": args.images,
            "seconds": seconds,
            "images_per_s": args.images / median,
            "ms_per_image": 1000 * median / args.images,
            "parameters": sum(p.numel() for p in model.net.parameters()),
            "threads": args.threads,
            "device": args.device,
            "conditional": args.conditional,
            "guidance": args.guidance,
            "overrides": overrides,
        }
        save(args.jsonl, record)
        rows.append(record)
    print(f"\nSampling speed, 28x28 images, {args.images} per call, {args.threads} thread(s) on {args.device}:\n")
    print("| model | net passes | images/s | ms/image | parameters |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['net_passes']} | {r['images_per_s']:.3g} | {r['ms_per_image']:.4g} | "
            f"{r['parameters'] / 1e6:.2f} M |"
        )


if __name__ == "__main__":
    main()
