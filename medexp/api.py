"""medexp from Python (notebooks, scripts): train, evaluate and load checkpoints as the commands do.

    import medexp

    run = medexp.train(["model=resnet18", "trainer.max_epochs=3"])    # as `medexp train ...`
    run["test"]["test/auroc"], run["run_dir"], run["best_checkpoint"]
    medexp.evaluate(run["best_checkpoint"], overrides=["splits=[val,test]"])   # as `medexp eval`
    model = medexp.load(run["best_checkpoint"])
    model.predict("scan.png")             # class probabilities, as `medexp predict` writes them

:func:`train` and :func:`evaluate` compose the command's config with Hydra from the installed
``conf/`` and run it as the command runs it: a run directory under ``logs/<command>/runs/<time>``
(relative to the working directory; ``hydra.run.dir=...`` picks another) with ``.hydra/``, the
log file, ``metrics.json`` and the rest. Errors the user can cause (a bad override, a missing
file) raise :class:`~medexp.utils.errors.MedexpError` with one line, never exit the interpreter.

Importing :mod:`medexp` imports none of this; each function imports what it needs when called.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from medexp.utils.errors import MedexpError

Overrides = Sequence[str] | str


def train(overrides: Overrides = ()) -> dict[str, Any]:
    """Fit a model and test its best checkpoint, as ``medexp train <overrides>``.

    Args:
        overrides: Hydra overrides, e.g. ``["model=resnet18", "data=medmnist"]`` (or one string
            of them separated by spaces, as typed after ``medexp train``). ``ckpt_path=<run>/
            checkpoints/last.ckpt`` resumes that run in its directory, as the command does.

    Returns:
        What the run's ``metrics.json`` holds (``test``, ``val``, ``fit``, ``best_score``,
        ``best_checkpoint``, ``seed``, ...) and ``run_dir``: the run directory.

    Raises:
        MedexpError: for overrides that do not compose or fail medexp's checks, data that is
            missing or wrong, a run directory in use, a diverged loss, ...
    """
    from medexp.utils.rundir import resume_arguments

    arguments = resume_arguments(_overrides(overrides, "train"))

    def job(cfg: Any) -> dict[str, Any]:
        from medexp.train import train as train_command

        return train_command(cfg)

    return _run("train", arguments, job)


def evaluate(ckpt: str | os.PathLike[str], overrides: Overrides = ()) -> dict[str, Any]:
    """Evaluate a checkpoint with its stored config, as ``medexp eval ckpt_path=<ckpt> <overrides>``.

    Args:
        ckpt: a ``.ckpt`` written by ``medexp train`` (or :func:`train`).
        overrides: e.g. ``["splits=[val,test]", "report=true", "data.root=/moved/data"]``.

    Returns:
        What the eval run's ``metrics.json`` holds (``{split: {metric: value}}``, ``checkpoint``,
        and ``recorded``: the training run's metrics when the checkpoint sits in its run
        directory) and ``run_dir``: the eval run's directory.

    Raises:
        MedexpError: as :func:`train`, and for a missing or unsafe checkpoint.
    """

    def job(cfg: Any) -> dict[str, Any]:
        from medexp.eval import evaluate as evaluate_command

        return evaluate_command(cfg)

    return _run("eval", [f"ckpt_path={_quoted(os.fspath(ckpt))}", *_overrides(overrides, "eval")], job)


def load(ckpt: str | os.PathLike[str], allowed_targets: Sequence[str] = ()) -> Predictor:
    """A checkpoint's model (in evaluation mode, on the CPU) with the preprocessing that
    ``medexp predict`` applies to a file: see :class:`Predictor`.

    Args:
        ckpt: a ``.ckpt`` written by ``medexp train``, read with ``weights_only`` (decrypted
            with the key its header names when it was written encrypted).
        allowed_targets: ``_target_`` names trusted in its stored config besides medexp's
            (as ``allowed_targets=`` of the commands).

    Raises:
        MedexpError: for a missing, foreign or unsafe checkpoint.
    """
    from medexp.checkpoints.checkpoint import INFERENCE, Checkpoint

    checkpoint = Checkpoint(ckpt, allowed_targets)
    datamodule, model = checkpoint.build(model_overrides=INFERENCE)  # as medexp predict builds them
    return Predictor(model=model.eval(), datamodule=datamodule, path=checkpoint.path)


@dataclass
class Predictor:
    """A loaded checkpoint (see :func:`load`).

    Attributes:
        model: the task (a LightningModule) with the checkpoint's weights, in evaluation mode;
            ``model.net`` is the network. Move it with ``model.to("cuda")``: :meth:`predict`
            follows it.
        datamodule: the checkpoint's data module, built from its stored config (its splits
            are not loaded): ``class_names``, ``num_classes``, ``spatial_dims``, ...
        path: the checkpoint file.
        transform: the chain that turns ``{"image": path}`` into the model's input, as
            ``medexp predict`` prepares a file (``datamodule.predict_transform()``).
    """

    model: Any
    datamodule: Any
    path: Path

    @cached_property
    def transform(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return self.datamodule.predict_transform()

    @property
    def class_names(self) -> list[str] | None:
        return self.datamodule.class_names

    def predict(self, images: Any) -> Any:
        """What ``medexp predict`` computes for each image: the task's prediction step on the
        prepared input (classification: class probabilities, the numbers ``predictions.csv``
        holds; segmentation: class probabilities per pixel, on the model's grid).

        Args:
            images: an image file (any format ``medexp predict`` reads), or an array of pixel
                values as an image file holds them (2D: ``(H, W)`` or ``(H, W, 3|4)`` of
                ``uint8``/``uint16`` as ``numpy.asarray(PIL.Image.open(file))`` gives; 3D:
                ``(D, H, W)``): it is written losslessly to a PNG (NIfTI for volumes) and read
                back by the same chain, so it predicts as that file would; or a list of these.

        Returns:
            A numpy array per image (stacked into one array for a list when the shapes agree);
            boxes (detection) as the task's dictionaries of arrays.

        Raises:
            MedexpError: when the task does not predict on single images (e.g. a GAN, a
                sequence model), or for an array of another shape or type.
        """
        import numpy as np
        import torch
        from lightning.fabric.utilities.apply_func import move_data_to_device

        from medexp.inference.loop import file_loader

        model = self.model
        if model.prediction_writer is None or getattr(model, "prediction_inputs", "images") != "images":
            why = model.not_predicted if model.prediction_writer is None else "{name} predicts on pairs of images"
            raise MedexpError(why.format(name=type(model).__name__, ckpt=self.path))
        single = isinstance(images, str | os.PathLike | np.ndarray | torch.Tensor)
        results = []
        model.eval()
        with tempfile.TemporaryDirectory(prefix="medexp-predict-") as folder, torch.inference_mode():
            files = [self._file(image, Path(folder) / str(i)) for i, image in enumerate([images] if single else images)]
            for index, batch in enumerate(file_loader([{"image": f} for f in files], self.transform, batch_size=1)):
                batch = move_data_to_device(batch, model.device)
                results.append(_numpy(model.predict_step(batch, index))[0])
        if single:
            return results[0]
        if results and all(isinstance(r, np.ndarray) and r.shape == results[0].shape for r in results):
            return np.stack(results)
        return results

    def _file(self, image: Any, path: Path) -> str:
        """The file of an image: a path as it is; an array written to ``path`` (a suffix added)."""
        import numpy as np

        if isinstance(image, str | os.PathLike):
            return os.fspath(image)
        array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
        dims = self.datamodule.spatial_dims
        if dims == 2 and array.dtype in (np.uint8, np.uint16) and (array.ndim == 2 or array.shape[-1:] in ((3,), (4,))):
            from PIL import Image

            if array.ndim == 3 and array.dtype != np.uint8:
                raise MedexpError(f"an RGB(A) array of {array.dtype}; expected uint8 (as PIL reads colour images)")
            Image.fromarray(array).save(path.with_suffix(".png"))
            return str(path.with_suffix(".png"))
        if dims == 3 and array.ndim == 3 and np.issubdtype(array.dtype, np.number):
            import nibabel as nib

            nib.save(nib.Nifti1Image(array, np.eye(4)), path.with_suffix(".nii.gz"))
            return str(path.with_suffix(".nii.gz"))
        expected = (
            "(H, W) or (H, W, 3|4) of uint8/uint16, as an image file holds it"
            if dims == 2
            else "(D, H, W) of numbers, as a volume file holds it"
        )
        raise MedexpError(f"an array of shape {tuple(array.shape)} and type {array.dtype}; expected {expected}")


def _numpy(value: Any) -> Any:
    """Tensors (also inside lists and dicts) as numpy arrays."""
    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {key: _numpy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_numpy(item) for item in value]
    return value


def _overrides(overrides: Overrides, command: str) -> list[str]:
    """The overrides as a list; a string is split as a shell splits it. Flags are refused: the
    API runs one job of a command (a sweep: ``medexp <command> -m ...``)."""
    arguments = shlex.split(overrides) if isinstance(overrides, str) else [str(o) for o in overrides]
    for argument in arguments:
        if argument.startswith("-"):
            raise MedexpError(
                f"{argument!r}: medexp.{'evaluate' if command == 'eval' else command}() takes overrides only "
                f"(key=value); sweeps, --help and other flags are the command's: medexp {command} {argument} ..."
            )
    return arguments


def _quoted(value: str) -> str:
    """``value`` as a quoted Hydra override value (paths may hold ``=``, ``,``, spaces...): quotes
    escaped, and the backslashes before a quote or the closing quote doubled (Hydra's grammar)."""
    import re

    value = re.sub(r"(\\*)'", lambda match: match.group(1) * 2 + "\\'", value)
    return "'" + re.sub(r"(\\+)$", lambda match: match.group(1) * 2, value) + "'"


def _run(command: str, overrides: list[str], job: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Compose ``conf/<command>.yaml`` with ``overrides`` and run ``job`` on it as Hydra runs the
    command (run directory, ``.hydra/``, log file, the run-directory lock); the job's result
    with ``run_dir``."""
    from hydra.errors import HydraException

    from medexp.utils.errors import RaisedUserError, find_user_error, raise_user_errors
    from medexp.utils.run_info import API_CALL
    from medexp.utils.rundir import override_key

    run_dir: list[str] = []

    def task(cfg: Any) -> dict[str, Any]:
        run_dir.append(str(cfg.paths.output_dir))
        return job(cfg)

    token = API_CALL.set([f"medexp.{'evaluate' if command == 'eval' else command}", *overrides])
    try:
        with raise_user_errors(), _hydra(command) as hydra:
            if not any(override_key(override) == "hydra.run.dir" for override in overrides):
                overrides = [*overrides, f"hydra.run.dir={_quoted(_new_run_dir(command, overrides))}"]
            result = hydra.run(config_name=command, task_function=task, overrides=overrides).return_value
    except (Exception, RaisedUserError) as exc:
        # RaisedUserError: from the run directory's checks, a Hydra callback (medexp.utils.runlock)
        cause = exc.error if isinstance(exc, RaisedUserError) else exc
        error = find_user_error(cause)
        if error is None and isinstance(cause, HydraException):  # a composition error or instantiation failure
            error = MedexpError(" ".join(line.strip() for line in str(cause).splitlines() if line.strip()))
        if error is None:
            raise
        raise error from None
    finally:
        API_CALL.reset(token)
    return {**result, "run_dir": run_dir[0]}


def _new_run_dir(command: str, overrides: list[str]) -> str:
    """The run directory the command would make (``hydra.run.dir``, by default
    ``logs/<command>/runs/<time to the second>``), with ``_1``, ``_2``, ... appended while that
    exists: two calls within a second (a quick evaluation) get a directory each, as two
    command lines, seconds apart, do."""
    from hydra import compose

    cfg = compose(config_name=command, overrides=overrides, return_hydra_config=True)
    run_dir = base = str(cfg.hydra.run.dir)
    count = 0
    while os.path.exists(run_dir):
        count += 1
        run_dir = f"{base}_{count}"
    return run_dir


@contextlib.contextmanager
def _hydra(command: str) -> Iterator[Any]:
    """Hydra initialised with medexp's installed configs, as ``medexp <command>`` initialises it;
    a Hydra the caller had initialised (e.g. with ``hydra.initialize``) is back afterwards."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from hydra_plugins.medexp import register_plugins
    from medexp.resolvers import register_resolvers

    register_resolvers()
    register_plugins()
    global_hydra = GlobalHydra.instance()
    previous = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        with initialize_config_module(config_module="medexp.conf", job_name=command, version_base="1.3"):
            yield global_hydra.hydra
    finally:
        global_hydra = GlobalHydra.instance()  # initialize_config_module put back a copy of the cleared one
        global_hydra.clear()
        if previous is not None:
            global_hydra.initialize(previous)
