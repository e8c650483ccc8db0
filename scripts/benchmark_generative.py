"""Autoencoders and GANs on real MedMNIST data, through `medexp train` / `medexp sample`.

    python scripts/benchmark_generative.py --data-root ../shared/data/medmnist --stages denoise anomaly gan augment

Stages (each a set of ``python -m medexp.<command>`` runs, as a user would start them):
    denoise  model=denoising_unet (residual U-Net; Gaussian noise, std 0.2 in [-1, 1] = 0.1 of the
             range) and model=autoencoder on BreastMNIST and PneumoniaMNIST, batch 32: test
             PSNR/SSIM of the output against the clean image, and of the noisy input (psnr_input)
    anomaly  experiment=anomaly_pneumonia (normal X-rays only), and the same on BreastMNIST with
             benign/normal (class 1) as normal: test AUROC of the reconstruction error
    gan      experiment=breast_gan (a class-conditional GAN), then `medexp sample` measured by
             domain FID/KID on the features of a classifier trained on the real images
             (model=cnn), against the test split, beside real validation images as the floor
    augment  BreastMNIST classifiers (model=cnn, and optionally resnet18) trained with
             data.generated.ratio 0 (real only), 0.5 and 1 from that GAN, over seeds

Each run's row goes to ``--jsonl`` (appended); a Markdown summary is printed at the end.
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

QUIET = ["callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false"]


def medexp(command: str, args: list[str]) -> float:
    """Run ``python -m medexp.<command> args``; return its wall time in seconds."""
    line = [sys.executable, "-m", f"medexp.{command}", *args]
    print("+", " ".join(line), flush=True)
    start = time.perf_counter()
    subprocess.run(line, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def train(run_dir: Path, overrides: list[str]) -> tuple[dict, float]:
    """``medexp train`` into ``run_dir`` (reused when its metrics.json exists)."""
    wall = 0.0
    if not (run_dir / "metrics.json").exists():
        wall = medexp("train", [*overrides, f"hydra.run.dir={run_dir}", *QUIET])
    return json.loads((run_dir / "metrics.json").read_text()), wall


def record(args: argparse.Namespace, row: dict) -> dict:
    with open(args.jsonl, "a") as file:
        file.write(json.dumps(row) + "\n")
    return row


def denoise(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in ("breastmnist", "pneumoniamnist"):
        for model, extra in (("denoising_unet", ["model.noise_std=0.2"]), ("autoencoder", [])):
            run_dir = Path(args.log_dir) / f"denoise_{name}_{model}"
            metrics, wall = train(
                run_dir,
                [
                    "data=medmnist",
                    f"data.name={name}",
                    f"data.root={args.data_root}",
                    f"model={model}",
                    *extra,
                    f"trainer.max_epochs={args.ae_epochs}",
                    "optimizer.lr=2e-3",
                    "data.batch_size=32",
                    "seed=0",
                ],
            )
            test = metrics["test"]
            rows.append(
                record(
                    args,
                    {
                        "stage": "denoise",
                        "data": name,
                        "model": model,
                        "epochs": args.ae_epochs,
                        "wall_s": wall,
                        "psnr": test["test/psnr"],
                        "ssim": test["test/ssim"],
                        "psnr_input": test.get("test/psnr_input"),
                    },
                )
            )
    return rows


def anomaly(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, normal, experiment in (
        ("pneumoniamnist", 0, ["experiment=anomaly_pneumonia"]),
        ("breastmnist", 1, ["experiment=anomaly_pneumonia", "data.name=breastmnist", "model.normal_classes=[1]"]),
    ):
        run_dir = Path(args.log_dir) / f"anomaly_{name}"
        metrics, wall = train(
            run_dir, [*experiment, f"data.root={args.data_root}", f"trainer.max_epochs={args.ae_epochs}", "seed=0"]
        )
        rows.append(
            record(
                args,
                {
                    "stage": "anomaly",
                    "data": name,
                    "normal_class": normal,
                    "epochs": args.ae_epochs,
                    "wall_s": wall,
                    "test_auroc": metrics["test"]["test/anomaly_auroc"],
                    "val_auroc": metrics["best_score"],
                },
            )
        )
    return rows


def gan_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    return Path(args.log_dir) / "breast_gan", Path(args.log_dir) / "breast_features_cnn"


def gan(args: argparse.Namespace) -> list[dict]:
    gan_dir, features_dir = gan_paths(args)
    _, gan_wall = train(
        gan_dir,
        ["experiment=breast_gan", f"data.root={args.data_root}", f"trainer.max_epochs={args.gan_epochs}", "seed=0"],
    )
    _, _ = train(
        features_dir,
        [
            "experiment=breastmnist_resnet18",
            "model=cnn",
            f"data.root={args.data_root}",
            "trainer.max_epochs=100",
            "seed=0",
        ],
    )
    features = features_dir / "checkpoints" / "best.ckpt"
    rows = []
    for what, extra in (("GAN samples (last.ckpt)", []),):
        out = Path(args.log_dir) / "breast_gan_samples"
        medexp(
            "sample",
            [
                f"ckpt_path={gan_dir / 'checkpoints' / 'last.ckpt'}",
                "n=512",
                f"output={out}",
                f"features_ckpt={features}",
                "reference_split=test",
                "kid_subset_size=100",
                f"hydra.run.dir={out / 'log'}",
                *extra,
            ],
        )
        quality = json.loads((out / "quality.json").read_text())
        rows.append(
            record(args, {"stage": "gan", "what": what, "gan_epochs": args.gan_epochs, "wall_s": gan_wall, **quality})
        )
    rows.append(record(args, {"stage": "gan", "what": "real validation images (floor)", **real_floor(args, features)}))
    return rows


def real_floor(args: argparse.Namespace, features: Path) -> dict:
    """Domain FID/KID of the real validation images against the test split: what a perfect
    generator would score with as many images."""
    import torch
    from monai.transforms import NormalizeIntensityd

    from medexp.data.medmnist import MedMNISTDataModule
    from medexp.metrics.domain import DomainFeatures, quality_metrics

    data = MedMNISTDataModule(
        name="breastmnist",
        root=args.data_root,
        task="binary",
        num_classes=2,
        in_channels=1,
        spatial_dims=2,
        transforms=[NormalizeIntensityd(keys=["image"], subtrahend=0.5, divisor=0.5)],
        scan="off",
    )
    data.setup()
    metrics = quality_metrics(DomainFeatures.from_checkpoint(features), kid_subset_size=50)
    for split, real in (("test", True), ("val", False)):
        images = torch.stack([data.datasets[split][i]["image"] for i in range(len(data.datasets[split]))])
        for metric in metrics.values():
            metric.update(images, real=real)
    kid, kid_std = metrics["domain_kid"].compute_with_std()
    return {
        "domain_fid": float(metrics["domain_fid"].compute()),
        "domain_kid": float(kid),
        "domain_kid_std": float(kid_std),
        "samples": len(data.datasets["val"]),
        "reference": "test split",
    }


def augment(args: argparse.Namespace) -> list[dict]:
    gan_dir, _ = gan_paths(args)
    ckpt = gan_dir / "checkpoints" / "last.ckpt"
    rows = []
    for model in args.augment_models:
        for ratio in args.ratios:
            for seed in args.seeds:
                run_dir = Path(args.log_dir) / f"augment_{model}_ratio{ratio}_seed{seed}"
                metrics, wall = train(
                    run_dir,
                    [
                        "experiment=breast_gan_augmented",
                        f"model={model}",
                        f"data.root={args.data_root}",
                        f"gan_ckpt={ckpt}",
                        f"data.generated.ratio={ratio}",
                        f"seed={seed}",
                        f"trainer.max_epochs={args.clf_epochs}",
                    ],
                )
                rows.append(
                    record(
                        args,
                        {
                            "stage": "augment",
                            "model": model,
                            "ratio": ratio,
                            "seed": seed,
                            "epochs": args.clf_epochs,
                            "wall_s": wall,
                            "test_auroc": metrics["test"]["test/auroc"],
                            "test_accuracy": metrics["test"]["test/accuracy"],
                            "val_auroc": metrics["best_score"],
                        },
                    )
                )
    return rows


def summary(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        if row["stage"] == "denoise":
            noisy = f"{row['psnr_input']:.2f}" if row["psnr_input"] is not None else "(no noise)"
            lines.append(
                f"| denoise | {row['data']} | {row['model']} | PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f} "
                f"| input PSNR {noisy} | {row['wall_s'] / 60:.1f} min |"
            )
        elif row["stage"] == "anomaly":
            lines.append(
                f"| anomaly | {row['data']} (normal = {row['normal_class']}) | autoencoder "
                f"| test AUROC {row['test_auroc']:.3f} | val AUROC {row['val_auroc']:.3f} | {row['wall_s'] / 60:.1f} min |"
            )
        elif row["stage"] == "gan":
            lines.append(
                f"| gan | breastmnist | {row['what']} | domain FID {row['domain_fid']:.2f} "
                f"| KID {row['domain_kid']:.4f} ± {row['domain_kid_std']:.4f} | {row.get('wall_s', 0) / 60:.1f} min |"
            )
    groups: dict[tuple, list[dict]] = {}
    for row in (r for r in rows if r["stage"] == "augment"):
        groups.setdefault((row["model"], row["ratio"]), []).append(row)
    for (model, ratio), group in groups.items():
        aucs = [r["test_auroc"] for r in group]
        accs = [r["test_accuracy"] for r in group]
        spread = lambda values: statistics.stdev(values) if len(values) > 1 else 0.0  # noqa: E731
        lines.append(
            f"| augment | breastmnist | {model}, ratio {ratio} ({len(group)} seeds) "
            f"| test AUROC {statistics.mean(aucs):.3f} ± {spread(aucs):.3f} "
            f"| ACC {statistics.mean(accs):.3f} ± {spread(accs):.3f} | {statistics.mean(r['wall_s'] for r in group) / 60:.1f} min |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--log-dir", default="logs/benchmark_generative")
    parser.add_argument("--jsonl", default="docs/benchmark_generative.jsonl")
    parser.add_argument("--stages", nargs="+", default=["denoise", "anomaly", "gan", "augment"])
    parser.add_argument("--ae-epochs", type=int, default=30)
    parser.add_argument("--gan-epochs", type=int, default=300)
    parser.add_argument("--clf-epochs", type=int, default=100)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0, 0.5, 1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--augment-models", nargs="+", default=["cnn"])
    args = parser.parse_args()
    if not Path(args.data_root).is_dir():
        raise SystemExit(f"--data-root {args.data_root}: no such folder")
    stages = {"denoise": denoise, "anomaly": anomaly, "gan": gan, "augment": augment}
    rows = [row for stage in args.stages for row in stages[stage](args)]
    print("| stage | data | model | result | | wall time |\n|---|---|---|---|---|---|\n" + summary(rows))


if __name__ == "__main__":
    main()
