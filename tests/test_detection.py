"""Lesion detection: box data (synthetic and files), mAP/FROC, RetinaNet training and predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medexp.data.detection import FileDetectionDataModule, SyntheticDetectionDataModule
from medexp.data.phantoms import make_detection_phantoms, mask_boxes
from medexp.metrics.detection import DetectionMetrics
from medexp.predict import predict
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, medexp_main

SMALL = ["data.num_samples={train: 8, val: 4, test: 4}", "data.batch_size=4", "trainer.max_epochs=1", "report=false"]


def test_mask_boxes_span_each_lesion_from_first_pixel_to_one_past_last():
    mask = np.zeros((12, 10), dtype=np.uint8)
    mask[2:5, 3:7] = 1  # rows 2..4, columns 3..6
    mask[8:10, 0:2] = 2  # a lesion of the second class
    boxes, labels = mask_boxes(mask)
    assert boxes.tolist() == [[2, 3, 5, 7], [8, 0, 10, 2]] and labels.tolist() == [0, 1]
    volume = np.zeros((6, 6, 6), dtype=np.uint8)
    volume[1:3, 2:5, 0:6] = 1
    assert mask_boxes(volume)[0].tolist() == [[1, 2, 0, 3, 5, 6]]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_synthetic_images_hold_one_to_three_bright_lesions_inside_their_boxes(spatial_dims):
    images, boxes, labels = make_detection_phantoms(24, 32, 1, np.random.default_rng(0), spatial_dims=spatial_dims)
    assert images.shape == (24, 1, *(32,) * spatial_dims) and images.dtype == np.uint8
    assert {len(b) for b in boxes} <= {1, 2, 3} and all((label == 0).all() for label in labels)
    brighter = []
    for image, image_boxes in zip(images[:, 0].astype(float), boxes):
        assert (image_boxes[:, :spatial_dims] >= 0).all() and (image_boxes[:, spatial_dims:] <= 32).all()
        for box in image_boxes.astype(int):
            inside = image[tuple(slice(lo, hi) for lo, hi in zip(box[:spatial_dims], box[spatial_dims:]))]
            brighter.append(inside.mean() > image.mean())
    assert np.mean(brighter) > 0.9  # lesions are bright blobs on a darker body


def test_map_and_froc_of_known_detections():
    metric = DetectionMetrics(num_classes=1, spatial_dims=2)

    def found(boxes: list[list[float]], scores: list[float]) -> dict[str, torch.Tensor]:
        return {
            "boxes": torch.tensor(boxes).reshape(-1, 4),
            "labels": torch.zeros(len(scores), dtype=torch.long),
            "labels_scores": torch.tensor(scores),
        }

    def truth(boxes: list[list[float]]) -> dict[str, torch.Tensor]:
        return {"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.zeros(len(boxes), dtype=torch.long)}

    lesion = [10.0, 10.0, 20.0, 20.0]
    metric.update([found([lesion], [0.9])], [truth([lesion])])
    values = metric.compute()
    assert float(values["map_10"]) == pytest.approx(1.0) and float(values["froc"]) == pytest.approx(1.0)
    metric.reset()
    # a box shifted by 4 px (IoU 0.43): a hit at IoU 0.1, a miss at 0.5
    metric.update([found([[14.0, 10.0, 24.0, 20.0]], [0.9])], [truth([lesion])])
    values = metric.compute()
    assert float(values["map_10"]) == pytest.approx(1.0) and float(values["map_50"]) == pytest.approx(0.0)
    metric.reset()
    # a false positive on an image without lesions outscores the hit: precision 1/2 at recall 1;
    # 1 false positive over 2 images = 0.5 per image, so sensitivity is 0 below 0.5 and 1 from there
    metric.update([found([[40.0, 40.0, 50.0, 50.0]], [0.95]), found([lesion], [0.8])], [truth([]), truth([lesion])])
    values = metric.compute()
    assert float(values["map_10"]) == pytest.approx(0.5)
    assert [float(values[f"sens_fp{r}"]) for r in ("0.125", "0.25", "0.5", "1", "8")] == [0, 0, 1, 1, 1]
    assert float(values["froc"]) == pytest.approx(5 / 7)


def test_box_flip_augmentation_moves_image_and_boxes_together():
    from monai.apps.detection.transforms.dictionary import RandFlipBoxd

    flip = RandFlipBoxd(image_keys="image", box_keys="boxes", box_ref_image_keys="image", prob=1.0, spatial_axis=0)
    datamodule = SyntheticDetectionDataModule(
        num_classes=1, num_samples={"train": 2, "val": 1, "test": 1}, augmentations=[flip]
    )
    datamodule.setup()
    train = datamodule.datasets["train"]
    sample, image, boxes = train[0], train.images[0][0] / 255.0, train.boxes[0]
    assert torch.allclose(sample["image"][0], torch.from_numpy(image).float().flip(0))
    expected = np.stack([64 - boxes[:, 2], boxes[:, 1], 64 - boxes[:, 0], boxes[:, 3]], axis=1)
    assert sample["boxes"].numpy().tolist() == expected.tolist()


def test_train_and_predict_through_the_cli(tmp_path):
    """A short CPU run finds the synthetic lesions; predict writes boxes in the files' geometry."""
    medexp_main(
        "train",
        "data=synthetic_det",
        "model=retinanet",
        "hydra.run.dir=run",
        "trainer.max_epochs=3",
        "data.num_samples={train: 128, val: 32, test: 32}",
        "optimizer.lr=3e-3",
        *QUIET,
        cwd=tmp_path,
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # an untrained RetinaNet scores below the 0.05 threshold everywhere: no boxes, mAP 0
    assert metrics["monitor"] == "val/map_10" and metrics["fit"]["val/map_10_best"] > 0
    assert metrics["test"]["test/map_10"] > 0.3
    assert metrics["test"]["test/froc"] > 0.3
    assert metrics["test"]["test/map_50"] <= metrics["test"]["test/map_10"]
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert report["task"] == "detection" and report["agreement"]["map_10"]["abs_diff"] < 1e-6
    assert report["totals"]["lesions"] == sum(case["lesions"] for case in report["per_case"]) > 32
    assert (tmp_path / "run" / "report" / "froc.png").is_file() and (
        tmp_path / "run" / "report" / "worst_cases.png"
    ).is_file()

    # phantoms as PNGs (width x = columns, height y = rows), and one padded 16 columns wider
    from PIL import Image

    from medexp.checkpoints.checkpoint import Checkpoint

    images, _, _ = make_detection_phantoms(4, 64, 1, np.random.default_rng([7, 2]))
    (tmp_path / "scans").mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image[0]).save(tmp_path / "scans" / f"case{index}.png")
    Image.fromarray(np.pad(images[0][0], ((0, 0), (0, 16)))).save(tmp_path / "scans" / "wide.png")
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    table = predict(
        compose_config(
            [f"ckpt_path={ckpt}", f"input={tmp_path / 'scans'}", f"output={tmp_path / 'preds'}"],
            "predict",
            output_dir=tmp_path / "predict_run",
        )
    )
    with table.open() as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["image", "label", "score", "x_min", "y_min", "x_max", "y_max"]
    record = json.loads((tmp_path / "preds" / "boxes.json").read_text())
    assert record["box_mode"] == "xyxy" and record["classes"] == ["bright"]
    assert len(rows) == sum(len(found["boxes"]) for found in record["images"].values()) > 0
    # the model on the arrays themselves, (row, column) boxes: predict must give the same boxes as (x, y)
    model = Checkpoint(ckpt).build_model()
    with torch.no_grad():
        expected = model.infer(torch.from_numpy(images).float() / 255).detections
    for index, found in enumerate(expected):
        written = record["images"][str(tmp_path / "scans" / f"case{index}.png")]
        assert written["spatial_size"] == [64, 64] and written["scores"] == pytest.approx(
            found["labels_scores"].tolist(), abs=1e-5
        )
        assert np.allclose(written["boxes"], found["boxes"][:, [1, 0, 3, 2]].numpy(), atol=1e-4)
    wide = record["images"][str(tmp_path / "scans" / "wide.png")]
    assert wide["spatial_size"] == [80, 64]
    assert all(0 <= b[0] < b[2] <= 80 and 0 <= b[1] < b[3] <= 64 for b in wide["boxes"])


def test_3d_detection_trains_and_evaluates_a_step(tmp_path):
    cfg = compose_config(
        [
            *QUIET,
            *SMALL,
            "data=synthetic_det",
            "data.spatial_dims=3",
            "data.image_size=32",
            "model=retinanet",
            "report=true",
        ],
        output_dir=tmp_path,
    )
    metrics = train(cfg)
    assert np.isfinite(metrics["fit"]["train/loss"])
    assert {"test/map_10", "test/map_50", "test/froc", "test/sens_fp8"} <= set(metrics["test"])
    assert all(np.isfinite(v) for v in metrics["test"].values())
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["n"] == 4 and report["metrics"]["froc"] == pytest.approx(metrics["test"]["test/froc"], abs=1e-6)
    assert (tmp_path / "report" / "worst_cases.png").is_file()  # slices through the largest box


def write_manifest(folder, rows: list[dict[str, str]]):
    path = folder / "boxes.csv"
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def phantom_files(folder, n: int = 12) -> list[dict[str, str]]:
    """PNG phantoms and manifest rows whose boxes follow the file convention (x = column)."""
    from PIL import Image

    images, boxes, _ = make_detection_phantoms(n, 32, 1, np.random.default_rng(3))
    rows = []
    for index, (image, image_boxes) in enumerate(zip(images, boxes)):
        Image.fromarray(image[0]).save(folder / f"p{index}.png")
        file_boxes = image_boxes[:, [1, 0, 3, 2]].astype(int).tolist()
        rows.append(
            {"image": f"p{index}.png", "boxes": json.dumps(file_boxes), "split": ["train", "val", "test"][index % 3]}
        )
    return rows


def test_file_manifest_boxes_index_the_image_as_loaded_and_train(tmp_path):
    rows = phantom_files(tmp_path)
    # one case with its boxes and labels in a sidecar file
    (tmp_path / "p0.json").write_text(
        json.dumps({"boxes": json.loads(rows[0]["boxes"]), "labels": [0] * len(json.loads(rows[0]["boxes"]))})
    )
    rows[0]["boxes"] = "p0.json"
    manifest = write_manifest(tmp_path, rows)
    datamodule = FileDetectionDataModule(manifest=manifest, num_classes=1, transforms=[], output_dir=tmp_path)
    datamodule.setup()
    images, boxes, _ = make_detection_phantoms(12, 32, 1, np.random.default_rng(3))
    sample = datamodule.datasets["train"][0]  # p0: MONAI reads a PNG as (x, y) = (columns, rows)
    assert torch.equal(sample["image"][0], torch.from_numpy(images[0][0]).float().T)
    for box, truth in zip(sample["boxes"].long().tolist(), boxes[0].astype(int)):
        x0, y0, x1, y1 = box
        assert torch.equal(
            sample["image"][0, x0:x1, y0:y1],
            torch.from_numpy(images[0][0, truth[0] : truth[2], truth[1] : truth[3]]).float().T,
        )
    splits = {Path(row["image"]).name: row for row in csv.DictReader((tmp_path / "splits.csv").open())}
    assert len(splits) == 12 and json.loads(splits["p3.png"]["boxes"]) == json.loads(rows[3]["boxes"])
    assert json.loads(splits["p0.png"]["boxes"]) == boxes[0][:, [1, 0, 3, 2]].tolist()  # from the sidecar

    metrics = train(
        compose_config(
            [
                *QUIET,
                "data=files_det",
                f"data.manifest={manifest}",
                "model=retinanet",
                "trainer.max_epochs=1",
                "report=false",
            ],
            output_dir=tmp_path / "run",
        )
    )
    assert np.isfinite(metrics["test"]["test/loss"]) and "test/map_10" in metrics["test"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.anchor_shapes=[8]"], "model.anchor_shapes has 1 shape(s) but model.net.num_anchors=2"),
        (["model.feature_map_scales=[1,2,4]"], "model.feature_map_scales=[1, 2, 4] has 3 level(s)"),
        (["model.nms_threshold=0"], "model.nms_threshold=0; expected a value in (0, 1]"),
        (["model.net.feature_extractor.out_channels=20"], "out_channels=20; expected a multiple of 8"),
        (["model=unet"], "data.task='detection'"),
        (
            ["data.augmentations=[{_target_: monai.transforms.Flipd, keys: [image], spatial_axis: 0}]"],
            "Flipd moves pixels but not the lesion boxes",
        ),
    ],
)
def test_bad_detection_configs_fail_early_with_the_key(tmp_path, overrides, message):
    cfg = compose_config([*QUIET, *SMALL, "data=synthetic_det", "model=retinanet", *overrides], output_dir=tmp_path)
    with pytest.raises(MedexpError) as caught:
        train(cfg)
    assert message in str(caught.value)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("boxes", "message"),
    [
        ("[[5, 5, 3, 9]]", "is not [min..., max...] with 0 <= min < max"),
        ("[[1, 2, 3]]", "expected a JSON list of 4-number boxes"),
        ("[[1, 2", "cannot read the boxes or labels as JSON"),
        ("missing.json", "box file 'missing.json' not found"),
        ("[[20, 20, 40, 30]]", "reaches beyond the image of spatial size [32, 32]"),
    ],
)
def test_bad_boxes_in_a_manifest_are_named_with_their_line(tmp_path, boxes, message):
    rows = phantom_files(tmp_path, n=3)
    rows[1]["boxes"] = boxes
    manifest = write_manifest(tmp_path, rows)
    with pytest.raises(MedexpError) as caught:
        FileDetectionDataModule(manifest=manifest, num_classes=1, scan="all").setup()
    assert message in str(caught.value) and ("line 3" in str(caught.value) or "p1.png" in str(caught.value))


def test_on_bad_skip_leaves_out_an_image_whose_boxes_do_not_fit(tmp_path):
    rows = phantom_files(tmp_path, n=6)
    rows[4]["boxes"] = "[[20, 20, 40, 30]]"  # beyond the 32 x 32 image
    datamodule = FileDetectionDataModule(
        manifest=write_manifest(tmp_path, rows), num_classes=1, scan="all", on_bad="skip", output_dir=tmp_path
    )
    datamodule.setup()
    assert sum(len(cases) for cases in datamodule.cases.values()) == 5
    skipped = list(csv.DictReader((tmp_path / "skipped.csv").open()))
    assert [Path(row["image"]).name for row in skipped] == ["p4.png"] and "reaches beyond" in skipped[0]["reason"]
