"""SegmentationTask: metrics with explicit empty-mask handling, and 2D/3D training end to end."""

from __future__ import annotations

import json

import pytest
import torch

from medexp.tasks.segmentation import HausdorffDistance95
from medexp.train import train
from tests.conftest import QUIET, compose_config, medexp_main


def squares(offset: int = 0, present: bool = True) -> torch.Tensor:
    mask = torch.zeros(1, 32, 32, dtype=torch.long)
    if present:
        mask[0, 10 + offset : 20 + offset, 10:20] = 1
    return mask


def test_hd95_of_shifted_missed_and_empty_masks():
    metric = HausdorffDistance95(num_classes=2)
    metric.update(squares(2), squares())  # shifted by 2 px
    assert float(metric.compute()) == pytest.approx(2.0)
    metric.reset()
    metric.update(squares(present=False), squares())  # a missed lesion counts as the diagonal
    assert float(metric.compute()) == pytest.approx((32**2 + 32**2) ** 0.5)
    metric.reset()
    metric.update(squares(present=False), squares(present=False))  # nothing to measure
    assert torch.isnan(metric.compute())


def test_dice_leaves_out_cases_with_nothing_to_find(compose_cfg):
    from hydra.utils import instantiate

    task = instantiate(compose_cfg("data=synthetic_seg", "model=unet").model, _convert_="all")
    metrics = task.configure_metrics()
    probs = lambda mask: torch.nn.functional.one_hot(mask, 2).movedim(-1, 1).float()  # noqa: E731
    # case 1: empty truth, empty prediction (left out); case 2: perfect
    pred = torch.cat([squares(present=False), squares()])
    true = torch.cat([squares(present=False), squares()])[:, None]
    assert float(metrics(probs(pred), true)["dice"]) == pytest.approx(1.0)
    metrics.reset()
    # a phantom lesion on an empty truth scores 0
    assert float(metrics(probs(squares()), squares(present=False)[:, None])["dice"]) == pytest.approx(0.0)


def test_2d_segmentation_through_medexp_train(tmp_path):
    medexp_main("train", "data=synthetic_seg", "model=unet", "hydra.run.dir=run", *QUIET, cwd=tmp_path)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # an empty prediction scores 0 on every case with a lesion, a random one about the lesion
    # share of the pixels (< 0.02); the trained U-Net must be far above both
    assert metrics["test"]["test/dice"] > 0.4
    assert metrics["test"]["test/auroc"] > 0.9
    assert metrics["monitor"] == "val/dice"


def test_3d_segmentation_with_sliding_windows_and_eval(tmp_path):
    """Train on foreground/background-balanced patches, validate and test on whole volumes."""
    from medexp.eval import evaluate

    cfg = compose_config(
        [
            *QUIET,
            "data=synthetic_seg",
            "data.spatial_dims=3",
            "data.image_size=24",
            "data.num_samples={train: 128, val: 32, test: 32}",
            "data.batch_size=8",
            "model=unet",
            "model.net.channels=[8,16,32]",
            "model.net.strides=[2,2]",
            "model.net.num_res_units=1",
            "model.roi_size=[16,16,16]",
            "data/augmentations=patches",
            "optimizer.lr=3e-3",
            "trainer.max_epochs=8",
        ],
        output_dir=tmp_path / "run",
    )
    metrics = train(cfg)
    assert metrics["test"]["test/dice"] > 0.3
    assert (tmp_path / "run" / "overlays" / "epoch_007.png").is_file()  # drawn from the slice with most lesion
    results = evaluate(
        compose_config(
            [f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}"], "eval", output_dir=tmp_path / "eval"
        )
    )
    for name, value in metrics["test"].items():
        assert results["test"][name] == pytest.approx(value, abs=1e-6), name


def test_multiclass_masks_report_dice_per_class(compose_cfg):
    cfg = compose_cfg(
        *QUIET,
        "data=synthetic_seg",
        "data.num_classes=3",
        "model=unet",
        "trainer.max_epochs=1",
        "data.num_samples={train: 32, val: 16, test: 16}",
        "model.tta_flips=true",
    )
    metrics = train(cfg)
    assert {"test/dice", "test/dice_1", "test/dice_2", "test/hd95", "test/iou"} <= set(metrics["test"])
    assert "test/auroc" not in metrics["test"]


def test_overlays_go_to_the_run_directory_and_tensorboard(compose_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(
        compose_cfg(
            *QUIET,
            "data=synthetic_seg",
            "model=unet",
            "logger=tensorboard",
            "trainer.max_epochs=2",
            "data.num_samples={train: 32, val: 8, test: 8}",
            "callbacks.segmentation_overlays.num_cases=3",
        )
    )
    assert sorted(p.name for p in (tmp_path / "overlays").glob("*.png"))[:2] == ["epoch_000.png", "epoch_001.png"]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "val/overlays" in events.Tags()["images"]


def test_overlays_skip_classifiers(compose_cfg, tmp_path):
    train(compose_cfg(*QUIET, "trainer.max_epochs=1", "data.num_samples={train: 32, val: 8, test: 8}"))
    assert not (tmp_path / "overlays").exists()


def test_metrics_count_only_pixels_inside_the_roi(compose_cfg):
    from hydra.utils import instantiate

    task = instantiate(compose_cfg("data=synthetic_seg", "model=unet").model, _convert_="all")
    metrics = task.configure_metrics()
    truth = squares()[:, None]  # (1, 1, 32, 32)
    logits = torch.nn.functional.one_hot(squares(), 2).movedim(-1, 1).float() * 10
    logits[:, 1, :5, :5] = 20  # a phantom lesion in the corner...
    roi = torch.ones_like(truth, dtype=torch.bool)
    roi[:, :, :8, :8] = False  # ...outside the field of view
    task.update_metrics(metrics, logits, {"label": truth, "roi": roi})
    values = metrics.compute()
    assert float(values["dice"]) == pytest.approx(1.0)
    assert float(values["auroc"]) == pytest.approx(1.0)
    metrics.reset()
    task.update_metrics(metrics, logits, {"label": truth})  # without the roi it counts
    assert float(metrics.compute()["dice"]) < 1.0


def test_drive_short_run(compose_cfg, tmp_path):
    from tests.conftest import SHARED_DATA

    drive = SHARED_DATA / "drive"
    if not (drive / "training" / "images").is_dir():
        pytest.skip("../shared/data/drive is absent")
    metrics = train(
        compose_cfg(
            *QUIET,
            "experiment=drive_unet",
            f"data.root={drive}",
            "data.cache=false",
            "trainer.max_epochs=1",
            "trainer.check_val_every_n_epoch=1",
            "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1",
            "callbacks.segmentation_overlays.num_cases=1",
        )
    )
    assert {"test/dice", "test/auroc", "test/hd95"} <= set(metrics["test"])
    rows = (tmp_path / "splits.csv").read_text().splitlines()
    assert len(rows) == 1 + 40 and rows[0] == "image,label,split,patient_id,roi"
    assert sum(",test," in row for row in rows) == 20 and sum(",val," in row for row in rows) == 4
    assert all(row.rsplit(",", 1)[1].endswith("_mask.gif") for row in rows[1:])
