"""Exported models: a task's prediction as one ONNX graph (``torch.onnx.export(dynamo=True)``)
or ``torch.export`` program (``.pt2``) that runs without medexp, the runner that loads it back,
and the sidecar that says how to feed and read it; shared by ``medexp export`` and ``medexp
compress``.

Both formats come from ``torch.export``: ONNX through the torch.export-based exporter (onnxscript
translates the exported program; opset 18 or later), ``pt2`` as the ``ExportedProgram`` itself
(``torch.export.save``; ``torch.export.load(path).module()`` runs it). TorchScript
(``torch.jit.trace``) and the TorchScript-based ONNX exporter, both deprecated by torch, are not
used.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medexp.utils.errors import MedexpError

log = logging.getLogger("medexp")

FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2"}
SIDECAR = "model.json"
SUPPORTED = "classification (model.task binary, multiclass, multilabel) and segmentation"
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
# the torch.export-based ONNX exporter writes opset 18 and later; it only tries to convert down
# to older opsets, and may keep 18 when that fails
MIN_OPSET = 18
# how a deployer runs each format, for the sidecar
LOADERS = {
    "onnx": f"onnxruntime.InferenceSession(path).run(['{OUTPUT_NAME}'], {{'{INPUT_NAME}': x}})[0]",
    "pt2": "torch.export.load(path).module()(x)",
}


def not_exported(task: type, target: str) -> str | None:
    """Why a task class cannot be exported (its ``not_exported``, filled in), or None."""
    reason = getattr(task, "not_exported", "cannot export a {name}; exportable: {supported}")
    return None if reason is None else reason.format(name=task.__name__, target=target, supported=SUPPORTED)


def export_problem(model: Any, target: str) -> str | None:
    """Why ``model`` cannot be exported: its task's reason, else the model's own (a sequence
    net, sliding windows; see ``export_problem`` of :class:`~medexp.tasks.base.BaseTask`), or None."""
    reason = not_exported(type(model), target)
    if reason is None and hasattr(model, "export_problem"):
        problem = model.export_problem()
        reason = None if problem is None else problem.format(supported=SUPPORTED)
    return reason


class Exported(nn.Module):
    """The task's prediction as one module: ``task.postprocess(task.infer(image))``, i.e.
    probabilities (a segmenter's flips at inference, ``model.tta_flips``, included).

    Only the task's network is a submodule: exporting a LightningModule itself reads its
    ``trainer``, which a rebuilt model has not.
    """

    def __init__(self, task: nn.Module) -> None:
        super().__init__()
        self.net = task.net
        self._task = (task,)  # a tuple: not registered as a submodule

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        task = self._task[0]
        return task.postprocess(task.infer(image))


def require_onnx(what: str) -> None:
    """Raise a :class:`MedexpError` naming the packages ``what`` needs when one is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise MedexpError(
            f"{what} needs the packages onnx, onnxscript and onnxruntime ({exc}); pip install onnx onnxscript "
            'onnxruntime (or pip install -e ".[export]")'
        ) from exc


def example_batch(example: torch.Tensor) -> torch.Tensor:
    """``example`` with at least two images: torch.export takes an axis of size 1 for a constant,
    so a batch of one would fix the batch size of the export."""
    return example if example.shape[0] > 1 else torch.cat([example, example])


def dynamic_axes(example: torch.Tensor, dynamic_spatial: bool) -> dict[int, str]:
    """The axes of the input that vary, by name: the batch, and with ``dynamic_spatial`` the
    spatial axes (``dim0``, ``dim1``, ...)."""
    spatial = {axis: f"dim{axis - 2}" for axis in range(2, example.ndim)} if dynamic_spatial else {}
    return {0: "batch", **spatial}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def export_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_spatial: bool) -> str:
    """Write ``wrapper`` exported on ``example`` as ONNX at ``path`` (one file, weights inside)
    and check the file; return the runtime that will run it.

    ``torch.onnx.export(dynamo=True)`` captures the graph with ``torch.export`` and translates it
    with onnxscript. The batch axis (and with ``dynamic_spatial`` the spatial axes) varies:
    ``dynamic_shapes`` names the axes, which torch.onnx turns into ``torch.export.Dim.DYNAMIC``
    (guards a net needs, e.g. a U-Net's even sizes, are kept rather than refused) and gives the
    names to the ONNX graph's symbolic dimensions; the output's follow from the graph.
    """
    require_onnx("format=onnx")
    import onnx
    import onnxruntime

    # without torchvision installed the exporter logs, on every export, that it skips
    # torchvision's detection operators: none of them is in a network medexp exports
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        torch.onnx.export(
            wrapper,
            (example_batch(example),),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: dynamic_axes(example, dynamic_spatial)},
            external_data=False,  # one file; ONNX's protobuf limit (2 GB) is far above medexp's nets
            verbose=False,
        )
    except Exception as exc:  # torch.export and the translation raise many types
        raise MedexpError(f"cannot export the model as ONNX with opset={opset} ({_first_line(exc)})") from exc
    written = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import if not o.domain), 0)
    if written != opset:  # the exporter keeps its own opset where it cannot convert to the one asked for
        path.unlink()
        raise MedexpError(
            f"opset={opset}: torch {torch.__version__.split('+')[0]} wrote opset {written} instead; expected an "
            f"opset from {MIN_OPSET} to {onnx.defs.onnx_opset_version()} (the newest the installed onnx knows)"
        )
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise MedexpError(f"the exported {path.name} is not a valid ONNX model ({_first_line(exc)})") from exc
    return f"onnxruntime {onnxruntime.__version__}"


def export_pt2(wrapper: nn.Module, example: torch.Tensor, path: Path, dynamic_spatial: bool) -> str:
    """Write ``wrapper`` exported on ``example`` by ``torch.export.export`` at ``path``
    (``torch.export.save``); return the runtime that will run it.

    The batch axis (and with ``dynamic_spatial`` the spatial axes) is ``Dim.DYNAMIC``: any size
    the net's own guards allow (a U-Net's multiples of its strides, for instance).
    """
    from torch.export import Dim

    shapes = {INPUT_NAME: dict.fromkeys(dynamic_axes(example, dynamic_spatial), Dim.DYNAMIC)}
    try:
        program = torch.export.export(wrapper, (example_batch(example),), dynamic_shapes=shapes)
    except Exception as exc:  # torch.export raises several types on what it cannot capture
        raise MedexpError(f"cannot export the model with torch.export ({_first_line(exc)})") from exc
    torch.export.save(program, str(path))
    return f"torch.export {torch.__version__}"


def load_runner(fmt: str, path: Path, threads: int | None = None) -> Callable[[torch.Tensor], Any]:
    """A function ``(B, C, *spatial)`` tensor -> outputs of the exported file at ``path``; ONNX
    runs with ``threads`` intra-op threads (default: torch's)."""
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().cpu().numpy()})[0]
    if fmt == "pt2":
        module = torch.export.load(str(path)).module()
        return lambda x: module(x.cpu())
    raise ValueError(f"no runner for format {fmt!r}")


def describe(
    model: Any, datamodule: Any, run_cfg: dict[str, Any], example: Any, fmt: str, opset: int, dynamic_spatial: bool
) -> dict[str, Any]:
    """The sidecar's description of the exported model: input, preprocessing, output, classes."""
    import medexp

    segments = model.pixel_classes
    task = "segmentation" if segments else model.task
    shape = list(example.shape[1:])
    num_classes = int(model.num_classes)
    spatial = "(B, num_classes, *spatial)" if segments else "(B, num_classes)"
    spatial_names = [f"dim{k}" for k in range(len(shape) - 1)]
    if segments:
        meaning = (
            f"softmax probabilities of the {num_classes} classes (background first) for every pixel (voxel), "
            f"{spatial}; the mask of class indices is the argmax over axis 1"
        )
    elif task == "multilabel":
        meaning = (
            f"sigmoid probability of each of the {num_classes} labels, independent of each other, {spatial}; "
            "a label is present where its probability is above 0.5"
        )
    else:
        meaning = f"softmax probabilities of the {num_classes} classes, {spatial}; the predicted class is the argmax over axis 1"
    names = datamodule.class_names
    data_cfg = run_cfg.get("data", {})
    return {
        "format": fmt,
        "file": FORMATS[fmt],
        **({"opset": opset} if fmt == "onnx" else {}),
        "load": LOADERS[fmt],
        "medexp_version": medexp.__version__,
        "task": task,
        "model": run_cfg.get("model", {}).get("_target_"),
        "net": run_cfg.get("model", {}).get("net", {}).get("_target_"),
        "input": {
            "name": INPUT_NAME if fmt == "onnx" else None,
            "shape": shape,
            "batch_shape": ["batch", shape[0], *(spatial_names if dynamic_spatial else shape[1:])],
            "dtype": "float32",
            "layout": layout(datamodule),
        },
        "preprocessing": preprocessing(datamodule, data_cfg),
        "intensity_range": None if datamodule.intensity_range is None else list(datamodule.intensity_range),
        "output": {
            "name": OUTPUT_NAME if fmt == "onnx" else None,
            "batch_shape": [
                "batch",
                num_classes,
                *((spatial_names if dynamic_spatial else shape[1:]) if segments else []),
            ],
            "dtype": "float32",
            "meaning": meaning,
        },
        "num_classes": num_classes,
        "class_names": [str(name) for name in names] if names else None,
        **({"tta_flips": True} if segments and model.hparams.get("tta_flips") else {}),
    }


def reads_arrays(datamodule: Any) -> bool:
    """True where inputs are prepared as in-memory arrays are (uint8 scaled to [0, 1])."""
    from medexp.data.base import ArrayDataModule

    return type(datamodule).predict_transform is ArrayDataModule.predict_transform


def layout(datamodule: Any) -> str:
    dims = int(datamodule.spatial_dims)
    axes = "(C, H, W): channels, rows, columns" if dims == 2 else "(C, D, H, W): channels, then the volume's axes"
    if reads_arrays(datamodule):
        return f"{axes}, in numpy's axis order (as a PIL image converted with numpy.asarray, channels moved first)"
    return (
        "channels first, then the spatial axes as MONAI's LoadImage returns them: for PNG/JPEG/TIFF (W, H), "
        "the transpose of numpy.asarray(PIL.Image.open(file)); for NIfTI/DICOM the stored voxel order"
    )


def preprocessing(datamodule: Any, data_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """What turns a raw image into the exported model's input, in order: reading and scaling
    (as :meth:`~medexp.data.base.ArrayDataModule.predict_transform` does) and the data's
    ``transforms`` as recorded in the checkpoint's config (MONAI dictionary transforms on key
    ``image``; a ``formula`` where it is a simple one)."""
    steps: list[dict[str, Any]] = []
    if reads_arrays(datamodule):
        steps.append(
            {
                "step": "read",
                "description": "the image as an array of shape (C, *spatial); a grey image has C=1 (see input.layout)",
            }
        )
        steps.append(
            {
                "step": "scale_intensity",
                "description": "raw 8-bit intensities to [0, 1], as float32",
                "in_range": [0.0, 255.0],
                "out_range": [0.0, 1.0],
                "formula": "x / 255",
            }
        )
    else:
        steps.append(
            {
                "step": "read",
                "description": (
                    "the file as monai.transforms.LoadImage(image_only=True, ensure_channel_first=True) reads it, "
                    "intensities as stored (not scaled), as float32 (see input.layout)"
                ),
            }
        )
    for config in data_cfg.get("transforms") or []:
        step = {"step": "transform", "config": config}
        formula = transform_formula(config)
        if formula:
            step["formula"] = formula
        steps.append(step)
    return steps


def transform_formula(config: dict[str, Any]) -> str | None:
    """A plain description of a common MONAI intensity or resizing transform, else None."""
    target = str(config.get("_target_", "")).rsplit(".", 1)[-1].rstrip("d")
    match target:
        case "NormalizeIntensity":
            if config.get("channel_wise") or config.get("nonzero"):
                return None
            sub, div = config.get("subtrahend"), config.get("divisor")
            sub_text = "mean(x)" if sub is None else f"{sub}"
            div_text = "std(x)" if div is None else f"{div}"
            return f"(x - {sub_text}) / {div_text}" + (" (per image)" if sub is None or div is None else "")
        case "ScaleIntensity":
            if config.get("factor") is not None or config.get("channel_wise"):
                return None
            low, high = config.get("minv", 0.0), config.get("maxv", 1.0)
            return f"(x - min(x)) / (max(x) - min(x)) * ({high} - {low}) + {low} (per image)"
        case "ScaleIntensityRange":
            a_min, a_max, b_min, b_max = (config.get(k) for k in ("a_min", "a_max", "b_min", "b_max"))
            formula = f"(x - {a_min}) / ({a_max} - {a_min}) * ({b_max} - {b_min}) + {b_min}"
            return formula + (f", clipped to [{b_min}, {b_max}]" if config.get("clip") else "")
        case "Resize":
            return (
                f"resize the spatial axes to {config.get('spatial_size')} ({config.get('mode', 'area')} interpolation)"
            )
    return None


def sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path``, in hex (the sidecar's record of the checkpoint)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_onnx(task: Any, net: nn.Module, example: torch.Tensor, path: Path, opset: int = MIN_OPSET) -> None:
    """Save ``net`` with ``task``'s postprocessing as ONNX at ``path``, as ``medexp export`` does
    (dynamic batch axis): ``(B, C, *spatial)`` -> probabilities."""
    task.net = net  # Exported runs task.postprocess(task.infer(x)), i.e. with this net
    with torch.no_grad():
        export_onnx(Exported(task).eval(), example, path, opset, dynamic_spatial=False)


def verify(
    model: Any,
    run: Callable[[torch.Tensor], Any],
    inputs: list[torch.Tensor],
    tolerance: float,
    runtime: str,
    what: str,
) -> dict[str, Any]:
    """Run ``run`` (an exported model, a bundle) next to the model's ``predict_step`` on the test
    batches ``inputs`` and on one image alone (the batch axis of an export varies), log the result
    and return the ``verification`` record.

    Args:
        what: what ``run`` is, e.g. ``"exported"``, ``"bundle"`` (messages say "the <what> model").

    Raises:
        MedexpError: when ``run`` fails on a batch or returns another shape than the model.
    """
    max_diff, samples = 0.0, 0
    checks = [*inputs, inputs[0][:1]] if inputs[0].shape[0] > 1 else inputs
    with torch.no_grad():
        for index, x in enumerate(checks):
            expected = model.predict_step({model.input_key: x}, index).float()
            try:
                got = torch.as_tensor(run(x)).float()
            except Exception as exc:  # onnxruntime, torch.export's guards and MONAI raise their own types
                first = (str(exc).strip().splitlines() or [""])[0]
                raise MedexpError(
                    f"the {what} model failed on a test batch of shape {tuple(x.shape)} (other spatial sizes: dynamic_spatial="
                    f"true, where the format has it): {type(exc).__name__}: {first}"
                ) from exc
            if got.shape != expected.shape:
                raise MedexpError(
                    f"the {what} model returned shape {tuple(got.shape)} for input {tuple(x.shape)}; the model returns "
                    f"{tuple(expected.shape)}"
                )
            diff = (got - expected).abs().max()
            # NaN anywhere (on either side) fails the check rather than vanishing in max()
            max_diff = max(max_diff, float(diff) if torch.isfinite(diff) else float("inf"))
            samples += x.shape[0] if index < len(inputs) else 0
    passed = max_diff <= tolerance
    log.info(
        "verification on %d test sample(s) in %d batch(es) with %s: max |%s - model| = %.3g (tolerance %.3g): %s",
        samples,
        len(inputs),
        runtime,
        what,
        max_diff,
        tolerance,
        "passed" if passed else "FAILED",
    )
    return {
        "runtime": runtime,
        "split": "test",
        "batches": len(inputs),
        "samples": samples,
        "max_abs_diff": max_diff,
        "tolerance": tolerance,
        "passed": passed,
    }
