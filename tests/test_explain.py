"""`medexp explain`: saliency maps of a classifier trained on synthetic lesions, scored against
the lesion masks, and the SaliencyWatch callback."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from medexp.checkpoints.checkpoint import CONFIG_KEY
from medexp.data.phantoms import make_phantoms
from medexp.explain import explain
from medexp.metrics.saliency import (
    deletion_insertion,
    mask_fraction,
    normalise,
    pointing_hit,
    pointing_mass,
    random_maps,
)
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import ENV, QUIET, compose_config

# A tiny 2-stage CNN (8x8 feature maps at 32 px: the default 3-stage net's 4x4 cells see nearly
# the whole image) on high-contrast lesions: seconds to train, and its maps find the lesions
# (pointing mass 5-6x the uniform map's over seeds 1-3; the test asks for 2x).
TINY = [
    *QUIET,
    "model.net.channels=[8,16]",
    "data.lesion_contrast=3",
    "optimizer.lr=3e-3",
    "trainer.max_epochs=6",
    "data.num_samples={train: 384, val: 64, test: 64}",
    "data.batch_size=32",
    "test=false",
    "logger=tensorboard",
    "callbacks.saliency_watch.every_n_epochs=5",
    "callbacks.saliency_watch.num_images=4",
]


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lesions")
    train(compose_config(TINY, output_dir=run))
    return run


def explain_with(run: Path, output: Path, *overrides: str) -> dict:
    ckpt = run / "checkpoints" / "last.ckpt"
    return explain(compose_config([f"ckpt_path={ckpt}", f"output={output}", *overrides], "explain", output_dir=output))


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def mean(rows: list[dict], column: str) -> float:
    return float(np.mean([float(row[column]) for row in rows]))


# --- the scores --------------------------------------------------------------------------------


def test_pointing_mass_of_uniform_exact_and_empty_cases():
    mask = torch.zeros(3, 1, 10, 10, dtype=torch.uint8)
    mask[:2, :, 2:5, 3:7] = 1  # 12 pixels of 100 in the first two images, none in the third
    maps = torch.stack([torch.ones(1, 10, 10), mask[1].float(), torch.rand(1, 10, 10)])
    torch.testing.assert_close(mask_fraction(mask), torch.tensor([0.12, 0.12, 0.0]))
    mass = pointing_mass(maps, mask)
    assert mass[0] == pytest.approx(0.12)  # a uniform map scores the mask's area fraction
    assert mass[1] == pytest.approx(1.0) and torch.isnan(mass[2])
    hit = pointing_hit(maps, mask)
    assert hit[1] == 1.0 and torch.isnan(hit[0]) and torch.isnan(hit[2])  # constant map, empty mask
    assert torch.isnan(pointing_mass(torch.zeros(1, 1, 10, 10), mask[:1]))[0]  # a map without mass
    scaled = normalise(torch.tensor([[[[2.0, 4.0], [3.0, 2.0]]], [[[5.0, 5.0], [5.0, 5.0]]]]))
    torch.testing.assert_close(scaled, torch.tensor([[[[0.0, 1.0], [0.5, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]]))


def test_deletion_auc_of_the_true_evidence_beats_a_random_order():
    """A "model" whose class-1 probability is the share of an 8x8 region still intact: deleting
    that region first drops it to 0 after 64 of 1024 pixels (AUC 1/32 with 32 steps), a random
    order drops it linearly (AUC about 0.5); insertion the other way round."""
    images = torch.zeros(1, 1, 32, 32)
    images[..., 4:12, 8:16] = 1.0

    def probabilities(x):
        p = x[:, 0, 4:12, 8:16].mean(dim=(1, 2))
        return torch.stack([1 - p, p], dim=1)

    evidence = images.clone()
    truth = deletion_insertion(probabilities, images, evidence, torch.tensor([1]), steps=32, baseline="zero")
    noise = random_maps(images, torch.Generator().manual_seed(0))
    chance = deletion_insertion(probabilities, images, noise, torch.tensor([1]), steps=32, baseline="zero")
    torch.testing.assert_close(truth["deletion_curve"][0, :4], torch.tensor([1.0, 0.5, 0.0, 0.0]))
    assert float(truth["deletion_auc"]) == pytest.approx(1 / 32)
    assert float(chance["deletion_auc"]) == pytest.approx(0.5, abs=0.1)
    assert float(truth["insertion_auc"]) == pytest.approx(1 - 1 / 32)
    assert float(chance["insertion_auc"]) == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("fold", [None, 2])
def test_synthetic_classification_serves_lesion_masks_outside_training(fold):
    from medexp.data.synthetic import SyntheticDataModule

    data = SyntheticDataModule(
        task="multiclass",
        num_classes=3,
        in_channels=1,
        spatial_dims=2,
        fold=fold,
        num_samples={"train": 40, "val": 12, "test": 12},
    )
    data.setup()
    assert data.datasets["train"].masks is None and "mask" not in data.datasets["train"][0]
    for split in ("val", "test"):
        dataset = data.datasets[split]
        assert dataset.masks.dtype == np.uint8 and dataset.masks.shape == (len(dataset), 1, 32, 32)
        for sample in (dataset[i] for i in range(len(dataset))):
            assert sample["mask"].dtype == torch.uint8 and sample["image"].dtype == torch.float32
            # multiclass: the label counts the bright lesions; no lesion in the mask <=> label 0
            assert bool(sample["mask"].any()) == bool(sample["label"] > 0)


# --- a trained model ---------------------------------------------------------------------------


def test_gradcam_mass_lies_on_the_lesions_and_deletion_beats_random(lesion_run, tmp_path):
    """split=test: the lesion class's Grad-CAM maps (class_index=1) of the test images put far
    more of their mass inside the lesion masks than a uniform map, and deleting pixels in their
    order lowers the lesion probability faster than a random order."""
    summary = explain_with(lesion_run, tmp_path / "out", "split=test", "class_index=1", "overlays=false")
    assert summary["layer"] == "features.3"  # the last conv block of the 2-stage net
    rows = read_rows(tmp_path / "out" / "saliency.csv")
    assert len(rows) == 64 and json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    lesions = [row for row in rows if row["label"] == "1"]
    assert len(lesions) == summary["images_scored_with_mask"] > 10
    assert all(row["pointing_mass"] == "" for row in rows if row["label"] == "0")  # no lesion: no score
    mass, uniform = mean(lesions, "pointing_mass"), mean(lesions, "mask_fraction")
    assert summary["mean"]["pointing_mass"] == pytest.approx(mass, rel=1e-4)
    assert mass > 2 * uniform, (mass, uniform)
    assert summary["pointing_mass_over_uniform"] > 2
    deletion, random_order = mean(lesions, "deletion_auc"), mean(lesions, "deletion_auc_random")
    assert deletion < random_order, (deletion, random_order)


@pytest.mark.parametrize("method", ["gradcampp", "occlusion"])
def test_other_methods_also_point_at_lesions(lesion_run, tmp_path, method):
    summary = explain_with(
        lesion_run, tmp_path, "split=test", "class_index=1", f"method={method}", "limit=16", "steps=0", "overlays=false"
    )
    assert summary["images"] == 16 and summary["mean"]["deletion_auc"] is None
    assert summary["pointing_mass_over_uniform"] > 2
    assert (summary["layer"] is None) == (method == "occlusion")


def write_cases(folder: Path, n: int = 4) -> tuple[list[Path], np.ndarray]:
    images, labels, masks = make_phantoms(n, 32, "binary", 2, np.random.default_rng(3), lesion_contrast=3.0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    paths = []
    for k in range(n):
        paths.append(folder / "images" / f"case{k}.png")
        Image.fromarray(images[k, 0]).save(paths[-1])
        Image.fromarray(masks[k, 0] * 255).save(folder / "masks" / f"case{k}.png")
    return paths, labels


def test_medexp_explain_on_image_files_writes_overlays_and_scores(lesion_run, tmp_path):
    paths, labels = write_cases(tmp_path)
    ckpt = lesion_run / "checkpoints" / "last.ckpt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medexp.explain",
            f"ckpt_path={ckpt}",
            "input=images",
            "mask=masks",
            "output=out",
            "hydra.run.dir=run",
            "batch_size=2",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(tmp_path / "out" / "saliency.csv")
    assert [row["image"] for row in rows] == [f"case{k}.png" for k in range(4)]
    assert {"predicted_class", "probability", "pointing_mass", "mask_fraction", "deletion_auc"} <= set(rows[0])
    for row, label in zip(rows, labels):
        assert (row["pointing_mass"] != "") == bool(label)  # scored where the mask has a lesion
        assert 0.5 <= float(row["probability"]) <= 1.0
        picture = np.asarray(Image.open(tmp_path / "out" / row["overlay"]))
        assert picture.ndim == 3 and picture.shape[1] > picture.shape[0] >= 192  # image | map, enlarged
    assert (tmp_path / "out" / "overlays" / "case0.png").is_file()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["images"] == 4 and summary["layer"] == "features.3"
    log = (tmp_path / "run" / "explain.log").read_text()
    assert "layer features.3" in log and "pointing mass" in log

    # the same masks named by a CSV column score the same
    with (tmp_path / "cases.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "lesion"])
        writer.writerows([[f"images/{p.name}", f"masks/{p.name}"] for p in paths])
    explain_with(lesion_run, tmp_path / "out_csv", f"input={tmp_path / 'cases.csv'}", "mask=lesion", "overlays=false")
    again = read_rows(tmp_path / "out_csv" / "saliency.csv")
    assert [row["pointing_mass"] for row in again] == [row["pointing_mass"] for row in rows]


def test_saliency_watch_draws_the_watch_list_and_logs_the_mass_in_the_lesions(lesion_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # every_n_epochs=5 of 6 epochs: epochs 0 and 5
    assert sorted(p.name for p in (lesion_run / "saliency").glob("*.png")) == ["epoch_000.png", "epoch_005.png"]
    events = EventAccumulator(str(lesion_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert "val/saliency" in events.Tags()["images"]
    values = [event.value for event in events.Scalars("val/saliency_in_mask")]
    assert len(values) == 2 and all(0 <= v <= 1 for v in values)
    assert "val/saliency_in_mask_lift" in events.Tags()["scalars"]


def test_the_watch_is_off_by_default_and_skips_other_tasks(tmp_path):
    from medexp.callbacks.saliency import SaliencyWatch
    from tests.conftest import compose_config as compose

    cfg = compose([], output_dir=tmp_path)
    assert cfg.callbacks.saliency_watch.every_n_epochs is None
    train(
        compose(
            [
                *QUIET,
                "data=synthetic_seg",
                "model=unet",
                "model.net.channels=[4,8]",
                "model.net.strides=[2]",
                "model.net.num_res_units=0",
                "trainer.max_epochs=1",
                "data.num_samples={train: 16, val: 4, test: 4}",
                "test=false",
                "callbacks.saliency_watch.every_n_epochs=1",
                "callbacks.segmentation_overlays=null",
            ],
            output_dir=tmp_path,
        )
    )
    assert not (tmp_path / "saliency").exists()
    with pytest.raises(ValueError, match="method"):
        SaliencyWatch(method="lime")


# --- refusals ----------------------------------------------------------------------------------


def fake_checkpoint(path: Path, *overrides: str) -> Path:
    """An untrained model's checkpoint with its run config, as training stores it."""
    from medexp.utils.config import build

    cfg = compose_config([*overrides], output_dir=path.parent)
    config = OmegaConf.to_container(cfg, resolve=True)
    model = build(cfg.model)
    torch.save({CONFIG_KEY: config, "state_dict": model.state_dict()}, path)
    return path


def test_bad_options_are_user_errors(lesion_run, tmp_path):
    ckpt = lesion_run / "checkpoints" / "last.ckpt"

    def run(*overrides: str) -> None:
        explain(compose_config([f"ckpt_path={ckpt}", f"output={tmp_path}", *overrides], "explain", output_dir=tmp_path))

    with pytest.raises(
        MedexpError, match=r"method='lime'; expected one of \['gradcam', 'gradcampp', 'occlusion', 'attention'\]"
    ):
        run("split=test", "method=lime")
    with pytest.raises(MedexpError, match=r"layer='features\.9' does not exist.*features\.0.*features\.3"):
        run("split=test", "layer=features.9", "limit=2")
    with pytest.raises(MedexpError, match=r"layer='head' has no feature map"):
        run("split=test", "layer=head", "limit=2")
    with pytest.raises(MedexpError, match=r"either input=.* \(not both\)"):
        run("input=scans", "split=test")  # neither: the test split (tests/test_first_hour.py)
    with pytest.raises(MedexpError, match="mask= applies to input= files"):
        run("mask=masks")
    with pytest.raises(MedexpError, match="split='train'"):
        run("split=train")
    with pytest.raises(MedexpError, match="baseline="):
        run("split=test", "baseline=noise")
    with pytest.raises(MedexpError, match="class_index=5"):
        run("split=test", "class_index=5")
    seg = fake_checkpoint(
        tmp_path / "seg.ckpt",
        "data=synthetic_seg",
        "model=unet",
        "model.net.channels=[4,8]",
        "model.net.strides=[2]",
        "model.net.num_res_units=0",
    )
    with pytest.raises(MedexpError, match="explains classifiers.*SegmentationTask"):
        explain(
            compose_config([f"ckpt_path={seg}", f"output={tmp_path}", "split=test"], "explain", output_dir=tmp_path)
        )
    gan = fake_checkpoint(tmp_path / "gan.ckpt", "model=gan")
    with pytest.raises(MedexpError, match="explains classifiers.*AdversarialTask"):
        explain(
            compose_config([f"ckpt_path={gan}", f"output={tmp_path}", "split=test"], "explain", output_dir=tmp_path)
        )


def test_the_command_reports_errors_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medexp.explain",
            f"ckpt_path={tmp_path / 'none.ckpt'}",
            "split=test",
            "output=out",
            "hydra.run.dir=run",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
