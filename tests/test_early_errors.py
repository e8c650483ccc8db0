"""Errors that used to come late (after the data were built, or after the first epoch), long (a
library's traceback) or not at all (issue 17): each is now one `medexp: error:` naming the key or
file and what is valid, before anything is trained.

The table below is driven through `medexp train` (the YAML, data and monitor cases, and `python -m
medexp.train` for one YAML case) or, for pure config checks, through `train(cfg)` in-process: the
function the command runs, which checks the config before it builds anything.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medexp.data import validation
from medexp.data.files import FileDataModule
from medexp.data.reading import not_a_series as _not_a_series
from medexp.train import train
from medexp.utils.config import build, check_config
from medexp.utils.errors import MedexpError
from medexp.utils.validation import check_monitors, validate_config
from tests.conftest import ENV, compose_config, run_cli
from tests.helpers import write_dicom
from tests.test_data_validation import (
    FAST,
    classification,
    noise,
    save_nifti,
    write_csv,
)


@dataclass
class Bad:
    overrides: list[str]
    says: list[str]  # what the message must hold: the key or file, and what is valid
    via: str = "train()"  # or "medexp train", "python -m medexp.train"
    arguments: list[str] = field(default_factory=list)  # before the overrides (e.g. --config-dir)


# --- config values that were not checked: schedulers, Adam's betas/eps, the accelerator ---


def config(*overrides: str, says: list[str]) -> Callable[[Path], Bad]:
    return lambda folder: Bad(list(overrides), says)


CONFIGS = {
    "milestones not a list": config(
        "scheduler=multistep",
        "scheduler.milestones=abc",
        says=["scheduler.milestones='abc'; expected a list of non-decreasing integers >= 1"],
    ),
    "milestones decreasing": config(
        "scheduler=multistep",
        "scheduler.milestones=[3,2]",
        says=["scheduler.milestones=[3, 2]; expected a list of non-decreasing integers >= 1"],
    ),
    "multistep gamma 0": config(
        "scheduler=multistep", "scheduler.gamma=0", says=["scheduler.gamma=0; expected a number > 0"]
    ),
    "cosine T_max negative": config(
        "scheduler=cosine", "scheduler.T_max=-5", says=["scheduler.T_max=-5; expected an integer >= 1"]
    ),
    "cosine eta_min negative": config(
        "scheduler=cosine", "scheduler.eta_min=-1", says=["scheduler.eta_min=-1; expected a number >= 0"]
    ),
    "plateau factor 1.5": config(
        "scheduler=plateau", "scheduler.factor=1.5", says=["scheduler.factor=1.5; expected a number in (0, 1)"]
    ),
    "plateau patience negative": config(
        "scheduler=plateau", "scheduler.patience=-1", says=["scheduler.patience=-1; expected an integer >= 0"]
    ),
    "plateau monitor never logged": config(
        "scheduler=plateau",
        "model.monitor=val/typo",
        says=["model.monitor='val/typo'; ClassificationTask logs", "'val/auroc'"],
    ),
    "betas of one number": config(
        "+optimizer.betas=[0.9]", says=["optimizer.betas=[0.9]; expected a list of 2 numbers in [0, 1)"]
    ),
    "betas above 1": config(
        "+optimizer.betas=[1.5,0.999]", says=["optimizer.betas=[1.5, 0.999]; expected a list of 2 numbers in [0, 1)"]
    ),
    "eps 0": config("+optimizer.eps=0", says=["optimizer.eps=0; expected a number > 0"]),
    "accelerator unknown": config(
        "trainer.accelerator=gpux", says=["trainer.accelerator='gpux'; expected one of ['auto', 'cpu', 'gpu'"]
    ),
    "early stopping monitor typo": config(
        "callbacks=early_stopping",
        "callbacks.early_stopping.monitor=val/aucroc",
        says=[
            "callbacks.early_stopping.monitor='val/aucroc': not logged by this run; did you mean val/auroc?",
            "'train/loss'",
        ],
    ),
    "sam radius negative": config("model.sam_rho=-1", says=["model.sam_rho=-1; expected a radius > 0"]),
    "sam with accumulated batches": config(
        "model.sam_rho=0.05",
        "+trainer.accumulate_grad_batches=2",
        says=["model.sam_rho=0.05 with trainer.accumulate_grad_batches=2", "set trainer.accumulate_grad_batches=1"],
    ),
}
if not torch.cuda.is_available():
    CONFIGS["accelerator gpu without one"] = config(
        "trainer.accelerator=gpu",
        says=["trainer.accelerator='gpu', but this machine has no CUDA GPU", "trainer=cpu", "accelerator=auto"],
    )


# --- through the command: a YAML syntax error in --config-dir, a checkpoint monitor ---


def yaml_in_config_dir(folder: Path, via: str = "medexp train") -> Bad:
    (folder / "mycfg" / "model").mkdir(parents=True)
    (folder / "mycfg" / "model" / "mymodel.yaml").write_text(
        "defaults:\n  - cnn\n  - _self_\n\nnet:\n  channels: [8, 16\n  dropout: 0.1\n"
    )
    return Bad(
        ["model=mymodel"],
        ["mymodel.yaml, line 7, column 10: YAML syntax error", "line 6, column 13"],
        via=via,
        arguments=["--config-dir", str(folder / "mycfg")],
    )


def yaml_in_config_dir_python_m(folder: Path) -> Bad:
    (folder / "mycfg" / "data").mkdir(parents=True)
    (folder / "mycfg" / "data" / "mydata.yaml").write_text(
        "defaults:\n  - synthetic\n\nbatch_size: 4\n\timage_size: 16\n"
    )
    return Bad(
        ["data=mydata"],
        ["mydata.yaml, line 5, column 1: YAML syntax error", "'\\t'"],
        via="python -m medexp.train",
        arguments=["--config-dir", str(folder / "mycfg")],
    )


def checkpoint_monitor_typo(folder: Path) -> Bad:
    return Bad(
        ["callbacks.model_checkpoint.monitor=val/typo"],
        [
            "callbacks.model_checkpoint.monitor='val/typo': not logged by this run",
            "ClassificationTask logs",
            "'val/auroc'",
            "callbacks may log ['val/saliency_in_mask'",
        ],
        via="medexp train",
    )


# --- data whose images cannot share a batch or a net, and a folder listed as an image ---


def files(folder: Path, rows: list[dict], *extra: str, via: str = "medexp train", says: list[str]) -> Bad:
    return Bad(["data=files", f"data.manifest={write_csv(folder / 'cases.csv', rows)}", *extra], says, via=via)


def mixed_channels(folder: Path) -> Bad:
    rows = classification(folder)
    Image.fromarray(np.stack([noise(2)] * 3, axis=-1)).save(folder / "c2.png")  # RGB among grey
    return files(
        folder,
        rows,
        via="train()",
        says=["c2.png (", "cases.csv line 4): shape (3, 16, 16)", "3 channel(s), not 1", "set data.in_channels to it"],
    )


def channels_after_following_the_advice(folder: Path) -> Bad:
    # the first training image is RGB: the first-image check advises data.in_channels=3; the rest are grey
    rows = classification(folder)
    Image.fromarray(np.stack([noise(0)] * 3, axis=-1)).save(folder / "c0.png")
    return files(
        folder,
        rows,
        "data.in_channels=3",
        via="train()",
        says=["c1.png (", "1 channel(s), not 3", "c0.png (", "has (3, 16, 16) as data.in_channels", "(5): "],
    )


def mixed_sizes(folder: Path) -> Bad:
    rows = classification(folder)
    Image.fromarray(noise(3, shape=(24, 20))).save(folder / "c3.png")
    return files(
        folder,
        rows,
        via="train()",
        says=[
            "c3.png (",
            "shape (1, 20, 24)",
            "has (1, 16, 16)",
            "monai.transforms.Resized with spatial_size [16, 16]",
            "data.batch_size=1",
        ],
    )


def nifti_among_pngs(folder: Path) -> Bad:
    rows = classification(folder)
    save_nifti(folder / "c1.nii.gz", np.random.default_rng(1).normal(size=(8, 8, 8)).astype(np.float32))
    rows[1]["image"] = "c1.nii.gz"
    return files(folder, rows, via="train()", says=["c1.nii.gz (", "shape (1, 8, 8, 8)", "a 3D image among 2D ones"])


def folder_as_image(folder: Path) -> Bad:
    rows = classification(folder)
    (folder / "slices").mkdir()
    for k in range(3):
        Image.fromarray(noise(10 + k)).save(folder / "slices" / f"s{k}.png")
    rows[1]["image"] = "slices"
    return files(
        folder,
        rows,
        via="train()",
        says=["slices (", "cases.csv line 3): a folder, not an image", "no DICOM files (s0.png, s1.png, s2.png)"],
    )


def folder_and_rgb_through_the_command(folder: Path) -> Bad:
    # both in one run of `medexp train` (one start-up of torch, not two): one line names both files
    bad = folder_as_image(folder)
    Image.fromarray(np.stack([noise(2)] * 3, axis=-1)).save(folder / "c2.png")
    return Bad(bad.overrides, [*bad.says, "c2.png (", "3 channel(s), not 1"], via="medexp train")


CLI_AND_DATA = [
    yaml_in_config_dir,
    yaml_in_config_dir_python_m,
    checkpoint_monitor_typo,
    mixed_channels,
    channels_after_following_the_advice,
    mixed_sizes,
    nifti_among_pngs,
    folder_as_image,
    folder_and_rgb_through_the_command,
]
CASES = [*CONFIGS.values(), *CLI_AND_DATA]
IDS = [*CONFIGS, *(fn.__name__ for fn in CLI_AND_DATA)]


def run_command(bad: Bad, folder: Path, run: Path) -> subprocess.CompletedProcess:
    arguments = [*bad.arguments, *FAST, *bad.overrides, f"hydra.run.dir={run}"]
    if bad.via == "medexp train":
        return run_cli("train", *arguments, cwd=folder, check=False)
    command = [sys.executable, "-m", "medexp.train", *arguments]
    return subprocess.run(command, check=False, cwd=folder, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("make", CASES, ids=IDS)
def test_a_late_error_now_comes_early_in_one_line(make, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    bad = make(data)
    run = tmp_path / "run"
    if bad.via == "train()":
        with pytest.raises(MedexpError) as error:
            train(compose_config([*FAST, *bad.overrides], output_dir=run))
        message = str(error.value)
        assert message.count("\n") <= message.count("\n  - ")  # one line, or one per config problem
    else:
        proc = run_command(bad, data, run)
        assert proc.returncode == 1, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("medexp: error:")]
        assert len(errors) == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "NvImgCodec" not in proc.stderr, proc.stderr[-3000:]
        assert len(proc.stderr.splitlines()) <= 10, proc.stderr[-3000:]  # not the 70-255 lines of before
        message = proc.stderr[proc.stderr.index("medexp: error:") :]  # the error and the problems it lists
    for text in bad.says:
        assert text in message, message
    assert not list(tmp_path.rglob("*.ckpt")) and not (run / "metrics.json").exists(), "a model was trained"


# --- what must still pass ---


@pytest.mark.parametrize(
    "overrides",
    [
        ["scheduler=multistep"],
        ["scheduler=cosine"],
        ["scheduler=plateau"],
        ["scheduler=none"],
        ["optimizer=adamw", "+optimizer.betas=[0.9,0.99]", "+optimizer.eps=1e-6"],
        ["optimizer=sgd"],
        ["trainer=cpu"],
        ["trainer.accelerator=auto"],
    ],
    ids=lambda overrides: " ".join(overrides),
)
def test_the_shipped_settings_pass(overrides, tmp_path):
    validate_config(check_config(compose_config(overrides, output_dir=tmp_path)))


@pytest.mark.parametrize(
    ("overrides", "monitor"),
    [
        ([], "train/loss"),
        ([], "val/auroc_best"),
        (["data=synthetic_seg", "model=unet", "data.num_classes=3"], "val/dice_2"),
        (["data=synthetic_seg", "model=unet"], "val/dice"),
    ],
)
def test_a_monitor_the_run_logs_passes(overrides, monitor, tmp_path):
    overrides = [*overrides, "callbacks=early_stopping", f"callbacks.early_stopping.monitor={monitor}"]
    config = check_config(compose_config(overrides, output_dir=tmp_path))
    model = build(config["model"])
    check_monitors(config, model.logged_metrics(), type(model).__name__)


def test_a_callback_declares_what_it_logs(tmp_path):
    # differential privacy logs train/epsilon, which early stopping may watch
    overrides = ["privacy=dp", "callbacks=early_stopping", "callbacks.early_stopping.monitor=train/epsilon"]
    config = check_config(compose_config(overrides, output_dir=tmp_path))
    check_monitors(config, ["val/auroc"], "ClassificationTask")


def _mixed_sizes(folder: Path) -> Path:
    rows = classification(folder)
    Image.fromarray(noise(3, shape=(24, 24))).save(folder / "c3.png")
    return write_csv(folder / "cases.csv", rows)


def test_a_resizing_transform_or_batches_of_one_take_mixed_sizes(tmp_path):
    resize = {"_target_": "monai.transforms.Resized", "keys": ["image"], "spatial_size": [16, 16]}
    common = {
        "task": "binary",
        "num_classes": 2,
        "in_channels": 1,
        "spatial_dims": 2,
        "manifest": _mixed_sizes(tmp_path),
    }
    for options in ({"transforms": [build(resize)], "batch_size": 4}, {"batch_size": 1}):
        FileDataModule(**common, **options).setup()
    with pytest.raises(MedexpError, match=r"c3\.png \(.*shape \(1, 24, 24\)"):
        FileDataModule(**common, batch_size=4).setup()


def test_a_shape_disagreement_can_be_skipped(tmp_path):
    manifest = _mixed_sizes(tmp_path)
    dm = FileDataModule(
        task="binary",
        num_classes=2,
        in_channels=1,
        spatial_dims=2,
        manifest=manifest,
        batch_size=4,
        on_bad="skip",
        output_dir=tmp_path / "run",
    )
    dm.setup()
    assert [case.image.name for case in dm.cases["train"]] == ["c0.png", "c1.png", "c2.png"]
    assert "shape_disagreement" in (tmp_path / "run" / "skipped.csv").read_text()


def test_splits_may_differ_in_size_but_not_in_channels():
    shapes = {("train", 0): (1, 16, 16), ("train", 1): (1, 16, 16), ("val", 0): (1, 32, 32), ("test", 0): (3, 32, 32)}
    findings = validation.shape_findings(shapes, lambda split, index: f"{split} {index}", 1, 2, batch_size=8)
    assert [(f.split, f.index) for f in findings] == [("test", 0)]


def test_a_dicom_series_folder_is_still_read_as_one(tmp_path):
    pytest.importorskip("pydicom")
    for k in range(2):
        write_dicom(tmp_path / "series" / f"slice{k}", noise(k).astype(np.uint16))  # no suffix: found by its preamble
    assert _not_a_series(tmp_path / "series") is None
    (tmp_path / "empty").mkdir()
    assert "a folder with no files" in _not_a_series(tmp_path / "empty")
