"""``medexp export ckpt_path=... format=onnx|pt2 output=...`` (or ``python -m medexp.export``):
a checkpoint's network, with its task's postprocessing, as a file that runs without medexp.

The model is rebuilt from the run config stored in the checkpoint, as ``medexp predict`` does.
The exported graph takes a float32 batch ``(B, C, *spatial)`` prepared as the test split was (see
the sidecar's ``preprocessing``) and returns probabilities: per class (or label) for a
classifier, per class and pixel for a segmenter. ``<output>`` receives ``model.onnx`` (ONNX
through ``torch.onnx.export(dynamo=True)``, opset 18+) or ``model.pt2`` (the
``torch.export.export`` program, ``torch.export.save``), both with a dynamic batch axis (and
dynamic spatial axes with ``dynamic_spatial=true``), and ``model.json``: what a deployer needs to
feed and read the model, where it came from, and the verification: the exported file run
(onnxruntime, or ``torch.export.load(path).module()``) on batches of the test split next to the
Lightning model, and the largest absolute difference of their outputs, which must stay within
``verify.tolerance``. ``format=torchscript`` is refused: torch deprecates TorchScript.

Supported: classification (binary, multi-class, multi-label) and segmentation. Refused: GANs and
reconstruction models (autoencoders, VAEs, denoisers), sequence models (extra ``length``/``time``
inputs) and segmentation by sliding windows (``model.roi_size``), which lives outside the network.

``format=bundle`` writes a MONAI bundle directory instead (see :mod:`medexp.inference.bundle`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from medexp.inference.artifacts import FORMATS, MIN_OPSET, SIDECAR, load_runner
from medexp.resolvers import register_resolvers
from medexp.utils.config import CONFIG_PATH
from medexp.utils.errors import MedexpError, user_errors
from medexp.utils.validation import Rule, check_options

log = logging.getLogger("medexp")
register_resolvers()

# format=torchscript, refused in one line before the other options are looked at
TORCHSCRIPT = (
    "format=torchscript: torch deprecates TorchScript (torch.jit.trace/script); export with format=pt2 "
    "(torch.export, model.pt2) or format=onnx (model.onnx)"
)

RULES = (
    Rule("format", (*FORMATS, "bundle")),  # bundle: a MONAI bundle directory (medexp.inference.bundle)
    Rule("opset", "int", MIN_OPSET, exact=True, message=f"expected an ONNX opset of at least {MIN_OPSET}"),
    Rule("batch_size", "int", 1, exact=True, message="expected a positive integer"),
    Rule(
        "verify.batches",
        "int",
        1,
        exact=True,
        optional=True,
        message="expected a positive integer, or null for the whole test split",
    ),
    Rule(
        "verify.tolerance",
        "number",
        0,
        finite=False,
        message="expected a number >= 0 (the largest absolute difference allowed)",
    ),
    Rule("dynamic_spatial", "bool"),
)


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
    if cfg.get("format") == "torchscript":
        raise MedexpError(TORCHSCRIPT)
    check_options(cfg, RULES)
    if cfg.format == "bundle":  # returns the bundle's configs/metadata.json (its verification under "medexp")
        from medexp.inference.bundle import export_bundle

        return export_bundle(cfg)

    from medexp.inference.artifacts import describe, sha256
    from medexp.utils.run_info import write_json
    from medexp.utils.runtime import tidy_library_output

    tidy_library_output()
    checkpoint, datamodule, model, inputs = _model_and_inputs(cfg)
    output = Path(cfg.output).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    path = output / FORMATS[cfg.format]
    verification = _export_and_verify(cfg, model, inputs, path)

    dynamic_spatial = cfg.dynamic_spatial and cfg.format in ("onnx", "pt2")
    sidecar = describe(model, datamodule, checkpoint.config, inputs[0], cfg.format, cfg.opset, dynamic_spatial)
    sidecar["source"] = {"checkpoint": str(checkpoint.path.resolve()), "sha256": sha256(checkpoint.path)}
    sidecar["verification"] = verification
    write_json(output / SIDECAR, sidecar)
    log.info("exported: %s; sidecar: %s", path, output / SIDECAR)
    if not verification["passed"]:
        raise MedexpError(
            f"the exported model's outputs differ from the model's by up to {verification['max_abs_diff']:.3g} on the "
            f"test split, above verify.tolerance={verification['tolerance']:g}; {path.name} and {SIDECAR} (passed: "
            f"false) are kept in {output} for inspection: do not deploy them"
        )
    return output / SIDECAR


def _model_and_inputs(cfg: DictConfig) -> tuple[Any, Any, Any, list[torch.Tensor]]:
    """The checkpoint, its data module, its model (refused early when it cannot be exported) and
    the test batches (``verify.batches`` of them) the export is verified on."""
    from medexp.checkpoints.checkpoint import INFERENCE, Checkpoint
    from medexp.inference.loop import batches as first_batches

    checkpoint = Checkpoint(cfg.ckpt_path, cfg.allowed_targets)
    checkpoint.checked_config()  # what the config names, refused before the task is looked at
    _refuse_by_target(checkpoint)
    datamodule, model = checkpoint.build(cfg.data, model_overrides=INFERENCE)
    _refuse_model(model, checkpoint.model_target)
    model = model.cpu().eval()
    datamodule.batch_size = int(cfg.batch_size)
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    inputs = [batch[model.input_key].float().cpu() for batch in first_batches(loader, cfg.verify.batches)]
    if not inputs:
        raise MedexpError("the checkpoint's data have an empty test split: nothing to verify the export on")
    return checkpoint, datamodule, model, inputs


def _export_and_verify(cfg: DictConfig, model: Any, inputs: list[torch.Tensor], path: Path) -> dict[str, Any]:
    """Write the export to ``path`` and compare it with the model on ``inputs``: the sidecar's
    ``verification`` record."""
    from medexp.inference.artifacts import Exported, export_onnx, export_pt2, verify

    fmt, tolerance = cfg.format, float(cfg.verify.tolerance)
    wrapper = Exported(model).eval()
    log.info("exporting %s as %s to %s", type(model).__name__, fmt, path)
    dynamic_spatial = bool(cfg.dynamic_spatial)
    with torch.no_grad():
        if fmt == "onnx":
            runtime = export_onnx(wrapper, inputs[0], path, cfg.opset, dynamic_spatial)
        else:
            runtime = export_pt2(wrapper, inputs[0], path, dynamic_spatial)
    record = verify(model, load_runner(fmt, path), inputs, tolerance, runtime, "exported")
    return {**record, "batch_size": int(cfg.batch_size)}


def _refuse_by_target(checkpoint: Any) -> None:
    """Refuse tasks that do not export before they are built (building a GAN may load the
    checkpoint that measured it)."""
    from medexp.inference.artifacts import not_exported

    cls = checkpoint.task_class
    reason = None if cls is None else not_exported(cls, checkpoint.model_target)
    if reason is not None:
        raise MedexpError(reason)


def _refuse_model(model: Any, target: str = "") -> None:
    """Refuse a model whose task does not export, or whose net or options keep it from it."""
    from medexp.inference.artifacts import export_problem

    reason = export_problem(model, target or f"{type(model).__module__}.{type(model).__name__}")
    if reason is not None:
        raise MedexpError(reason)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    with user_errors():
        export(cfg)


if __name__ == "__main__":
    main()
