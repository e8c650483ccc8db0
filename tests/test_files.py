"""File data (data=files): manifests and folder layouts, PNG/NIfTI/DICOM, splits, and bad input."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityd
from PIL import Image

from medexp.data.files import FileDataModule
from medexp.utils.config import check_config
from medexp.utils.errors import MedexpError
from tests.conftest import SHARED_DATA

SIZE = 16


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_png(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def png_pair(folder: Path, name: str, rng: np.random.Generator, mask_shape=(SIZE, SIZE)) -> tuple[str, str]:
    """A grey image with a bright square and its 0/255 mask, as relative paths under ``folder``."""
    mask = np.zeros(mask_shape, np.uint8)
    y, x = rng.integers(2, SIZE - 8, size=2)
    mask[y : y + 6, x : x + 6] = 255
    image = rng.integers(20, 60, size=(SIZE, SIZE)).astype(np.uint8)
    image[np.pad(mask, [(0, SIZE - s) for s in mask_shape]) > 0] = 220
    write_png(folder / "images" / f"{name}.png", image)
    write_png(folder / "masks" / f"{name}.png", mask)
    return f"images/{name}.png", f"masks/{name}.png"


def png_manifest(folder: Path, patients: int = 12, per_patient: int = 2, **extra_columns) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for p in range(patients):
        for k in range(per_patient):
            image, mask = png_pair(folder, f"p{p}_{k}", rng)
            rows.append({"image": image, "label": mask, "patient_id": f"P{p:02d}"})
    for index, row in enumerate(rows):
        row.update({key: values[index] for key, values in extra_columns.items()})
    return write_csv(folder / "cases.csv", rows)


def files(**kwargs) -> FileDataModule:
    defaults = dict(task="segmentation", num_classes=2, in_channels=1, spatial_dims=2, batch_size=4)
    return FileDataModule(**{**defaults, **kwargs})


def read_splits(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_png_segmentation_manifest_splits_by_patient(tmp_path):
    manifest = png_manifest(tmp_path / "data")
    out = tmp_path / "run"
    dm = files(
        manifest=manifest,
        output_dir=out,
        mask_threshold=127,
        val_fraction=0.25,
        test_fraction=0.25,
        transforms=[ScaleIntensityd(keys=["image"])],
    )
    dm.setup()

    rows = read_splits(out / "splits.csv")
    assert list(rows[0]) == ["image", "label", "split", "patient_id", "roi"]
    assert len(rows) == 24 and all(Path(row["image"]).is_absolute() and Path(row["image"]).is_file() for row in rows)
    split_of_patient: dict[str, set[str]] = {}
    for row in rows:
        split_of_patient.setdefault(row["patient_id"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in split_of_patient.values()), "a patient is in two splits"
    assert Counter(next(iter(s)) for s in split_of_patient.values()) == {"train": 6, "val": 3, "test": 3}

    batch = next(iter(dm.train_dataloader()))
    image, label = batch["image"], batch["label"]
    assert type(image) is torch.Tensor and type(label) is torch.Tensor  # no MetaTensors reach the model
    assert image.shape == (4, 1, SIZE, SIZE) and image.dtype == torch.float32
    assert label.shape == (4, 1, SIZE, SIZE) and label.dtype == torch.int64
    assert set(label.unique().tolist()) == {0, 1}
    # masks stay aligned with their images: the bright square is the labelled region
    assert image[label == 1].min() > image[label == 0].max()

    # the same seed draws the same split; splits.csv is itself a manifest that reproduces it
    again = files(manifest=out / "splits.csv", mask_threshold=127)
    assert all([c.image for c in again.cases[s]] == [c.image for c in dm.cases[s]] for s in dm.cases)
    other = files(manifest=manifest, mask_threshold=127, split_seed=1, val_fraction=0.25, test_fraction=0.25)
    assert [c.image for c in other.cases["test"]] != [c.image for c in dm.cases["test"]]


def test_folder_per_class_is_stratified(tmp_path):
    rng = np.random.default_rng(0)
    for name, level in (("benign", 40), ("malignant", 200)):
        for k in range(8):
            rgb = np.full((8, 8, 3), level, np.uint8) + rng.integers(0, 20, (8, 8, 3), dtype=np.uint8)
            write_png(tmp_path / "data" / name / f"{k}.png", rgb)
    dm = FileDataModule(
        task="binary",
        num_classes=2,
        in_channels=3,
        spatial_dims=2,
        root=tmp_path / "data",
        batch_size=4,
        val_fraction=0.25,
        test_fraction=0.25,
        output_dir=tmp_path / "run",
    )
    assert dm.class_names == ["benign", "malignant"]
    for split in ("train", "val", "test"):
        assert {case.label for case in dm.cases[split]} == {0, 1}, f"{split} lacks a class"
    counts, total = dm.label_counts()
    assert counts.tolist() == [4, 4] and total == 8
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["label"].dtype == torch.int64
    assert {row["label"] for row in read_splits(tmp_path / "run" / "splits.csv")} == {"0", "1"}

    grey = FileDataModule(task="binary", num_classes=2, in_channels=1, spatial_dims=2, root=tmp_path / "data")
    with pytest.raises(MedexpError, match=r"shape \(3, 8, 8\).*data.in_channels=1.*set data.in_channels=3"):
        grey.setup()


def test_nifti_volumes_keep_their_affine(tmp_path):
    nib = pytest.importorskip("nibabel")
    affine = np.array([[0.0, 0.0, 2.5, -40.0], [1.5, 0.0, 0.0, 12.0], [0.0, -2.0, 0.0, 7.5], [0.0, 0.0, 0.0, 1.0]])
    rng = np.random.default_rng(0)
    rows, volumes = [], []
    for k, split in enumerate(["train"] * 4 + ["val", "test"]):
        volume = rng.normal(size=(8, 9, 10)).astype(np.float32)
        mask = rng.integers(0, 3, size=(8, 9, 10)).astype(np.uint8)
        nib.save(nib.Nifti1Image(volume, affine), tmp_path / f"ct{k}.nii.gz")
        nib.save(nib.Nifti1Image(mask, affine), tmp_path / f"seg{k}.nii.gz")
        rows.append({"image": f"ct{k}.nii.gz", "label": f"seg{k}.nii.gz", "split": split})
        volumes.append(volume)
    manifest = write_csv(tmp_path / "cases.csv", rows)
    dm = files(manifest=manifest, num_classes=3, spatial_dims=3, batch_size=2, cache=True)

    case = dm.load_case("train", 0)
    for key in ("image", "label"):
        assert isinstance(case[key], MetaTensor)
        np.testing.assert_allclose(case[key].affine.numpy(), affine)
    np.testing.assert_allclose(case["image"][0].numpy(), volumes[0])
    assert case["label"].shape == (1, 8, 9, 10)

    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert type(batch["image"]) is torch.Tensor and batch["image"].shape == (2, 1, 8, 9, 10)
    assert batch["label"].dtype == torch.int64 and set(batch["label"].unique().tolist()) == {0, 1, 2}


def test_dicom_file(tmp_path):
    pytest.importorskip("pydicom")
    dicom = SHARED_DATA / "files" / "dicom" / "CT_small.dcm"
    if not dicom.is_file():
        pytest.skip("../shared/data/files/dicom is absent")
    rows = [{"image": str(dicom), "label": k % 2, "split": split} for k, split in enumerate(["train", "val", "test"])]
    # scan=off: one file in every split is a leak the data check refuses (tests/test_data_validation.py)
    dm = FileDataModule(
        task="binary",
        num_classes=2,
        in_channels=1,
        spatial_dims=2,
        batch_size=1,
        manifest=write_csv(tmp_path / "cases.csv", rows),
        scan="off",
    )
    image = dm.load_case("val", 0)["image"]
    assert image.shape == (1, 128, 128)
    assert not np.allclose(image.affine.numpy(), np.eye(4)), "the DICOM geometry was lost"
    assert image.meta["filename_or_obj"] == str(dicom)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (1, 1, 128, 128) and batch["label"].tolist() == [0]


def test_compose_through_hydra(compose_cfg, tmp_path):
    from hydra.utils import instantiate

    manifest = png_manifest(tmp_path / "data", patients=8, per_patient=1)
    cfg = compose_cfg(
        "data=files",
        f"data.manifest={manifest}",
        "data.task=segmentation",
        "data.mask_threshold=127",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
    )
    check_config(cfg)
    dm = instantiate(cfg.data)
    assert isinstance(dm, FileDataModule)
    dm.setup()
    assert (tmp_path / "splits.csv").is_file()  # compose_cfg makes tmp_path the run directory
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (2, 1, SIZE, SIZE) and 0 <= batch["image"].min() and batch["image"].max() <= 1


# --- bad input: one line that names the file, the manifest line and what would be valid ---


def test_missing_files_are_all_reported(tmp_path):
    manifest = png_manifest(tmp_path, patients=4, per_patient=1)
    rows = read_splits(manifest)
    rows[1]["image"] = "images/gone1.png"
    rows[2]["label"] = "masks/gone2.png"
    write_csv(manifest, rows)
    with pytest.raises(MedexpError) as error:
        files(manifest=manifest)
    message = str(error.value)
    assert "2 listed file(s) do not exist" in message and str(manifest) in message
    assert "line 3: image 'images/gone1.png'" in message and "line 4: mask 'masks/gone2.png'" in message


def test_image_and_mask_shapes_must_match(tmp_path):
    rng = np.random.default_rng(0)
    names = [("c0", "train"), ("c1", "val"), ("c2", "test"), ("odd", "test")]
    rows = []
    for name, split in names:
        image, mask = png_pair(tmp_path, name, rng, mask_shape=(SIZE, 12) if name == "odd" else (SIZE, SIZE))
        rows.append({"image": image, "label": mask, "split": split})
    dm = files(manifest=write_csv(tmp_path / "cases.csv", rows), mask_threshold=127)
    expected = (
        r"odd\.png .*cases\.csv line 5\): mask of spatial shape \(12, 16\) does not match its image .*odd\.png of"
    )
    with pytest.raises(MedexpError, match=expected + r" spatial shape \(16, 16\)"):
        dm.setup()


def test_missing_column(tmp_path):
    manifest = write_csv(tmp_path / "cases.csv", [{"path": "a.png", "label": 0}])
    expected = (
        r"cases\.csv: missing column\(s\) \['image'\]; a manifest needs columns \['image', 'label'\] and may have "
        r"\['split', 'patient_id', 'roi', 'site'\] \(found \['path', 'label'\]\)"
    )
    with pytest.raises(MedexpError, match=expected):
        files(manifest=manifest)


def test_unknown_split_value(tmp_path):
    manifest = png_manifest(tmp_path, patients=3, per_patient=1, split=["train", "valid", "test"])
    expected = r"unknown split value\(s\) line 3: 'valid'; expected one of \['train', 'val', 'test'\]"
    with pytest.raises(MedexpError, match=expected):
        files(manifest=manifest)


def test_class_labels_out_of_range(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"image": png_pair(tmp_path, f"c{k}", rng)[0], "label": label} for k, label in enumerate([0, 1, 2, "cat"])]
    expected = r"class indices 0\.\.1 \(data\.num_classes=2.*2 are not: line 4: '2'; line 5: 'cat'"
    with pytest.raises(MedexpError, match=expected):
        files(task="binary", manifest=write_csv(tmp_path / "cases.csv", rows))


def test_unthresholded_255_mask_says_what_to_set(tmp_path):
    dm = files(manifest=png_manifest(tmp_path, patients=6, per_patient=1))
    expected = r"masks/p\d_0\.png .*mask values \[255\.0\] are not class indices 0\.\.1.*data\.mask_threshold=127"
    with pytest.raises(MedexpError, match=expected):
        dm.setup()


@pytest.mark.parametrize("cache", [False, True], ids=["files", "cache"])
def test_corrupt_file_is_named(tmp_path, cache):
    manifest = png_manifest(tmp_path, patients=6, per_patient=1)
    (tmp_path / "images" / "p2_0.png").write_bytes(b"not a png")
    dm = files(manifest=manifest, mask_threshold=127, cache=cache)
    expected = r"p2_0\.png \(.*cases\.csv line 4\): cannot read it as an image \(UnidentifiedImageError"
    with pytest.raises(MedexpError, match=expected):
        dm.setup()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"manifest": "nowhere.csv"}, r"manifest not found: nowhere\.csv"),
        ({}, r"set one of data\.manifest=cases\.csv or data\.root=DIR .*got neither"),
        ({"root": "nowhere"}, r"data\.root=nowhere is not a folder"),
        (
            {"task": "multilabel", "root": "x"},
            r"data\.task='multilabel'; file data serve one of \['binary', 'multiclass',",
        ),
        ({"root": ".", "val_fraction": 0.6, "test_fraction": 0.5}, r"val_fraction=0\.6, data\.test_fraction=0\.5"),
        ({"root": ".", "cache": "yes"}, r"data\.cache='yes'; expected one of \[null, memory, disk\]"),
        ({"root": ".", "cache": "disk"}, r"data\.cache=disk needs data\.cache_dir"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(MedexpError, match=message):
        files(**kwargs)


def test_segmentation_folder_pairs_by_name(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(6):
        png_pair(tmp_path, f"c{k}", rng)
    (tmp_path / "masks" / "c5.png").rename(tmp_path / "masks" / "other.png")
    expected = r"do not pair up by file name: images/c5\.png has no mask; masks/other\.png has no image"
    with pytest.raises(MedexpError, match=expected):
        files(root=tmp_path)


def test_manifest_roi_column_is_read_and_checked(tmp_path):
    """An roi mask travels with its case; a missing one is reported with its line."""
    import numpy as np
    from PIL import Image

    from medexp.data.files import FileDataModule
    from medexp.utils.errors import MedexpError

    rows = ["image,label,split,roi"]
    for i, split in enumerate(["train", "val", "test"]):
        # a gradient: constant images would stop the run (the data check)
        Image.fromarray(np.full((16, 16), 50 * i, np.uint8) + np.arange(16, dtype=np.uint8)).save(
            tmp_path / f"i{i}.png"
        )
        Image.fromarray(np.eye(16, dtype=np.uint8)).save(tmp_path / f"m{i}.png")
        Image.fromarray(np.ones((16, 16), np.uint8) * 255).save(tmp_path / f"r{i}.png")
        rows.append(f"i{i}.png,m{i}.png,{split},r{i}.png")
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    dm = FileDataModule(
        task="segmentation", num_classes=2, in_channels=1, spatial_dims=2, manifest=tmp_path / "cases.csv", batch_size=1
    )
    dm.setup()
    sample = dm.datasets["val"][0]
    assert sample["roi"].dtype == torch.bool and sample["roi"].shape == sample["label"].shape and sample["roi"].all()
    (tmp_path / "r2.png").unlink()
    with pytest.raises(MedexpError, match=r"line 4: roi 'r2.png'"):
        FileDataModule(
            task="segmentation",
            num_classes=2,
            in_channels=1,
            spatial_dims=2,
            manifest=tmp_path / "cases.csv",
            batch_size=1,
        )
