"""``medexp compress ckpt_path=... method=dynamic|static|prune`` (or ``python -m medexp.compress``):
a classifier made smaller for CPU inference, measured before and after.

The model is rebuilt from the run config stored in the checkpoint, as ``medexp export`` does, and
its network, followed by the task's postprocessing, is exported as ONNX as ``medexp export
format=onnx`` writes it (``torch.onnx.export(dynamo=True)``, a dynamic batch axis, opset 18).
ONNX Runtime's quantization (``onnxruntime.quantization``) then works on that float32 file,
prepared first by ``quant_pre_process`` (shape inference and ORT's graph optimisations, as ORT
recommends before quantizing):

- ``dynamic``: post-training dynamic int8 (``quantize_dynamic``): int8 weights of the matrix
  products (``MatMul``/``Gemm``, i.e. Linear layers), activations quantized on the fly per batch
  (``DynamicQuantizeLinear`` + ``MatMulInteger``). Convolutions stay float32: ORT can quantize
  them dynamically too (``ConvInteger``), but on x86 CPUs that ran slower than float convolutions
  (MONAI ResNet-18: about 3x), so a conv net gains little; ``compression.json`` says how much of
  the weights became int8 and which layers stayed float32.
- ``static``: post-training static int8 (``quantize_static``): weights and activations of every
  operator ORT quantizes (convolutions and matrix products included), in the QDQ format
  (``quant_format``), weights per output channel (``per_channel``), the activations' ranges
  (MinMax) observed on ``calibration_batches`` validation batches through a
  ``CalibrationDataReader``. The final softmax (sigmoid) stays float32, so probabilities are not
  rounded to steps of 1/256; so do operators ORT does not quantize.
- ``prune``: global L1 unstructured pruning (``torch.nn.utils.prune``) of conv and linear
  weights, one model per ``amount``, each exported as ONNX; no fine-tuning after it. The weights
  stay dense tensors with zeros: the file is as large and as fast as before; ``gzip_bytes``
  shows what the zeros save.

Every model, the float32 one included, is saved and measured as an ONNX file run by onnxruntime
on the CPU: it takes a float32 batch ``(B, C, *spatial)`` prepared as the test split was and
returns probabilities ``(B, num_classes)``: ``onnxruntime.InferenceSession(path).run(
["probabilities"], {"image": x})`` runs it without medexp. The metrics reported are those of the
saved files on the test split, next to their size and CPU latency (onnxruntime with
``latency.threads`` intra-op threads).

Outputs, in ``output``: ``model.onnx`` (``prune``: ``model_pruned_<amount>.onnx`` per amount),
``compression.json`` and ``compression.md``.
"""

from __future__ import annotations

import copy
import gzip
import logging
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from medexp.resolvers import register_resolvers
from medexp.utils.config import CONFIG_PATH
from medexp.utils.errors import MedexpError, user_errors
from medexp.utils.validation import Rule, check_options

log = logging.getLogger("medexp")
register_resolvers()

METHODS = ("dynamic", "static", "prune")
QUANT_FORMATS = ("qdq", "qoperator")
_POSITIVE = "expected a positive integer"
# the options a table can check; amount depends on the method (method_problems)
RULES = (
    Rule("method", METHODS),
    Rule("quant_format", QUANT_FORMATS),
    Rule("per_channel", "bool"),
    Rule("batch_size", "int", 1, exact=True, message=_POSITIVE),
    Rule("calibration_batches", "int", 1, exact=True, message=_POSITIVE),
    Rule("latency.batch_size", "int", 1, exact=True, message=_POSITIVE),
    Rule("latency.repeats", "int", 1, exact=True, message=_POSITIVE),
    Rule("latency.threads", "int", 1, exact=True, message=_POSITIVE),
    Rule("latency.warmup", "int", 0, exact=True),
    Rule("batches", "int", 1, exact=True, optional=True, message=f"{_POSITIVE}, or null for the whole test split"),
)
# the operators dynamic quantization makes int8: matrix products (Linear layers); ORT's dynamic
# convolution (ConvInteger) is left out, slower than a float convolution on the CPU
DYNAMIC_OPS = ("MatMul", "Gemm")
# the weights that pruning considers
PRUNED_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
# a row's counts of those weights (None for an int8 model: it has no torch net)
WEIGHT_COUNTS = ("weights", "nonzero_weights", "weight_sparsity")
QUANTIZATION_API = {
    "dynamic": "onnxruntime.quantization.quantize_dynamic",
    "static": "onnxruntime.quantization.quantize_static",
}
# the task's postprocessing at the end of the graph (probabilities from logits): kept float32, as
# quantizing it would round the probabilities to steps of 1/256
POSTPROCESSING_OPS = ("Softmax", "Sigmoid", "LogSoftmax")
# the layers of an ONNX graph that hold weights, as float operators and in their int8 forms
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
INT8_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul")


@dataclass
class Variant:
    """One measured model: its ONNX file at ``path`` (``file``: its name in ``output``, None for
    the float32 reference), the torch net it came from where there is one (float32, pruned; its
    weights are counted), and extra fields of its row (``amount``)."""

    name: str
    path: Path
    file: str | None = None
    net: nn.Module | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def compress(cfg: DictConfig) -> Path:
    """Compress ``cfg.ckpt_path`` with ``cfg.method``; write the models and reports into
    ``cfg.output``.

    Returns:
        The path of ``compression.json``.

    Raises:
        MedexpError: for bad options, a checkpoint that is not a single-image classifier's, a
            net that does not export as ONNX, or missing ONNX packages.
    """
    from medexp.utils.config import check_config

    check_config(cfg)
    check_options(cfg, RULES, extra=method_problems(cfg))
    method = cfg.method
    amounts = [float(a) for a in _amounts(cfg.amount)] if method == "prune" else []

    from medexp.inference.artifacts import require_onnx, save_onnx
    from medexp.utils.run_info import write_json
    from medexp.utils.runtime import tidy_library_output

    require_onnx("medexp compress")
    tidy_library_output()
    checkpoint, datamodule, model, test_batches = _model_and_batches(cfg)
    output = Path(cfg.output).expanduser()
    output.mkdir(parents=True, exist_ok=True)

    float_net = model.net
    record: dict[str, Any] = {"method": method}
    with tempfile.TemporaryDirectory() as scratch:
        reference = Variant("float32", Path(scratch) / "float32.onnx", net=float_net)
        example = test_batches[0][0]
        save_onnx(model, float_net, example, reference.path)
        variants, notes = compressed_variants(cfg, amounts, model, datamodule, reference, example, output, record)
        rows = measure_variants(model, [reference, *variants], test_batches, cfg.latency)
    model.net = float_net
    record.update(_record(cfg, checkpoint, model, datamodule, test_batches, rows, notes))
    for note in notes:
        log.info("note: %s", note)
    write_json(output / "compression.json", record)
    (output / "compression.md").write_text(markdown(record))
    log.info("compressed models and compression.json, compression.md: %s", output)
    return output / "compression.json"


def _model_and_batches(cfg: DictConfig) -> tuple[Any, Any, Any, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The checkpoint, its data module, its classifier (refused early when it is none, or takes
    inputs besides the images) and the test batches the variants are measured on."""
    from medexp.checkpoints.checkpoint import INFERENCE, Checkpoint

    checkpoint = Checkpoint(cfg.ckpt_path, cfg.allowed_targets)
    checkpoint.checked_config()  # what the config names, refused before the task is looked at
    refuse_non_classifier(checkpoint)
    datamodule, model = checkpoint.build(cfg.data, model_overrides=INFERENCE)
    if model.extra_inputs:
        raise MedexpError(
            f"medexp compress: {type(model.net).__name__} is a sequence model that takes {list(model.extra_inputs)} "
            "besides the images; compress handles single-image classifiers"
        )
    model = model.cpu().eval()
    datamodule.batch_size = int(cfg.batch_size)
    datamodule.setup("test")
    test_batches = _batches(datamodule.test_dataloader(), model, cfg.batches)
    if not test_batches:
        raise MedexpError("the checkpoint's data have an empty test split: nothing to measure the models on")
    return checkpoint, datamodule, model, test_batches


def _record(
    cfg: DictConfig, checkpoint: Any, model: Any, datamodule: Any, test_batches: list, rows: list, notes: list[str]
) -> dict[str, Any]:
    """What ``compression.json`` says besides the method: source, evaluation, latency, rows."""
    import onnxruntime

    from medexp.inference.artifacts import MIN_OPSET, describe, sha256

    example = test_batches[0][0]
    return {
        "source": {"checkpoint": str(checkpoint.path.resolve()), "sha256": sha256(checkpoint.path)},
        "evaluation": {"split": "test", "batches": len(test_batches), "samples": sum(len(x) for x, _ in test_batches)},
        "latency": {
            "unit": "ms per image: median over repeats of one batch, divided by its size",
            "device": "cpu",
            "runtime": f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)",
            **{key: int(cfg.latency[key]) for key in ("batch_size", "repeats", "warmup", "threads")},
        },
        "rows": rows,
        "notes": notes,
        "model": {
            **describe(model, datamodule, checkpoint.config, example, "onnx", MIN_OPSET, False),
            "file": [r["file"] for r in rows[1:]],
        },
    }


def compressed_variants(
    cfg: DictConfig,
    amounts: list[float],
    model: Any,
    datamodule: Any,
    reference: Variant,
    example: torch.Tensor,
    output: Path,
    record: dict[str, Any],
) -> tuple[list[Variant], list[str]]:
    """The compressed models of ``model.net`` (``reference``: its float32 ONNX file; ``example``:
    the batch the exports capture), written into ``output``, and notes on them; what the method
    used (calibration, quantization) is added to ``record``.

    Raises:
        MedexpError: when method=static finds no validation batches to calibrate on.
    """
    from medexp.inference.artifacts import save_onnx

    method = cfg.method
    if method == "prune":
        variants = []
        for amount in amounts:
            file = f"model_pruned_{amount:g}.onnx"
            pruned = prune_weights(reference.net, amount)
            save_onnx(model, pruned, example, output / file)
            variants.append(Variant(f"pruned {amount:g}", output / file, file, pruned, {"amount": amount}))
        note = (
            "unstructured sparsity: the zeros are stored and multiplied like any weight, so file size and latency do "
            "not change; gzip_bytes shows the storage the zeros could save. No fine-tuning followed the pruning"
        )
        return variants, [note]

    import onnxruntime

    per_channel = bool(cfg.per_channel)
    prepared = reference.path.with_name("float32_prepared.onnx")
    prepare_for_quantization(reference.path, prepared)
    path = output / "model.onnx"
    quantization: dict[str, Any] = {
        "api": QUANTIZATION_API[method],
        "runtime": f"onnxruntime {onnxruntime.__version__}",
        "preprocessing": "onnxruntime.quantization.shape_inference.quant_pre_process",
        "weight_type": "int8",
        "per_channel": per_channel,
    }
    if method == "dynamic":
        quantize_dynamic(prepared, path, per_channel)
        quantization.update(
            format="dynamic (DynamicQuantizeLinear, MatMulInteger)",
            op_types=list(DYNAMIC_OPS),
            activation_type="uint8, quantized per batch at run time",
        )
    else:
        calibration = _batches(datamodule.val_dataloader(), model, cfg.calibration_batches)
        if not calibration:
            raise MedexpError("method=static calibrates on the validation split, and it is empty")
        quantize_static(prepared, path, calibration, str(cfg.quant_format), per_channel)
        quantization.update(
            format=str(cfg.quant_format).upper(),
            op_types="every operator ORT quantizes, but the output's softmax (sigmoid)",
            activation_type="int8",
            calibration_method="MinMax",
        )
        record["calibration"] = {
            "split": "val",
            "batches": len(calibration),
            "samples": sum(len(x) for x, _ in calibration),
        }
    coverage = int8_coverage(reference.path, path)
    record["quantization"] = {**quantization, **coverage}
    notes = [quantization_note(method, coverage, cfg), *onnx_notes()]
    return [Variant(f"int8 {method}", path, path.name)], notes


def quantization_note(method: str, coverage: dict[str, Any], cfg: DictConfig) -> str:
    """What quantization covered: int8 layers and their share of the weights; for dynamic, the
    convolutions it left float32."""
    share = f"{coverage['int8_weight_share']:.2%}"
    layers = f"{coverage['int8_layers']} layer(s) holding {share} of the net's weight values became int8"
    floats = coverage["float_layers"]
    if method == "dynamic":
        note = (
            f"dynamic int8 (ORT quantize_dynamic) quantizes matrix products only (MatMul/Gemm: Linear layers): {layers}"
        )
        convs = sum(count for op, count in floats.items() if op.startswith("Conv"))
        if convs:
            note += (
                f"; the {convs} convolution(s) stay float32 (ORT's dynamically quantized convolution, ConvInteger, ran "
                "slower than a float one on x86 CPUs), so a conv net gains little: use method=static for conv nets"
            )
        return note
    left = ", ".join(f"{count} {op}" for op, count in sorted(floats.items())) or "none"
    return (
        f"static int8 (ORT quantize_static, {str(cfg.quant_format).upper()} format, per-channel weights: "
        f"{bool(cfg.per_channel)}): {layers}; weighted layers left float32: {left}; the final softmax (sigmoid) and "
        "operators ORT does not quantize run in float32"
    )


def onnx_notes() -> list[str]:
    import onnxruntime

    return [
        f"the int8 model is an ONNX file for onnxruntime {onnxruntime.__version__} on the CPU; float32 is the same net "
        "exported as ONNX before quantization (not saved)"
    ]


def measure_variants(
    model: Any, variants: list[Variant], batches: list[tuple[torch.Tensor, torch.Tensor]], latency: Any
) -> list[dict[str, Any]]:
    """The rows of the float32 model (``variants[0]``) and of each compressed one, each measured
    as its saved ONNX file run by onnxruntime (see :func:`measure`)."""
    rows = []
    reference: torch.Tensor | None = None
    for variant in variants:
        row, probs = measure(model, variant, batches, latency, reference)
        reference = probs if reference is None else reference
        rows.append({"model": variant.name, "file": variant.file, **variant.fields, **row})
        log.info(
            "%s: accuracy %.4f, AUROC %.4f, agreement with float32 %.4f, %.3f ms/image, %d bytes of weights",
            variant.name,
            row["accuracy"],
            row["auroc"],
            row["agreement"],
            row["latency_ms"],
            row["weight_bytes"],
        )
    return rows


def method_problems(cfg: DictConfig) -> list[str]:
    """What :data:`RULES` cannot say: ``amount`` for ``prune``."""
    if cfg.method == "prune":
        given, values = cfg.amount, _amounts(cfg.amount)
        if not values or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1 for a in values):
            return [f"amount={_plain(given)!r}; expected fractions in (0, 1), e.g. amount=[0.2,0.5,0.8]"]
        if len(set(values)) < len(values):
            return [f"amount={_plain(given)!r}: each amount once"]
    return []


def _amounts(given: Any) -> list[Any]:
    """``amount`` as a list: one fraction or several."""
    return list(given) if not isinstance(given, (int, float, str)) and given is not None else [given]


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def refuse_non_classifier(checkpoint: Any) -> None:
    """Refuse, before building anything, a checkpoint whose model is not a classifier (its task's
    ``report_kind``: compress measures accuracy and AUROC)."""
    target, cls = checkpoint.model_target, checkpoint.task_class
    if cls is not None and getattr(cls, "report_kind", None) != "classification":
        raise MedexpError(
            f"medexp compress measures classifiers (accuracy, AUROC); this checkpoint's model is a "
            f"{target.rsplit('.', 1)[-1]}"
        )


def _batches(loader: Any, task: Any, limit: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` of the first ``limit`` batches of ``loader`` (None: all), on the CPU."""
    from medexp.inference.loop import batches

    return [(batch[task.input_key].float().cpu(), batch[task.target_key].cpu()) for batch in batches(loader, limit)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def prepare_for_quantization(source: Path, target: Path) -> None:
    """ORT's preprocessing before quantization: symbolic shape inference and graph optimisations
    (e.g. batch norms folded into convolutions) of the float32 file ``source``, into ``target``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(target))
    except Exception as exc:  # shape inference and the optimiser raise several types
        raise MedexpError(
            f"onnxruntime's quant_pre_process cannot prepare this net for quantization ({_first_line(exc)}); "
            "method=prune does without it"
        ) from exc


def quantize_dynamic(source: Path, target: Path, per_channel: bool) -> None:
    """Int8 weights of the matrix products (:data:`DYNAMIC_OPS`) of ``source``, activations
    quantized at run time, into ``target``."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as quantize

    try:
        quantize(
            str(source),
            str(target),
            op_types_to_quantize=list(DYNAMIC_OPS),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
        )
    except Exception as exc:  # ORT's quantizer raises several types on graphs it cannot handle
        raise MedexpError(
            f"method=dynamic: onnxruntime cannot quantize this net ({_first_line(exc)}); try per_channel=false or "
            "method=static"
        ) from exc


def calibration_reader(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over the images of ``batches``."""
    from onnxruntime.quantization import CalibrationDataReader

    from medexp.inference.artifacts import INPUT_NAME

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, Any] | None:
            return next(self._feeds, None)

        def rewind(self) -> None:
            self._feeds = iter([{INPUT_NAME: images.numpy()} for images, _ in batches])

    return Batches()


def quantize_static(
    source: Path,
    target: Path,
    calibration: list[tuple[torch.Tensor, torch.Tensor]],
    quant_format: str,
    per_channel: bool,
) -> None:
    """Int8 weights and activations of every operator ORT quantizes in ``source``, into
    ``target``; the activations' ranges (MinMax) observed on the images of ``calibration``.

    Raises:
        MedexpError: when ORT cannot quantize the graph.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as quantize

    try:
        quantize(
            str(source),
            str(target),
            calibration_reader(calibration),
            quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=postprocessing_nodes(source),
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as exc:  # ORT's quantizer raises several types on graphs it cannot handle
        raise MedexpError(
            f"method=static: onnxruntime cannot quantize this net ({_first_line(exc)}); try per_channel=false, "
            "method=dynamic or method=prune"
        ) from exc


def postprocessing_nodes(path: Path) -> list[str]:
    """The names of the nodes at the end of the ONNX graph at ``path`` that turn logits into its
    output (:data:`POSTPROCESSING_OPS`: softmax, sigmoid), walking back from the output."""
    import onnx

    graph = onnx.load(str(path)).graph
    producers = {name: node for node in graph.node for name in node.output}
    names, node = [], producers.get(graph.output[0].name)
    while node is not None and node.op_type in POSTPROCESSING_OPS:
        names.append(node.name)
        node = producers.get(node.input[0])
    return names


def int8_coverage(float_path: Path, int8_path: Path) -> dict[str, Any]:
    """How much of the float32 graph at ``float_path`` became int8 in ``int8_path``: the share of
    weight values (initializers of 2 or more axes) stored as int8, the weighted layers run in int8
    (integer operators, or QDQ: a weight that comes out of a ``DequantizeLinear``) and, by type,
    those left float32."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    def weights(model: onnx.ModelProto, dtypes: tuple[Any, ...]) -> int:
        arrays = (numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) >= 2)
        return sum(a.size for a in arrays if a.dtype in dtypes)

    total = weights(onnx.load(str(float_path)), (np.float32,))
    quantized = onnx.load(str(int8_path))
    int8 = weights(quantized, (np.int8, np.uint8))
    dequantized = {out for n in quantized.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    int8_layers, float_layers = 0, Counter()
    for node in quantized.graph.node:
        if node.op_type in INT8_OPS or (node.op_type in WEIGHTED_OPS and node.input[1] in dequantized):
            int8_layers += 1
        elif node.op_type in WEIGHTED_OPS:
            float_layers[node.op_type] += 1
    return {
        "int8_weight_share": int8 / max(total, 1),
        "int8_layers": int8_layers,
        "float_layers": dict(float_layers),
    }


def prune_weights(net: nn.Module, amount: float) -> nn.Module:
    """A copy of ``net`` with the fraction ``amount`` of its conv and linear weights, those of
    smallest magnitude over all these layers together, set to zero (made permanent)."""
    from torch.nn.utils import prune

    pruned = copy.deepcopy(net).eval()
    weights = [(m, "weight") for m in pruned.modules() if isinstance(m, PRUNED_LAYERS)]
    if not weights:
        raise MedexpError(f"method=prune: {type(net).__name__} has no conv or linear layers to prune")
    prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in weights:
        prune.remove(module, name)
    return pruned


def weight_counts(net: nn.Module) -> dict[str, Any]:
    """The float conv and linear weights of ``net``: how many, how many are not zero, and the
    fraction of zeros (all None for a net without them; an int8 model has no torch net, its
    row's are None too)."""
    weights = [getattr(m, "weight", None) for m in net.modules() if isinstance(m, PRUNED_LAYERS)]
    weights = [w for w in weights if isinstance(w, torch.Tensor) and w.is_floating_point()]
    total = sum(w.numel() for w in weights)
    if not total:
        return dict.fromkeys(WEIGHT_COUNTS)
    nonzero = sum(int(w.count_nonzero()) for w in weights)
    return {"weights": total, "nonzero_weights": nonzero, "weight_sparsity": 1 - nonzero / total}


def weight_bytes(path: Path) -> bytes:
    """The weights of the ONNX file at ``path``: its initializers' values (weights, biases, and
    an int8 model's scales and zero points), one after the other."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return b"".join(numpy_helper.to_array(tensor).tobytes() for tensor in model.graph.initializer)


def latency_ms(run: Callable[[torch.Tensor], Any], images: torch.Tensor, repeats: int, warmup: int) -> float:
    """The median time of ``run(images)`` over ``repeats`` calls, in milliseconds per image."""
    with torch.inference_mode():
        for _ in range(warmup):
            run(images)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(images)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 / images.shape[0]


def measure(
    task: Any,
    variant: Variant,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    latency: Any,
    reference: torch.Tensor | None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """The row of one model: the task's metrics of its saved ONNX file on ``batches`` (run by
    onnxruntime), its agreement with ``reference`` (the float32 model's probabilities; None: this
    is it), sizes, sparsity and latency.

    Returns:
        The row, and the probabilities ``(N, num_classes)`` on ``batches``.
    """
    from medexp.inference.artifacts import load_runner

    run = load_runner("onnx", variant.path)
    metrics = task.configure_metrics()
    probs = []
    with torch.inference_mode():
        for images, labels in batches:
            p = torch.as_tensor(run(images)).float()
            metrics.update(p, labels)
            probs.append(p)
    values = {name: float(value) for name, value in metrics.compute().items()}
    probs_all = torch.cat(probs)
    decide = (lambda p: p > 0.5) if task.task == "multilabel" else (lambda p: p.argmax(dim=1))
    base = probs_all if reference is None else reference
    weights = weight_bytes(variant.path)
    images = batches[0][0][: int(latency.batch_size)]
    while images.shape[0] < int(latency.batch_size):  # a test split smaller than the timed batch
        images = torch.cat([images, images])[: int(latency.batch_size)]
    timed = load_runner("onnx", variant.path, threads=int(latency.threads))
    ms = latency_ms(timed, images, int(latency.repeats), int(latency.warmup))
    counts = weight_counts(variant.net) if variant.net is not None else dict.fromkeys(WEIGHT_COUNTS)
    row = {
        "accuracy": values["accuracy"],
        "auroc": values["auroc"],
        "agreement": float((decide(probs_all) == decide(base)).float().mean()),
        "max_abs_diff": float((probs_all - base).abs().max()),
        "latency_ms": ms,
        "weight_bytes": len(weights),
        "gzip_bytes": len(gzip.compress(weights, compresslevel=6, mtime=0)),
        "file_bytes": variant.path.stat().st_size,
        **counts,
        "metrics": values,
    }
    return row, probs_all


def markdown(record: dict[str, Any]) -> str:
    """``compression.md``: the rows of ``compression.json`` as a table, and its notes."""
    from medexp.reports.tables import markdown_table

    columns = [
        "model",
        "file",
        "accuracy",
        "auroc",
        "agreement",
        "latency ms/image",
        "weights KiB",
        "gzip KiB",
        "sparsity",
    ]
    rows = [
        {
            "model": row["model"],
            "file": row["file"] or "",
            "accuracy": row["accuracy"],
            "auroc": row["auroc"],
            "agreement": row["agreement"],
            "latency ms/image": row["latency_ms"],
            "weights KiB": row["weight_bytes"] / 1024,
            "gzip KiB": row["gzip_bytes"] / 1024,
            "sparsity": row["weight_sparsity"],
        }
        for row in record["rows"]
    ]
    evaluation, latency = record["evaluation"], record["latency"]
    lines = [
        f"# medexp compress: method={record['method']}",
        "",
        f"Checkpoint: `{record['source']['checkpoint']}`. Metrics of the saved ONNX files run by onnxruntime on the "
        f"test split ({evaluation['samples']} images); agreement: the fraction of decisions equal to the float32 "
        f"model's; weights: the files' initializers; latency: {latency['unit']}, batch {latency['batch_size']}, "
        f"{latency['threads']} CPU thread(s).",
        "",
        markdown_table(columns, rows),
        "",
        *(f"- {note}" for note in record["notes"]),
    ]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="compress")
def main(cfg: DictConfig) -> None:
    with user_errors():
        compress(cfg)


if __name__ == "__main__":
    main()
