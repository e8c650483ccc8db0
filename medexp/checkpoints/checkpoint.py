"""One checkpoint, loaded safely: its stored run config, its task, and the model and data it builds.

Every command and every internal loader (a GAN's generator, a distillation teacher, the feature
extractor of FID/KID, GAN-generated training data) goes through :class:`Checkpoint`; nothing
else reads the stored config. What it builds passes :mod:`medexp.checkpoints.allowlist` first.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L

from medexp.utils.errors import MedexpError

CONFIG_KEY = "medexp_config"

# model overrides for models that only predict (predict, explain, export, compress, a teacher, a
# feature extractor): loss class weights from class_weights=auto would count the training labels
# at setup, and loss weights do not change what a model predicts (eval keeps them: its loss does)
INFERENCE: dict[str, Any] = {"class_weights": None}


class StoreConfig(L.Callback):
    """Write the resolved run config into each checkpoint, so ``medexp eval`` needs no config tree."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config


class Checkpoint:
    """A medexp checkpoint read without unpickling code, decrypted when it was written encrypted.

    Args:
        path: the ``.ckpt`` file.
        allowed_targets: exact ``_target_`` names the user trusts besides what medexp builds.
        name: how messages name the file's setting, e.g. ``ckpt_path`` or ``model.teacher_ckpt``.

    Raises:
        MedexpError: when the file is missing, is not a loadable checkpoint, holds pickled code,
            holds no run config, or is encrypted and its key is missing.
    """

    def __init__(self, path: str | Path, allowed_targets: Sequence[str] = (), name: str = "ckpt_path") -> None:
        self.path = Path(path).expanduser()
        self.allowed_targets = tuple(str(target) for target in allowed_targets or ())
        self.where = f"{name}={str(self.path)!r}"
        self.contents = load_checkpoint(self.path, self.where)

    @property
    def config(self) -> dict[str, Any]:
        """A copy of the stored run config, as recorded (not checked: read values, build nothing)."""
        return copy.deepcopy(self.contents[CONFIG_KEY])

    def get(self, key: str, default: Any = None) -> Any:
        """A recorded value by dotted key, e.g. ``data.task`` or ``data.intensity_range``."""
        node: Any = self.contents[CONFIG_KEY]
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return copy.deepcopy(node)

    @property
    def model_target(self) -> str:
        """The recorded ``model._target_`` (a string; see :attr:`task_class` for the class)."""
        return str(self.get("model._target_", ""))

    @property
    def task_class(self) -> type | None:
        """The task (LightningModule) class of the recorded model, resolved without importing
        any package medexp does not use; None when it does not resolve to a class."""
        from medexp.checkpoints.allowlist import resolve

        try:
            found = resolve(self.model_target)
        except LookupError:
            return None
        return found if isinstance(found, type) else None

    def checked_config(self, part: str | None = None) -> dict[str, Any]:
        """The stored run config (or its ``part``, e.g. ``model``), checked against the allowlist
        and with every argument that would fetch other weights made inert: what a rebuild builds.

        Raises:
            MedexpError: for interpolations (a checkpoint stores its config resolved) or a
                ``_target_`` that is not allowed (see :mod:`medexp.checkpoints.allowlist`).
        """
        from medexp.checkpoints.allowlist import FETCHING_WHEN_REBUILT, check_targets, make_inert, refuse_interpolations

        config = self.contents[CONFIG_KEY]
        where = "the checkpoint's config"
        if part is not None:
            config, where = config.get(part) or {}, f"the checkpoint's {part} config"
        if not isinstance(config, dict):
            raise MedexpError(f"refusing to build {where}: expected a mapping, found {type(config).__name__}")
        named = config if part is None else {part: config}  # keys named from the root: model.net._target_
        refuse_interpolations(named, where)
        check_targets(named, self.allowed_targets, where=where)
        return make_inert(config, FETCHING_WHEN_REBUILT)

    def build_model(self, overrides: Mapping[str, Any] | None = None) -> L.LightningModule:
        """The model with the checkpoint's weights, in evaluation mode; ``overrides`` (e.g.
        :data:`INFERENCE`) replace recorded ``model.*`` keys that exist."""
        from omegaconf import OmegaConf

        run_cfg = OmegaConf.create({"model": self.checked_config("model"), "privacy": bool(self.get("privacy"))})
        return self._model(run_cfg, overrides).eval()

    def build_generator(self, sampling: Mapping[str, Any] | None = None) -> L.LightningModule:
        """The model of a task that generates images (a GAN, a diffusion model), rebuilt for
        generating alone (its task's ``generator_overrides``), in evaluation mode.

        Args:
            sampling: ``model.*`` values that change how it samples (a diffusion model's
                ``sampler``, ``sample_steps``, ``guidance_scale``); each must be a key of the
                recorded model config.

        Raises:
            MedexpError: naming the checkpoint when its task does not generate, or a sampling key
                its model does not take.
        """
        overrides = getattr(self.task_class, "generator_overrides", None)
        name = self.model_target.rsplit(".", 1)[-1] or "non-medexp"
        if overrides is None:
            raise MedexpError(
                f"{self.where}: a {name} checkpoint; expected a GAN's (model=gan) or a diffusion model's (model=ddpm)"
            )
        recorded = self.get("model") or {}
        for key, value in (sampling or {}).items():
            if key not in recorded:
                raise MedexpError(f"{key}={value!r}: the {name} of {self.where} does not take it (model=ddpm does)")
        return self.build_model({**overrides, **(sampling or {})})

    def build(
        self,
        data_overrides: Mapping[str, Any] | None = None,
        data_output_dir: str | None = None,
        model_overrides: Mapping[str, Any] | None = None,
    ) -> tuple[L.LightningDataModule, L.LightningModule]:
        """The data module and the model (with the checkpoint's weights) of the stored config.

        Args:
            data_overrides: non-null values replace the recorded ``data.*`` (e.g. ``root`` or
                ``manifest`` when the data moved since training).
            data_output_dir: where the data module writes (e.g. ``splits.csv``): the new run's
                directory, or None for nowhere, never the training run's.
            model_overrides: values replacing recorded ``model.*`` keys that exist (e.g.
                :data:`INFERENCE`).

        Raises:
            MedexpError: for a data override the checkpoint's data module does not take, or
                anything :meth:`checked_config` refuses.
        """
        from omegaconf import OmegaConf

        from medexp.utils.config import build

        run_cfg = OmegaConf.create(self.checked_config())
        for key, value in (data_overrides or {}).items():
            if value is None:
                continue
            if key not in run_cfg.data:
                raise MedexpError(
                    f"data.{key}={value!r} does not apply: the checkpoint's data ({run_cfg.data._target_}) has no {key!r}"
                )
            run_cfg.data[key] = value
        if "output_dir" in run_cfg.data:
            run_cfg.data.output_dir = data_output_dir
        L.seed_everything(run_cfg.seed, workers=True)
        datamodule = build(run_cfg.data)
        return datamodule, self._model(run_cfg, model_overrides)

    def _model(self, run_cfg: Any, overrides: Mapping[str, Any] | None) -> L.LightningModule:
        from medexp.utils.config import build

        for key, value in (overrides or {}).items():
            if key in run_cfg.model:
                run_cfg.model[key] = value
        model = build(run_cfg.model)
        if run_cfg.get("privacy"):  # trained with DP-SGD: the net's layers as Opacus made them
            from medexp.privacy.dp import compatible_net

            model.net = compatible_net(model.net)
        model.load_state_dict(self.contents["state_dict"])
        return model

    def check_builds_like(self, config: Mapping[str, Any]) -> None:
        """Refuse this checkpoint for a run whose resolved ``config`` builds another model (task
        or net): resuming it, or testing it with ``train=false``, could not work.

        Raises:
            MedexpError: naming both targets.
        """
        theirs, ours = self.get("model", {}) or {}, config.get("model") or {}
        for key in ("_target_", "net._target_"):

            def target(node: Mapping[str, Any], key: str = key) -> Any:
                return (node.get("net") or {}).get("_target_") if key.startswith("net.") else node.get("_target_")

            if target(theirs) != target(ours):
                raise MedexpError(
                    f"{self.where} holds a model with model.{key}={target(theirs)}, but this run builds "
                    f"model.{key}={target(ours)}; resume with the model it was trained with (its run's overrides), "
                    "or start from scratch without ckpt_path"
                )


def load_checkpoint(path: str | Path, where: str | None = None) -> dict[str, Any]:
    """The contents of a medexp checkpoint, loaded on the CPU without unpickling code
    (``weights_only=True``), decrypted first when it was written encrypted (see
    :mod:`medexp.privacy.encryption`). Prefer :class:`Checkpoint`.

    Raises:
        MedexpError: as :class:`Checkpoint`.
    """
    from medexp.privacy.encryption import read_bytes

    path = Path(path).expanduser()
    where = where or f"ckpt_path={str(path)!r}"
    if not path.is_file():
        raise MedexpError(f"{where}: no such file")
    checkpoint = load_weights_only(read_bytes(path, what="checkpoint"), where)
    if not isinstance(checkpoint, dict) or CONFIG_KEY not in checkpoint:
        raise MedexpError(f"{where}: not a medexp checkpoint (no stored run config)")
    return checkpoint


def load_weights_only(data: bytes, where: str, expected: str = "a .ckpt file written by medexp train") -> Any:
    """``torch.load`` of ``data`` that unpickles no code (``weights_only=True``), on the CPU.

    Raises:
        MedexpError: in one line: a file holding pickled objects beyond tensors and plain
            containers is refused as unsafe (naming the first object torch refused); any other
            failure means the file is not a PyTorch checkpoint (truncated, another format).
    """
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses anyway
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message goes on to suggest weights_only=False: never the advice to give here
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:  # an opcode the safe unpickler does not know: text, another format
            raise MedexpError(f"{where}: not a PyTorch checkpoint (unreadable as one); expected {expected}") from None
        raise MedexpError(
            f"{where}: refused, it holds a pickled {found.group(1)}, which loading would run as code; medexp reads "
            "only tensors and plain values (weights_only). Export the weights from a trusted copy, or re-train"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for files of other formats
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise MedexpError(
            f"{where}: not a PyTorch checkpoint ({type(exc).__name__}: {detail}); expected {expected}"
        ) from None
