"""`medexp export format=bundle`: MONAI bundles, run by MONAI's own runner (`python -m monai.bundle
run`) on image files next to `medexp predict` on the same files."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medexp
from medexp.checkpoints.checkpoint import Checkpoint, load_checkpoint
from medexp.export import export
from medexp.predict import predict
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import ENV, QUIET, compose_config, run_cli

pytest.importorskip("ignite")  # MONAI's SupervisedEvaluator
pytest.importorskip("fire")  # MONAI's command line, python -m monai.bundle

TRAINER = [*QUIET, "trainer.max_epochs=1", "test=false", "trainer.log_every_n_steps=1"]
ONE_EPOCH = [*TRAINER, "data.image_size=16", "data.num_samples={train: 32, val: 16, test: 20}", "data.batch_size=16"]
NORMALISE = (
    "data.transforms=[{_target_: monai.transforms.NormalizeIntensityd, keys: [image], subtrahend: 0.5, divisor: 0.5}]"
)
TINY_UNET = ["model=unet", "model.net.channels=[4,8]", "model.net.strides=[2]", "model.net.num_res_units=0"]


def fit(tmp: Path, *overrides: str, base: list[str] = ONE_EPOCH) -> Path:
    train(compose_config([*base, *overrides], output_dir=tmp))
    return tmp / "checkpoints" / "best.ckpt"


def class_folders(root: Path) -> Path:
    """data=files in a folder per class (``benign``, ``malignant``): 12 grey 16x16 PNGs each."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("benign", "malignant")):
        (root / name).mkdir(parents=True)
        for index in range(12):
            image = rng.integers(0, 120, size=(16, 16)).astype(np.uint8)
            image[4:10, 5:11] += np.uint8(100 * label)
            Image.fromarray(image).save(root / name / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "classifier": fit(root / "cls", NORMALISE, "data.intensity_range=[-1.0,1.0]"),
        "multilabel": fit(root / "ml", "data.task=multilabel"),
        "files": fit(root / "files", "data=files", f"data.root={class_folders(root / 'images')}", base=TRAINER),
        "segmenter": fit(root / "seg", "data=synthetic_seg", *TINY_UNET),
        "segmenter_3d": fit(root / "seg3d", "data=synthetic_seg", "data.spatial_dims=3", *TINY_UNET),
    }


def edited(ckpt: Path, dest: Path, model: dict | None = None, data: dict | None = None, state: dict | None = None):
    """A copy of ``ckpt`` whose stored config (``model.*``, ``data.*``) or weights are changed."""
    contents = load_checkpoint(ckpt)
    contents["medexp_config"]["model"].update(model or {})
    contents["medexp_config"]["data"].update(data or {})
    contents["state_dict"].update(state or {})
    torch.save(contents, dest)
    return dest


def run_export(ckpt: Path, out: Path) -> dict:
    overrides = [f"ckpt_path={ckpt}", "format=bundle", f"output={out}", "verify.batches=1"]
    path = export(compose_config(overrides, "export", output_dir=out.parent / "run"))
    assert path == out / "configs" / "metadata.json"
    return json.loads(path.read_text())


def run_bundle(bundle: Path, images: Path, out: Path) -> subprocess.CompletedProcess:
    """The bundle run as its users run it: MONAI's runner, no medexp code but its network class."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(bundle / "configs" / "inference.json"),
            "--bundle_root",
            str(bundle),
            "--dataset_dir",
            str(images),
            "--output_dir",
            str(out),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_predict(ckpt: Path, images: Path, out: Path) -> Path:
    cfg = compose_config(
        [f"ckpt_path={ckpt}", f"input={images}", f"output={out}", "trainer.enable_progress_bar=false"],
        "predict",
        output_dir=out,
    )
    return predict(cfg)


def write_pngs(folder: Path, count: int = 3, shape=(16, 24)) -> Path:
    """Raw 8-bit PNGs, not square (a swapped axis shows), not of the training size."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for index in range(count):
        image = rng.integers(0, 140, size=shape).astype(np.uint8)
        image[3 + index : 9 + index, 6:14] += 110  # a bright blob
        Image.fromarray(image).save(folder / f"case{index}.png")
    return folder


def write_niftis(folder: Path, count: int = 2, shape=(16, 16, 20)) -> Path:
    """Float volumes with an anisotropic, shifted affine (kept by the masks)."""
    import nibabel as nib

    folder.mkdir(parents=True)
    rng = np.random.default_rng(11)
    affine = np.diag([0.8, 0.9, 1.5, 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    for index in range(count):
        volume = (rng.random(shape) * 0.4).astype(np.float32)
        volume[4 + index : 10 + index, 5:11, 6:13] += 0.6
        nib.save(nib.Nifti1Image(volume, affine), folder / f"vol{index}.nii.gz")
    return folder


def bundle_table(path: Path) -> dict[str, list[float]]:
    """ClassificationSaver's CSV: no header; the image's path, then the probabilities."""
    with path.open() as file:
        return {Path(row[0]).name: [float(v) for v in row[1:]] for row in csv.reader(file)}


def predict_table(path: Path, classes: int) -> dict[str, list[float]]:
    with path.open() as file:
        rows = list(csv.reader(file))
    return {Path(row[0]).name: [float(v) for v in row[1 : 1 + classes]] for row in rows[1:]}


def assert_same_probabilities(bundle_csv: Path, predict_csv: Path, classes: int) -> None:
    ours, theirs = bundle_table(bundle_csv), predict_table(predict_csv, classes)
    assert sorted(ours) == sorted(theirs) and ours
    for name in theirs:
        # medexp writes 6 significant digits; the bundle the float32 as it is
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-5, rtol=0, err_msg=name)


def test_the_command_line_writes_a_classifier_bundle_that_monai_runs_like_predict(checkpoints, tmp_path):
    ckpt = checkpoints["classifier"]
    out = tmp_path / "bundle"
    proc = run_cli("export", f"ckpt_path={ckpt}", "format=bundle", f"output={out}", "verify.batches=2", cwd=tmp_path)
    assert "max |bundle - model| =" in proc.stdout + proc.stderr
    for part in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (out / part).is_file(), part

    # models/model.pt: the net's plain state dict, its own keys (what model.init_weights.path=<bundle> reads)
    model = Checkpoint(ckpt).build_model({"class_weights": None})
    weights = torch.load(out / "models" / "model.pt", weights_only=True)
    assert list(weights) == list(model.net.state_dict())
    for key, value in model.net.state_dict().items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0)

    meta = json.loads((out / "configs" / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "task", "description"):
        assert meta[key], key
    for key in ("authors", "copyright", "data_source", "intended_use"):
        assert isinstance(meta[key], str) and meta[key], key
    assert meta["required_packages_version"]["medexp"] == medexp.__version__  # the net is medexp's SimpleCNN
    assert "pytorch-ignite" in meta["required_packages_version"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 1 and image["spatial_shape"] == [16, 16] and image["dtype"] == "float32"
    assert image["value_range"] == [-1.0, 1.0] and image["is_patch_data"] is False
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert (pred["type"], pred["format"], pred["num_channels"]) == ("probabilities", "classes", 2)
    assert pred["channel_def"] == {"0": "class 0", "1": "class 1"} and pred["value_range"] == [0, 1]
    record = meta["medexp"]
    assert record["source"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert record["source"]["checkpoint"] == str(ckpt.resolve())
    assert record["verification"]["passed"] is True and record["verification"]["samples"] == 20
    assert record["verification"]["max_abs_diff"] <= 1e-4
    readme = (out / "docs" / "README.md").read_text()
    assert record["source"]["sha256"] in readme and "python -m monai.bundle run" in readme
    assert "(x - 0.5) / 0.5" in readme  # the preprocessing, described

    config = json.loads((out / "configs" / "inference.json").read_text())
    assert config["network_def"] == Checkpoint(ckpt).config["model"]["net"]
    steps = [step["_target_"].rsplit(".", 1)[-1] for step in config["preprocessing"]["transforms"]]
    assert steps == [
        "LoadImaged",
        "EnsureChannelFirstd",
        "Transposed",
        "ScaleIntensityRanged",
        "NormalizeIntensityd",
        "EnsureTyped",
    ]
    assert config["inferer"]["_target_"] == "monai.inferers.SimpleInferer"
    assert config["evaluator"]["_target_"] == "monai.engines.SupervisedEvaluator"

    images = write_pngs(tmp_path / "images")
    run_bundle(out, images, tmp_path / "bundle_out")
    table = run_predict(ckpt, images, tmp_path / "predict_out")
    assert_same_probabilities(tmp_path / "bundle_out" / "predictions.csv", table, 2)


def test_a_multilabel_classifier_keeps_its_temperature(checkpoints, tmp_path):
    # a fitted temperature (model.calibrate) divides the logits before the sigmoid
    ckpt = edited(checkpoints["multilabel"], tmp_path / "calibrated.ckpt", state={"temperature": torch.tensor(2.5)})
    meta = run_export(ckpt, tmp_path / "bundle")
    assert meta["medexp"]["temperature"] == 2.5 and meta["medexp"]["task"] == "multilabel"
    config = json.loads((tmp_path / "bundle" / "configs" / "inference.json").read_text())
    post = config["postprocessing"]["transforms"]
    assert post[0] == {"_target_": "monai.transforms.Lambdad", "keys": "pred", "func": "$lambda x: x / 2.5"}
    assert post[1] == {"_target_": "monai.transforms.Activationsd", "keys": "pred", "sigmoid": True}

    images = write_pngs(tmp_path / "images")
    run_bundle(tmp_path / "bundle", images, tmp_path / "bundle_out")
    table = run_predict(ckpt, images, tmp_path / "predict_out")
    assert_same_probabilities(tmp_path / "bundle_out" / "predictions.csv", table, 2)


def test_file_data_read_as_stored_with_their_class_names(checkpoints, tmp_path):
    ckpt = checkpoints["files"]
    meta = run_export(ckpt, tmp_path / "bundle")
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channels == {"0": "benign", "1": "malignant"}
    config = json.loads((tmp_path / "bundle" / "configs" / "inference.json").read_text())
    steps = [step["_target_"].rsplit(".", 1)[-1] for step in config["preprocessing"]["transforms"]]
    # files are read as stored (no transpose, no 8-bit scaling), then the data's ScaleIntensityd
    assert steps == ["LoadImaged", "EnsureChannelFirstd", "ScaleIntensityd", "EnsureTyped"]

    images = write_pngs(tmp_path / "images", shape=(16, 16))
    run_bundle(tmp_path / "bundle", images, tmp_path / "bundle_out")
    table = run_predict(ckpt, images, tmp_path / "predict_out")
    assert_same_probabilities(tmp_path / "bundle_out" / "predictions.csv", table, 2)


def test_a_2d_segmenter_with_sliding_windows_and_flips_writes_predicts_masks(checkpoints, tmp_path):
    # sliding windows and flips at inference: expressed by the bundle's inferer, not refused
    ckpt = edited(checkpoints["segmenter"], tmp_path / "windows.ckpt", model={"roi_size": [8, 8], "tta_flips": True})
    meta = run_export(ckpt, tmp_path / "bundle")
    assert meta["medexp"]["roi_size"] == [8, 8] and meta["medexp"]["tta_flips"] is True
    assert meta["network_data_format"]["inputs"]["image"]["is_patch_data"] is True
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert (pred["type"], pred["format"], pred["num_channels"]) == ("image", "segmentation", 2)
    assert pred["channel_def"]["0"] == "background"
    assert "medexp" not in meta["required_packages_version"]  # MONAI's UNet: no medexp code needed
    config = json.loads((tmp_path / "bundle" / "configs" / "inference.json").read_text())
    assert config["pass_inferer"] == {
        "_target_": "monai.inferers.SlidingWindowInferer",
        "roi_size": [8, 8],
        "sw_batch_size": 4,
        "overlap": 0.25,
    }
    assert config["inferer"].startswith("$lambda inputs, network:")

    images = write_pngs(tmp_path / "images")
    run_bundle(tmp_path / "bundle", images, tmp_path / "bundle_out")
    run_predict(ckpt, images, tmp_path / "predict_out")
    foreground = 0
    for index in range(3):
        ours = np.asarray(Image.open(tmp_path / "bundle_out" / f"case{index}_seg.png"))
        theirs = np.asarray(Image.open(tmp_path / "predict_out" / f"case{index}.png"))
        assert ours.shape == theirs.shape == (16, 24)  # the input's own orientation
        np.testing.assert_array_equal(ours, theirs)
        foreground += int(theirs.sum())
    assert foreground > 0  # not two empty masks


def test_a_3d_segmenter_writes_nifti_masks_in_the_inputs_geometry(checkpoints, tmp_path):
    import nibabel as nib

    ckpt = checkpoints["segmenter_3d"]
    meta = run_export(ckpt, tmp_path / "bundle")
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16, 16, 16]
    volumes = write_niftis(tmp_path / "volumes")
    run_bundle(tmp_path / "bundle", volumes, tmp_path / "bundle_out")
    run_predict(ckpt, volumes, tmp_path / "predict_out")
    for index in range(2):
        ours = nib.load(tmp_path / "bundle_out" / f"vol{index}_seg.nii.gz")
        theirs = nib.load(tmp_path / "predict_out" / f"vol{index}.nii.gz")
        assert ours.shape == theirs.shape == (16, 16, 20)
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
        np.testing.assert_allclose(ours.affine, nib.load(volumes / f"vol{index}.nii.gz").affine, atol=1e-6)
        assert ours.get_data_dtype() == np.uint8


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")  # MONAI without the GPU DICOM decoder
def test_monai_parses_every_part_of_inference_json(checkpoints, tmp_path):
    from monai.bundle import ConfigParser
    from monai.engines import SupervisedEvaluator

    run_export(checkpoints["segmenter"], tmp_path / "bundle")
    images = write_pngs(tmp_path / "images", count=2)
    parser = ConfigParser()
    parser.read_config(str(tmp_path / "bundle" / "configs" / "inference.json"))
    parser.read_meta(str(tmp_path / "bundle" / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(tmp_path / "bundle"), "dataset_dir": str(images), "output_dir": str(tmp_path)})
    for key in ("bundle_root", "output_dir", "dataset_dir", "datalist", "device", "network_def", "network"):
        assert key in parser
    assert parser.get_parsed_content("datalist") == [str(images / "case0.png"), str(images / "case1.png")]
    assert parser.get_parsed_content("output_ext") == ".png"
    sample = parser.get_parsed_content("preprocessing")({"image": str(images / "case0.png")})
    assert tuple(sample["image"].shape) == (1, 16, 24) and sample["image"].dtype == torch.float32
    assert isinstance(parser.get_parsed_content("evaluator"), SupervisedEvaluator)
    for key in ("initialize", "run", "finalize"):
        assert isinstance(parser[key], list)


def test_an_autoencoder_is_refused_in_one_line(tmp_path):
    ckpt = fit(tmp_path / "ae", "model=autoencoder", "model.net.channels=[4,8]", "model.net.strides=[2,2]")
    with pytest.raises(MedexpError, match=r"^cannot export") as caught:
        run_export(ckpt, tmp_path / "bundle")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "bundle").exists()


def test_a_random_transform_is_refused(checkpoints, tmp_path):
    random = {"_target_": "monai.transforms.RandGaussianNoised", "keys": ["image"], "prob": 1.0}
    ckpt = edited(checkpoints["classifier"], tmp_path / "noisy.ckpt", data={"transforms": [random]})
    with pytest.raises(MedexpError, match=r"data.transforms\[0\]: monai.transforms.RandGaussianNoised is random"):
        run_export(ckpt, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_a_bundle_that_differs_from_the_model_fails_and_says_so(checkpoints, tmp_path, monkeypatch):
    import medexp.inference.bundle as module

    # a bundle that forgot the temperature: its probabilities are not the model's
    ckpt = edited(checkpoints["classifier"], tmp_path / "calibrated.ckpt", state={"temperature": torch.tensor(3.0)})
    monkeypatch.setattr(module, "classifier_temperature", lambda model: None)
    with pytest.raises(MedexpError, match=r"differ from the model's by up to .* above verify.tolerance=0.0001"):
        run_export(ckpt, tmp_path / "bundle")
    verification = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())["medexp"]["verification"]
    assert verification["passed"] is False and verification["max_abs_diff"] > 1e-4


def test_an_unknown_format_lists_bundle(tmp_path):
    overrides = [f"ckpt_path={tmp_path / 'never.ckpt'}", "format=zip", f"output={tmp_path / 'out'}"]
    with pytest.raises(MedexpError, match=r"format='zip'; expected one of \[.*'bundle'\]"):
        export(compose_config(overrides, "export", output_dir=tmp_path / "run"))
    assert not (tmp_path / "out").exists()
