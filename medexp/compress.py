"""``medexp compress ckpt_path=... method=dynamic|static|prune`` (or ``python -m medexp.compress``):
a classifier made smaller for CPU inference, measured before and after.

The model is rebuilt from the run config stored in the checkpoint, as ``medexp export`` does, and
compressed on the CPU:

- ``dynamic``: post-training dynamic int8 (``torch.ao.quantization.quantize_dynamic``): int8
  weights of Linear, LSTM and GRU layers, activations quantized on the fly. Convolutions stay
  float32, so a conv net gains little; ``compression.json`` says how much of the net was affected.
- ``static``: post-training static int8 in FX graph mode (``prepare_fx``/``convert_fx``): weights
  and activations of every supported layer, convolutions included, with the activations' ranges
  observed on ``calibration_batches`` validation batches. Nets must be traceable by ``torch.fx``.
- ``prune``: global L1 unstructured pruning (``torch.nn.utils.prune``) of conv and linear
  weights, one model per ``amount``; no fine-tuning after it. The weights stay dense tensors with
  zeros: the file is as large and as fast as before; ``gzip_bytes`` shows what the zeros save.

torch 2.13 still ships ``torch.ao.quantization`` (eager and FX modes), though deprecated in
favour of torchao's pt2e flow since 2.10; medexp uses it because it needs no other package.

Every model, the float32 one included, is saved as TorchScript (``torch.jit.trace``) of the
network followed by the task's postprocessing, as ``medexp export format=torchscript`` does: it
takes a float32 batch ``(B, C, *spatial)`` prepared as the test split was and returns
probabilities ``(B, num_classes)``; ``torch.jit.load(path)`` runs it without medexp (int8 models:
with the same quantized engine, ``backend``). The metrics reported are those of the saved files
run on the test split, next to their size and CPU latency.

Outputs, in ``output``: ``model.pt`` (``prune``: ``model_pruned_<amount>.pt`` per amount),
``compression.json`` and ``compression.md``.
"""

from __future__ import annotations

import copy
import gzip
import io
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
_POSITIVE = "expected a positive integer"
# the options a table can check; amount and backend depend on the method (method_problems)
RULES = (
    Rule("method", METHODS),
    Rule("batch_size", "int", 1, exact=True, message=_POSITIVE),
    Rule("calibration_batches", "int", 1, exact=True, message=_POSITIVE),
    Rule("latency.batch_size", "int", 1, exact=True, message=_POSITIVE),
    Rule("latency.repeats", "int", 1, exact=True, message=_POSITIVE),
    Rule("latency.threads", "int", 1, exact=True, message=_POSITIVE),
    Rule("latency.warmup", "int", 0, exact=True),
    Rule("batches", "int", 1, exact=True, optional=True, message=f"{_POSITIVE}, or null for the whole test split"),
)
# the layers dynamic quantization makes int8 (torch.ao's defaults for qint8 besides RNN cells)
DYNAMIC_LAYERS = (nn.Linear, nn.LSTM, nn.GRU)
# the weights that pruning considers
PRUNED_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
QUANTIZATION_API = {
    "dynamic": "torch.ao.quantization.quantize_dynamic (eager mode)",
    "static": "torch.ao.quantization.quantize_fx.prepare_fx/convert_fx (FX graph mode)",
}
# what torch.ao's quantization says on every call in torch >= 2.10; medexp says it once, in the output
QUIET_WARNINGS = (
    r"torch\.ao\.quantization is deprecated",
    r".*quantized tensor creation functions",
    r"Please use quant_min and quant_max",
    r".*must run observer before calling calculate_qparams",
)


def compress(cfg: DictConfig) -> Path:
    """Compress ``cfg.ckpt_path`` with ``cfg.method``; write the models and reports into
    ``cfg.output``.

    Returns:
        The path of ``compression.json``.

    Raises:
        MedexpError: for bad options, a checkpoint that is not a single-image classifier's, or a
            net that the method cannot handle (e.g. one ``torch.fx`` cannot trace, for static).
    """
    from medexp.utils.config import check_config

    check_config(cfg)
    check_options(cfg, RULES, extra=method_problems(cfg))
    method = cfg.method
    amounts = [float(a) for a in _amounts(cfg.amount)] if method == "prune" else []

    from medexp.utils.run_info import write_json
    from medexp.utils.runtime import tidy_library_output

    tidy_library_output()
    checkpoint, datamodule, model, test_batches = _model_and_batches(cfg)
    output = Path(cfg.output).expanduser()
    output.mkdir(parents=True, exist_ok=True)

    float_net = model.net
    record: dict[str, Any] = {"method": method}
    with _engine(str(cfg.backend)), _quiet_quantization():
        variants, notes = compressed_variants(cfg, method, amounts, model, datamodule, record)
        rows = measure_variants(model, float_net, variants, test_batches[0][0], test_batches, output, cfg.latency)
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
    from medexp.inference.artifacts import describe, sha256

    example = test_batches[0][0]
    return {
        "source": {"checkpoint": str(checkpoint.path.resolve()), "sha256": sha256(checkpoint.path)},
        "evaluation": {"split": "test", "batches": len(test_batches), "samples": sum(len(x) for x, _ in test_batches)},
        "latency": {
            "unit": "ms per image: median over repeats of one batch, divided by its size",
            "device": "cpu",
            **{key: int(cfg.latency[key]) for key in ("batch_size", "repeats", "warmup", "threads")},
        },
        "rows": rows,
        "notes": notes,
        "model": {
            **describe(model, datamodule, checkpoint.config, example, "torchscript", 0, False),
            "file": [r["file"] for r in rows[1:]],
        },
    }


def compressed_variants(
    cfg: DictConfig, method: str, amounts: list[float], model: Any, datamodule: Any, record: dict[str, Any]
) -> tuple[list[tuple[str, nn.Module, str, dict[str, Any]]], list[str]]:
    """The compressed nets of ``model.net`` as ``(name, net, file, fields)``, and notes on them;
    what the method used (calibration, quantization API) is added to ``record``.

    Raises:
        MedexpError: when method=static finds no validation batches to calibrate on.
    """
    float_net = model.net
    notes: list[str] = []
    if method == "dynamic":
        variants = [("int8 dynamic", quantize_dynamic(float_net), "model.pt", {})]
        notes += dynamic_notes(float_net)
    elif method == "static":
        calibration = _batches(datamodule.val_dataloader(), model, cfg.calibration_batches)
        if not calibration:
            raise MedexpError("method=static calibrates on the validation split, and it is empty")
        variants = [("int8 static", quantize_static(float_net, calibration, str(cfg.backend)), "model.pt", {})]
        record["calibration"] = {
            "split": "val",
            "batches": len(calibration),
            "samples": sum(len(x) for x, _ in calibration),
        }
    else:
        variants = [
            (f"pruned {amount:g}", prune_weights(float_net, amount), f"model_pruned_{amount:g}.pt", {"amount": amount})
            for amount in amounts
        ]
        notes.append(
            "unstructured sparsity: the zeros are stored and multiplied like any weight, so file size and latency do "
            "not change; gzip_bytes shows the storage the zeros could save. No fine-tuning followed the pruning"
        )
    if method != "prune":
        record["quantization"] = {"api": QUANTIZATION_API[method], "engine": str(cfg.backend), "dtype": "qint8"}
        notes.append(
            f"{QUANTIZATION_API[method]}: deprecated since torch 2.10 in favour of torchao's pt2e flow, still "
            f"shipped with torch {torch.__version__.split('+')[0]}; the int8 models run on the CPU with the "
            f"quantized engine {cfg.backend!r} (torch.backends.quantized.engine)"
        )
    return variants, notes


def measure_variants(
    model: Any,
    float_net: nn.Module,
    variants: list[tuple[str, nn.Module, str, dict[str, Any]]],
    example: torch.Tensor,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    output: Path,
    latency: Any,
) -> list[dict[str, Any]]:
    """The rows of the float32 net (saved to a scratch file) and of each variant (saved into
    ``output``), each measured as a saved TorchScript file (see :func:`measure`)."""
    from medexp.inference.artifacts import save_torchscript

    rows = []
    reference: torch.Tensor | None = None
    with tempfile.TemporaryDirectory() as scratch:
        for name, net, file, fields in [("float32", float_net, None, {}), *variants]:
            path = output / file if file else Path(scratch) / "float32.pt"
            run = save_torchscript(model, net, example, path)
            row, probs = measure(model, net, run, path, batches, latency, reference)
            reference = probs if reference is None else reference
            rows.append({"model": name, "file": file, **fields, **row})
            log.info(
                "%s: accuracy %.4f, AUROC %.4f, agreement with float32 %.4f, %.3f ms/image, %d bytes of weights",
                name,
                row["accuracy"],
                row["auroc"],
                row["agreement"],
                row["latency_ms"],
                row["state_dict_bytes"],
            )
    return rows


def method_problems(cfg: DictConfig) -> list[str]:
    """What :data:`RULES` cannot say: ``amount`` for ``prune``, and for the quantizing methods a
    ``backend`` among the quantized engines of this torch build (known only at run time)."""
    if cfg.method == "prune":
        given, values = cfg.amount, _amounts(cfg.amount)
        if not values or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1 for a in values):
            return [f"amount={_plain(given)!r}; expected fractions in (0, 1), e.g. amount=[0.2,0.5,0.8]"]
        if len(set(values)) < len(values):
            return [f"amount={_plain(given)!r}: each amount once"]
    elif cfg.method in METHODS:
        engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
        if cfg.backend not in engines:
            return [f"backend={cfg.backend!r}; this torch build has the quantized engines {engines}"]
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


@contextmanager
def _engine(backend: str) -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@contextmanager
def _quiet_quantization() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


def quantize_dynamic(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with int8 weights in its Linear, LSTM and GRU layers."""
    from torch.ao.quantization import quantize_dynamic as quantize

    return quantize(copy.deepcopy(net).eval(), set(DYNAMIC_LAYERS), dtype=torch.qint8)


def dynamic_notes(net: nn.Module) -> list[str]:
    """What dynamic quantization leaves alone in ``net``: the share of parameters outside the
    layers it quantizes, e.g. a conv net's convolutions."""
    total = sum(p.numel() for p in net.parameters())
    quantized = sum(p.numel() for m in net.modules() if isinstance(m, DYNAMIC_LAYERS) for p in m.parameters())
    convs = sum(1 for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd))
    note = (
        f"dynamic int8 quantizes Linear, LSTM and GRU layers only: they hold {quantized / max(total, 1):.2%} of this "
        f"net's {total} parameters"
    )
    if convs:
        note += f"; its {convs} convolution(s) stay float32, so it gains little: use method=static for conv nets"
    return [note]


def quantize_static(net: nn.Module, calibration: list[tuple[torch.Tensor, torch.Tensor]], backend: str) -> nn.Module:
    """An int8 copy of ``net`` by FX graph mode post-training quantization, its activations'
    ranges observed on the ``(B, C, *spatial)`` images of ``calibration``.

    Raises:
        MedexpError: when ``torch.fx`` cannot trace the net.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    example = calibration[0][0]
    try:
        prepared = prepare_fx(copy.deepcopy(net).eval(), get_default_qconfig_mapping(backend), (example,))
    except Exception as exc:  # symbolic tracing raises several types on data-dependent control flow
        raise MedexpError(
            f"method=static: torch.fx cannot trace {type(net).__name__} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); use method=dynamic or method=prune"
        ) from exc
    with torch.no_grad():
        for images, _ in calibration:
            prepared(images)
    return convert_fx(prepared)


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
    fraction of zeros (all None for a net without them, e.g. the packed int8 weights of a
    quantized net)."""
    weights = [getattr(m, "weight", None) for m in net.modules() if isinstance(m, PRUNED_LAYERS)]
    weights = [w for w in weights if isinstance(w, torch.Tensor) and w.is_floating_point()]
    total = sum(w.numel() for w in weights)
    if not total:
        return {"weights": None, "nonzero_weights": None, "weight_sparsity": None}
    nonzero = sum(int(w.count_nonzero()) for w in weights)
    return {"weights": total, "nonzero_weights": nonzero, "weight_sparsity": 1 - nonzero / total}


def state_dict_bytes(net: nn.Module) -> bytes:
    """``net``'s weights as ``torch.save`` writes them."""
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.getvalue()


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
    net: nn.Module,
    run: Callable[[torch.Tensor], Any],
    path: Path,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    latency: Any,
    reference: torch.Tensor | None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """The row of one model: the task's metrics of the saved file ``run`` on ``batches``, its
    agreement with ``reference`` (the float32 model's probabilities; None: this is it), sizes,
    sparsity and latency.

    Returns:
        The row, and the probabilities ``(N, num_classes)`` on ``batches``.
    """
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
    weights = state_dict_bytes(net)
    images = batches[0][0][: int(latency.batch_size)]
    while images.shape[0] < int(latency.batch_size):  # a test split smaller than the timed batch
        images = torch.cat([images, images])[: int(latency.batch_size)]
    previous = torch.get_num_threads()
    torch.set_num_threads(int(latency.threads))
    try:
        ms = latency_ms(run, images, int(latency.repeats), int(latency.warmup))
    finally:
        torch.set_num_threads(previous)
    row = {
        "accuracy": values["accuracy"],
        "auroc": values["auroc"],
        "agreement": float((decide(probs_all) == decide(base)).float().mean()),
        "max_abs_diff": float((probs_all - base).abs().max()),
        "latency_ms": ms,
        "state_dict_bytes": len(weights),
        "gzip_bytes": len(gzip.compress(weights, compresslevel=6, mtime=0)),
        "file_bytes": path.stat().st_size,
        **weight_counts(net),
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
            "weights KiB": row["state_dict_bytes"] / 1024,
            "gzip KiB": row["gzip_bytes"] / 1024,
            "sparsity": row["weight_sparsity"],
        }
        for row in record["rows"]
    ]
    evaluation, latency = record["evaluation"], record["latency"]
    lines = [
        f"# medexp compress: method={record['method']}",
        "",
        f"Checkpoint: `{record['source']['checkpoint']}`. Metrics of the saved TorchScript files on the test split "
        f"({evaluation['samples']} images); agreement: the fraction of decisions equal to the float32 model's; "
        f"latency: {latency['unit']}, batch {latency['batch_size']}, {latency['threads']} CPU thread(s).",
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
