"""`medexp export`: ONNX (torch.onnx.export, dynamo) and torch.export (pt2) exports of checkpoints, their
sidecar, their verification, and no deprecated torch API on the way."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

import medexp
from medexp.checkpoints.checkpoint import Checkpoint
from medexp.export import export
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import ENV, QUIET, compose_config

pytest.importorskip("onnxruntime")

ONE_EPOCH = [
    *QUIET,
    "trainer.max_epochs=1",
    "test=false",
    "trainer.log_every_n_steps=1",
    "data.image_size=16",
    "data.num_samples={train: 32, val: 16, test: 20}",
    "data.batch_size=16",
]
# MedMNIST's normalisation to [-1, 1], so the sidecar has a transform to describe
NORMALISE = (
    "data.transforms=[{_target_: monai.transforms.NormalizeIntensityd, keys: [image], subtrahend: 0.5, divisor: 0.5}]"
)
TINY_UNET = ["model=unet", "model.net.channels=[4,8]", "model.net.strides=[2]", "model.net.num_res_units=0"]


def fit(tmp: Path, *overrides: str) -> Path:
    train(compose_config([*ONE_EPOCH, *overrides], output_dir=tmp))
    return tmp / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "classifier": fit(root / "cls", NORMALISE, "data.intensity_range=[-1.0,1.0]"),
        "segmenter": fit(root / "seg", "data=synthetic_seg", *TINY_UNET),
    }


def run_export(ckpt: Path, out: Path, *overrides: str) -> dict:
    export(compose_config([f"ckpt_path={ckpt}", f"output={out}", *overrides], "export", output_dir=out.parent / "run"))
    return json.loads((out / "model.json").read_text())


def first_test_batch(ckpt: Path) -> torch.Tensor:
    """The first test batch as the data module serves it, rebuilt from the checkpoint."""
    datamodule, _ = Checkpoint(ckpt).build()
    datamodule.setup("test")
    return next(iter(datamodule.test_dataloader()))["image"]


def expected_outputs(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    model = Checkpoint(ckpt).build_model({"class_weights": None})
    with torch.no_grad():
        return model.predict_step({"image": x}, 0)


def run_exported(path: Path, x: torch.Tensor) -> torch.Tensor:
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    with torch.no_grad():
        return torch.export.load(str(path)).module()(x)


def deprecated_torch_apis(caught: list[warnings.WarningMessage]) -> list[str]:
    """The deprecation warnings among ``caught`` that are about TorchScript, torch.jit or
    torch.ao (the deprecated exporters and quantization this code moved away from)."""
    return [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning))
        and re.search(r"torchscript|\bjit\b|torch\.jit|torch\.ao", str(w.message), re.IGNORECASE)
    ]


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("kind", ["classifier", "segmenter"])
def test_exports_reproduce_the_model(checkpoints, tmp_path, kind, fmt):
    ckpt = checkpoints[kind]
    sidecar = run_export(ckpt, tmp_path / "out", f"format={fmt}", "batch_size=8", "verify.batches=2")
    path = tmp_path / "out" / sidecar["file"]
    assert path.name == {"onnx": "model.onnx", "pt2": "model.pt2"}[fmt] and path.is_file()

    # a batch of another size than the export traced, read back outside medexp
    x = first_test_batch(ckpt)[:5]
    torch.testing.assert_close(run_exported(path, x), expected_outputs(ckpt, x), atol=1e-4, rtol=0)

    segments = kind == "segmenter"
    assert sidecar["format"] == fmt and sidecar["medexp_version"] == medexp.__version__
    assert sidecar["task"] == ("segmentation" if segments else "binary")
    assert sidecar["input"]["shape"] == [1, 16, 16] and sidecar["input"]["dtype"] == "float32"
    assert sidecar["output"]["batch_shape"] == ["batch", 2, *([16, 16] if segments else [])]
    assert ("for every pixel" if segments else "probabilities of the 2 classes") in sidecar["output"]["meaning"]
    assert sidecar["num_classes"] == 2
    assert sidecar["intensity_range"] == ([0.0, 1.0] if segments else [-1.0, 1.0])
    assert sidecar["source"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    verification = sidecar["verification"]
    assert verification["passed"] is True and verification["tolerance"] == 1e-4
    assert 0 <= verification["max_abs_diff"] <= 1e-4
    assert (verification["batches"], verification["samples"], verification["split"]) == (2, 16, "test")
    assert verification["runtime"].startswith("onnxruntime" if fmt == "onnx" else "torch.export")
    assert ("opset" in sidecar) == (fmt == "onnx") and sidecar.get("opset", 18) == 18


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_the_sidecar_preprocessing_makes_the_model_input(checkpoints, tmp_path, fmt):
    ckpt = checkpoints["classifier"]
    # spatial axes free: the raw image below is not of the training size
    sidecar = run_export(ckpt, tmp_path / "out", f"format={fmt}", "verify.batches=1", "dynamic_spatial=true")
    assert sidecar["input"]["batch_shape"] == ["batch", 1, "dim0", "dim1"]
    steps = sidecar["preprocessing"]
    assert [step["step"] for step in steps] == ["read", "scale_intensity", "transform"]
    assert steps[1]["in_range"] == [0.0, 255.0] and steps[1]["out_range"] == [0.0, 1.0]
    assert steps[2]["config"]["_target_"] == "monai.transforms.NormalizeIntensityd"
    assert steps[2]["formula"] == "(x - 0.5) / 0.5"

    # a raw 8-bit image, not square, so a swapped axis would show
    raw = np.random.default_rng(3).integers(0, 256, size=(16, 24), dtype=np.uint8)
    Image.fromarray(raw).save(tmp_path / "raw.png")
    datamodule, _ = Checkpoint(ckpt).build()
    served = datamodule.predict_transform()({"image": str(tmp_path / "raw.png")})["image"].as_tensor()

    # the deployer's side: the steps of the sidecar applied to the array, in its layout (C, H, W)
    low, high = steps[1]["in_range"]
    out_low, out_high = steps[1]["out_range"]
    x = torch.from_numpy(raw[None].astype(np.float32))
    x = (x - low) / (high - low) * (out_high - out_low) + out_low
    for step in steps[2:]:
        x = instantiate(step["config"])({"image": x})["image"]
    torch.testing.assert_close(torch.as_tensor(x), served, atol=1e-6, rtol=0)
    torch.testing.assert_close(served, torch.from_numpy((raw[None] / 255.0 - 0.5) / 0.5).float(), atol=1e-6, rtol=0)
    # ...and the exported model gives the model's answer on it, at that size
    batch = served[None]
    torch.testing.assert_close(
        run_exported(tmp_path / "out" / sidecar["file"], batch), expected_outputs(ckpt, batch), atol=1e-4, rtol=0
    )


def test_the_command_line_exports_and_logs_the_difference(checkpoints, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medexp.export",
            f"ckpt_path={checkpoints['classifier']}",
            "format=pt2",
            "output=exported",
            "verify.batches=1",
            "hydra.run.dir=run",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max |exported - model| =" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "exported" / "model.json").read_text())["verification"]["passed"] is True


def test_outputs_beyond_the_tolerance_fail(checkpoints, tmp_path, monkeypatch):
    import medexp.export as module

    real = module.load_runner

    def off_by_a_little(fmt, path):
        run = real(fmt, path)
        return lambda x: torch.as_tensor(run(x)) + 1e-3

    monkeypatch.setattr(module, "load_runner", off_by_a_little)
    with pytest.raises(MedexpError, match=r"differ from the model's by up to 0.001.* above verify.tolerance=0.0001"):
        run_export(checkpoints["classifier"], tmp_path / "out", "verify.batches=1")
    verification = json.loads((tmp_path / "out" / "model.json").read_text())["verification"]
    assert verification["passed"] is False and verification["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)


def test_a_gan_is_refused(tmp_path):
    ckpt = fit(tmp_path / "gan", "model=gan", "model.latent_size=8", "callbacks.sample_grids=null")
    proc = subprocess.run(
        [sys.executable, "-m", "medexp.export", f"ckpt_path={ckpt}", "output=exported", "hydra.run.dir=run"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "medexp: error: cannot export a GAN (medexp.tasks.adversarial.AdversarialTask)" in proc.stderr
    assert "Exportable: classification" in proc.stderr
    assert not (tmp_path / "exported").exists()


def test_sliding_window_segmentation_is_refused(checkpoints):
    from medexp.export import _refuse_model

    model = Checkpoint(checkpoints["segmenter"]).build_model({"roi_size": [8, 8]})
    with pytest.raises(MedexpError, match=r"sliding windows \(model.roi_size=\[8, 8\]\)"):
        _refuse_model(model)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("format=tflite", r"format='tflite'; expected one of \['onnx', 'pt2'"),
        ("opset=17", r"opset=17; expected an ONNX opset of at least 18"),
        ("verify.tolerance=-1", r"verify.tolerance=-1; expected a number >= 0"),
        ("verify.batches=0", r"verify.batches=0; expected a positive integer"),
        ("batch_size=0", r"batch_size=0; expected a positive integer"),
    ],
)
def test_bad_options_name_the_key(tmp_path, override, message):
    with pytest.raises(MedexpError, match=message):
        run_export(tmp_path / "never-read.ckpt", tmp_path / "out", override)
    assert not (tmp_path / "out").exists()


def test_torchscript_is_refused_in_one_line(tmp_path):
    with pytest.raises(MedexpError) as error:
        run_export(tmp_path / "never-read.ckpt", tmp_path / "out", "format=torchscript")
    message = str(error.value)
    assert "\n" not in message and message.startswith("format=torchscript: torch deprecates TorchScript")
    assert "format=pt2" in message and "format=onnx" in message
    assert not (tmp_path / "out").exists()


def test_exports_use_no_deprecated_torch_api(checkpoints, tmp_path):
    """Neither export goes through TorchScript (torch.jit.trace, the TorchScript-based ONNX
    exporter): no deprecation warning of torch's about them, with every warning shown."""
    for fmt in ("onnx", "pt2"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sidecar = run_export(checkpoints["segmenter"], tmp_path / fmt, f"format={fmt}", "verify.batches=1")
        assert sidecar["verification"]["passed"] is True
        assert deprecated_torch_apis(caught) == [], fmt
