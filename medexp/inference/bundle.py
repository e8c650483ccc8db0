"""MONAI bundles: ``medexp export ckpt_path=... format=bundle output=DIR`` writes a checkpoint as
the directory MONAI Label, MONAI Deploy, NVFlare and the Model Zoo consume, run by MONAI's own
runner with no medexp code but a medexp network class where the net is one::

    python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR \\
        --dataset_dir IMAGES --output_dir OUT

``DIR`` receives:

- ``configs/inference.json``: Model Zoo conventions (``bundle_root``, ``dataset_dir``, ``datalist``,
  ``network_def``, ``preprocessing``, ``inferer``, ``postprocessing``, ``handlers``,
  ``evaluator``, ``initialize``/``run``/``finalize``): each image file of ``dataset_dir`` prepared
  as ``medexp predict`` prepares it (:meth:`~medexp.data.base.ArrayDataModule.predict_transform`
  written as MONAI dictionary transforms), the network, and the task's postprocessing: a
  classifier's probabilities (its fitted temperature as a transform, then softmax, or sigmoid for
  multi-label tasks) in ``OUT/predictions.csv`` (``ClassificationSaver``: one row per image, its
  path then one probability per class, no header); a segmenter's mask of class indices (argmax of
  the softmax), mapped back onto the input's geometry and saved as ``OUT/<name>_seg.png`` (raster
  inputs) or ``.nii.gz`` with ``SaveImaged``. Sliding windows (``model.roi_size``) are a
  ``SlidingWindowInferer``; flips at inference (``model.tta_flips``) an ``inferer`` expression
  averaging the flipped passes' logits around it, as the task does.
- ``models/model.pt``: the network's plain state dict (``torch.save(net.state_dict())``, the
  net's own keys), what ``network_def`` builds and the ``CheckpointLoader`` handler loads.
- ``configs/metadata.json``: MONAI's metadata fields (versions, task, ``network_data_format``,
  ...) and medexp's record under ``medexp``: the source checkpoint and its sha256, the
  preprocessing described step by step, and the verification.
- ``docs/README.md``: what the model is, where it came from, how to run it, its preprocessing.

Verification: the bundle's ``network_def`` (parsed from the written ``inference.json`` by MONAI's
``ConfigParser``) with the weights of ``models/model.pt``, its ``inferer`` and the probability
steps of its ``postprocessing`` run on test batches next to the Lightning model; the largest
absolute difference of their probabilities goes into the log and ``metadata.json``
(``medexp.verification``), and the command fails above ``verify.tolerance``.

Refused in one line: what ``medexp export`` refuses but sliding windows (GANs, reconstruction and
sequence models), data whose preprocessing is not one of medexp's file or array chains, random or
medexp-made transforms in ``data.transforms``, and nets that DP-SGD training changed (``privacy``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from medexp.utils.errors import MedexpError

log = logging.getLogger("medexp")

FORMAT = "bundle"
METADATA = "configs/metadata.json"
INFERENCE = "configs/inference.json"
WEIGHTS = "models/model.pt"
README = "docs/README.md"
LOGGING = "configs/logging.conf"
# what MONAI's runner reads from configs/logging.conf (Model Zoo bundles ship one): INFO to stdout
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""
# the newest metadata schema of MONAI's Model Zoo (with required_packages_version)
SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
BUNDLE_VERSION = "0.1.0"
PREDICTIONS = "predictions.csv"
# Hydra's instantiation keys that MONAI's ConfigParser has no use for (dropped; _partial_ becomes _mode_)
HYDRA_DROPPED = ("_convert_", "_recursive_")
# strings MONAI's ConfigParser would read as a reference, an expression or a macro
CONFIG_SIGILS = ("@", "$", "%")


def export_bundle(cfg: Any) -> Path:
    """Write ``cfg.ckpt_path`` as a MONAI bundle into ``cfg.output`` and verify it (see the module).

    Returns:
        The path of ``configs/metadata.json``.

    Raises:
        MedexpError: for a model or data the bundle cannot express (refused before anything is
            written), or a bundle whose probabilities differ from the model's by more than
            ``verify.tolerance`` (the files are kept, ``metadata.json`` records ``passed: false``).
    """
    from medexp.checkpoints.checkpoint import INFERENCE as INFERENCE_OVERRIDES
    from medexp.checkpoints.checkpoint import Checkpoint
    from medexp.inference.artifacts import sha256
    from medexp.inference.loop import batches
    from medexp.utils.runtime import tidy_library_output

    tidy_library_output()
    checkpoint = Checkpoint(cfg.ckpt_path, cfg.allowed_targets)
    run_cfg = checkpoint.checked_config()  # what the config names, refused before the task is looked at
    refuse_task(checkpoint.task_class, checkpoint.model_target)
    net_cfg = run_cfg.get("model", {}).get("net") or {}
    network_def = monai_config(net_cfg, "model.net")
    if checkpoint.get("privacy"):
        refuse_private_net(net_cfg)
    datamodule, model = checkpoint.build(cfg.data, model_overrides=INFERENCE_OVERRIDES)
    reason = bundle_problem(model, checkpoint.model_target)
    if reason is not None:
        raise MedexpError(reason)
    model = model.cpu().eval()
    steps = preprocessing_configs(datamodule, run_cfg.get("data", {}))

    datamodule.batch_size = int(cfg.batch_size)
    datamodule.setup("test")
    inputs = [b[model.input_key].float().cpu() for b in batches(datamodule.test_dataloader(), cfg.verify.batches)]
    if not inputs:
        raise MedexpError("the checkpoint's data have an empty test split: nothing to verify the bundle on")

    output = Path(cfg.output).expanduser()
    for part in (METADATA, WEIGHTS, README):
        (output / part).parent.mkdir(parents=True, exist_ok=True)
    config, probability_steps = inference_config(model, network_def, steps, int(datamodule.spatial_dims))
    (output / INFERENCE).write_text(json.dumps(config, indent=4) + "\n")
    (output / LOGGING).write_text(LOGGING_CONF)
    torch.save(model.net.state_dict(), output / WEIGHTS)
    log.info("writing a MONAI bundle of %s (%s) to %s", type(model).__name__, net_cfg.get("_target_"), output)

    verification = verify_bundle(output, model, inputs, float(cfg.verify.tolerance), probability_steps)
    verification["batch_size"] = int(cfg.batch_size)
    source = {"checkpoint": str(checkpoint.path.resolve()), "sha256": sha256(checkpoint.path)}
    metadata = bundle_metadata(model, datamodule, run_cfg, inputs[0], source, verification)
    (output / METADATA).write_text(json.dumps(metadata, indent=4) + "\n")
    (output / README).write_text(bundle_readme(model, metadata, config))
    log.info("bundle: %s (run it with python -m monai.bundle run, see %s)", output, output / README)
    if not verification["passed"]:
        raise MedexpError(
            f"the bundle's probabilities differ from the model's by up to {verification['max_abs_diff']:.3g} on the "
            f"test split, above verify.tolerance={verification['tolerance']:g}; the bundle is kept in {output} "
            f"({METADATA} records passed: false) for inspection: do not deploy it"
        )
    return output / METADATA


# --- what a bundle can express ------------------------------------------------------------------


def refuse_task(task: type | None, target: str) -> None:
    """Refuse tasks that do not export (as ``medexp export``), before anything is built."""
    from medexp.inference.artifacts import not_exported

    reason = None if task is None else not_exported(task, target)
    if reason is not None:
        raise MedexpError(reason)


def bundle_problem(model: Any, target: str) -> str | None:
    """Why ``model`` cannot be written as a bundle, or None: its task's reason, a sequence net, or
    what the model's own ``export_problem`` says, except sliding windows (``model.roi_size``),
    which a bundle expresses as its ``SlidingWindowInferer``."""
    from medexp.inference.artifacts import SUPPORTED, not_exported

    reason = not_exported(type(model), target)
    if reason is not None:
        return reason
    if model.hparams.get("tta_shift"):
        return (
            f"model.tta_shift={model.hparams.tta_shift}: a MONAI bundle expresses test-time flips, not shifts; "
            "export it as format=onnx or format=pt2 (the shifts are in the graph), or train with model.tta_shift=0"
        )
    if model.hparams.get("select_output") is not None:
        return (
            f"cannot export {type(model.net).__name__} as a MONAI bundle: it returns several outputs and the task uses "
            f"one (model.select_output={model.hparams.select_output!r}), which a bundle's network_def cannot pick; "
            "export it as format=onnx or format=pt2 (the selection is in the graph)"
        )
    members = model.hparams.get("ensemble", 1)
    if members > 1:
        return (
            f"cannot export an ensemble of {members} networks (model.ensemble) as a MONAI bundle: its network_def "
            "builds one network; export it as format=onnx or format=pt2 (the averaging is in the graph)"
        )
    if model.extra_inputs:
        return (
            f"cannot export {type(model.net).__name__} as a MONAI bundle: a sequence model that takes "
            f"{list(model.extra_inputs)} besides the images; exportable: single-image {SUPPORTED}"
        )
    if sliding_windows(model) is None and hasattr(model, "export_problem"):
        problem = model.export_problem()
        return None if problem is None else problem.format(supported=SUPPORTED)
    return None


def inference_text(config: dict[str, Any]) -> str:
    """How the bundle's ``inferer`` runs the network, in words for its README."""
    inferer = config.get("pass_inferer", config["inferer"])
    if isinstance(inferer, str):  # a classifier's test-time flips
        return "the network's logits averaged over the image and its flips (model.tta_flips)"
    name = f"`{inferer['_target_'].rsplit('.', 1)[-1]}`"
    if "pass_inferer" in config:
        return f"{name} with the logits averaged over flips along each spatial axis (model.tta_flips)"
    return name


def flip_views(model: Any, spatial_dims: int) -> list[tuple[int, ...]]:
    """The batch dimensions each test-time view of a classifier flips (``model.tta_flips``; the
    identity first), or ``[]`` without test-time flips."""
    if not hasattr(model, "tta_axes"):
        return []
    views: list[tuple[int, ...]] = [()]
    for axis in model.tta_axes(spatial_dims):
        views += [(*view, 2 + axis) for view in views]
    return views if len(views) > 1 else []


def sliding_windows(model: Any) -> list[int] | None:
    """The window size of a segmenter that infers by sliding windows (``model.roi_size``), else None."""
    roi_size = model.hparams.get("roi_size") if model.pixel_classes else None
    return None if roi_size is None else [int(v) for v in roi_size]


def refuse_private_net(net_cfg: dict[str, Any]) -> None:
    """Refuse a net that DP-SGD training rebuilt with other layers (BatchNorm -> GroupNorm, ...):
    ``network_def`` builds the net of the config, which these weights do not fit."""
    from hydra.utils import instantiate

    from medexp.inference.artifacts import FORMATS
    from medexp.privacy.dp import compatible_net

    net = instantiate(net_cfg)
    if [type(m) for m in compatible_net(net).modules()] != [type(m) for m in net.modules()]:
        raise MedexpError(
            f"cannot export a net trained with DP-SGD (privacy) as a MONAI bundle: Opacus replaced layers of "
            f"{type(net).__name__} (e.g. BatchNorm -> GroupNorm) that the bundle's network_def cannot rebuild; "
            f"{' or '.join(f'format={name}' for name in FORMATS)} export it"
        )


def preprocessing_configs(datamodule: Any, data_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The MONAI dictionary transforms that prepare an image file as ``medexp predict`` does
    (``datamodule.predict_transform()``): read it channel first; array data (synthetic, MedMNIST)
    also swap a 2D image's axes into numpy's order and scale 8-bit intensities to [0, 1]; then the
    data's recorded ``transforms``; then float32.

    Raises:
        MedexpError: for a data module whose files are prepared otherwise, or transforms that a
            bundle cannot repeat (random ones, medexp's own).
    """
    from medexp.data.files import FileDataModule
    from medexp.inference.artifacts import reads_arrays

    steps: list[dict[str, Any]] = [
        {"_target_": "monai.transforms.LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "monai.transforms.EnsureChannelFirstd", "keys": "image"},
    ]
    if reads_arrays(datamodule):
        if int(datamodule.spatial_dims) == 2:
            # LoadImage reads raster images (W, H); arrays are (H, W): an invertible transpose, as medexp predict
            steps.append({"_target_": "monai.transforms.Transposed", "keys": "image", "indices": [0, 2, 1]})
        steps.append(
            {
                "_target_": "monai.transforms.ScaleIntensityRanged",
                "keys": "image",
                "a_min": 0.0,
                "a_max": 255.0,
                "b_min": 0.0,
                "b_max": 1.0,
            }
        )
    elif type(datamodule).predict_transform is not FileDataModule.predict_transform:
        raise MedexpError(
            f"cannot write how {type(datamodule).__name__} data prepare an image file as MONAI bundle transforms; "
            "a bundle is written for array data (synthetic, MedMNIST) and image files (data=files)"
        )
    for index, config in enumerate(data_cfg.get("transforms") or []):
        steps.append(data_transform(config, f"data.transforms[{index}]"))
    steps.append(
        {"_target_": "monai.transforms.EnsureTyped", "keys": "image", "dtype": "$torch.float32", "track_meta": True}
    )
    return steps


def data_transform(config: Any, where: str) -> dict[str, Any]:
    """One recorded ``data.transforms`` entry as a bundle transform: keys a file's sample lacks
    (``label``, ``roi``) skipped, as ``medexp predict`` skips them.

    Raises:
        MedexpError: for an entry that is not a MONAI transform, or a random one.
    """
    from monai.transforms import MapTransform, Randomizable

    target = str(config.get("_target_", "")) if isinstance(config, dict) else ""
    found = _locate(target) if target.startswith("monai.") else None
    if not isinstance(found, type):
        raise MedexpError(
            f"{where}: {target or config!r} is not a MONAI transform class; a MONAI bundle repeats only MONAI's "
            "transforms (no medexp code runs in it)"
        )
    if issubclass(found, Randomizable):
        raise MedexpError(
            f"{where}: {target} is random; a bundle cannot repeat its draws (move it to data.augmentations, which "
            "apply to training only)"
        )
    step = monai_config(config, where)
    if issubclass(found, MapTransform):
        step["allow_missing_keys"] = True
    return step


def _locate(target: str) -> Any:
    from monai.utils.module import locate

    try:
        return locate(target)
    except Exception:  # noqa: BLE001 - a name that does not import is simply not found
        return None


def monai_config(config: Any, where: str) -> Any:
    """A Hydra config (resolved, as checkpoints store it) as MONAI ConfigParser content: the same
    ``_target_`` and arguments, ``_partial_: true`` as ``_mode_: callable``, Hydra's
    ``_convert_``/``_recursive_`` dropped.

    Raises:
        MedexpError: for positional arguments (``_args_``) or strings MONAI would read as a
            reference, expression or macro (``@``, ``$``, ``%`` first), naming the key.
    """
    if isinstance(config, dict):
        if "_args_" in config:
            raise MedexpError(f"{where}._args_: positional arguments have no MONAI bundle form; name each argument")
        converted: dict[str, Any] = {}
        for key, value in config.items():
            if key in HYDRA_DROPPED:
                continue
            if key == "_partial_":
                if value:
                    converted["_mode_"] = "callable"
                continue
            converted[str(key)] = monai_config(value, f"{where}.{key}")
        return converted
    if isinstance(config, (list, tuple)):
        return [monai_config(value, f"{where}[{index}]") for index, value in enumerate(config)]
    if isinstance(config, str) and config.startswith(CONFIG_SIGILS):
        raise MedexpError(
            f"{where}={config!r}: MONAI's ConfigParser would read a string starting with {config[0]!r} as code or a "
            "reference; a bundle cannot hold it"
        )
    return config


# --- the bundle's files -------------------------------------------------------------------------


def inference_config(
    model: Any, network_def: dict[str, Any], preprocessing: list[dict[str, Any]], spatial_dims: int
) -> tuple[dict[str, Any], int]:
    """``configs/inference.json`` (see the module), and how many of its ``postprocessing`` steps
    come first and turn the network's outputs into the task's probabilities."""
    from medexp.data.paths import RASTER_SUFFIXES
    from medexp.inference.inputs import image_suffixes

    segments = bool(model.pixel_classes)
    probabilities = probability_steps(model)
    config: dict[str, Any] = {
        "imports": ["$import pathlib"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        # as medexp predict's input=<folder>: its image files, sorted, sub-folders not included
        "image_extensions": list(image_suffixes()),
        "datalist": (
            "$[str(p) for p in sorted(pathlib.Path(@dataset_dir).expanduser().iterdir()) if p.is_file() and not "
            "p.name.startswith('.') and p.name.lower().endswith(tuple(@image_extensions))]"
        ),
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "monai.transforms.Compose", "transforms": preprocessing},
        "dataset": {
            "_target_": "monai.data.Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "monai.data.DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
    }
    roi_size = sliding_windows(model)
    one_pass = (
        {"_target_": "monai.inferers.SimpleInferer"}
        if roi_size is None
        else {
            "_target_": "monai.inferers.SlidingWindowInferer",
            "roi_size": roi_size,
            "sw_batch_size": int(model.hparams.sw_batch_size),
            "overlap": float(model.hparams.overlap),
        }
    )
    if segments and model.hparams.get("tta_flips"):
        # model.tta_flips: the logits averaged over the image and its flip along each spatial axis
        config["pass_inferer"] = one_pass
        config["inferer"] = (
            "$lambda inputs, network: (@pass_inferer(inputs, network) + sum(@pass_inferer(inputs.flip(axis), "
            "network).flip(axis) for axis in range(2, inputs.ndim))) / (inputs.ndim - 1)"
        )
    elif not segments and flip_views(model, spatial_dims):
        # model.tta_flips of a classifier: the logits averaged over every combination of the flips
        views = flip_views(model, spatial_dims)
        config["inferer"] = (
            f"$lambda inputs, network: sum(network(inputs.flip(dims) if dims else inputs) for dims in {views!r}) "
            f"/ {len(views)}"
        )
    else:
        config["inferer"] = one_pass
    handlers: list[dict[str, Any]] = [
        {
            "_target_": "monai.handlers.CheckpointLoader",
            "load_path": f"$@bundle_root + '/{WEIGHTS}'",
            "load_dict": {"model": "@network"},
            "map_location": "@device",
            "strict": True,
        }
    ]
    if segments:
        config["raster_extensions"] = list(RASTER_SUFFIXES)
        # masks in the inputs' format, as medexp predict writes them: PNG for raster images, else NIfTI
        config["output_ext"] = (
            "$'.png' if @datalist and all(f.lower().endswith(tuple(@raster_extensions)) for f in @datalist) "
            "else '.nii.gz'"
        )
        post = [
            *probabilities,
            {"_target_": "monai.transforms.AsDiscreted", "keys": "pred", "argmax": True},
            # back onto the input's grid (undoing e.g. a transpose or resizing), nearest neighbour
            *(
                [
                    {
                        "_target_": "monai.transforms.Invertd",
                        "keys": "pred",
                        "transform": "@preprocessing",
                        "orig_keys": "image",
                        "nearest_interp": True,
                        "to_tensor": True,
                    }
                ]
                if any(spatial(step) for step in preprocessing)
                else []
            ),
            {
                "_target_": "monai.transforms.SaveImaged",
                "keys": "pred",
                "output_dir": "@output_dir",
                "output_ext": "@output_ext",
                "output_dtype": "$numpy.uint8",
                "output_postfix": "seg",
                "separate_folder": False,
                "resample": False,
                "print_log": False,
            },
        ]
    else:
        post = probabilities
        handlers.append(
            {
                "_target_": "monai.handlers.ClassificationSaver",
                "output_dir": "@output_dir",
                "filename": PREDICTIONS,
                "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
                "output_transform": "$lambda output: [item['pred'] for item in output]",
            }
        )
    config["postprocessing"] = {"_target_": "monai.transforms.Compose", "transforms": post}
    config["handlers"] = handlers
    config["evaluator"] = {
        "_target_": "monai.engines.SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@dataloader",
        "network": "@network",
        "inferer": "@inferer",
        "postprocessing": "@postprocessing",
        "val_handlers": "@handlers",
    }
    config["initialize"] = ["$monai.utils.set_determinism(seed=0)"]
    config["run"] = ["$@evaluator.run()"]
    config["finalize"] = []
    return config, len(probabilities)


def spatial(step: dict[str, Any]) -> bool:
    """Whether the preprocessing ``step`` records what it did for ``Invertd`` to undo (an
    invertible transform: transposing, resizing, resampling...)."""
    from monai.transforms import InvertibleTransform

    found = _locate(str(step.get("_target_", "")))
    return isinstance(found, type) and issubclass(found, InvertibleTransform)


def probability_steps(model: Any) -> list[dict[str, Any]]:
    """The task's ``postprocess`` as transforms of ``pred``: a classifier's temperature (when
    fitted), then sigmoid (multi-label) or softmax; a segmenter's softmax over the classes."""
    steps: list[dict[str, Any]] = []
    temperature = classifier_temperature(model)
    if temperature is not None and temperature != 1.0:
        steps.append(
            {"_target_": "monai.transforms.Lambdad", "keys": "pred", "func": f"$lambda x: x / {temperature!r}"}
        )
    sigmoid = not model.pixel_classes and model.task == "multilabel"
    steps.append(
        {
            "_target_": "monai.transforms.Activationsd",
            "keys": "pred",
            **({"sigmoid": True} if sigmoid else {"softmax": True}),
        }
    )
    return steps


def classifier_temperature(model: Any) -> float | None:
    """A classifier's temperature (the ``temperature`` buffer its ``postprocess`` divides the logits
    by), as the float32 it holds; None for a model without one."""
    temperature = getattr(model, "temperature", None)
    if model.pixel_classes or not isinstance(temperature, torch.Tensor):
        return None
    return float(temperature.float())


# --- verification -------------------------------------------------------------------------------


def verify_bundle(
    bundle: Path, model: Any, inputs: list[torch.Tensor], tolerance: float, probability_steps: int
) -> dict[str, Any]:
    """Run the written bundle (its ``network_def`` with ``models/model.pt``, its ``inferer`` and the
    first ``probability_steps`` steps of its ``postprocessing``, parsed by MONAI's ConfigParser)
    on ``inputs`` next to the model's ``predict_step``: the ``verification`` record.

    Raises:
        MedexpError: when the bundle's network does not take the weights, fails on a batch or
            returns another shape.
    """
    import monai
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from medexp.inference.artifacts import verify

    parser = ConfigParser()
    parser.read_config(str(bundle / INFERENCE))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    net = parser.get_parsed_content("network_def")
    try:
        net.load_state_dict(torch.load(bundle / WEIGHTS, map_location="cpu", weights_only=True), strict=True)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise MedexpError(f"the bundle's network_def does not take the weights of {WEIGHTS}: {first}") from exc
    net.eval()
    inferer = parser.get_parsed_content("inferer")
    post = Compose([parser.get_parsed_content(f"postprocessing#transforms#{i}") for i in range(probability_steps)])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.as_tensor(post({"pred": item})["pred"]) for item in inferer(x, net)])

    runtime = f"monai.bundle ConfigParser (MONAI {monai.__version__}, torch {torch.__version__})"
    return verify(model, run, inputs, tolerance, runtime, "bundle")


# --- metadata and README ------------------------------------------------------------------------


def bundle_metadata(
    model: Any,
    datamodule: Any,
    run_cfg: dict[str, Any],
    example: torch.Tensor,
    source: dict[str, str],
    verification: dict[str, Any],
) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's metadata fields, and medexp's record under ``medexp``."""
    import monai
    import numpy

    import medexp
    from medexp.inference.artifacts import layout, preprocessing

    segments = bool(model.pixel_classes)
    num_classes = int(model.num_classes)
    dims = int(datamodule.spatial_dims)
    kind = "segmentation" if segments else model.task
    shape = [int(v) for v in example.shape[2:]]
    roi_size = sliding_windows(model)
    names = class_names(datamodule, num_classes, segments)
    net_target = str(run_cfg.get("model", {}).get("net", {}).get("_target_", ""))
    data_cfg = run_cfg.get("data", {})
    # the evaluator, MONAI's command line, the readers of raster images and NIfTI, medexp for its nets
    required = {name: _version(name) for name in ("pytorch-ignite", "fire", "pillow", "nibabel")}
    if net_target.startswith("medexp."):
        required["medexp"] = medexp.__version__
    what = f"{dims}D {'volumes' if dims == 3 else 'images'}"
    if segments:
        task = f"Segmentation of {what} into {num_classes} classes (background first)"
    else:
        task = {
            "binary": f"Binary classification of {what}",
            "multiclass": f"Classification of {what} into {num_classes} classes",
            "multilabel": f"Multi-label classification of {what} ({num_classes} independent labels)",
        }.get(model.task, f"Classification of {what}")
    modality = (
        getattr(datamodule, "info", {}).get("modality") if isinstance(getattr(datamodule, "info", None), dict) else None
    )
    image_format = {
        "type": "image",
        "format": "magnitude",
        **({"modality": str(modality)} if modality else {}),
        "num_channels": int(example.shape[1]),
        "spatial_shape": roi_size or shape,
        "dtype": "float32",
        "value_range": [] if datamodule.intensity_range is None else [float(v) for v in datamodule.intensity_range],
        "is_patch_data": roi_size is not None,
        "channel_def": {"0": "image"}
        if example.shape[1] == 1
        else {str(c): f"channel {c}" for c in range(example.shape[1])},
    }
    pred_format = {
        "type": "image" if segments else "probabilities",
        "format": "segmentation" if segments else "classes",
        "num_channels": num_classes,
        "spatial_shape": (roi_size or shape) if segments else [1, num_classes],
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": roi_size is not None,
        "channel_def": {str(c): name for c, name in enumerate(names)},
    }
    temperature = classifier_temperature(model)
    return {
        "schema": SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {
            BUNDLE_VERSION: f"exported by medexp {medexp.__version__} from {Path(source['checkpoint']).name}"
        },
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {k: v for k, v in required.items() if v},
        "task": task,
        "description": (
            f"A {type(model.net).__name__} ({net_target}) trained with medexp ({run_cfg.get('model', {}).get('_target_')}); "
            + (
                "predicts a class for every pixel (voxel): the softmax over the classes, saved as a mask of class indices"
                if segments
                else "predicts "
                + ("a sigmoid probability per label" if model.task == "multilabel" else "softmax class probabilities")
            )
            + "."
        ),
        "authors": "not recorded by medexp: fill in",
        "copyright": "not recorded by medexp: fill in",
        "data_source": f"{data_cfg.get('_target_')}: {datamodule.describe()}",
        "data_type": f"{what} as MONAI's LoadImage reads them (PNG, JPEG, TIFF, NIfTI, DICOM)",
        "intended_use": "Research only; not validated for clinical or diagnostic use",
        "network_data_format": {"inputs": {"image": image_format}, "outputs": {"pred": pred_format}},
        "medexp": {
            "medexp_version": medexp.__version__,
            "source": source,
            "model": run_cfg.get("model", {}).get("_target_"),
            "net": net_target,
            "task": kind,
            "num_classes": num_classes,
            "class_names": names,
            **({"temperature": temperature} if temperature is not None else {}),
            **({"roi_size": roi_size} if roi_size is not None else {}),
            **({"tta_flips": True} if segments and model.hparams.get("tta_flips") else {}),
            **({"tta_flip_dims": flip_views(model, dims)} if not segments and flip_views(model, dims) else {}),
            "input_shape": [int(v) for v in example.shape[1:]],
            "layout": layout(datamodule),
            "preprocessing": preprocessing(datamodule, data_cfg),
            "verification": verification,
        },
    }


def class_names(datamodule: Any, num_classes: int, segments: bool) -> list[str]:
    names = datamodule.class_names
    if names and len(names) == num_classes:
        return [str(name) for name in names]
    return ["background" if segments and c == 0 else f"class {c}" for c in range(num_classes)]


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def bundle_readme(model: Any, metadata: dict[str, Any], config: dict[str, Any]) -> str:
    """``docs/README.md``: what the model is, its provenance, how to run it, its preprocessing."""
    record = metadata["medexp"]
    segments = bool(model.pixel_classes)
    classes = ", ".join(
        f"{c}: {name}" for c, name in metadata["network_data_format"]["outputs"]["pred"]["channel_def"].items()
    )
    steps = "\n".join(
        f"{index}. `{step['_target_'].rsplit('.', 1)[-1]}`"
        + "".join(
            f" {key}={json.dumps(value)}"
            for key, value in step.items()
            if key not in ("_target_", "keys", "allow_missing_keys")
        )
        for index, step in enumerate(config["preprocessing"]["transforms"], 1)
    )
    described = "\n".join(
        f"- {step['step']}: {step.get('formula') or step.get('description') or step.get('config', {}).get('_target_')}"
        for step in record["preprocessing"]
    )
    if segments:
        outputs = (
            "one mask of class indices per image, `<name>_seg.png` for PNG/JPEG/TIFF inputs, else `<name>_seg.nii.gz` "
            "(uint8, in the input's geometry: the argmax of the softmax, mapped back through the preprocessing's "
            "spatial steps by nearest neighbour; NIfTI keeps the input's affine)"
        )
    else:
        outputs = (
            f"`{PREDICTIONS}`, one row per image without a header: the image's path, then one "
            + ("sigmoid probability per label" if model.task == "multilabel" else "softmax probability per class")
            + " in class order"
            + (
                f" (logits divided by the fitted temperature {record['temperature']:g} first)"
                if record.get("temperature", 1.0) != 1.0
                else ""
            )
        )
    verification = record["verification"]
    return f"""# {metadata["task"]}

{metadata["description"]}

Classes: {classes}.

This MONAI bundle was written by `medexp export format=bundle` (medexp {record["medexp_version"]}). It is
for research; it was not validated for clinical or diagnostic use.

## Provenance

- checkpoint: `{record["source"]["checkpoint"]}`
- sha256: `{record["source"]["sha256"]}`
- task: `{record["model"]}`, network: `{record["net"]}` (its weights: `models/model.pt`, a plain state dict)
- data: {metadata["data_source"]}
- verification: the bundle's network, inferer and probability steps on {verification["samples"]} test sample(s) next
  to the medexp model: max |bundle - model| = {verification["max_abs_diff"]:.3g} (tolerance {verification["tolerance"]:g}):
  {"passed" if verification["passed"] else "FAILED: do not deploy"}

## Run it

```bash
python -m monai.bundle run --config_file <bundle>/configs/inference.json --bundle_root <bundle> \\
    --dataset_dir <folder of images> --output_dir <output folder>
```

It needs `monai`, `pytorch-ignite`, `fire` (MONAI's command line) and the readers of your files (`pillow`,
`nibabel`, `pydicom`){", and medexp for its network class" if record["net"].startswith("medexp.") else ""}.
Every image file directly in `dataset_dir` is read ({", ".join(config["image_extensions"])}). Inference:
{inference_text(config)}.
Output in `output_dir`: {outputs}.

## Preprocessing

Each file goes through these MONAI dictionary transforms (`preprocessing` in `configs/inference.json`),
as `medexp predict` prepares it:

{steps}

In plain terms, the network's input is {record["input_shape"]} float32 ({record["layout"]}):

{described}
"""
