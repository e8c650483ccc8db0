"""Translation data from files (data=files_translation), slice pairs of the T1 and grey-matter
templates, the "images" prediction writer and the "translation" evaluation report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from medexp.data.files_translation import FileTranslationDataModule, UnpairedFileSampler, slice_pairs
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, SHARED_DATA, compose_config

T1 = SHARED_DATA / "files" / "nifti" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GM = SHARED_DATA / "files" / "nifti" / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
AFFINE = np.array([[2.0, 0, 0, -10], [0, 1.5, 0, 4], [0, 0, 3, 7], [0, 0, 0, 1]])


def _pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random picture in [0, 1]: a few Gaussian blobs."""
    yy, xx = np.mgrid[:size, :size] / size
    image = np.zeros((size, size))
    for _ in range(3):
        cy, cx, width = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.2)
        image += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
    return image / image.max()


def _write_manifest(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("source", "target", "split")) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def png_pairs(folder: Path, count: int = 12, size: int = 16, seed: int = 0) -> Path:
    """PNG pairs whose target is the inverted source; a manifest with splits 8/2/2 (of 12)."""
    rng = np.random.default_rng(seed)
    (folder / "src").mkdir(parents=True, exist_ok=True)
    (folder / "tgt").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        source = (_pattern(rng, size) * 255).astype(np.uint8)
        Image.fromarray(source).save(folder / "src" / f"case{index}.png")
        Image.fromarray(255 - source).save(folder / "tgt" / f"case{index}.png")
        split = "train" if index < count - 4 else "val" if index < count - 2 else "test"
        rows.append([f"src/case{index}.png", f"tgt/case{index}.png", split])
    return _write_manifest(folder / "pairs.csv", rows)


def nifti_pairs(folder: Path, count: int = 12, size: int = 16, seed: int = 0, dims: int = 2) -> Path:
    """NIfTI pairs sharing AFFINE (target = source squared, both float32 in [0, 1]); splits 8/2/2."""
    rng = np.random.default_rng(seed)
    (folder / "src").mkdir(parents=True, exist_ok=True)
    (folder / "tgt").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        source = _pattern(rng, size)
        if dims == 3:
            source = np.stack([source * (0.6 + 0.4 * k / size) for k in range(size)], axis=-1)
        source = source.astype(np.float32)
        nib.save(nib.Nifti1Image(source, AFFINE), folder / "src" / f"case{index}.nii.gz")
        nib.save(nib.Nifti1Image(source**2, AFFINE), folder / "tgt" / f"case{index}.nii.gz")
        split = "train" if index < count - 4 else "val" if index < count - 2 else "test"
        rows.append([f"src/case{index}.nii.gz", f"tgt/case{index}.nii.gz", split])
    return _write_manifest(folder / "pairs.csv", rows)


def _module(manifest: Path | None = None, **kwargs) -> FileTranslationDataModule:
    from monai.transforms import ScaleIntensityd

    kwargs.setdefault("transforms", [ScaleIntensityd(keys=["image", "target"], minv=0.0, maxv=1.0)])
    return FileTranslationDataModule(manifest=manifest, batch_size=4, **kwargs)


# --------------------------------------------------------------------------------------------
# the data module


def test_png_pairs_batch_as_source_and_target(tmp_path, compose_cfg):
    manifest = png_pairs(tmp_path / "data")
    cfg = compose_cfg("data=files_translation", f"data.manifest={manifest}", "data.batch_size=4")
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16) and batch["target"].shape == (4, 1, 16, 16)
    assert batch["image"].dtype == torch.float32 and type(batch["image"]) is torch.Tensor
    # the target is the inverted source; both scaled per image to [0, 1]
    torch.testing.assert_close(batch["target"], 1 - batch["image"], atol=1e-6, rtol=0)
    assert [len(datamodule.datasets[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    with (tmp_path / "splits.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["split"] for row in rows].count("test") == 2 and rows[0]["target"].endswith("tgt/case0.png")


def test_split_by_patient_without_split_column(tmp_path):
    manifest = png_pairs(tmp_path, count=20)
    with manifest.open() as file:
        rows = [[row["source"], row["target"], f"p{i // 2}"] for i, row in enumerate(csv.DictReader(file))]
    manifest = _write_manifest(tmp_path / "nosplit.csv", rows, ("source", "target", "patient_id"))
    datamodule = _module(manifest, val_fraction=0.2, test_fraction=0.2)
    splits = {
        case.patient_id: split for split in ("train", "val", "test") for case in datamodule.cases[split]
    }  # every patient in exactly one split
    assert len(splits) == 10
    for split in ("train", "val", "test"):
        patients = [case.patient_id for case in datamodule.cases[split]]
        assert all(patients.count(p) == 2 for p in patients)
    assert len(datamodule.cases["val"]) == 4 and len(datamodule.cases["test"]) == 4


def test_nifti_3d_pairs_keep_their_geometry(tmp_path):
    manifest = nifti_pairs(tmp_path, count=6, size=16, dims=3)
    datamodule = _module(manifest, spatial_dims=3, transforms=[], output_dir=None)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16, 16)
    torch.testing.assert_close(batch["target"], batch["image"] ** 2)
    loaded = datamodule.load_case("train", 0)
    np.testing.assert_allclose(loaded["image"].affine.numpy(), AFFINE)


def test_paired_rows_must_share_a_grid(tmp_path):
    manifest = nifti_pairs(tmp_path, count=12)
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    bad = tmp_path / "tgt" / "case3.nii.gz"
    nib.save(nib.Nifti1Image(nib.load(bad).get_fdata().astype(np.float32), shifted), bad)
    with pytest.raises(MedexpError, match=r"case3\.nii\.gz.*line 5.*affine.*differs from its source .*case3") as info:
        _module(manifest).setup()
    assert "\n" not in str(info.value) and "-5.0" in str(info.value) and "-10.0" in str(info.value)
    # another shape: named with both shapes
    nib.save(nib.Nifti1Image(np.zeros((16, 12), np.float32) + 0.5, AFFINE), bad)
    with pytest.raises(MedexpError, match=r"spatial shape \(16, 12\) does not share a grid .* \(16, 16\)"):
        _module(manifest).setup()
    # skip: left out and listed
    datamodule = _module(manifest, on_bad="skip", output_dir=tmp_path / "run")
    datamodule.setup()
    assert len(datamodule.datasets["train"]) == 7
    with (tmp_path / "run" / "skipped.csv").open() as file:
        skipped = list(csv.DictReader(file))
    assert len(skipped) == 1 and "case3" in skipped[0]["file"] and skipped[0]["kind"] == "shape_mismatch"


def test_bad_manifests_fail_in_one_line(tmp_path):
    manifest = png_pairs(tmp_path)
    text = manifest.read_text()
    (tmp_path / "nocol.csv").write_text(text.replace("target", "mask", 1))
    with pytest.raises(MedexpError, match=r"missing column\(s\) \['target'\]"):
        _module(tmp_path / "nocol.csv")
    (tmp_path / "missing.csv").write_text(text.replace("tgt/case2.png", "tgt/nope.png"))
    with pytest.raises(MedexpError, match=r"1 listed file\(s\) do not exist.*line 4: target 'tgt/nope.png'"):
        _module(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text(text.replace(",test", ",val"))
    with pytest.raises(MedexpError, match="the test split has no sources"):
        _module(tmp_path / "empty.csv")
    with pytest.raises(MedexpError, match="data.manifest='.*absent.csv': no such file"):
        _module(tmp_path / "absent.csv")
    with pytest.raises(MedexpError, match="data.out_channels=3 .*set data.out_channels=1"):
        _module(manifest, out_channels=3).setup()
    with pytest.raises(MedexpError, match=r"source has values in \[.*, 255\].*outside data.intensity_range"):
        _module(manifest, transforms=[]).setup()
    with pytest.raises(MedexpError, match="got neither"):
        _module(None)
    with pytest.raises(MedexpError, match="unpaired folders, but data.paired=True"):
        _module(None, source_dir=tmp_path / "src", target_dir=tmp_path / "tgt")


def test_unpaired_folders_draw_new_targets_each_epoch(tmp_path):
    png_pairs(tmp_path, count=20)
    for path in sorted((tmp_path / "tgt").iterdir())[:6]:  # folders of different sizes
        path.unlink()
    datamodule = _module(
        None, source_dir=tmp_path / "src", target_dir=tmp_path / "tgt", paired=False, truth=False, seed=3
    )
    datamodule.setup()
    assert len(datamodule.targets["train"]) < len(datamodule.cases["train"])
    torch.manual_seed(0)
    sampler = datamodule._shuffler(datamodule.datasets["train"])
    assert isinstance(sampler, UnpairedFileSampler)
    first = list(sampler)
    assert first == list(sampler)  # the same epoch draws the same pairs
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second and sorted(i for i, _ in first) == list(range(len(datamodule.cases["train"])))
    assert {j for _, j in first} == set(range(len(datamodule.targets["train"])))
    sample = datamodule.datasets["train"][first[0]]
    assert sample["image"].shape == sample["target"].shape == (1, 16, 16)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["target"].shape == (4, 1, 16, 16)


def test_paired_manifest_trains_unpaired_but_evaluates_aligned(tmp_path):
    datamodule = _module(png_pairs(tmp_path, count=12), paired=False)
    datamodule.setup()
    torch.manual_seed(0)
    drawn = list(datamodule._shuffler(datamodule.datasets["train"]))
    assert any(i != j for i, j in drawn) and sorted(j for _, j in drawn) == list(range(8))
    batch = next(iter(datamodule.val_dataloader()))  # the rows' own targets
    torch.testing.assert_close(batch["target"], 1 - batch["image"], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# slices of the T1 and grey-matter templates


@pytest.fixture(scope="module")
def t1_gm_slices(tmp_path_factory) -> Path:
    if not (T1.is_file() and GM.is_file()):
        pytest.skip("../shared/data/files/nifti (the MNI T1 and grey-matter templates) is absent")
    return slice_pairs(T1, GM, tmp_path_factory.mktemp("t1_gm"), axis=2, step=6, size=32, slab=3)


def test_slice_pairs_split_by_slab_and_keep_the_affine(t1_gm_slices):
    with t1_gm_slices.open() as file:
        rows = list(csv.DictReader(file))
    assert {row["split"] for row in rows} == {"train", "val", "test"}
    index = [int(row["source"][-11:-7]) for row in rows]
    assert index == sorted(index) and all(i % 6 == 0 for i in index)
    # a slab's slices stay in one split, and a split change leaves a gap of a dropped slice
    for previous, row, i_prev, i in zip(rows, rows[1:], index, index[1:]):
        if previous["split"] != row["split"]:
            assert i - i_prev >= 12 and previous["patient_id"] != row["patient_id"]
    slabs = {}
    for row in rows:
        slabs.setdefault(row["patient_id"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in slabs.values())
    # in-plane affine: 197 and 233 voxels of 1 mm resampled to 32; the slice's z is its index's
    image = nib.load(t1_gm_slices.parent / rows[0]["source"])
    volume = nib.load(T1)
    assert image.shape == (32, 32)
    np.testing.assert_allclose(np.diag(image.affine)[:2], [197 / 32, 233 / 32])
    centre = volume.affine @ [98.0, 116.0, index[0], 1.0]  # the volume's centre voxel in this slice
    np.testing.assert_allclose(image.affine @ [15.5, 15.5, 0, 1], centre, atol=1e-6)
    # the pixels are the volume's slice, resampled
    expected = volume.get_fdata()[:, :, index[0]]
    assert abs(image.get_fdata().mean() - expected.mean()) < 0.02 * expected.max()


# --------------------------------------------------------------------------------------------
# end to end: medexp train model=pix2pix, predict (the "images" writer), eval (the report)

TINY_PIX2PIX = [
    *QUIET,
    "model=pix2pix",
    "data=files_translation",
    "data.batch_size=4",
    "trainer.max_epochs=1",
    "model.net.channels=[8,16]",
    "model.net.strides=[2]",
    "model.discriminator.channels=8",
]


def _translate(ckpt: Path, file: Path) -> torch.Tensor:
    """The checkpoint's translation of one file, prepared as medexp predict prepares it."""
    from medexp.checkpoints.checkpoint import Checkpoint

    datamodule, model = Checkpoint(ckpt).build()
    sample = datamodule.predict_transform()({"image": str(file)})
    with torch.no_grad():
        return model.eval().predict_step({"image": sample["image"][None].as_tensor()}, 0)[0]


def _report_checks(report_dir: Path, n_test: int) -> dict:
    report = json.loads((report_dir / "report.json").read_text())
    assert report["task"] == "translation" and report["n"] == n_test
    assert report["figures"] == ["cases.png"] and (report_dir / "report.html").is_file()
    # the figure: one row per case (the worst by MAE, then the median), four panels each
    rows = report["figure_rows"]
    assert [row["kind"] for row in rows] == ["worst"] * (len(rows) - 1) + ["median"]
    assert rows[0]["mae"] == max(case["mae"] for case in report["per_case"])
    width, height = Image.open(report_dir / "cases.png").size
    assert 0.8 < (width / 4) / (height / len(rows)) < 1.25  # 4 square-ish panels a row, a row per case
    for name in ("mae", "psnr", "ssim", "mae_source", "psnr_source", "ssim_source"):
        assert report["agreement"][name]["abs_diff"] < 1e-4, name  # equals the test metrics
    markdown = (report_dir / "report.md").read_text()
    assert "| MAE |" in markdown and "source vs target (baseline)" in markdown and "![" in markdown
    return report


def test_nifti_pairs_train_predict_and_report(tmp_path):
    from medexp.eval import evaluate
    from medexp.predict import predict
    from medexp.train import train

    manifest = nifti_pairs(tmp_path / "data", count=10)
    train(
        compose_config([*TINY_PIX2PIX, f"data.manifest={manifest}", "data.transforms=[]"], output_dir=tmp_path / "run")
    )
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    _report_checks(tmp_path / "run" / "report", 2)

    # medexp predict on the manifest's sources: translations in the inputs' geometry and shape, the model's values
    source = tmp_path / "data" / "src" / "case0.nii.gz"
    overrides = [f"ckpt_path={ckpt}", f"input={manifest}", f"output={tmp_path / 'out'}"]
    table = predict(compose_config(overrides, "predict", output_dir=tmp_path / "log"))
    written = nib.load(tmp_path / "out" / "case0.nii.gz")
    np.testing.assert_allclose(written.affine, AFFINE)
    assert written.shape == (16, 16) and written.get_data_dtype() == np.float32
    expected = _translate(ckpt, source)[0].numpy()
    np.testing.assert_allclose(written.get_fdata(), expected, atol=1e-6)
    assert 0.0 <= expected.min() and expected.max() <= 1.0 and expected.std() > 0
    with table.open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 10 and rows[0]["translated"] == str(tmp_path / "out" / "case0.nii.gz")

    # medexp eval writes the same report for the checkpoint
    evaluate(compose_config([f"ckpt_path={ckpt}", "report=true"], "eval", output_dir=tmp_path / "eval"))
    _report_checks(tmp_path / "eval" / "report", 2)


def test_png_pairs_resized_predict_back_to_the_input_size(tmp_path):
    from medexp.predict import predict
    from medexp.train import train

    manifest = png_pairs(tmp_path / "data", count=10, size=20)
    overrides = [*TINY_PIX2PIX, f"data.manifest={manifest}", "data.image_size=16", "report=false"]
    train(compose_config(overrides, output_dir=tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    inputs = tmp_path / "data" / "src"
    overrides = [f"ckpt_path={ckpt}", f"input={inputs}", f"output={tmp_path / 'out'}"]
    predict(compose_config(overrides, "predict", output_dir=tmp_path / "log"))
    for name in ("case0.png", "case9.png"):
        written = np.asarray(Image.open(tmp_path / "out" / name))
        assert written.shape == (20, 20) and written.dtype == np.uint8  # the input's size: image_size undone
        # the model's 16x16 output in [0, 1], resized back and scaled to 0..255 (PIL reads rows first)
        translated = _translate(ckpt, inputs / name)[0]
        back = torch.nn.functional.interpolate(translated[None, None], size=(20, 20), mode="area")[0, 0]
        assert np.abs(written.astype(np.float64) - back.numpy().T * 255).max() <= 1.0


@pytest.mark.usefixtures("t1_gm_slices")
def test_t1_to_grey_matter_slices_train_and_report(t1_gm_slices, tmp_path):
    scale = "{_target_: monai.transforms.ScaleIntensityRanged, keys: [image, target], a_min: 0, a_max: 255, b_min: 0, b_max: 1, clip: true}"
    from medexp.train import train

    overrides = [*TINY_PIX2PIX, f"data.manifest={t1_gm_slices}", f"data.transforms=[{scale}]", "trainer.max_epochs=2"]
    train(compose_config(overrides, output_dir=tmp_path / "run"))
    with t1_gm_slices.open() as file:
        n_test = sum(row["split"] == "test" for row in csv.DictReader(file))
    report = _report_checks(tmp_path / "run" / "report", n_test)
    # grey-matter probability is not the T1 image: the identity baseline is poor
    assert report["metrics"]["mae_source"] > 0.1


def test_nifti_volumes_predict_in_their_geometry(tmp_path):
    from medexp.predict import predict
    from medexp.train import train

    manifest = nifti_pairs(tmp_path / "data", count=6, size=16, dims=3)
    overrides = [*TINY_PIX2PIX, f"data.manifest={manifest}", "data.transforms=[]", "data.spatial_dims=3"]
    train(compose_config([*overrides, "data.batch_size=2"], output_dir=tmp_path / "run"))
    report = _report_checks(tmp_path / "run" / "report", 2)  # the middle slices of the volumes
    assert report["worst_cases"][0]["case"] != report["median_case"]["case"]
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    source = tmp_path / "data" / "src" / "case5.nii.gz"
    overrides = [f"ckpt_path={ckpt}", f"input={source}", f"output={tmp_path / 'out'}"]
    predict(compose_config(overrides, "predict", output_dir=tmp_path / "log"))
    written = nib.load(tmp_path / "out" / "case5.nii.gz")
    np.testing.assert_allclose(written.affine, AFFINE)
    assert written.shape == (16, 16, 16)
    np.testing.assert_allclose(written.get_fdata(), _translate(ckpt, source)[0].numpy(), atol=1e-6)


def test_cyclegan_on_unpaired_folders_reports_without_scores(tmp_path):
    from medexp.train import train

    png_pairs(tmp_path / "data", count=14)
    for path in sorted((tmp_path / "data" / "tgt").iterdir())[:3]:
        path.unlink()
    overrides = [
        *QUIET,
        "model=cyclegan",
        "model.monitor=val/loss",
        "data=files_translation",
        f"data.source_dir={tmp_path / 'data' / 'src'}",
        f"data.target_dir={tmp_path / 'data' / 'tgt'}",
        "data.paired=false",
        "data.truth=false",
        "data.batch_size=4",
        "trainer.max_epochs=1",
        *(f"model.{net}.channels=[8,16]" for net in ("net", "net_back")),
        *(f"model.{net}.strides=[2]" for net in ("net", "net_back")),
    ]
    metrics = train(compose_config(overrides, output_dir=tmp_path / "run"))
    assert "test/mae" not in metrics["test"]  # no true targets, nothing scored
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    with (tmp_path / "run" / "splits.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert sum(bool(row["source"]) for row in rows) == 14 and sum(bool(row["target"]) for row in rows) == 11
    n_test = sum(bool(row["source"]) and row["split"] == "test" for row in rows)
    assert report["truth"] is False and report["metrics"] == {} and report["n"] == n_test == 2
    assert [row["kind"] for row in report["figure_rows"]] == ["example"] * n_test
    width, height = Image.open(tmp_path / "run" / "report" / "cases.png").size
    assert 0.8 < (width / 2) / (height / n_test) < 1.25  # source | translated, a row per case
