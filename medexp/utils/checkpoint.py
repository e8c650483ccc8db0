"""The run config stored inside every checkpoint, and safe loading of checkpoints."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch

from medexp.utils.config import build
from medexp.utils.errors import MedexpError

CONFIG_KEY = "medexp_config"


class StoreConfig(L.Callback):
    """Write the resolved run config into each checkpoint, so ``medexp eval`` needs no config tree."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config


def check_targets(config: Any, allowed: Sequence[str] = (), where: str = "the stored config") -> None:
    """Refuse a stored config that would build anything medexp does not build itself (see
    :mod:`medexp.checkpoints.allowlist`); ``allowed``: exact dotted names the user trusts.

    Raises:
        MedexpError: naming every refused key and its target.
    """
    from medexp.checkpoints.allowlist import check_targets as check

    check(config, allowed, where)


def safe_run_config(checkpoint: dict[str, Any], allowed: Sequence[str] = (), part: str | None = None) -> dict[str, Any]:
    """The checkpoint's stored run config (or its ``part``, e.g. ``model``), checked and with
    every argument that would fetch other weights made inert: what a rebuild instantiates.

    Raises:
        MedexpError: for interpolations (a checkpoint stores its config resolved) or a
            ``_target_`` that is not allowed (see :mod:`medexp.checkpoints.allowlist`).
    """
    from medexp.checkpoints.allowlist import FETCHING_WHEN_REBUILT, make_inert, refuse_interpolations

    config = checkpoint[CONFIG_KEY]
    where = "the checkpoint's config"
    if part is not None:
        config, where = config.get(part) or {}, f"the checkpoint's {part} config"
    if not isinstance(config, dict):
        raise MedexpError(f"refusing to build {where}: expected a mapping, found {type(config).__name__}")
    named = config if part is None else {part: config}  # keys named from the root: model.net._target_
    refuse_interpolations(named, where)
    check_targets(named, allowed, where=where)
    return make_inert(config, FETCHING_WHEN_REBUILT)


def rebuild(
    checkpoint: dict[str, Any],
    data_overrides: dict[str, Any],
    data_output_dir: str | None,
    model_overrides: dict[str, Any] | None = None,
    allowed_targets: Sequence[str] = (),
) -> tuple[L.LightningDataModule, L.LightningModule]:
    """Data module and model (with the checkpoint's weights) from the run config it stores.

    Args:
        checkpoint: as returned by :func:`load_checkpoint`.
        data_overrides: non-null values replace the recorded ``data.*`` (e.g. ``root`` or
            ``manifest`` when the data moved since training).
        data_output_dir: where the data module writes (e.g. ``splits.csv``): the new run's
            directory, or None for nowhere, never the training run's.
        model_overrides: values replacing recorded ``model.*`` keys that exist.
        allowed_targets: exact ``_target_`` names trusted besides what medexp builds.

    Raises:
        MedexpError: for a data override the checkpoint's data module does not take, or a
            ``_target_`` that is not trusted (see :func:`check_targets`).
    """
    from omegaconf import OmegaConf

    run_cfg = OmegaConf.create(safe_run_config(checkpoint, allowed_targets))
    for key, value in data_overrides.items():
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
    return datamodule, _model_of(run_cfg, checkpoint, model_overrides)


def model_class(run_cfg: dict[str, Any]) -> type | None:
    """The LightningModule class a run config's ``model._target_`` names, without building it
    (e.g. to refuse a task early); None when it cannot be imported (:func:`rebuild` reports that)."""
    from medexp.checkpoints.allowlist import resolve

    try:  # imports only the packages medexp uses: importing a module runs its code
        found = resolve(str(run_cfg.get("model", {}).get("_target_", "")))
    except Exception:  # noqa: BLE001 - any import problem is rebuild()'s to report
        return None
    return found if isinstance(found, type) else None


def rebuild_for_inference(cfg: Any, refuse: Callable[[dict[str, Any]], None]) -> tuple[Path, dict[str, Any], Any, Any]:
    """What commands that turn a checkpoint into something else (export, compress) start with:
    load ``cfg.ckpt_path`` safely, check its config's targets against ``cfg.allowed_targets``,
    let ``refuse`` reject its model from the config alone (nothing built yet), then rebuild data
    module and model with ``cfg.data``'s overrides.

    Returns:
        The checkpoint's path and contents, the data module and the model. Loss class weights
        are left out: ``auto`` would count the training labels, and weights do not change outputs.
    """
    path = Path(cfg.ckpt_path).expanduser()
    checkpoint = load_checkpoint(path)
    safe_run_config(checkpoint, cfg.allowed_targets)
    refuse(checkpoint[CONFIG_KEY])
    datamodule, model = rebuild(
        checkpoint, cfg.data, data_output_dir=None, model_overrides={"class_weights": None},
        allowed_targets=cfg.allowed_targets,
    )
    return path, checkpoint, datamodule, model


def rebuild_model(
    checkpoint: dict[str, Any], model_overrides: dict[str, Any] | None = None, allowed_targets: Sequence[str] = ()
) -> L.LightningModule:
    """The model alone, with the checkpoint's weights, in evaluation mode (see :func:`rebuild`)."""
    from omegaconf import OmegaConf

    model = safe_run_config(checkpoint, allowed_targets, part="model")
    privacy = checkpoint[CONFIG_KEY].get("privacy")
    run_cfg = OmegaConf.create({"model": model, "privacy": bool(privacy)})
    return _model_of(run_cfg, checkpoint, model_overrides).eval()


def _model_of(run_cfg: Any, checkpoint: dict[str, Any], overrides: dict[str, Any] | None) -> L.LightningModule:
    for key, value in (overrides or {}).items():
        if key in run_cfg.model:
            run_cfg.model[key] = value
    model = build(run_cfg.model)
    if run_cfg.get("privacy"):  # trained with DP-SGD: the net's layers as Opacus made them
        from medexp.privacy.dp import compatible_net

        model.net = compatible_net(model.net)
    model.load_state_dict(checkpoint["state_dict"])
    return model


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a medexp checkpoint on the CPU without unpickling code (``weights_only=True``),
    decrypted first when it was written encrypted (see :mod:`medexp.privacy.encryption`).

    Raises:
        MedexpError: when the file is missing, is not a loadable checkpoint, holds no run config,
            or is encrypted and the key variable its header names is unset or holds another key.
    """
    from medexp.privacy.encryption import read_bytes

    path = Path(path).expanduser()
    if not path.is_file():
        raise MedexpError(f"ckpt_path={str(path)!r}: no such file")
    data = read_bytes(path, what="checkpoint")
    checkpoint = load_weights_only(data, f"ckpt_path={str(path)!r}")
    if not isinstance(checkpoint, dict) or CONFIG_KEY not in checkpoint:
        raise MedexpError(f"ckpt_path={str(path)!r}: not a medexp checkpoint (no stored run config)")
    return checkpoint


def load_weights_only(data: bytes, where: str) -> Any:
    """``torch.load`` of ``data`` that unpickles no code (``weights_only=True``), on the CPU.

    Raises:
        MedexpError: in one line: a file holding pickled objects beyond tensors and plain
            containers is refused as unsafe (naming the first object torch refused); any other
            failure means the file is not a PyTorch checkpoint (truncated, another format).
    """
    import pickle
    import re
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses anyway
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message goes on to suggest weights_only=False: never the advice to give here
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:  # an opcode the safe unpickler does not know: text, another format
            raise MedexpError(
                f"{where}: not a PyTorch checkpoint (unreadable as one); expected a .ckpt file written by medexp train"
            ) from None
        raise MedexpError(
            f"{where}: refused, it holds a pickled {found.group(1)}, which loading would run as code; medexp reads "
            "only tensors and plain values (weights_only). Export the weights from a trusted copy, or re-train"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for files of other formats
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise MedexpError(
            f"{where}: not a PyTorch checkpoint ({type(exc).__name__}: {detail}); expected a .ckpt file written by "
            "medexp train"
        ) from None


def check_checkpoint_for(config: dict[str, Any]) -> None:
    """Check that ``config["ckpt_path"]`` (resumed, or tested with ``train=false``) loads safely
    and holds the model this run builds: same task and net, before data or model are built.

    Raises:
        MedexpError: for a missing, damaged, unsafe or foreign file, naming ``ckpt_path``.
    """
    path = config["ckpt_path"]
    stored = load_checkpoint(path)[CONFIG_KEY]
    theirs, ours = stored.get("model") or {}, config.get("model") or {}
    for key in ("_target_", "net._target_"):
        get = lambda node: (node.get("net") or {}).get("_target_") if key.startswith("net.") else node.get("_target_")  # noqa: E731
        if get(theirs) != get(ours):
            raise MedexpError(
                f"ckpt_path={str(path)!r} holds a model with model.{key}={get(theirs)}, but this run builds "
                f"model.{key}={get(ours)}; resume with the model it was trained with (its run's overrides), or start "
                "from scratch without ckpt_path"
            )
