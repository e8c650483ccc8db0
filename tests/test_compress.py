"""`medexp compress`: int8 quantization (ONNX Runtime) and a pruning sweep of a distilled student, measured
and reloadable as ONNX files, with no deprecated torch API on the way."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc

from medexp.checkpoints.checkpoint import Checkpoint
from medexp.compress import compress
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, medexp_main
from tests.helpers import write_medmnist_npz

onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

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
    """Accuracy and AUROC of a saved model on the checkpoint's test split, computed here (the
    ONNX file run by onnxruntime, without medexp)."""
    datamodule, _ = Checkpoint(ckpt).build()
    datamodule.setup("test")
    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    probs, labels = [], []
    for batch in datamodule.test_dataloader():
        probs.append(torch.from_numpy(session.run(["probabilities"], {"image": batch["image"].numpy()})[0]))
        labels.append(batch["label"])
    p, y = torch.cat(probs), torch.cat(labels)
    assert p.shape == (40, 2) and torch.allclose(p.sum(dim=1), torch.ones(40), atol=1e-4)  # probabilities
    return float(multiclass_accuracy(p, y, 2, average="micro")), float(multiclass_auroc(p, y, 2))


def check_rows(report: dict, ckpt: Path, out: Path) -> None:
    """Every saved model's reported metrics are those recomputed from its file; sizes and
    latencies are measured."""
    assert report["rows"][0]["model"] == "float32" and report["evaluation"]["samples"] == 40
    for row in report["rows"]:
        assert row["latency_ms"] > 0 and row["weight_bytes"] > 0 and 0 < row["gzip_bytes"]
        if row["file"] is None:
            continue
        accuracy, auroc = recomputed(ckpt, out / row["file"])
        assert row["accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert row["auroc"] == pytest.approx(auroc, abs=1e-6)
        assert row["file_bytes"] == (out / row["file"]).stat().st_size and row["file"].endswith(".onnx")
        onnx.checker.check_model(str(out / row["file"]))
    table = (out / "compression.md").read_text()
    assert all(f"| {row['model']} |" in table for row in report["rows"])


def test_static_int8_shrinks_the_weights_and_keeps_the_predictions(student, tmp_path):
    out = tmp_path / "static"
    report = run_compress(student, out, "method=static")
    check_rows(report, student, out)
    base, int8 = report["rows"]
    assert int8["weight_bytes"] < 0.5 * base["weight_bytes"] and int8["file_bytes"] < 0.5 * base["file_bytes"]
    assert int8["agreement"] >= 0.9 and int8["auroc"] >= base["auroc"] - 0.1
    assert report["calibration"] == {"split": "val", "batches": 2, "samples": 32}
    quantization = report["quantization"]
    assert quantization["api"] == "onnxruntime.quantization.quantize_static" and quantization["format"] == "QDQ"
    assert quantization["per_channel"] is True and quantization["float_layers"] == {}
    assert quantization["int8_weight_share"] > 0.9 and quantization["int8_layers"] >= 2
    # QDQ: every convolution's weight comes out of a DequantizeLinear (onnxruntime fuses them into int8 kernels)
    graph = onnx.load(str(out / "model.onnx")).graph
    dequantized = {name for node in graph.node if node.op_type == "DequantizeLinear" for name in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert convs and all(node.input[1] in dequantized for node in convs)
    assert report["model"]["file"] == ["model.onnx"] and report["model"]["format"] == "onnx"


def test_dynamic_int8_on_the_command_line_says_a_conv_net_gains_little(student, tmp_path):
    out = tmp_path / "dynamic"
    medexp_main(
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
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger", "Conv"} <= ops and "ConvInteger" not in ops
    assert any("matrix products only" in note and "use method=static" in note for note in report["notes"])
    assert report["quantization"]["op_types"] == ["MatMul", "Gemm"]
    assert 0 < report["quantization"]["int8_weight_share"] < 0.5  # the linear head only
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
        assert row["weight_bytes"] == base["weight_bytes"]  # dense tensors, zeros included
        assert row["file"] == f"model_pruned_{row['amount']:g}.onnx"
    gzipped = [row["gzip_bytes"] for row in report["rows"]]
    assert gzipped == sorted(gzipped, reverse=True) and gzipped[-1] < 0.5 * gzipped[0]
    assert pruned[0]["agreement"] >= 0.9


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=int4"], r"method='int4'; expected one of \['dynamic', 'static', 'prune'\]"),
        (["method=prune", "amount=[0.5,1.2]"], r"amount=\[0.5, 1.2\]; expected fractions in \(0, 1\)"),
        (["method=static", "quant_format=int4"], r"quant_format='int4'; expected one of \['qdq', 'qoperator'\]"),
        (["per_channel=maybe"], r"per_channel='maybe'; expected true or false"),
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


def test_compression_uses_no_deprecated_torch_api(student, tmp_path):
    """No TorchScript (torch.jit) nor torch.ao quantization on the way: no deprecation warning of
    torch's about them, with every warning shown."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_compress(student, tmp_path / "out", "method=static", "calibration_batches=1")
    assert report["rows"][1]["file"] == "model.onnx"
    deprecated = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning))
        and re.search(r"torchscript|\bjit\b|torch\.jit|torch\.ao", str(w.message), re.IGNORECASE)
    ]
    assert deprecated == []
