"""`model=distill`: a small student trained from a teacher checkpoint (KD loss, feature matching)."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from medexp.checkpoints.checkpoint import CONFIG_KEY, Checkpoint, load_checkpoint
from medexp.nets.simple_cnn import SimpleCNN
from medexp.tasks.distillation import DistillationTask
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config
from tests.helpers import write_medmnist_npz

# MedMNIST-format files whose mean intensity gives the label away: a teacher learns them in 2 epochs
SIZES = {"train": 96, "val": 32, "test": 32}
TWO_EPOCHS = [
    *QUIET,
    "report=false",
    "data=medmnist",
    "data.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "optimizer.lr=3e-3",
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> dict[str, Path]:
    """A classifier (model=cnn) trained by `medexp train` on binary grey images."""
    root = tmp_path_factory.mktemp("distill")
    write_medmnist_npz(root / "data" / "breastmnist.npz", SIZES, num_classes=2)
    write_medmnist_npz(root / "data" / "retinamnist.npz", SIZES, num_classes=5, channels=3)
    metrics = train(compose_config([*TWO_EPOCHS, f"data.root={root / 'data'}"], output_dir=root / "teacher"))
    assert metrics["test"]["test/auroc"] > 0.9, "the teacher must have learnt something to teach"
    return {"ckpt": root / "teacher" / "checkpoints" / "best.ckpt", "data": root / "data"}


def distil(teacher: dict[str, Path], out: Path, *overrides: str) -> dict:
    return train(
        compose_config(
            [
                *TWO_EPOCHS,
                f"data.root={teacher['data']}",
                "model=distill",
                f"model.teacher_ckpt={teacher['ckpt']}",
                *overrides,
            ],
            output_dir=out,
        )
    )


def epochs(run: Path) -> list[dict[str, float]]:
    """The per-epoch training rows of a run's CSV log."""
    with next(run.rglob("metrics.csv")).open() as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/kd_loss")]
    return [{key: float(value) for key, value in row.items() if value} for row in rows]


def test_a_student_learns_from_the_teacher_alone(teacher, tmp_path):
    # alpha=1: the labels do not enter the loss, only the teacher's softened outputs do
    metrics = distil(teacher, tmp_path, "model.alpha=1.0", "model.kd_temperature=2")
    history = epochs(tmp_path)
    assert len(history) == 2
    first, last = history
    assert last["train/kd_loss"] < 0.7 * first["train/kd_loss"]
    assert last["train/loss"] == pytest.approx(last["train/kd_loss"], rel=1e-5)
    assert last["train/teacher_agreement"] >= 0.9
    assert metrics["test"]["test/auroc"] > 0.9
    # the teacher is neither part of the student's weights nor needed to use them
    checkpoint = Checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    student = checkpoint.contents
    assert {key for key in student["state_dict"] if not key.startswith("net.")} == {
        "temperature",
        "monitor_best.max_value",
    }
    assert student[CONFIG_KEY]["model"]["teacher_ckpt"] == str(teacher["ckpt"])
    student[CONFIG_KEY]["model"]["teacher_ckpt"] = str(tmp_path / "moved_away.ckpt")
    model = checkpoint.build_model()
    assert model.teacher is None
    teacher_params = sum(
        t.numel() for k, t in load_checkpoint(teacher["ckpt"])["state_dict"].items() if k.startswith("net.")
    )
    assert sum(p.numel() for p in model.net.parameters()) < teacher_params / 3


def test_feature_matching_trains_a_projection_to_the_teacher_features(teacher, tmp_path):
    distil(teacher, tmp_path, "model.feature_weight=1.0")
    first, last = epochs(tmp_path)
    assert last["train/feature_loss"] < first["train/feature_loss"]
    expected = 0.5 * last["train/ce_loss"] + 0.5 * last["train/kd_loss"] + last["train/feature_loss"]
    assert last["train/loss"] == pytest.approx(expected, rel=1e-4)
    checkpoint = Checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    student = checkpoint.contents
    # student features (32, the last of model=distill's channels) -> teacher features (64, model=cnn's)
    assert student["state_dict"]["projection.weight"].shape == (64, 32)
    student[CONFIG_KEY]["model"]["teacher_ckpt"] = None  # rebuilt without its teacher, as medexp eval would
    model = checkpoint.build_model()
    assert torch.equal(model.projection.weight, student["state_dict"]["projection.weight"])


@pytest.mark.parametrize(
    ("overrides", "messages"),
    [
        (["data.name=retinamnist"], ["data.task='binary'", "data.num_classes=2", "data.in_channels=1"]),
        # the same images without MedMNIST's normalisation to [-1, 1]
        (["data.transforms=[]", "data.intensity_range=[0.0,1.0]"], [r"data.intensity_range=\[-1.0, 1.0\]"]),
    ],
    ids=["other-classes-and-channels", "other-intensities"],
)
def test_a_teacher_of_other_data_is_refused_before_training(teacher, tmp_path, overrides, messages):
    with pytest.raises(MedexpError, match="model.teacher_ckpt") as error:
        distil(teacher, tmp_path, *overrides)
    for message in messages:
        assert re.search(message, str(error.value)), str(error.value)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.teacher_ckpt=no/such/teacher.ckpt", r"model.teacher_ckpt='no/such/teacher.ckpt': no such file"),
        ("model.alpha=1.5", r"model.alpha=1.5; expected a number in \[0, 1\]"),
        ("model.kd_temperature=0", r"model.kd_temperature=0; expected a number > 0"),
        ("model.feature_weight=-1", r"model.feature_weight=-1; expected a number >= 0"),
    ],
)
def test_bad_distillation_settings_name_the_key(teacher, tmp_path, override, message):
    with pytest.raises(MedexpError, match=message):
        distil(teacher, tmp_path, override)


def test_a_teacher_is_checked_against_the_data_module_too(teacher):
    # programmatic use, without medexp train's config check: setup("fit") loads and checks it
    task = DistillationTask(SimpleCNN(2, 1, 2, (4, 8)), "binary", 2, teacher_ckpt=str(teacher["ckpt"]), optimizer=None)
    with pytest.raises(MedexpError, match=r"data.in_channels=1, but these data have data.in_channels=3"):
        task.load_teacher(SimpleNamespace(in_channels=3))
    assert task.load_teacher(SimpleNamespace(in_channels=1, intensity_range=(-1, 1))) is task.teacher


@pytest.mark.parametrize(("task", "num_classes"), [("binary", 2), ("multiclass", 4), ("multilabel", 3)])
def test_the_loss_mixes_labels_and_the_teacher_kl_at_temperature(task, num_classes):
    torch.manual_seed(0)
    model = DistillationTask(
        SimpleCNN(2, 1, num_classes, (4,)), task, num_classes, alpha=0.3, kd_temperature=3.0, optimizer=None
    )
    student, teacher = torch.randn(6, num_classes), torch.randn(6, num_classes) * 2
    target = torch.randint(0, 2, (6, num_classes)) if task == "multilabel" else torch.randint(0, num_classes, (6,))
    ce, kd = model.distillation_terms(student, teacher, target)
    t = 3.0
    if task == "multilabel":
        p, q = torch.sigmoid(teacher / t), torch.sigmoid(student / t)
        kl = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean()
        assert ce == pytest.approx(float(F.binary_cross_entropy_with_logits(student, target.float())), rel=1e-5)
    else:
        p, q = (teacher / t).softmax(dim=1), (student / t).softmax(dim=1)
        kl = (p * (p / q).log()).sum(dim=1).mean()
        assert ce == pytest.approx(float(F.cross_entropy(student, target)), rel=1e-5)
    assert kd == pytest.approx(float(kl) * t * t, rel=1e-4)
    assert float(model.distillation_terms(teacher, teacher, target)[1]) == pytest.approx(0.0, abs=1e-6)
    loss = model.batch_loss(student, {"image": torch.zeros(6, 1, 8, 8), "label": target, "teacher_logits": teacher})
    assert loss == pytest.approx(0.7 * float(ce) + 0.3 * float(kd), rel=1e-5)
    # validation and test batches carry no teacher outputs: the student's own cross-entropy
    assert model.batch_loss(student, {"image": torch.zeros(6, 1, 8, 8), "label": target}) == pytest.approx(
        float(ce), rel=1e-5
    )
