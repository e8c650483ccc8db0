"""The fast MedMNIST recipe (``experiment=medmnist_fast``) against the best published results.

Every run is ``medexp train experiment=medmnist_fast data.name=<dataset> seed=S [variant]``, as a
user types it; the script reads the run's metrics.json and appends one JSON row per run to
``--out`` (rows already there are skipped, so an interrupted benchmark continues).

    # variants, seed 0, judged on validation metrics only (docs/benchmark_medmnist_fast_variants.jsonl
    # was measured on the draft recipe, which had test-time flips on; rounds 1-4 on one network:
    # --base model.ensemble=1, since the recipe now trains as many as fit its budget)
    python scripts/benchmark_medmnist_fast.py variants --data-root ../shared/data/medmnist \
        --base 'model.tta_flips=${data.flip_axes}'
    # the chosen recipe, 3 seeds, test metrics reported
    python scripts/benchmark_medmnist_fast.py final --data-root ../shared/data/medmnist
    # training images/s of the recipe's network and of ResNet-18 (28), same machine, one run
    python scripts/benchmark_medmnist_fast.py throughput
    # the Markdown tables of docs/benchmarks.md
    python scripts/benchmark_medmnist_fast.py table

CPU time is the user + system time of the training process (its 2 threads), wall time the
run's whole ``medexp train`` (data check, training, validation, test, report).
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

DATASETS = ("breastmnist", "retinamnist", "pneumoniamnist")
# test AUC / ACC at 28x28: MedMNIST v2 (Yang et al., 2023, Table 3) and the best 28 px entries of
# MedMNIST+ (Doerrich et al., 2024)
PUBLISHED = {
    "breastmnist": {
        "ResNet-18 (28), MedMNIST v2": (0.901, 0.863),
        "Google AutoML Vision, MedMNIST v2 (best AUC)": (0.919, 0.861),
        "best 28 px, MedMNIST+": (0.891, 0.865),
    },
    "retinamnist": {
        "ResNet-18 (28), MedMNIST v2": (0.717, 0.524),
        "Google AutoML Vision, MedMNIST v2 (best)": (0.750, 0.531),
        "best 28 px, MedMNIST+": (0.754, 0.543),
    },
    "pneumoniamnist": {
        "ResNet-18 (28), MedMNIST v2": (0.944, 0.854),
        "Google AutoML Vision, MedMNIST v2": (0.991, 0.946),
    },
}
# the recipe's batch augmentations (per-sample flips along the safe axes, 2-pixel shifts) plus more
# the recipe's batch augmentations up to round 6: flips and shifts; round 7 added the intensity jitter
FLIPS_SHIFTS = (
    "{_target_:medexp.data.batch_augment.BatchFlip,axes:${data.flip_axes},prob:0.5}",
    "{_target_:medexp.data.batch_augment.BatchTranslate,pixels:2,mode:reflect}",
)
INTENSITY = "{_target_:medexp.data.batch_augment.BatchIntensity,brightness:0.1,contrast:0.1}"
RECIPE_AUGMENTATIONS = (*FLIPS_SHIFTS, INTENSITY)


def augmentations(*extra: str, base: tuple[str, ...] = RECIPE_AUGMENTATIONS) -> str:
    return f"data.batch_augmentations=[{','.join([*base, *extra])}]"


# each variant changes the recipe in one place (overrides on top of experiment=medmnist_fast)
VARIANTS = {
    "recipe": [],
    "no_ema": ["callbacks.ema.decay=null"],
    "no_tta": ["model.tta_flips=null"],
    "no_batch_aug": ["data.batch_augmentations=[]"],
    "no_label_smoothing": ["model.label_smoothing=0.0"],
    # round 11: more smoothing (none was worse than the recipe's 0.1 in round 5); failed (1), dropped
    "label_smoothing_0.2": ["model.label_smoothing=0.2"],
    "mixup_0.2": ["model.mixup_alpha=0.2"],
    "cutmix_1": ["model.cutmix_alpha=1.0"],
    "tta_shift_1": ["model.tta_shift=1"],
    # round 12: the schedule and the optimiser, never varied before; warm-up and cosine passed (1) and
    # failed (2), SGD failed both: dropped
    "warmup_cosine": ["scheduler=warmup_cosine"],
    "sgd": ["optimizer=sgd", "optimizer.lr=0.05", "optimizer.weight_decay=5e-4"],
    "lr_1e-3": ["optimizer.lr=1e-3"],
    "wd_0.01": ["optimizer.weight_decay=0.01"],
    # adopted in round 8 (the recipe's weight decay since; 0.05 before)
    "wd_0.1": ["optimizer.weight_decay=0.1"],
    "wd_0.05": ["optimizer.weight_decay=0.05"],
    # the next step of the trend (0.01 < 0.05 < 0.1): round 9, a tie adopted by the rule (the recipe's since)
    "wd_0.2": ["optimizer.weight_decay=0.2"],
    # round 11: the trend's next step again (0.05, 0.1 and 0.2 each passed the rule); failed (1), dropped
    "wd_0.4": ["optimizer.weight_decay=0.4"],
    "ema_0.98": ["callbacks.ema.decay=0.98"],
    # the EMA's decay without its warm-up cap (1 + n) / (10 + n): on the small sets the cap, not 0.99,
    # sets the average (BreastMNIST's 360 updates end at 0.976, about 4 epochs; 0.99 is about 11);
    # round 9: BreastMNIST never learns under the long average, dropped
    "ema_no_warmup": ["callbacks.ema.warmup=false"],
    # round 10: best.ckpt picked by validation loss instead of AUROC (a continuous measure of every
    # probability, steadier than the AUROC of 78-216 validation images); training unchanged
    "monitor_loss": ["model.monitor=val/loss"],
    # round 12: Cutout (BatchErase): an 8-pixel square (8% of a 28x28 image) blanked in half of the
    # training samples, on top of the recipe's flips, shifts and intensity jitter; failed both, dropped
    "cutout_8": [augmentations("{_target_:medexp.data.batch_augment.BatchErase,size:8,prob:0.5}")],
    # round 12: depth instead of width (wider networks were tried in rounds 6-9): a second block in
    # the last stage (4x4 pixels, 256 channels), about 30% more compute a pass; failed (1), dropped
    "depth_1112": ["model.net.layers=[1,1,1,2]"],
    # round 13: GELU instead of ReLU throughout the network (MONAI's act argument), the smooth
    # activation of recent small-image networks; about the same compute; failed (2), dropped
    "act_gelu": ["+model.net.act=gelu"],
    # round 13: twice the one-cycle's peak learning rate (lr 1e-3 was tried in round 5, when the
    # recipe had one network and weight decay 0.05; the decoupled decay scales with it); passed
    # both measures and is the recipe since (this variant now repeats it)
    "lr_4e-3": ["optimizer.lr=4e-3"],
    # round 10: sharpness-aware minimisation (model.sam_rho, medexp/tasks/sharpness.py) at the
    # recipe's compute: a SAM step costs two passes, so half the epochs (networks as for 20 epochs:
    # BreastMNIST and RetinaMNIST 3, PneumoniaMNIST 1, as the recipe's)
    "sam_0.05_epochs_20": ["model.sam_rho=0.05", "trainer.max_epochs=20"],
    "batch_64": ["data.batch_size=64"],
    "batch_32": ["data.batch_size=32"],
    "focal_2": ["model.loss=focal", "model.focal_gamma=2.0"],
    # inverse class frequency of the training labels in the loss
    "class_weights": ["model.class_weights=auto"],
    # label smoothing to neighbouring grades on ordinal sets (RetinaMNIST); the others unchanged
    "ordinal_smoothing": ["model.ordinal_smoothing=${data.ordinal}"],
    "epochs_20": ["trainer.max_epochs=20"],
    "epochs_80": ["trainer.max_epochs=80"],
    # half the epochs, with as many networks (at most 5) as then fit the 150k training image passes:
    # BreastMNIST and RetinaMNIST 5, PneumoniaMNIST 1
    "epochs_20_x5": [
        "trainer.max_epochs=20",
        "model.ensemble='${members_for:150000,${medmnist:${data.name},train_size},${trainer.max_epochs},5}'",
    ],
    "width_48": ["model.net.block_inplanes=[48,96,192,384]"],
    # width 48 with as many networks as the budget's compute allows: a pass of the wider network
    # costs 2.1x the CPU time of the recipe's (round 8), so 150k passes become 71k (BreastMNIST 3
    # networks, RetinaMNIST 1)
    "width_48_budget": [
        "model.net.block_inplanes=[48,96,192,384]",
        "model.ensemble='${members_for:71000,${medmnist:${data.name},train_size},${trainer.max_epochs},3}'",
    ],
    # the CPU time that 20 epochs free (round 8) spent on width instead of epochs: width 48 at 20
    # epochs costs about the recipe's 3 x 40 (2.1x a pass, half the passes); networks sized as in
    # width_48_budget (BreastMNIST and RetinaMNIST 3, PneumoniaMNIST 1); round 9: as epochs_20, dropped
    "epochs_20_width_48": [
        "trainer.max_epochs=20",
        "model.net.block_inplanes=[48,96,192,384]",
        "model.ensemble='${members_for:71000,${medmnist:${data.name},train_size},${trainer.max_epochs},3}'",
    ],
    # three networks trained side by side, their probabilities averaged (medexp/nets/ensemble.py)
    "ensemble_3": ["model.ensemble=3"],
    "ensemble_5": ["model.ensemble=5"],
    # the whole budget of 150k training image passes: networks as for 40 epochs (at most 3), then
    # as many epochs as fill the budget (BreastMNIST 3 x 91, RetinaMNIST 3 x 46, larger sets 1 x 40)
    "spend_budget": [
        # quoted: Hydra's override grammar takes no nested interpolation with arguments unquoted
        "model.ensemble='${members_for:150000,${medmnist:${data.name},train_size},40,3}'",
        "trainer.max_epochs='${epochs_for:150000,${medmnist:${data.name},train_size},${model.ensemble},40}'",
    ],
    # rotations of up to 15 degrees and zooms of 0.9-1.1 of every training image, on whole batches
    # (rounds 4-5 measured them on the flips and shifts alone, before the intensity jitter)
    "affine_15": [augmentations("{_target_:medexp.data.batch_augment.BatchAffine,degrees:15,scale:[0.9,1.1]}")],
    "affine_30": [augmentations("{_target_:medexp.data.batch_augment.BatchAffine,degrees:30,scale:[0.9,1.1]}")],
    # contrast and brightness jitter of +-10% (of the [-1, 1] span) per sample, added to the flips and
    # shifts in round 7 (since then the recipe itself); no_intensity: the round-6 augmentations
    "intensity_0.1": [augmentations(base=(*FLIPS_SHIFTS, INTENSITY))],
    "no_intensity": [augmentations(base=FLIPS_SHIFTS)],
    # twice the jitter, measured after 0.1 was adopted
    "intensity_0.2": [
        augmentations(
            "{_target_:medexp.data.batch_augment.BatchIntensity,brightness:0.2,contrast:0.2}", base=FLIPS_SHIFTS
        )
    ],
    # the jitter per channel, a colour jitter, instead of per sample (grey sets: the same draws)
    "color_0.1": [
        augmentations(
            "{_target_:medexp.data.batch_augment.BatchIntensity,brightness:0.1,contrast:0.1,per_channel:true}",
            base=FLIPS_SHIFTS,
        )
    ],
    "resnet18": [
        "model=resnet18",
        "model.label_smoothing=0.1",
        "model.channels_last=true",
        "model.tta_flips=${data.flip_axes}",
    ],
}


def medexp_train(run_dir: Path, overrides: list[str]) -> tuple[dict, float, float]:
    """Run ``medexp train`` into ``run_dir``: its metrics, CPU minutes and wall minutes."""
    command = [
        sys.executable,
        "-m",
        "medexp.train",
        f"hydra.run.dir={run_dir}",
        "callbacks.rich_progress_bar=null",
        "extras.print_config=false",
        *overrides,
    ]
    print("+", " ".join(command), flush=True)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL)
    wall = (time.perf_counter() - start) / 60
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / 60
    return json.loads((run_dir / "metrics.json").read_text()), cpu, wall


def validation_at_best(run_dir: Path) -> tuple[float, float, int]:
    """Validation AUROC and accuracy of the epoch that best.ckpt holds (the first with the best
    value of the run's ``model.monitor``: the highest val/auroc, or since round 10 the lowest
    val/loss), and the epochs trained, read from the run's CSV log: the rows of every validation
    during fit, then one re-validation of best.ckpt, which is left out."""
    import csv

    from omegaconf import OmegaConf

    from medexp.utils.config import metric_mode

    monitor = OmegaConf.load(run_dir / ".hydra" / "config.yaml").model.monitor
    sign = -1.0 if metric_mode(monitor) == "min" else 1.0
    log = next(run_dir.glob("csv/**/metrics.csv"))
    rows = [r for r in csv.DictReader(log.open()) if r.get("val/auroc")][:-1]
    best = max(range(len(rows)), key=lambda i: (sign * float(rows[i][monitor]), -i))
    return float(rows[best]["val/auroc"]), float(rows[best]["val/accuracy"]), len(rows)


def refresh(out: Path, log_dir: Path, phase: str) -> None:
    """Re-read the validation figures of every row of ``out`` from its run's log."""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        run_dir = log_dir / phase / f"{row['dataset']}_{row['variant']}_seed{row['seed']}"
        row["val_auc"], row["val_acc"], row["epochs"] = validation_at_best(run_dir)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))


def done(out: Path) -> set[tuple[str, str, int]]:
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return {(r["dataset"], r["variant"], r["seed"]) for r in rows}


def train_rows(args: argparse.Namespace, variants: list[str], seeds: list[int]) -> None:
    out = Path(args.out)
    for dataset in args.datasets:
        for variant in variants:
            for seed in seeds:
                if (dataset, variant, seed) in done(out):
                    continue
                run_dir = Path(args.log_dir) / args.phase / f"{dataset}_{variant}_seed{seed}"
                overrides = [
                    "experiment=medmnist_fast",
                    *args.base,
                    f"data.name={dataset}",
                    f"data.root={args.data_root}",
                    f"seed={seed}",
                    *VARIANTS[variant],
                ]
                metrics, cpu, wall = medexp_train(run_dir, overrides)
                val_auc, val_acc, epochs = validation_at_best(run_dir)
                row = {
                    "dataset": dataset,
                    "variant": variant,
                    "seed": seed,
                    "overrides": [*args.base, *VARIANTS[variant]],
                    "val_auc": metrics["val"]["val/auroc"],
                    "val_acc": metrics["val"]["val/accuracy"],
                    "test_auc": metrics["test"]["test/auroc"],
                    "test_acc": metrics["test"]["test/accuracy"],
                    "epochs": epochs,
                    "cpu_min": round(cpu, 2),
                    "wall_min": round(wall, 2),
                }
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


def held_out(args: argparse.Namespace) -> None:
    """Which checkpoint to test, chosen on images no choice has seen: each variant trains on
    ``--folds`` of the training split (``data.fold=k``; it validates, and picks best.ckpt, on fold k),
    and then its best.ckpt and last.ckpt are evaluated on the official validation split, which the
    fold runs never use, and beside it on the run's own fold (``fold_val_*``: unselected for
    last.ckpt). Fold k's runs are ``<log-dir>/fold<k>/variants/...``, their rows
    ``<out>_fold<k>.jsonl``; the held-out rows go to ``--out``."""
    out = Path(args.out)
    for fold in args.folds:
        fold_args = argparse.Namespace(**vars(args))
        fold_args.base = [*args.base, f"data.fold={fold}"]
        fold_args.log_dir, fold_args.phase = f"{args.log_dir}/fold{fold}", "variants"
        fold_args.out = str(out.with_name(f"{out.stem}_fold{fold}{out.suffix}"))
        train_rows(fold_args, args.variants, args.seeds or [0])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    seen = {(r["dataset"], r["variant"], r["seed"], r["fold"], r["checkpoint"]) for r in rows}
    for fold in args.folds:
        for dataset in args.datasets:
            for variant in args.variants:
                for seed in args.seeds or [0]:
                    run_dir = Path(args.log_dir) / f"fold{fold}" / "variants" / f"{dataset}_{variant}_seed{seed}"
                    for name in ("best", "last"):
                        if (dataset, variant, seed, fold, name) in seen:
                            continue
                        row = {"dataset": dataset, "variant": variant, "seed": seed, "fold": fold, "checkpoint": name}
                        row.update(official_validation(run_dir / "checkpoints" / f"{name}.ckpt"))
                        with out.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(json.dumps(row), flush=True)
    # each row also gets its checkpoint's validation on the run's own fold (from the run's log)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        run_dir = Path(args.log_dir) / f"fold{row['fold']}" / "variants"
        run_dir /= f"{row['dataset']}_{row['variant']}_seed{row['seed']}"
        row["fold_val_auc"], row["fold_val_acc"] = fold_validation(run_dir, row["epoch"])
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for variant in args.variants:
        for dataset in args.datasets:
            for name in ("best", "last"):
                group = [r for r in rows if (r["dataset"], r["variant"], r["checkpoint"]) == (dataset, variant, name)]
                if group:
                    means = [
                        statistics.mean(r[k] for r in group)
                        for k in ("val_auc", "val_acc", "fold_val_auc", "fold_val_acc")
                    ]
                    print(
                        f"{dataset} {variant} {name}: {len(group)} runs, official val AUC {means[0]:.4f} ACC "
                        f"{means[1]:.4f}; own fold AUC {means[2]:.4f} ACC {means[3]:.4f}"
                    )
        measures = held_out_measures([r for r in rows if r["variant"] == variant], args.datasets)
        if measures:
            print(
                f"{variant}: (1) best.ckpt on official val {measures[0]:.4f}; (2) last.ckpt on own fold {measures[1]:.4f}"
            )


def held_out_measures(rows: list[dict], datasets: list[str]) -> tuple[float, float] | None:
    """The two measures by which round 8 on adopts a variant, each the mean over ``datasets`` of the
    mean of AUC and ACC over folds: (1) best.ckpt on the official validation split (what the recipe
    tests, scored on images nothing was picked on), (2) last.ckpt on the run's own fold (nothing
    picked; together the folds hold every training image once). None until every dataset has both."""
    by_key = {}
    for dataset in datasets:
        for name, keys in (("best", ("val_auc", "val_acc")), ("last", ("fold_val_auc", "fold_val_acc"))):
            group = [r for r in rows if (r["dataset"], r["checkpoint"]) == (dataset, name)]
            if not group:
                return None
            by_key[dataset, name] = statistics.mean(statistics.mean(r[k] for r in group) for k in keys)
    return tuple(statistics.mean(by_key[d, name] for d in datasets) for name in ("best", "last"))


def fold_validation(run_dir: Path, epoch: int) -> tuple[float, float]:
    """Validation AUROC and accuracy of a fold run at ``epoch``, on its own fold, from its CSV log
    (the rows of every validation during fit; the last row, the tested checkpoint's, left out).
    For last.ckpt this is unselected; for best.ckpt it is the figure that picked it."""
    import csv

    log = next(run_dir.glob("csv/**/metrics.csv"))
    rows = [r for r in csv.DictReader(log.open()) if r.get("val/auroc")][:-1]
    row = next(r for r in rows if int(r["epoch"]) == epoch)
    return float(row["val/auroc"]), float(row["val/accuracy"])


def official_validation(ckpt_path: Path) -> dict:
    """A fold run's checkpoint on the official validation split (``data.fold`` cleared): AUROC,
    accuracy, the checkpoint's epoch and the number of images evaluated."""
    import lightning.pytorch as L
    from omegaconf import OmegaConf

    from medexp.checkpoints.checkpoint import Checkpoint
    from medexp.utils.config import build

    checkpoint = Checkpoint(ckpt_path)
    run_cfg = OmegaConf.create(checkpoint.checked_config())
    run_cfg.data.fold, run_cfg.data.output_dir = None, None
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    datamodule = build(run_cfg.data)
    metrics = trainer.validate(checkpoint.build_model(), datamodule=datamodule, verbose=False)[0]
    return {
        "val_auc": metrics["val/auroc"],
        "val_acc": metrics["val/accuracy"],
        "epoch": checkpoint.contents["epoch"],
        "images": len(datamodule.val_dataloader().dataset),
    }


def throughput(args: argparse.Namespace) -> None:
    """Training images/s (forward, backward, AdamW step; batch 128, 1x28x28, 2 threads) of each
    model config's network, built by Hydra from medexp's own YAML, one after the other."""
    import torch
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from medexp.resolvers import register_resolvers

    register_resolvers()
    torch.set_num_threads(2)
    rows = []
    from medexp.nets.ensemble import Ensemble

    # (model, channels-last, torch.compile, ensemble members)
    setups = [
        ("resnet10_fast", False, False, 1),
        ("resnet10_fast", True, False, 1),
        ("resnet10_fast", True, True, 1),
        ("resnet10_fast", True, False, 3),
        ("resnet18", False, False, 1),
        ("resnet18", True, False, 1),
    ]
    for model, channels_last, compiled, members in setups:
        with initialize_config_module("medexp.conf", version_base="1.3"):
            cfg = compose("train", overrides=["data=medmnist", f"model={model}", "data.root=."])
        torch.manual_seed(0)
        net = instantiate(cfg.model.net)
        if members > 1:  # trained as model.ensemble trains it: each member on its own loss
            net = Ensemble(net, members, "softmax")
        x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 2, (128,))
        if channels_last:
            net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        if compiled:
            net.compile()
        optimizer = torch.optim.AdamW(net.parameters())
        times = []
        steps = args.steps if model == "resnet10_fast" else max(3, args.steps // 3)
        for _ in range(steps + 2):
            start = time.perf_counter()
            out = net(x)
            out = out if members == 1 else out.flatten(0, 1)
            loss = torch.nn.functional.cross_entropy(out, y.repeat(members))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        row = {
            "model": model,
            "channels_last": channels_last,
            "compile": compiled,
            "ensemble": members,
            "images_per_s": round(128 / statistics.median(times[2:]), 1),
            # the first two steps, which pay the compilation when compiled
            "first_steps_s": round(sum(times[:2]), 1),
            "parameters_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows.append(augmentation_cost())
    print(json.dumps(rows[-1]), flush=True)
    Path(args.throughput_out).write_text("".join(json.dumps(r) + "\n" for r in rows))


def augmentation_cost(batches: int = 5) -> dict:
    """Microseconds per 1x28x28 image of random flips and 2-pixel shifts: MONAI's per-sample chain
    (``RandFlipd``, reflect ``SpatialPadd``, ``RandSpatialCropd``, as ``data.augmentations``
    would run it) vs medexp's whole-batch ``BatchFlip`` + ``BatchTranslate`` (batch 128, 1 thread),
    and of a whole-batch rotation and zoom (``BatchAffine``)."""
    import torch
    from monai.transforms import Compose, RandFlipd, RandSpatialCropd, SpatialPadd

    from medexp.data.batch_augment import BatchAffine, BatchFlip, BatchTranslate

    torch.set_num_threads(1)
    x = torch.randn(128, 1, 28, 28)
    chain = Compose(
        [
            RandFlipd(keys=["image"], prob=0.5, spatial_axis=1),
            SpatialPadd(keys=["image"], spatial_size=[32, 32], mode="reflect"),
            RandSpatialCropd(keys=["image"], roi_size=[28, 28], random_size=False),
        ]
    )
    flip, translate, turn = BatchFlip([1]), BatchTranslate(2), BatchAffine(15, (0.9, 1.1))
    timings = {}
    for name, augment in (
        ("monai_per_sample_us", lambda: torch.stack([chain({"image": image})["image"] for image in x])),
        ("batch_us", lambda: translate(flip(x))),
        ("batch_affine_us", lambda: turn(x)),
    ):
        augment()
        start = time.perf_counter()
        for _ in range(batches):
            augment()
        timings[name] = round((time.perf_counter() - start) / batches / len(x) * 1e6, 1)
    torch.set_num_threads(2)
    return {"augmentation": "flip + 2 px shift, per 1x28x28 image", **timings}


def table(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
    print("| dataset | variant | seeds | val AUC | val ACC | test AUC | test ACC | CPU min | wall min |")
    print("|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["dataset"], r["variant"]) for r in rows}, key=lambda k: (k[0], k[1] != "recipe", k[1]))
    for dataset, variant in keys:
        group = [r for r in rows if r["dataset"] == dataset and r["variant"] == variant]

        def cell(key: str, group: list[dict] = group) -> str:
            values = [r[key] for r in group]
            if len(values) == 1:
                return f"{values[0]:.3f}"
            return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

        seeds = ",".join(str(r["seed"]) for r in group)
        print(
            f"| {dataset} | {variant} | {seeds} | {cell('val_auc')} | {cell('val_acc')} | {cell('test_auc')} | "
            f"{cell('test_acc')} | {cell('cpu_min')} | {cell('wall_min')} |"
        )
    for dataset, entries in PUBLISHED.items():
        for name, (auc, acc) in entries.items():
            print(f"| {dataset} | {name} | | | | {auc:.3f} | {acc:.3f} | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["variants", "final", "held_out", "throughput", "table", "refresh"])
    parser.add_argument("--data-root", default="../shared/data/medmnist")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 for variants, 0 1 2 for final")
    parser.add_argument("--log-dir", default="logs/benchmark_medmnist_fast")
    parser.add_argument("--out", default=None, help="JSON lines (default: docs/benchmark_medmnist_fast_<phase>.jsonl)")
    parser.add_argument(
        "--base",
        nargs="*",
        default=[],
        help="overrides of every run before the variant's; the committed variants were measured on the draft "
        "recipe with test-time flips: --base 'model.tta_flips=${data.flip_axes}'",
    )
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="held_out: data.fold values")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per network (throughput)")
    parser.add_argument("--throughput-out", default="docs/benchmark_medmnist_fast_throughput.jsonl")
    args = parser.parse_args()
    if args.phase == "throughput":
        return throughput(args)
    args.out = (
        args.out
        or f"docs/benchmark_medmnist_fast_{args.phase if args.phase in ('variants', 'held_out') else 'final'}.jsonl"
    )
    if args.phase == "table":
        return table(args)
    if args.phase == "refresh":
        return refresh(Path(args.out), Path(args.log_dir), "variants" if "variants" in args.out else "final")
    if args.phase == "held_out":
        return held_out(args)
    if args.phase == "variants":
        return train_rows(args, args.variants, args.seeds or [0])
    return train_rows(args, ["recipe"], args.seeds or [0, 1, 2])


if __name__ == "__main__":
    main()
