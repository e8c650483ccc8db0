"""Privacy: no image pixels, DICOM patient attributes or plain file paths reach remote loggers
unless asked for, and no DICOM patient attribute reaches a file medexp writes."""

from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import get_class
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from medexp.predict import predict
from medexp.train import train
from medexp.utils.config import check_config, instantiate_dict
from medexp.utils.privacy import geometry_only, hide_paths, is_remote, pseudonym
from tests.conftest import QUIET, compose_config
from tests.helpers import write_dicom
from tests.test_files import write_csv, write_png

# DICOM patient attributes, each a string found nowhere else
PHI = {
    "PatientName": "Doe^Janephi",
    "PatientID": "PHIID4711",
    "PatientBirthDate": "19230405",
    "AccessionNumber": "PHIACC0815",
    "InstitutionName": "PhiGeneralHospital",
}
# file names can identify patients too: this one is in every path of the test data
NAME = "janedoe"
FAKE = "tests.test_privacy.FakeRemoteLogger"
SIZE = 16
TINY_UNET = ["model=unet", "model.net.channels=[4,8]", "model.net.strides=[2]", "model.net.num_res_units=0"]


class FakeRemoteLogger(Logger):
    """A logger medexp does not know, so a remote one, that keeps everything it is given.

    Instances are built by Hydra from ``tests.test_privacy``, which pytest may import under another
    name: reach the records through ``get_class(FAKE).received``.
    """

    received: list[tuple[str, Any]] = []

    @property
    def name(self) -> str:
        return "fake"

    @property
    def version(self) -> str:
        return "0"

    @property
    def experiment(self) -> None:  # what medexp touches to start a logger
        return None

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.received.append(("hyperparams", dict(params)))

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.received.append(("metrics", dict(metrics)))

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self.received.append(("image", {"key": key, "images": list(images), **kwargs}))

    def log_graph(self, model: torch.nn.Module, input_array: Any = None) -> None:
        self.received.append(("graph", input_array))


@pytest.fixture(scope="module")
def dicom_data(tmp_path_factory) -> Path:
    """Six DICOM slices with PNG masks of a bright square, listed in a manifest."""
    pytest.importorskip("pydicom")
    folder = tmp_path_factory.mktemp("data") / f"{NAME}_scans"
    rng = np.random.default_rng(0)
    rows = []
    for k, split in enumerate(["train", "train", "train", "train", "val", "test"]):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        y, x = rng.integers(2, SIZE - 8, size=2)
        mask[y : y + 6, x : x + 6] = 255
        pixels = rng.integers(100, 400, size=(SIZE, SIZE)) + 2000 * (mask > 0)
        write_dicom(folder / "images" / f"{NAME}_{k}.dcm", pixels, spacing=(0.7, 0.7), **PHI)
        write_png(folder / "masks" / f"{NAME}_{k}.png", mask)
        rows.append({"image": f"images/{NAME}_{k}.dcm", "label": f"masks/{NAME}_{k}.png", "split": split})
    return write_csv(folder / "cases.csv", rows)


@pytest.fixture
def every_tag(monkeypatch):
    """Read DICOM files as MONAI's ITKReader does: with every tag (the PHI too) in the image's
    metadata (MONAI's default PydicomReader keeps the geometry only)."""
    import pydicom

    from medexp.data.reading import CaseReader

    read = CaseReader.read

    def read_every_tag(self, path: str, where: str = ""):
        image = read(self, path, where)
        if str(path).endswith(".dcm"):
            tags = pydicom.dcmread(path, stop_before_pixels=True)
            image.meta.update({f"{e.tag.group:04x}|{e.tag.element:04x}": str(e.value) for e in tags})
        return image

    monkeypatch.setattr(CaseReader, "read", read_every_tag)


@pytest.fixture
def fake_logger():
    received = get_class(FAKE).received
    received.clear()
    yield received
    received.clear()


def segmentation_run(manifest: Path, run_dir: Path, *overrides: str) -> None:
    train(
        compose_config(
            [
                *QUIET,
                "data=files",
                f"data.manifest={manifest}",
                "data.task=segmentation",
                "data.mask_threshold=127",
                "data.batch_size=2",
                *TINY_UNET,
                "trainer.max_epochs=1",
                f"+logger.fake._target_={FAKE}",
                *overrides,
            ],
            output_dir=run_dir,
        )
    )


def arrays_in(value: Any) -> list[Any]:
    """Arrays and tensors of more than one value anywhere in ``value``."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return [value] if np.prod(value.shape) > 1 else []
    if isinstance(value, dict):
        return [a for v in value.values() for a in arrays_in(v)]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in arrays_in(v)]
    return []


def files_holding(folder: Path, needles: list[str]) -> list[str]:
    """``file: needle`` for every file under ``folder`` whose bytes (gzip: uncompressed) hold a needle."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        found += [f"{path.relative_to(folder)}: {needle}" for needle in needles if needle.encode() in data]
    return found


def test_no_pixels_phi_or_paths_reach_a_remote_logger_nor_any_file(
    dicom_data, every_tag, fake_logger, tmp_path, monkeypatch
):
    from medexp.data.reading import CaseReader

    dicoms = sorted((dicom_data.parent / "images").glob("*.dcm"))
    # the reader of this test keeps the patient attributes, as some MONAI readers do
    assert PHI["PatientID"] in str(CaseReader("segmentation", 2).read(str(dicoms[0])).meta)
    # wandb records the command line unless told not to; this one names the data
    monkeypatch.setattr(sys, "argv", ["medexp", "train", f"data.manifest={dicom_data}"])
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    # next to the fake remote logger, every logger option writes its files (wandb offline, MLflow locally)
    loggers = "many" if importlib.util.find_spec("mlflow") else "[csv,tensorboard,wandb]"
    segmentation_run(dicom_data, run, f"logger={loggers}")
    assert list((run / "overlays").glob("epoch_*.png")), "the overlays are still drawn into the run directory"

    kinds = {kind for kind, _ in fake_logger}
    assert {"hyperparams", "metrics"} <= kinds and "image" not in kinds
    assert not arrays_in([value for _, value in fake_logger])
    sent = repr(fake_logger)
    leaks = [text for text in [*PHI.values(), "Janephi", NAME, str(tmp_path)] if text in sent]
    assert not leaks, f"sent to a remote logger: {leaks}"
    params = next(p for kind, p in fake_logger if kind == "hyperparams" and p)
    assert params["data.manifest"] == pseudonym(str(dicom_data))
    assert params["paths.output_dir"] == pseudonym(str(run))
    assert params["model.monitor"] == "val/dice" and params["data.task"] == "segmentation"
    # a local logger keeps the paths; the wandb run, synced later, holds neither them nor the command line
    assert str(dicom_data) in (run / "csv" / "hparams.yaml").read_text()
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not files_holding(run / "wandb", [NAME, str(dicom_data.parent)])

    # the DICOMs' masks are NIfTI files; nothing we write holds a patient attribute
    out = tmp_path / "predictions"
    predict(
        compose_config(
            [
                f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
                f"input={dicoms[0].parent}",
                f"output={out}",
                "trainer.enable_progress_bar=false",
                f"allowed_targets=[{FAKE}]",
            ],
            "predict",
            output_dir=tmp_path / "predict_run",
        )
    )
    assert len(list(out.glob("*.nii.gz"))) == len(dicoms)
    for folder in (run, out, tmp_path / "predict_run"):
        assert not files_holding(folder, [*PHI.values(), "Janephi"])


def test_opting_in_sends_images_and_plain_paths(dicom_data, fake_logger, tmp_path):
    run = tmp_path / "run"
    segmentation_run(dicom_data, run, "test=false", "logger.log_images=true", "logger.hash_paths=false")
    images = [value for kind, value in fake_logger if kind == "image"]
    assert images and images[0]["key"] == "val/overlays"
    assert Path(images[0]["images"][0]) == run / "overlays" / "epoch_000.png"
    params = next(p for kind, p in fake_logger if kind == "hyperparams" and p)
    assert params["data.manifest"] == str(dicom_data)


def test_which_loggers_are_remote(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setattr("mlflow.tracking.MlflowClient", lambda *args, **kwargs: None)  # no store is opened
    local_db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert not is_remote(CSVLogger(tmp_path))
    assert not is_remote(TensorBoardLogger(tmp_path))
    assert not is_remote(MLFlowLogger(tracking_uri=local_db, artifact_location=str(tmp_path / "artifacts")))
    assert not is_remote(MLFlowLogger(tracking_uri=f"file:{tmp_path / 'mlruns'}"))
    assert is_remote(MLFlowLogger(tracking_uri="https://mlflow.example.org"))
    assert is_remote(MLFlowLogger(tracking_uri=local_db, artifact_location="s3://bucket/artifacts"))
    assert is_remote(WandbLogger(offline=True, save_dir=str(tmp_path)))  # offline runs are synced later
    assert is_remote(FakeRemoteLogger())

    class Uploading(CSVLogger):  # a subclass may send anything anywhere
        pass

    assert is_remote(Uploading(tmp_path))


def test_path_values_become_pseudonyms():
    params = {
        "data.root": "scans",  # a path by its key
        "data.manifest": None,
        "ckpt_path": "/runs/x/last.ckpt",
        "data.transforms": [{"_target_": "monai.transforms.LoadImaged", "keys": ["image"]}],
        "tags": ["dev", f"~/{NAME}/scan.dcm"],
        "note": f"{NAME}.nii.gz",  # a file name by its suffix
        "logger.mlflow.tracking_uri": "https://mlflow.example.org",
        "model.monitor": "val/dice",
        "model._target_": "medexp.tasks.segmentation.SegmentationTask",
        "optimizer.lr": 0.001,
    }
    hidden = hide_paths(params)
    assert hidden["data.root"] == pseudonym("scans") and hidden["ckpt_path"] == pseudonym("/runs/x/last.ckpt")
    assert hidden["tags"] == ["dev", pseudonym(f"~/{NAME}/scan.dcm")]
    assert hidden["note"].startswith("sha256:") and len(hidden["note"]) == len("sha256:") + 12
    assert hidden["logger.mlflow.tracking_uri"].startswith("sha256:")
    for key in ("data.manifest", "data.transforms", "model.monitor", "model._target_", "optimizer.lr"):
        assert hidden[key] == params[key]


def test_written_images_keep_only_their_geometry():
    from monai.data import MetaTensor

    affine = torch.diag(torch.tensor([0.7, 0.7, 1.0, 1.0], dtype=torch.float64))
    meta = {"0010|0010": PHI["PatientName"], "spatial_shape": (4, 4)}  # a tag as ITKReader keeps it
    image = MetaTensor(torch.zeros(1, 4, 4), affine=affine, meta=meta)
    clean = geometry_only(image)
    assert PHI["PatientName"] not in str(clean.meta)
    torch.testing.assert_close(clean.affine, affine)
    assert tuple(clean.meta["spatial_shape"]) == (4, 4)


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb", "mlflow", "many", "none"])
def test_the_opt_in_is_accepted_with_every_logger_option(tmp_path, logger):
    cfg = compose_config(
        [f"logger={logger}", "logger.log_images=true", "data=synthetic_seg", "model=unet"], output_dir=tmp_path
    )
    resolved = check_config(cfg)
    assert resolved["callbacks"]["segmentation_overlays"]["remote_images"] is True
    if logger == "none":
        assert instantiate_dict(cfg.logger) == []
