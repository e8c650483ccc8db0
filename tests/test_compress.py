"""`medexp compress`: int8 quantization and a pruning sweep of a distilled student, measured and reloadable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc

from medexp.checkpoints.checkpoint import Checkpoint
from medexp.compress import compress
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, run_cli
from tests.helpers import write_medmnist_npz

TWO_EPOCHS = [
    *QUIET,
    "report=false",
    "data=medmnist",
    "data.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "optimizer.lr=3e-3",
]
# few timed passes: the tests check that latency is measured, not how fast a busy machine is
QUICK = ["latency.repeats=3", "latency.warmup=1", "batch_size=16", "calibration_batches=2"]


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A student (model=distill) distilled from a model=cnn teacher, whose checkpoint is then
    deleted: compressing the student must not need it."""
    root = tmp_path_factory.mktemp("compress")
    write_medmnist_npz(root / "data" / "breastmnist.npz", {"train": 96, "val": 32, "test": 40}, num_classes=2)
    data = f"data.root={root / 'data'}"
    train(compose_config([*TWO_EPOCHS, data], output_dir=root / "teacher"))
    teacher = root / "teacher" / "checkpoints" / "best.ckpt"
    train(
        compose_config(
            [*TWO_EPOCHS, data, "model=distill", f"model.teacher_ckpt={teacher}"], output_dir=root / "student"
        )
    )
    shutil.rmtree(root / "teacher")
    return root / "student" / "checkpoints" / "best.ckpt"


def run_compress(ckpt: Path, out: Path, *overrides: str) -> dict:
    compress(
        compose_config(
            [f"ckpt_path={ckpt}", f"output={out}", *QUICK, *overrides], "compress", output_dir=out.parent / "run"
        )
    )
    return json.loads((out / "compression.json").read_text())


def recomputed(ckpt: Path, model_file: Path) -> tuple[float, float]:
    """Accuracy and AUROC of a saved model on the checkpoint's test split, computed here."""
    datamodule, _ = Checkpoint(ckpt).build()
    datamodule.setup("test")
    module = torch.jit.load(str(model_file))
    probs, labels = [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            probs.append(module(batch["image"]))
            labels.append(batch["label"])
    p, y = torch.cat(probs), torch.cat(labels)
    assert p.shape == (40, 2) and torch.allclose(p.sum(dim=1), torch.ones(40), atol=1e-4)  # probabilities
    return float(multiclass_accuracy(p, y, 2, average="micro")), float(multiclass_auroc(p, y, 2))


def check_rows(report: dict, ckpt: Path, out: Path) -> None:
    """Every saved model's reported metrics are those recomputed from its file; sizes and
    latencies are measured."""
    assert report["rows"][0]["model"] == "float32" and report["evaluation"]["samples"] == 40
    for row in report["rows"]:
        assert row["latency_ms"] > 0 and row["state_dict_bytes"] > 0 and 0 < row["gzip_bytes"]
        if row["file"] is None:
            continue
        accuracy, auroc = recomputed(ckpt, out / row["file"])
        assert row["accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert row["auroc"] == pytest.approx(auroc, abs=1e-6)
        assert row["file_bytes"] == (out / row["file"]).stat().st_size
    table = (out / "compression.md").read_text()
    assert all(f"| {row['model']} |" in table for row in report["rows"])


def test_static_int8_shrinks_the_weights_and_keeps_the_predictions(student, tmp_path):
    out = tmp_path / "static"
    report = run_compress(student, out, "method=static")
    check_rows(report, student, out)
    base, int8 = report["rows"]
    assert int8["state_dict_bytes"] < 0.5 * base["state_dict_bytes"]
    assert int8["agreement"] >= 0.9 and int8["auroc"] >= base["auroc"] - 0.1
    assert report["calibration"] == {"split": "val", "batches": 2, "samples": 32}
    assert "prepare_fx" in report["quantization"]["api"]
    assert "quantized::conv2d" in str(torch.jit.load(str(out / "model.pt")).inlined_graph)


def test_dynamic_int8_on_the_command_line_says_a_conv_net_gains_little(student, tmp_path):
    out = tmp_path / "dynamic"
    run_cli(
        "compress",
        f"ckpt_path={student}",
        "method=dynamic",
        f"output={out}",
        *QUICK,
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    report = json.loads((out / "compression.json").read_text())
    check_rows(report, student, out)
    assert "quantized::linear_dynamic" in str(torch.jit.load(str(out / "model.pt")).inlined_graph)
    assert any("Linear, LSTM and GRU layers only" in note and "use method=static" in note for note in report["notes"])
    assert report["rows"][1]["agreement"] >= 0.9


def test_a_pruning_sweep_reports_one_row_per_sparsity(student, tmp_path):
    out = tmp_path / "prune"
    report = run_compress(student, out, "method=prune", "amount=[0.3,0.6,0.9]")
    check_rows(report, student, out)
    base, *pruned = report["rows"]
    assert [row["amount"] for row in pruned] == [0.3, 0.6, 0.9]
    assert base["weight_sparsity"] == 0.0
    for row in pruned:
        # global pruning: the fraction of zeros over all conv and linear weights together
        assert row["weight_sparsity"] == pytest.approx(row["amount"], abs=1e-3)
        assert row["nonzero_weights"] == round(base["weights"] * (1 - row["amount"]))
        assert row["state_dict_bytes"] == base["state_dict_bytes"]  # dense tensors, zeros included
    gzipped = [row["gzip_bytes"] for row in report["rows"]]
    assert gzipped == sorted(gzipped, reverse=True) and gzipped[-1] < 0.5 * gzipped[0]
    assert pruned[0]["agreement"] >= 0.9


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=int4"], r"method='int4'; expected one of \['dynamic', 'static', 'prune'\]"),
        (["method=prune", "amount=[0.5,1.2]"], r"amount=\[0.5, 1.2\]; expected fractions in \(0, 1\)"),
        (["method=static", "backend=tpu"], r"backend='tpu'; this torch build has the quantized engines"),
        (["latency.repeats=0"], r"latency.repeats=0; expected a positive integer"),
    ],
)
def test_bad_options_name_the_key(student, tmp_path, overrides, message):
    with pytest.raises(MedexpError, match=message):
        run_compress(student, tmp_path / "out", *overrides)


def test_a_checkpoint_of_another_task_is_refused(tmp_path):
    ckpt = tmp_path / "unet.ckpt"
    torch.save(
        {"medexp_config": {"model": {"_target_": "medexp.tasks.segmentation.SegmentationTask"}}, "state_dict": {}}, ckpt
    )
    with pytest.raises(MedexpError, match="measures classifiers.*SegmentationTask"):
        run_compress(ckpt, tmp_path / "out")
