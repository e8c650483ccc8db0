"""``medexp export ckpt_path=... format=onnx|torchscript output=...`` (or ``python -m medexp.export``):
a checkpoint's network, with its task's postprocessing, as a file that runs without medexp.

The model is rebuilt from the run config stored in the checkpoint, as ``medexp predict`` does.
The exported graph takes a float32 batch ``(B, C, *spatial)`` prepared as the test split was (see
the sidecar's ``preprocessing``) and returns probabilities: per class (or label) for a
classifier, per class and pixel for a segmenter. ``<output>`` receives ``model.onnx`` (ONNX,
opset 17+, a dynamic batch axis) or ``model.pt`` (TorchScript, traced), and ``model.json``: what
a deployer needs to feed and read the model, where it came from, and the verification: the
exported file run (onnxruntime, or ``torch.jit.load``) on batches of the test split next to the
Lightning model, and the largest absolute difference of their outputs, which must stay within
``verify.tolerance``.

Supported: classification (binary, multi-class, multi-label) and segmentation. Refused: GANs and
reconstruction models (autoencoders, VAEs, denoisers), sequence models (extra ``length``/``time``
inputs) and segmentation by sliding windows (``model.roi_size``), which lives outside the network.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from medexp.utils.config import CONFIG_PATH, register_resolvers
from medexp.utils.errors import MedexpError, user_errors

log = logging.getLogger("medexp")
register_resolvers()

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
MIN_OPSET = 17
SIDECAR = "model.json"
SUPPORTED = "classification (model.task binary, multiclass, multilabel) and segmentation"
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"


def export(cfg: DictConfig) -> Path:
    """Export ``cfg.ckpt_path`` as ``cfg.format`` into ``cfg.output`` and verify it.

    Returns:
        The path of the sidecar ``model.json``.

    Raises:
        MedexpError: for bad options, a model that cannot be exported (see the module's
            docstring), or an export whose outputs differ from the model's by more than
            ``verify.tolerance`` (the files are kept, the sidecar records ``passed: false``).
    """
    from medexp.utils.config import check_config

    check_config(cfg)
    fmt, opset, batches, tolerance = _check_options(cfg)
    dynamic_spatial = bool(cfg.dynamic_spatial) and fmt == "onnx"

    from medexp.utils.checkpoint import CONFIG_KEY, rebuild_for_inference
    from medexp.utils.run_info import write_json
    from medexp.utils.runtime import tidy_library_output

    tidy_library_output()
    ckpt_path, checkpoint, datamodule, model = rebuild_for_inference(cfg, _refuse_by_target)
    run_cfg = checkpoint[CONFIG_KEY]
    _refuse_model(model)
    model = model.cpu().eval()

    datamodule.batch_size = int(cfg.batch_size)
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    inputs = []
    for index, batch in enumerate(loader):
        if batches is not None and index >= batches:
            break
        inputs.append(batch[model.input_key].float().cpu())
    if not inputs:
        raise MedexpError("the checkpoint's data have an empty test split: nothing to verify the export on")

    output = Path(cfg.output).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    path = output / FORMATS[fmt]
    wrapper = Exported(model).eval()
    example = inputs[0]
    log.info("exporting %s as %s to %s", type(model).__name__, fmt, path)
    with torch.no_grad():
        if fmt == "onnx":
            runtime = _export_onnx(wrapper, example, path, opset, dynamic_spatial, model)
        else:
            runtime = _export_torchscript(wrapper, example, path)
    run = load_runner(fmt, path)

    max_diff, samples = 0.0, 0
    # one image alone too: the batch axis of the export varies
    checks = [*inputs, inputs[0][:1]] if inputs[0].shape[0] > 1 else inputs
    with torch.no_grad():
        for index, x in enumerate(checks):
            expected = model.predict_step({model.input_key: x}, index).float()
            try:
                got = torch.as_tensor(run(x)).float()
            except Exception as exc:  # onnxruntime and TorchScript raise their own types
                hint = " (ONNX takes other spatial sizes with dynamic_spatial=true)" if fmt == "onnx" else ""
                raise MedexpError(
                    f"the exported model failed on a test batch of shape {tuple(x.shape)}{hint}: "
                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                ) from exc
            if got.shape != expected.shape:
                raise MedexpError(
                    f"the exported model returned shape {tuple(got.shape)} for input {tuple(x.shape)}; the model "
                    f"returns {tuple(expected.shape)}"
                )
            diff = (got - expected).abs().max()
            # NaN anywhere (on either side) fails the check rather than vanishing in max()
            max_diff = max(max_diff, float(diff) if torch.isfinite(diff) else float("inf"))
            samples += x.shape[0] if index < len(inputs) else 0
    passed = max_diff <= tolerance
    verification = {
        "runtime": runtime,
        "split": "test",
        "batches": len(inputs),
        "samples": samples,
        "batch_size": int(cfg.batch_size),
        "max_abs_diff": max_diff,
        "tolerance": tolerance,
        "passed": passed,
    }
    log.info(
        "verification on %d test sample(s) in %d batch(es) with %s: max |exported - model| = %.3g (tolerance %.3g): %s",
        samples, len(inputs), runtime, max_diff, tolerance, "passed" if passed else "FAILED",
    )

    sidecar = describe(model, datamodule, run_cfg, example, fmt, opset, dynamic_spatial)
    sidecar["source"] = {"checkpoint": str(ckpt_path.resolve()), "sha256": sha256(ckpt_path)}
    sidecar["verification"] = verification
    write_json(output / SIDECAR, sidecar)
    log.info("exported: %s; sidecar: %s", path, output / SIDECAR)
    if not passed:
        raise MedexpError(
            f"the exported model's outputs differ from the model's by up to {max_diff:.3g} on the test split, above "
            f"verify.tolerance={tolerance:g}; {path.name} and {SIDECAR} (passed: false) are kept in {output} for "
            "inspection: do not deploy them"
        )
    return output / SIDECAR


def _check_options(cfg: DictConfig) -> tuple[str, int, int | None, float]:
    fmt = cfg.format
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise MedexpError(f"format={fmt!r}; expected one of {list(FORMATS)}")
    opset = cfg.opset
    if not _is_int(opset) or opset < MIN_OPSET:
        raise MedexpError(f"opset={opset!r}; expected an ONNX opset of at least {MIN_OPSET}")
    if not _is_int(cfg.batch_size) or cfg.batch_size < 1:
        raise MedexpError(f"batch_size={cfg.batch_size!r}; expected a positive integer")
    batches = cfg.verify.batches
    if batches is not None and (not _is_int(batches) or batches < 1):
        raise MedexpError(f"verify.batches={batches!r}; expected a positive integer, or null for the whole test split")
    tolerance = cfg.verify.tolerance
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise MedexpError(f"verify.tolerance={tolerance!r}; expected a number >= 0 (the largest absolute difference allowed)")
    if not isinstance(cfg.dynamic_spatial, bool):
        raise MedexpError(f"dynamic_spatial={cfg.dynamic_spatial!r}; expected true or false")
    return fmt, int(opset), batches, float(tolerance)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse_by_target(run_cfg: dict[str, Any]) -> None:
    """Refuse GANs before they are built (building one may load the checkpoint that measured it)."""
    from medexp.tasks.adversarial import AdversarialTask
    from medexp.utils.checkpoint import model_class

    target = str(run_cfg.get("model", {}).get("_target_", ""))
    cls = model_class(run_cfg)
    if cls is not None and issubclass(cls, AdversarialTask):
        raise MedexpError(
            f"cannot export a GAN ({target}): it generates images from random codes and has no image input to "
            f"predict on; generate images with: medexp sample ckpt_path=... Exportable: {SUPPORTED}"
        )


def _refuse_model(model: Any) -> None:
    from medexp.tasks.classification import ClassificationTask
    from medexp.tasks.reconstruction import ReconstructionTask
    from medexp.tasks.segmentation import SegmentationTask

    name = type(model).__name__
    if isinstance(model, ReconstructionTask):
        raise MedexpError(
            f"cannot export a reconstruction model ({name}: autoencoder, VAE, denoiser) yet; exportable: {SUPPORTED}"
        )
    if not isinstance(model, (ClassificationTask, SegmentationTask)):
        raise MedexpError(f"cannot export a {name}; exportable: {SUPPORTED}")
    extra = tuple(getattr(model.net, "extra_inputs", ()))
    if extra:
        raise MedexpError(
            f"cannot export {type(model.net).__name__}: a sequence model that takes {list(extra)} besides the images "
            f"(series of frames over time); exportable: single-image {SUPPORTED}"
        )
    roi_size = getattr(model.hparams, "roi_size", None)
    if isinstance(model, SegmentationTask) and roi_size is not None:
        raise MedexpError(
            f"cannot export a segmentation model that infers by sliding windows (model.roi_size={list(roi_size)}): "
            "the windows and their blending are not part of the network; segmentation models are exported with "
            "model.roi_size=null (one pass over the whole image)"
        )


class Exported(nn.Module):
    """The task's prediction as one module: ``task.postprocess(task.infer(image))``, i.e.
    probabilities (a segmenter's flips at inference, ``model.tta_flips``, included).

    Only the task's network is a submodule: tracing a LightningModule itself reads its
    ``trainer``, which a rebuilt model has not.
    """

    def __init__(self, task: nn.Module) -> None:
        super().__init__()
        self.net = task.net
        self._task = (task,)  # a tuple: not registered as a submodule

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        task = self._task[0]
        return task.postprocess(task.infer(image))


def _export_onnx(wrapper: Any, example: Any, path: Path, opset: int, dynamic_spatial: bool, model: Any) -> str:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise MedexpError(f"format=onnx needs the packages onnx and onnxruntime ({exc}); pip install onnx onnxruntime") from exc
    import inspect

    spatial = range(2, example.ndim)
    axes_in = {0: "batch", **({axis: f"dim{axis - 2}" for axis in spatial} if dynamic_spatial else {})}
    segments = _is_segmentation(model)
    axes_out = {0: "batch", **({axis: f"dim{axis - 2}" for axis in spatial} if dynamic_spatial and segments else {})}
    kwargs: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript-based exporter: no onnxscript needed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 deprecates the TorchScript-based exporter
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # instance norm always normalises with the input's statistics; the exporter says so
        warnings.filterwarnings("ignore", message=r".*operator 'instance_norm' is set to train=True", category=UserWarning)
        try:
            torch.onnx.export(
                wrapper, (example,), str(path), opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: axes_in, OUTPUT_NAME: axes_out}, **kwargs,
            )
        except Exception as exc:  # unsupported operators or opsets: torch raises several types
            raise MedexpError(f"cannot export the model as ONNX with opset={opset} ({type(exc).__name__}: {exc})") from exc
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise MedexpError(f"the exported {path.name} is not a valid ONNX model ({type(exc).__name__}: {exc})") from exc
    return f"onnxruntime {onnxruntime.__version__}"


def _export_torchscript(wrapper: Any, example: Any, path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        except Exception as exc:
            raise MedexpError(f"cannot trace the model as TorchScript ({type(exc).__name__}: {exc})") from exc
        torch.jit.save(traced, str(path))
    return f"torch.jit {torch.__version__}"


def load_runner(fmt: str, path: Path) -> Any:
    """A function ``(B, C, *spatial)`` tensor -> outputs of the exported file at ``path``."""
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.cpu().numpy()})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    return lambda x: module(x.cpu())


def _is_segmentation(model: Any) -> bool:
    from medexp.tasks.segmentation import SegmentationTask

    return isinstance(model, SegmentationTask)


def describe(
    model: Any, datamodule: Any, run_cfg: dict[str, Any], example: Any, fmt: str, opset: int, dynamic_spatial: bool
) -> dict[str, Any]:
    """The sidecar's description of the exported model: input, preprocessing, output, classes."""
    import medexp

    segments = _is_segmentation(model)
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
        "medexp_version": medexp.__version__,
        "task": task,
        "model": run_cfg.get("model", {}).get("_target_"),
        "net": run_cfg.get("model", {}).get("net", {}).get("_target_"),
        "input": {
            "name": INPUT_NAME if fmt == "onnx" else None,
            "shape": shape,
            "batch_shape": ["batch", shape[0], *(spatial_names if dynamic_spatial else shape[1:])],
            "dtype": "float32",
            "layout": _layout(datamodule),
        },
        "preprocessing": preprocessing(datamodule, data_cfg),
        "intensity_range": None if datamodule.intensity_range is None else list(datamodule.intensity_range),
        "output": {
            "name": OUTPUT_NAME if fmt == "onnx" else None,
            "batch_shape": ["batch", num_classes, *((spatial_names if dynamic_spatial else shape[1:]) if segments else [])],
            "dtype": "float32",
            "meaning": meaning,
        },
        "num_classes": num_classes,
        "class_names": [str(name) for name in names] if names else None,
        **({"tta_flips": True} if segments and model.hparams.get("tta_flips") else {}),
    }


def _reads_arrays(datamodule: Any) -> bool:
    """True where inputs are prepared as in-memory arrays are (uint8 scaled to [0, 1])."""
    from medexp.data.base import ArrayDataModule

    return type(datamodule).predict_transform is ArrayDataModule.predict_transform


def _layout(datamodule: Any) -> str:
    dims = int(datamodule.spatial_dims)
    axes = "(C, H, W): channels, rows, columns" if dims == 2 else "(C, D, H, W): channels, then the volume's axes"
    if _reads_arrays(datamodule):
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
    if _reads_arrays(datamodule):
        steps.append({
            "step": "read",
            "description": "the image as an array of shape (C, *spatial); a grey image has C=1 (see input.layout)",
        })
        steps.append({
            "step": "scale_intensity",
            "description": "raw 8-bit intensities to [0, 1], as float32",
            "in_range": [0.0, 255.0],
            "out_range": [0.0, 1.0],
            "formula": "x / 255",
        })
    else:
        steps.append({
            "step": "read",
            "description": (
                "the file as monai.transforms.LoadImage(image_only=True, ensure_channel_first=True) reads it, "
                "intensities as stored (not scaled), as float32 (see input.layout)"
            ),
        })
    for config in data_cfg.get("transforms") or []:
        step = {"step": "transform", "config": config}
        formula = _formula(config)
        if formula:
            step["formula"] = formula
        steps.append(step)
    return steps


def _formula(config: dict[str, Any]) -> str | None:
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
            return f"resize the spatial axes to {config.get('spatial_size')} ({config.get('mode', 'area')} interpolation)"
    return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    with user_errors():
        export(cfg)


if __name__ == "__main__":
    main()
