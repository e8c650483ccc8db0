"""Longitudinal data (data=synthetic_longitudinal, files_longitudinal): padded series of 2D images
over time for sequence models (model=cnn_lstm), the synthetic task, manifests and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medexp.data.longitudinal import FileLongitudinalDataModule, SyntheticLongitudinalDataModule
from medexp.data.phantoms import make_series
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, medexp_main

SIZE = 8


def synthetic(**kwargs) -> SyntheticLongitudinalDataModule:
    defaults = dict(
        task="binary",
        num_classes=2,
        in_channels=1,
        spatial_dims=2,
        image_size=16,
        batch_size=16,
        num_patients={"train": 16, "val": 4, "test": 4},
    )
    return SyntheticLongitudinalDataModule(**{**defaults, **kwargs})


def test_synthetic_batch_is_padded_and_sorted():
    dm = synthetic(max_length=7)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"image", "length", "time", "label"}
    assert batch["image"].shape == (4, 7, 1, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["time"].shape == (4, 7) and batch["time"].dtype == torch.float32
    assert batch["length"].shape == (4,) and batch["length"].dtype == torch.int64
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.int64

    batch = next(iter(dm.train_dataloader()))
    image, length, times = batch["image"], batch["length"], batch["time"]
    assert len(set(length.tolist())) > 1 and length.min() >= 2 and length.max() <= 6
    assert 0 <= image.min() and image.max() <= 1
    for frames, n, t in zip(image, length.tolist(), times):
        assert (frames[n:] == 0).all() and (t[n:] == 0).all(), "padding is not zero"
        assert (frames[:n].flatten(1).amax(dim=1) > 0).all(), "a valid visit is empty"
        assert t[0] == 0 and (t[1:n].diff(prepend=t[:1]) >= 30).all(), "visits are not in time order"
    assert len(dm.datasets["train"]) == 16 and dm.label_counts()[1] == 16


def test_synthetic_task_needs_time():
    """A stable lesion keeps its size, a progressor's grows with the days since the first visit;
    pooled over visits, the sizes of both classes are alike, so one frame does not tell."""
    series, radii = make_series(200, 16, 2, 6, 6, np.random.default_rng(0))
    valid = np.arange(6) < series.lengths[:, None]
    for label, lesion, n, days in zip(series.labels, radii, series.lengths, series.times):
        lesion, days = lesion[:n], days[:n]
        assert (lesion > 0).all()
        if label == 0:
            assert np.ptp(lesion) == 0
        else:
            assert (np.diff(lesion) > 0).all() or lesion[-1] == 0.4  # grows, up to its cap
            growth = (lesion[1] - lesion[0]) / (days[1] - days[0]) * 365
            assert 0.12 <= growth <= 0.24 or lesion[1] == 0.4
    by_class = [radii[valid & (series.labels[:, None] == c)] for c in (0, 1)]
    assert abs(by_class[0].mean() - by_class[1].mean()) < 0.1 * by_class[1].mean()
    assert 0.3 < series.labels.mean() < 0.7
    # reproducible from the seed; every split draws its own patients
    assert np.array_equal(make_series(200, 16, 2, 6, 6, np.random.default_rng(0))[0].images, series.images)
    dm = synthetic()
    assert not np.array_equal(dm.load_series("val").images, dm.load_series("test").images)


# small enough for a few seconds of training on one CPU thread; test AUROC 0.95-0.99 over seeds
LEARN = [
    *QUIET,
    "logger=none",
    "data=synthetic_longitudinal",
    "model=cnn_lstm",
    "data.num_patients={train: 512, val: 64, test: 128}",
    "data.image_size=24",
    "data.batch_size=16",
    "model.net.encoder.channels=[8,16,32]",
    "model.net.feature_size=32",
    "model.net.hidden_size=32",
    "optimizer.lr=3e-3",
    "trainer.max_epochs=5",
]


def test_cnn_lstm_learns_synthetic_progression(tmp_path):
    """Through the real command: the padded series, length and time reach the net."""
    medexp_main("train", *LEARN, "hydra.run.dir=run", cwd=tmp_path)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["test/auroc"] > 0.8, metrics["test"]


def test_cnn_lstm_with_time_features_learns_too(tmp_path):
    from medexp.train import train

    # in-process: the command's start-up was tested above and costs more than this training
    metrics = train(compose_config([*LEARN, "model.net.time_features=true"], output_dir=tmp_path))
    assert metrics["test"]["test/auroc"] > 0.8, metrics["test"]


# --- files -----------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def visits_manifest(folder: Path, visits=(1, 3, 5, 1, 3, 5, 3, 5), shape=(SIZE, SIZE), **columns) -> Path:
    """Patients ``P0..`` with ``visits[p]`` PNGs each at irregular days, listed newest first (the
    module must sort them). A pixel holds the visit's day, so the order can be checked."""
    rng = np.random.default_rng(0)
    rows = []
    for p, count in enumerate(visits):
        days = np.cumsum(rng.integers(20, 400, size=count)) - 20
        for day in days[::-1]:
            pixels = rng.integers(0, 200, size=shape).astype(np.uint8)
            pixels[0, 0], pixels[0, 1] = 0, 255  # every image spans 0..255: scaling keeps the values
            pixels[0, 2] = day % 256
            name = f"p{p}_d{day}.png"
            Image.fromarray(pixels).save(folder / name)
            rows.append({"patient_id": f"P{p}", "time": int(day), "image": name, "label": p % 2})
    for index, row in enumerate(rows):
        row.update({key: values(row) if callable(values) else values[index] for key, values in columns.items()})
    return write_csv(folder / "visits.csv", rows)


def split_of(splits: dict[str, str]):
    """A ``split`` column for :func:`visits_manifest`: the patients' splits, ``train`` for the rest."""
    return lambda row: splits.get(row["patient_id"], "train")


def files(manifest: Path, **kwargs) -> FileLongitudinalDataModule:
    defaults = dict(task="binary", num_classes=2, in_channels=1, spatial_dims=2, batch_size=8, manifest=manifest)
    return FileLongitudinalDataModule(**{**defaults, **kwargs})


def test_files_train_one_epoch(tmp_path):
    from hydra.utils import instantiate

    from medexp.train import train

    manifest = visits_manifest(tmp_path, split=split_of({"P4": "val", "P5": "val", "P6": "test", "P7": "test"}))
    overrides = [
        *QUIET,
        "logger=none",
        "data=files_longitudinal",
        f"data.manifest={manifest}",
        "model=cnn_lstm",
        "model.net.encoder.channels=[4,8]",
        "model.net.feature_size=8",
        "model.net.hidden_size=8",
        "model.net.time_features=true",
        "trainer.max_epochs=1",
    ]
    cfg = compose_config(overrides, output_dir=tmp_path / "run")
    metrics = train(cfg)
    assert metrics["status"] == "complete" and "test/auroc" in metrics["test"]
    written = list(csv.DictReader((tmp_path / "run" / "splits.csv").open()))
    assert len(written) == 26 and {row["split"] for row in written if row["patient_id"] == "P4"} == {"val"}

    dm = instantiate(cfg.data)
    dm.setup()
    assert dm.max_length == 5 and [len(dm.datasets[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 5, 1, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert sorted(batch["length"].tolist()) == [1, 1, 3, 5]
    for frames, n, days in zip(batch["image"], batch["length"].tolist(), batch["time"]):
        assert (days[:n].diff() > 0).all(), "visits are not in time order"
        assert (frames[n:] == 0).all() and (days[n:] == 0).all()
        # each frame is the image of its own day (a pixel holds the day)
        stored = (frames[:n, 0, 0, 2] * 255).round()
        assert torch.equal(stored, days[:n] % 256)


def test_files_split_by_patient(tmp_path):
    manifest = visits_manifest(tmp_path, visits=[2] * 10)
    dm = files(manifest, val_fraction=0.2, test_fraction=0.2, output_dir=tmp_path / "run")
    dm.setup()
    ids = {split: set(dm.series[split].ids) for split in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    for split in ("train", "val", "test"):  # stratified by class
        assert set(dm.series[split].labels.tolist()) == {0, 1}
    again = files(tmp_path / "run" / "splits.csv")  # the split written is a manifest that reproduces it
    again.setup()
    assert {split: set(again.series[split].ids) for split in ids} == ids
    assert again.fingerprint() == dm.fingerprint()


def _rows(manifest: Path) -> list[dict]:
    return list(csv.DictReader(manifest.open()))


def _line(rows: list[dict], line: int) -> dict:
    return rows[line - 2]  # line 1 is the header


def _drop_time(rows):
    for row in rows:
        row.pop("time")


def _duplicate_time(rows):
    _line(rows, 4)["time"] = _line(rows, 3)["time"]


# P0: line 2; P1 (label 1): lines 3-5; P2: 6-10; P3: 11; P4: 12-14; P5: 15-19; P6: 20-22; P7: 23-27
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop_time, r"missing column\(s\) \['time'\]; .*\['patient_id', 'time', 'image', 'label'\]"),
        (lambda rows: _line(rows, 3).update(time="baseline"), r"time must be a number .*1: line 3: 'baseline'"),
        (lambda rows: _line(rows, 3).update(time="nan"), r"time must be a number .*1: line 3: 'nan'"),
        (
            lambda rows: _line(rows, 3).update(label="0"),
            r"disagree on their label \(1\): P1: 0 \(line 3\), 1 \(line 4\), 1 \(line 5\)",
        ),
        (lambda rows: _line(rows, 3).update(label="7"), r"class indices 0\.\.1 .*1: line 3: '7'"),
        (
            lambda rows: _line(rows, 3).update(image="gone.png"),
            r"listed image\(s\) do not exist .*1: line 3: 'gone\.png'",
        ),
        (_duplicate_time, r"1 duplicate \(patient_id, time\) visit\(s\): P1 at time \d+ \(lines 3, 4\)"),
        (lambda rows: _line(rows, 3).update(patient_id=""), r"empty patient_id at 1: line 3"),
    ],
    ids=[
        "missing_column",
        "time_not_numeric",
        "time_nan",
        "conflicting_labels",
        "label_range",
        "missing_file",
        "duplicate_time",
        "no_patient",
    ],
)
def test_manifest_errors_name_the_problem(tmp_path, change, message):
    rows = _rows(visits_manifest(tmp_path))
    change(rows)
    with pytest.raises(MedexpError, match=message):
        files(write_csv(tmp_path / "visits.csv", rows))


def test_conflicting_splits(tmp_path):
    rows = _rows(visits_manifest(tmp_path, split=split_of({"P3": "val", "P6": "test", "P7": "test"})))
    _line(rows, 3)["split"] = "val"
    with pytest.raises(MedexpError, match=r"disagree on their split \(1\): P1: val \(line 3\), train \(line 4\)"):
        files(write_csv(tmp_path / "visits.csv", rows))


def test_images_of_another_shape_are_named_or_resized(tmp_path):
    manifest = visits_manifest(tmp_path)
    odd = _line(_rows(manifest), 6)["image"]
    Image.fromarray(np.arange(6 * SIZE, dtype=np.uint8).reshape(6, SIZE)).save(tmp_path / odd)
    expected = (
        rf"images of different shapes: 1 differ from the \(8, 8\) \(H, W\) of the others: .*{odd} "
        r"\(.*visits\.csv line 6\): \(6, 8\)\. Set data\.resize=\[H, W\]"
    )
    with pytest.raises(MedexpError, match=expected):
        files(manifest).setup()
    dm = files(manifest, resize=[6, 6])
    dm.setup()
    assert dm.datasets["train"][0]["image"].shape == (5, 1, 6, 6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 3}, r"max_length=3 but 3 patient\(s\) have more visits: P2 \(5 visits\).*max_length=5"),
        ({"generated": {"ckpt": "gan.ckpt", "ratio": 0.5}}, r"data\.generated: .*series of images over time"),
        ({"spatial_dims": 3}, r"data\.spatial_dims=3; longitudinal data are series of 2D images"),
        ({"task": "multilabel"}, r"data\.task='multilabel'; longitudinal data serve one of \['binary', 'multicl"),
        ({"in_channels": 3}, r"p\d_d\d+\.png \(.*visits\.csv line \d+\): 1 channel\(s\) but data\.in_channels=3"),
    ],
)
def test_bad_settings(tmp_path, kwargs, message):
    manifest = visits_manifest(tmp_path)
    with pytest.raises(MedexpError, match=message):
        files(manifest, **kwargs).setup()


def test_transforms_see_the_series_stacked(tmp_path):
    """Transforms get the valid frames stacked as channels: one flip for every visit; padding
    comes after them, so it stays zero; a transform that changes the channels is refused."""
    from monai.transforms import RandFlipd, RepeatChanneld, ScaleIntensityd

    plain = synthetic()
    plain.setup()
    flipped = synthetic(
        augmentations=[RandFlipd(keys="image", prob=0.5, spatial_axis=1)],
        transforms=[ScaleIntensityd(keys="image", minv=0.0, maxv=2.0)],
    )
    flipped.setup()
    outcomes = set()
    for index in range(8):
        before, after = plain.datasets["train"][index], flipped.datasets["train"][index]
        n = int(before["length"])
        image = before["image"][:n]
        scaled = (image - image.min()) / (image.max() - image.min()) * 2  # one scaling for the whole series
        if torch.allclose(after["image"][:n], scaled, atol=1e-5):
            outcomes.add("kept")
        else:
            assert torch.allclose(after["image"][:n], scaled.flip(-1), atol=1e-5), "visits flipped apart"
            outcomes.add("flipped")
        assert (after["image"][n:] == 0).all()
    assert outcomes == {"kept", "flipped"}
    repeat = synthetic(transforms=[RepeatChanneld(keys="image", repeats=3)])
    expected = r"data\.transforms turned a series of \d visit\(s\) x 1 channel\(s\).*must keep the channels"
    with pytest.raises(MedexpError, match=expected):
        repeat.setup()  # setup serves the first training series


def test_folds_split_patients(tmp_path):
    dm = synthetic(fold=1, num_folds=4, output_dir=tmp_path)
    dm.setup()
    rows = list(csv.DictReader((tmp_path / "folds.csv").open()))
    assert len(rows) == 16 and {row["fold"] for row in rows} == {"0", "1", "2", "3"}
    assert len(dm.datasets["val"]) == 4 and len(dm.datasets["train"]) == 12
    held_out = [int(row["index"]) for row in rows if row["fold"] == "1"]
    original = dm.load_series("train")
    assert np.array_equal(dm.series["val"].images, original.images[held_out])
    assert np.array_equal(dm.series["val"].times, original.times[held_out])
    counts, total = dm.label_counts()
    assert total == 12 and counts.sum() == 12


def test_bad_images_stop_the_run_or_their_patient_is_skipped(tmp_path):
    manifest = visits_manifest(tmp_path, split=split_of({"P3": "val", "P6": "test", "P7": "test"}))
    rows = _rows(manifest)
    blank, leak = _line(rows, 7)["image"], _line(rows, 2)["image"]  # P2's second visit; P0's only one
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / blank)
    _line(rows, 20)["image"] = leak  # a visit of P6 (test) is P0's image (train)
    write_csv(manifest, rows)
    with pytest.raises(MedexpError) as error:
        files(manifest).setup()
    message = str(error.value)
    assert f"{blank} (" in message and "visits.csv line 7): every pixel is 0" in message
    assert "images duplicated across splits" in message and "line 2)" in message

    dm = files(manifest, on_bad="skip", output_dir=tmp_path / "run")
    dm.setup()
    assert "P2" not in dm.series["train"].ids and "P0" not in dm.series["train"].ids
    skipped = {row["patient_id"]: row["kind"] for row in csv.DictReader((tmp_path / "run" / "skipped.csv").open())}
    assert skipped == {"P0": "duplicate_across_splits", "P2": "constant"}
