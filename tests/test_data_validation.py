"""The data check before training (medexp/data/validation.py): bad data of every kind stops a run
before its first step, with the file (or sample) and the kind of problem named; data.on_bad=skip
trains on the rest and lists what it left out; data.scan=off lets readable data through."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medexp.data import validation
from medexp.data.files import FileDataModule
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, medexp_main, run_cli
from tests.helpers import write_dicom, write_medmnist_npz

SIZE = 16
FAST = [*QUIET, "logger=none", "trainer.max_epochs=1", "data.batch_size=4"]
TINY_UNET = ["model=unet", "model.net.channels=[4,8]", "model.net.strides=[2]", "model.net.num_res_units=0"]
SPLITS = ["train"] * 4 + ["val", "test"]


# --- small files, written by the tests ---


def noise(seed: int, shape=(SIZE, SIZE)) -> np.ndarray:
    return np.random.default_rng(seed).integers(10, 200, size=shape).astype(np.uint8)


def square_mask(seed: int, shape=(SIZE, SIZE)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    y, x = np.random.default_rng(seed).integers(1, SIZE - 7, size=2)
    mask[y : y + 6, x : x + 6] = 1
    return mask


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def classification(folder: Path, suffix: str = "png") -> list[dict]:
    """Six grey images (4 train, 1 val, 1 test) with class labels."""
    rows = []
    for k, split in enumerate(SPLITS):
        name = f"c{k}.{suffix}"
        if suffix == "dcm":
            write_dicom(folder / name, noise(k).astype(np.uint16) * 8)
        else:
            Image.fromarray(noise(k)).save(folder / name)
        rows.append({"image": name, "label": k % 2, "split": split})
    return rows


def segmentation_png(folder: Path) -> list[dict]:
    rows = []
    for k, split in enumerate(SPLITS):
        Image.fromarray(noise(k)).save(folder / f"i{k}.png")
        Image.fromarray(square_mask(k)).save(folder / f"m{k}.png")
        rows.append({"image": f"i{k}.png", "label": f"m{k}.png", "split": split})
    return rows


AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, affine), path)


def segmentation_nifti(folder: Path) -> list[dict]:
    rows = []
    for k, split in enumerate(SPLITS):
        volume = np.random.default_rng(k).normal(size=(8, 8, 8)).astype(np.float32)
        mask = np.zeros((8, 8, 8), np.uint8)
        mask[2:6, 2:6, 2 + k % 3 : 5 + k % 3] = 1
        save_nifti(folder / f"ct{k}.nii.gz", volume)
        save_nifti(folder / f"seg{k}.nii.gz", mask)
        rows.append({"image": f"ct{k}.nii.gz", "label": f"seg{k}.nii.gz", "split": split})
    return rows


def files_overrides(folder: Path, rows: list[dict], *extra: str) -> list[str]:
    return ["data=files", f"data.manifest={write_csv(folder / 'cases.csv', rows)}", *extra]


SEG_2D = ["data.task=segmentation", *TINY_UNET]
SEG_3D = ["data.task=segmentation", "data.spatial_dims=3", *TINY_UNET]


def assert_not_trained(run: Path) -> None:
    # start-up checks (medexp/utils/preflight.py) may create an empty checkpoints/ folder
    assert not list(run.rglob("*.ckpt")) and not (run / "metrics.json").exists(), "a model was trained"


# --- the bad-data table: each builder writes a data set with one kind of problem ---


@dataclass
class Bad:
    overrides: list[str]
    name: str  # the file or sample the message must name
    kind: str  # how the message must call the problem


def truncated_png(folder):
    rows = classification(folder)
    data = (folder / "c2.png").read_bytes()
    (folder / "c2.png").write_bytes(data[: len(data) // 2])
    return Bad(files_overrides(folder, rows), "c2.png (", "unreadable or missing files (1)")


def garbage_nifti(folder):
    rows = segmentation_nifti(folder)
    (folder / "ct4.nii.gz").write_bytes(b"\x00garbage, not a NIfTI volume" * 8)
    return Bad(files_overrides(folder, rows, *SEG_3D), "ct4.nii.gz (", "unreadable or missing files (1)")


def unparsable_dicom(folder):
    pytest.importorskip("pydicom")
    rows = classification(folder, "dcm")
    (folder / "c5.dcm").write_bytes(b"DICM? no: garbage" * 20)
    return Bad(files_overrides(folder, rows), "c5.dcm (", "unreadable or missing files (1)")


def unreadable_mask(folder):
    rows = segmentation_png(folder)
    (folder / "m1.png").write_bytes(b"not a png")
    return Bad(files_overrides(folder, rows, *SEG_2D), "m1.png (", "unreadable or missing files (1)")


def missing_file(folder):
    rows = classification(folder)
    rows[3]["image"] = "gone.png"
    return Bad(files_overrides(folder, rows), "line 5: image 'gone.png'", "listed file(s) do not exist")


def nan_in_nifti(folder):
    rows = segmentation_nifti(folder)
    volume = np.random.default_rng(9).normal(size=(8, 8, 8)).astype(np.float32)
    volume[1, 2, 3] = np.nan
    save_nifti(folder / "ct1.nii.gz", volume)
    return Bad(files_overrides(folder, rows, *SEG_3D), "ct1.nii.gz (", "NaN/Inf values (1): ")


def inf_in_tiff(folder):
    rows = classification(folder)
    image = noise(7).astype(np.float32)
    image[0, 0] = np.inf
    Image.fromarray(image, mode="F").save(folder / "float.tif")
    rows[0]["image"] = "float.tif"
    return Bad(files_overrides(folder, rows), "float.tif (", "NaN/Inf values (1): ")


def nan_in_npz(folder):
    rows = classification(folder)
    image = noise(8).astype(np.float32)
    image[4:6, 4:6] = np.nan
    np.savez(folder / "array.npz", image=image)
    rows[5]["image"] = "array.npz"
    return Bad(files_overrides(folder, rows), "array.npz (", "4 NaN of 256 values")


def black_png(folder):
    rows = classification(folder)
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(folder / "c3.png")  # an all-black export
    return Bad(files_overrides(folder, rows), "c3.png (", "constant images (every pixel equal) (1)")


def constant_dicom(folder):
    pytest.importorskip("pydicom")
    rows = classification(folder, "dcm")
    write_dicom(folder / "c0.dcm", np.full((SIZE, SIZE), 1000))
    return Bad(files_overrides(folder, rows), "c0.dcm (", "every pixel is 1000")


def mask_label_out_of_range(folder):
    rows = segmentation_png(folder)
    Image.fromarray(square_mask(2) * 3).save(folder / "m2.png")
    return Bad(files_overrides(folder, rows, *SEG_2D), "m2.png (", "labels outside the classes (1)")


def mask_saved_as_255(folder):
    rows = segmentation_png(folder)
    Image.fromarray(square_mask(0) * 255).save(folder / "m0.png")
    return Bad(files_overrides(folder, rows, *SEG_2D), "m0.png (", "set data.mask_threshold=127")


def fractional_nifti_mask(folder):
    rows = segmentation_nifti(folder)
    save_nifti(folder / "seg3.nii.gz", np.full((8, 8, 8), 0.5, np.float32))
    return Bad(files_overrides(folder, rows, *SEG_3D), "seg3.nii.gz (", "mask values [0.5] are not class indices 0..1")


def mask_shape_png(folder):
    rows = segmentation_png(folder)
    Image.fromarray(square_mask(4)[:, :12]).save(folder / "m4.png")
    return Bad(files_overrides(folder, rows, *SEG_2D), "m4.png (", "image/mask shape mismatches (1)")


def mask_shape_nifti(folder):
    rows = segmentation_nifti(folder)
    save_nifti(folder / "seg0.nii.gz", np.zeros((8, 8, 6), np.uint8))
    return Bad(files_overrides(folder, rows, *SEG_3D), "seg0.nii.gz (", "does not match its image")


def rgb_mask(folder):
    rows = segmentation_png(folder)
    Image.fromarray(np.stack([square_mask(5)] * 3, axis=-1)).save(folder / "m5.png")
    return Bad(files_overrides(folder, rows, *SEG_2D), "m5.png (", "the mask has 3 channels")


def nifti_affine_mismatch(folder):
    rows = segmentation_nifti(folder)
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:6, 2:6, 2:5] = 1
    save_nifti(folder / "seg2.nii.gz", mask, np.diag([1.0, 1.0, 3.0, 1.0]))  # 3 mm slices under a 2 mm image
    return Bad(files_overrides(folder, rows, *SEG_3D), "seg2.nii.gz (", "image/mask geometry mismatches (1)")


def dicom_spacing_mismatch(folder):
    pytest.importorskip("pydicom")
    rows = []
    for k, split in enumerate(SPLITS):
        write_dicom(folder / f"i{k}.dcm", noise(k).astype(np.uint16) * 8)
        write_dicom(folder / f"m{k}.dcm", square_mask(k), spacing=(0.7, 0.7) if k == 1 else (0.5, 0.5))
        rows.append({"image": f"i{k}.dcm", "label": f"m{k}.dcm", "split": split})
    return Bad(files_overrides(folder, rows, *SEG_2D), "m1.dcm (", "spacing [0.7, 0.7, 1.0]")


def duplicate_across_files(folder):
    rows = classification(folder)
    Image.fromarray(noise(5)).save(folder / "copy.png")  # the test image c5.png under another name
    rows[1]["image"] = "copy.png"
    return Bad(files_overrides(folder, rows), "copy.png (", "the same image as")


def file_listed_in_two_splits(folder):
    rows = classification(folder)
    rows[4]["image"] = "c0.png"  # a training image again, as the validation case
    return Bad(files_overrides(folder, rows), "c0.png (", "images duplicated across splits (a leak) (1)")


SMALL = {"train": 20, "val": 6, "test": 6}


def medmnist_npz(folder: Path, edit) -> list[str]:
    """A MedMNIST-format breastmnist.npz with ``edit(arrays)`` applied to its arrays."""
    path = write_medmnist_npz(folder / "breastmnist.npz", SMALL, num_classes=2)
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    edit(arrays)
    np.savez(path, **arrays)
    return ["data=medmnist", f"data.root={folder}"]


def medmnist_nan(folder):
    def edit(arrays):
        images = arrays["test_images"].astype(np.float32) / 255  # float images are used as they are
        images[3, 5, 5] = np.nan
        arrays["test_images"] = images

    return Bad(medmnist_npz(folder, edit), "test sample 3: 1 NaN of 784 values", "NaN/Inf values (1)")


def medmnist_duplicate(folder):
    def edit(arrays):
        arrays["train_images"][7] = arrays["test_images"][2]

    # data=medmnist only warns of these (its official splits have a few); strict on request
    return Bad(
        [*medmnist_npz(folder, edit), "data.on_bad=fail"],
        "train sample 7: the same image as test sample 2",
        "across splits (a leak)",
    )


def medmnist_constant(folder):
    def edit(arrays):
        arrays["val_images"][0] = 0

    return Bad([*medmnist_npz(folder, edit), "data.on_bad=fail"], "val sample 0: every pixel is 0", "constant images")


def medmnist_label(folder):
    def edit(arrays):
        arrays["train_labels"][4] = 7

    return Bad(medmnist_npz(folder, edit), "train sample 4: label 7", "labels outside the classes (1)")


BAD_DATA = [
    truncated_png,
    garbage_nifti,
    unparsable_dicom,
    unreadable_mask,
    missing_file,
    nan_in_nifti,
    inf_in_tiff,
    nan_in_npz,
    black_png,
    constant_dicom,
    mask_label_out_of_range,
    mask_saved_as_255,
    fractional_nifti_mask,
    mask_shape_png,
    mask_shape_nifti,
    rgb_mask,
    nifti_affine_mismatch,
    dicom_spacing_mismatch,
    duplicate_across_files,
    file_listed_in_two_splits,
    medmnist_nan,
    medmnist_duplicate,
    medmnist_constant,
    medmnist_label,
]


@pytest.mark.parametrize("bad_data", BAD_DATA, ids=[fn.__name__ for fn in BAD_DATA])
def test_bad_data_stops_the_run_before_training(bad_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    bad = bad_data(data)
    run = tmp_path / "run"
    with pytest.raises(MedexpError) as error:
        train(compose_config([*FAST, *bad.overrides], output_dir=run))
    message = str(error.value)
    assert bad.name in message and bad.kind in message, message
    assert "\n" not in message
    assert_not_trained(run)


def test_every_problem_is_listed_with_counts_and_how_to_proceed(tmp_path):
    rows = classification(tmp_path)
    for k in (1, 2):
        (tmp_path / f"c{k}.png").write_bytes(b"garbage")
    Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(tmp_path / "c3.png")
    dm = FileDataModule(
        task="binary", num_classes=2, in_channels=1, spatial_dims=2, manifest=write_csv(tmp_path / "cases.csv", rows)
    )
    with pytest.raises(MedexpError) as error:
        dm.setup()
    message = str(error.value)
    assert "found 3 problem(s) in 3 case(s)" in message
    assert "unreadable or missing files (2): " in message and "constant images (every pixel equal) (1): " in message
    assert message.index("c1.png") < message.index("c2.png") < message.index("c3.png")
    assert "cases.csv line 3)" in message  # the manifest line of c1.png
    assert "data.on_bad=skip" in message and "data.scan=off" in message


def test_the_cli_reports_bad_data_in_one_line(tmp_path):
    rows = classification(tmp_path)
    (tmp_path / "c2.png").write_bytes(b"not a png")
    manifest = write_csv(tmp_path / "cases.csv", rows)
    proc = run_cli(
        "train", "data=files", f"data.manifest={manifest}", *FAST, "hydra.run.dir=run", cwd=tmp_path, check=False
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("medexp: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "c2.png (" in errors[0] and "cannot read it as an image" in errors[0] and "data.on_bad=skip" in errors[0]
    assert "Traceback" not in proc.stderr
    assert_not_trained(tmp_path / "run")


def test_the_cli_refuses_unknown_options(tmp_path):
    proc = medexp_main("train", "data.scan=quick", *FAST, "hydra.run.dir=run", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "medexp: error: data.scan='quick'; expected one of ['sample', 'all', 'off']"
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.on_bad=ignore", r"data\.on_bad='ignore'; expected one of \['fail', 'skip', 'warn'\]"),
        ("data.scan_sample=0", r"data\.scan_sample=0; expected a positive number"),
        ("data.scan=everything", r"data\.scan='everything'; expected one of \['sample', 'all', 'off'\]"),
    ],
)
def test_option_values_are_checked(override, message, tmp_path):
    with pytest.raises(MedexpError, match=message):
        train(compose_config([*FAST, override], output_dir=tmp_path))


def test_skip_trains_on_the_rest_and_lists_what_it_left_out(tmp_path, caplog):
    rows = []
    for k, split in enumerate(["train"] * 8 + ["val"] * 2 + ["test"] * 2):
        Image.fromarray(noise(k)).save(tmp_path / f"c{k}.png")
        rows.append({"image": f"c{k}.png", "label": k % 2, "split": split})
    (tmp_path / "c0.png").write_bytes(b"not a png")  # the first training case: a bad one
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "c8.png")  # constant, in val
    Image.fromarray(noise(11)).save(tmp_path / "c3.png")  # = c11.png, the second test image
    rows.append({"image": "gone.png", "label": 0, "split": "train"})  # missing
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="medexp"):
        train(compose_config([*FAST, *files_overrides(tmp_path, rows), "data.on_bad=skip"], output_dir=run))

    assert (run / "checkpoints" / "best.ckpt").is_file()
    skipped = read_csv(run / "skipped.csv")
    assert [(Path(r["image"]).name, r["split"], r["kind"]) for r in skipped] == [
        ("c0.png", "train", "unreadable"),
        ("c3.png", "train", "duplicate_across_splits"),
        ("gone.png", "train", "unreadable"),
        ("c8.png", "val", "constant"),
    ]
    assert "c11.png" in skipped[1]["reason"] and "no such file" in skipped[2]["reason"]
    used = {Path(row["image"]).name for row in read_csv(run / "splits.csv")}
    assert used == {f"c{k}.png" for k in (1, 2, 4, 5, 6, 7, 9, 10, 11)}
    assert any("skipping 4 bad case(s)" in r.getMessage() for r in caplog.records)
    assert any("data check of" in r.getMessage() and " s: 4 problem(s)" in r.getMessage() for r in caplog.records)


def test_skip_keeps_the_test_copy_of_a_leaked_array_sample(tmp_path):
    from medexp.data.medmnist import MedMNISTDataModule

    def edit(arrays):
        arrays["train_images"][7] = arrays["test_images"][2]
        arrays["val_images"][1] = arrays["test_images"][2]
        arrays["train_images"][9] = arrays["train_images"][8]  # within a split: kept, a warning

    medmnist_npz(tmp_path, edit)
    dm = MedMNISTDataModule(
        name="breastmnist",
        root=tmp_path,
        task="binary",
        num_classes=2,
        in_channels=1,
        spatial_dims=2,
        on_bad="skip",
        output_dir=tmp_path / "run",
    )
    dm.setup()
    sizes = {split: len(dataset) for split, dataset in dm.datasets.items()}
    assert sizes == {"train": 19, "val": 5, "test": 6}
    assert [(r["index"], r["split"], r["kind"]) for r in read_csv(tmp_path / "run" / "skipped.csv")] == [
        ("7", "train", "duplicate_across_splits"),
        ("1", "val", "duplicate_across_splits"),
    ]


def test_scan_off_lets_readable_bad_data_through(tmp_path):
    rows = segmentation_png(tmp_path)
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "i0.png")  # constant
    Image.fromarray(noise(5)).save(tmp_path / "i1.png")  # = i5.png, the test image
    manifest = write_csv(tmp_path / "cases.csv", rows)
    args = dict(task="segmentation", num_classes=2, in_channels=1, spatial_dims=2, manifest=manifest, batch_size=2)
    with pytest.raises(MedexpError, match="constant images .* across splits"):
        FileDataModule(**args).setup()
    dm = FileDataModule(**args, scan="off")
    dm.setup()
    assert len(dm.datasets["train"]) == 4
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 1, SIZE, SIZE)


def test_a_sample_scan_reads_few_files_the_same_ones_each_time(tmp_path, monkeypatch, caplog):
    rows = []
    for k in range(40):
        Image.fromarray(noise(k)).save(tmp_path / f"c{k}.png")
        rows.append({"image": f"c{k}.png", "label": k % 2, "split": "train" if k < 30 else "val" if k < 35 else "test"})
    manifest = write_csv(tmp_path / "cases.csv", rows)
    read = []

    def build(**kwargs):
        dm = FileDataModule(task="binary", num_classes=2, in_channels=1, spatial_dims=2, manifest=manifest, **kwargs)
        inspect = dm.reader.inspect
        monkeypatch.setattr(dm.reader, "inspect", lambda data: read.append(Path(data["image"]).name) or inspect(data))
        return dm

    with caplog.at_level(logging.INFO, logger="medexp"):
        build(scan_sample=4).setup()
    first = list(read)
    assert len(first) == 12 and {"c0.png", "c30.png", "c35.png"} <= set(first)  # 4 per split, the first always
    assert "data.scan=sample read 4 of 30 train, 4 of 5 val, 4 of 5 test cases in" in caplog.text
    read.clear()
    build(scan_sample=4).setup()
    assert read == first
    read.clear()
    build(scan="all").setup()
    assert len(read) == 40


def test_scan_indices():
    assert validation.scan_indices(10, "all", 3, "train").tolist() == list(range(10))
    assert validation.scan_indices(10, "off", 3, "train").tolist() == []
    assert validation.scan_indices(2, "sample", 3, "train").tolist() == [0, 1]
    sample = validation.scan_indices(1000, "sample", 16, "test")
    assert len(set(sample.tolist())) == 16 and sample[0] == 0 and (np.diff(sample) > 0).all()
    assert sample.tolist() == validation.scan_indices(1000, "sample", 16, "test").tolist()


def test_medmnist_keeps_its_published_splits_with_a_warning_but_not_nan(tmp_path, caplog):
    def duplicate(arrays):
        arrays["train_images"][7] = arrays["test_images"][2]

    cfg = compose_config(
        [*QUIET, *medmnist_npz(tmp_path / "dup", duplicate), "trainer.max_epochs=1"], output_dir=tmp_path / "a"
    )
    train(cfg)  # data=medmnist: scan=all, on_bad=warn
    assert "kept: data.on_bad=warn" in caplog.text and "train sample 7: the same image as test sample 2" in caplog.text
    assert list((tmp_path / "a").rglob("*.ckpt"))
    bad = medmnist_nan(tmp_path / "nan")  # NaN would corrupt training: warn does not keep it
    with pytest.raises(MedexpError, match="NaN"):
        train(compose_config([*QUIET, *bad.overrides], output_dir=tmp_path / "b"))
