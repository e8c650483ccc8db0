"""Autoencoders, GANs, diffusion and image translation on real data, through `medexp train` /
`medexp sample`.

    python scripts/benchmark_generative.py --data-root ../shared/data/medmnist \
        --stages denoise anomaly gan ddpm augment translation

Stages (each a set of ``python -m medexp.<command>`` runs, as a user would start them):
    denoise  model=denoising_unet (residual U-Net; Gaussian noise, std 0.2 in [-1, 1] = 0.1 of the
             range) and model=autoencoder on BreastMNIST and PneumoniaMNIST, batch 32: test
             PSNR/SSIM of the output against the clean image, and of the noisy input (psnr_input)
    anomaly  experiment=anomaly_pneumonia (normal X-rays only), and the same on BreastMNIST with
             benign/normal (class 1) as normal: test AUROC of the reconstruction error
    gan      experiment=breast_gan (a class-conditional GAN), then `medexp sample` measured by
             domain FID/KID on the features of a classifier trained on the real images
             (model=cnn), against the test split, beside real validation images as the floor
    ddpm     experiment=breast_ddpm (a class-conditional diffusion model, EMA weights, DDIM
             sampling with --ddpm-sample-steps steps), measured like the GAN
    augment  BreastMNIST classifiers (model=cnn, and optionally resnet18) trained with
             data.generated.ratio 0 (real only), 0.5 and 1 from each of --generators, over seeds
    translation  pix2pix (paired) and CycleGAN (trained unpaired on the same images) against the
             identity baseline (the source scored as the translation): data=synthetic_translation,
             and T1 -> grey-matter probability slices of the MNI templates (--nifti-root)

Each run's row goes to ``--jsonl`` (appended); a Markdown summary is printed at the end.
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

QUIET = ["callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false"]


# CPU seconds (user + system) of the last medexp command
LAST_CPU = {"s": 0.0}


def medexp(command: str, args: list[str]) -> float:
    """Run ``python -m medexp.<command> args``; return its wall time in seconds (its CPU time in
    ``LAST_CPU``)."""
    line = [sys.executable, "-m", f"medexp.{command}", *args]
    print("+", " ".join(line), flush=True)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(line, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    LAST_CPU["s"] = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
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


def generator_dir(args: argparse.Namespace, generator: str) -> Path:
    return Path(args.log_dir) / f"breast_{generator}"


def features_ckpt(args: argparse.Namespace) -> Path:
    """A classifier trained on the real images (model=cnn): its features measure samples."""
    features_dir = Path(args.log_dir) / "breast_features_cnn"
    train(
        features_dir,
        [
            "experiment=breastmnist_resnet18",
            "model=cnn",
            f"data.root={args.data_root}",
            "trainer.max_epochs=100",
            "seed=0",
        ],
    )
    return features_dir / "checkpoints" / "best.ckpt"


def generator_quality(args: argparse.Namespace, generator: str, epochs: int, wall: float, cpu: float) -> dict:
    """``medexp sample`` of 512 images from the generator's last checkpoint: domain FID/KID
    against the test split, and the sampling time."""
    out = Path(args.log_dir) / f"breast_{generator}_samples"
    sample_wall = medexp(
        "sample",
        [
            f"ckpt_path={generator_dir(args, generator) / 'checkpoints' / 'last.ckpt'}",
            "n=512",
            f"output={out}",
            f"features_ckpt={features_ckpt(args)}",
            "reference_split=test",
            "kid_subset_size=100",
            f"hydra.run.dir={out / 'log'}",
        ],
    )
    quality = json.loads((out / "quality.json").read_text())
    row = {
        "stage": "gan",
        "what": f"{generator} samples (last.ckpt)",
        "epochs": epochs,
        "wall_s": wall,
        "cpu_s": cpu,
        "sample_wall_s": sample_wall,
        **quality,
    }
    return record(args, row)


def gan(args: argparse.Namespace) -> list[dict]:
    _, wall = train(
        generator_dir(args, "gan"),
        ["experiment=breast_gan", f"data.root={args.data_root}", f"trainer.max_epochs={args.gan_epochs}", "seed=0"],
    )
    rows = [generator_quality(args, "gan", args.gan_epochs, wall, LAST_CPU["s"] if wall else 0.0)]
    rows.append(
        record(
            args, {"stage": "gan", "what": "real validation images (floor)", **real_floor(args, features_ckpt(args))}
        )
    )
    return rows


def ddpm(args: argparse.Namespace) -> list[dict]:
    _, wall = train(
        generator_dir(args, "ddpm"),
        [
            "experiment=breast_ddpm",
            f"data.root={args.data_root}",
            f"trainer.max_epochs={args.ddpm_epochs}",
            f"+trainer.max_time={args.ddpm_max_time}",
            f"model.sample_steps={args.ddpm_sample_steps}",
            "seed=0",
        ],
    )
    return [generator_quality(args, "ddpm", args.ddpm_epochs, wall, LAST_CPU["s"] if wall else 0.0)]


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
    rows = []
    runs = [("real", 0.0)] + [(g, r) for g in args.generators for r in args.ratios if r > 0]
    for model in args.augment_models:
        for generator, ratio in runs:
            ckpt = generator_dir(args, "gan" if generator == "real" else generator) / "checkpoints" / "last.ckpt"
            for seed in args.seeds:
                run_dir = Path(args.log_dir) / f"augment_{model}_{generator}_ratio{ratio}_seed{seed}"
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
                            "generator": generator,
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


def translation(args: argparse.Namespace) -> list[dict]:
    """pix2pix and CycleGAN (unpaired training on the same images) on two datasets; the identity
    baseline is the source scored as the translation (the ``*_source`` metrics)."""
    datasets = {"synthetic": ["data=synthetic_translation", "data.image_size=32"]}
    t1, gm = (Path(args.nifti_root) / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm"))
    if t1.is_file() and gm.is_file():
        from medexp.data.files_translation import slice_pairs

        manifest = slice_pairs(t1, gm, Path(args.log_dir) / "t1_gm_slices", axis=2, step=2, size=64, slab=4)
        # both templates hold 0..255: one fixed window keeps the grey-matter probability's scale
        scale = (
            "{_target_: monai.transforms.ScaleIntensityRanged, keys: [image, target], a_min: 0, a_max: 255, "
            "b_min: 0, b_max: 1, clip: true}"
        )
        datasets["t1_to_grey_matter"] = [
            "data=files_translation",
            f"data.manifest={manifest}",
            f"data.transforms=[{scale}]",
        ]
    rows = []
    for name, data in datasets.items():
        for model, extra in (("pix2pix", []), ("cyclegan", ["data.paired=false"])):
            for seed in args.seeds:
                run_dir = Path(args.log_dir) / f"translation_{name}_{model}_seed{seed}"
                metrics, wall = train(
                    run_dir,
                    [*data, f"model={model}", *extra, f"trainer.max_epochs={args.translation_epochs}", f"seed={seed}"],
                )
                test = metrics["test"]
                row = {"stage": "translation", "data": name, "model": model, "seed": seed, "wall_s": wall}
                row["cpu_s"] = LAST_CPU["s"] if wall else None
                for metric in ("mae", "psnr", "ssim"):
                    row[metric], row[f"{metric}_source"] = test[f"test/{metric}"], test[f"test/{metric}_source"]
                rows.append(record(args, row))
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

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    groups: dict[tuple, list[dict]] = {}
    for row in (r for r in rows if r["stage"] == "augment"):
        groups.setdefault((row["model"], row.get("generator", "gan"), row["ratio"]), []).append(row)
    for (model, generator, ratio), group in groups.items():
        aucs = [r["test_auroc"] for r in group]
        accs = [r["test_accuracy"] for r in group]
        lines.append(
            f"| augment | breastmnist | {model}, {generator} ratio {ratio} ({len(group)} seeds) "
            f"| test AUROC {statistics.mean(aucs):.3f} ± {spread(aucs):.3f} "
            f"| ACC {statistics.mean(accs):.3f} ± {spread(accs):.3f} | {statistics.mean(r['wall_s'] for r in group) / 60:.1f} min |"
        )
    groups = {}
    for row in (r for r in rows if r["stage"] == "translation"):
        groups.setdefault((row["data"], row["model"]), []).append(row)
    for (data, model), group in groups.items():
        cells = []
        for metric in ("mae", "psnr", "ssim"):
            values, source = [r[metric] for r in group], [r[f"{metric}_source"] for r in group]
            cells.append(
                f"{metric.upper()} {statistics.mean(values):.3f} ± {spread(values):.3f} "
                f"(identity {statistics.mean(source):.3f})"
            )
        cpu = [r["cpu_s"] for r in group if r.get("cpu_s")]
        lines.append(
            f"| translation | {data} | {model} ({len(group)} seeds) | {', '.join(cells)} | "
            f"| {statistics.mean(cpu) / 60 if cpu else float('nan'):.1f} CPU min |"
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
    parser.add_argument("--generators", nargs="+", default=["gan", "ddpm"], choices=["gan", "ddpm"])
    parser.add_argument("--ddpm-epochs", type=int, default=200)
    parser.add_argument("--ddpm-sample-steps", type=int, default=25)
    parser.add_argument("--ddpm-max-time", default="00:00:20:00", help="the diffusion model's training budget")
    parser.add_argument("--translation-epochs", type=int, default=30)
    parser.add_argument("--nifti-root", default="../shared/data/files/nifti")
    args = parser.parse_args()
    if not Path(args.data_root).is_dir():
        raise SystemExit(f"--data-root {args.data_root}: no such folder")
    stages = {
        "denoise": denoise,
        "anomaly": anomaly,
        "gan": gan,
        "ddpm": ddpm,
        "augment": augment,
        "translation": translation,
    }
    rows = [row for stage in args.stages for row in stages[stage](args)]
    print("| stage | data | model | result | | wall time |\n|---|---|---|---|---|---|\n" + summary(rows))


if __name__ == "__main__":
    main()
