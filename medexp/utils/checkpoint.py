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


# Packages whose classes a stored config may name as `_target_`. A config from a checkpoint or
# run directory is data from whoever wrote it: `_target_: os.system` would run their command.
TRUSTED_TARGETS = ("torch.", "lightning.", "monai.", "torchmetrics.", "medexp.", "hydra_plugins.medexp.", "optuna.")
# ...except the parts of those that load or run code from elsewhere
UNTRUSTED_TARGETS = ("torch.hub.", "torch.package.", "torch.utils.cpp_extension.", "torch.load", "torch.jit.load", "monai.bundle.")


def check_targets(config: Any, allowed: Sequence[str] = (), where: str = "the stored config") -> None:
    """Refuse a stored config that names a ``_target_`` outside :data:`TRUSTED_TARGETS` and
    ``allowed`` (prefixes the user trusts, from their own config or command line).

    Raises:
        MedexpError: naming every refused target and its key.
    """
    trusted = (*TRUSTED_TARGETS, *allowed)
    refused = []

    def visit(node: Any, key: str) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if target is not None and (
                not str(target).startswith(trusted) or str(target).startswith(UNTRUSTED_TARGETS)
            ):
                refused.append(f"{key + '.' if key else ''}_target_={target}")
            for name, value in node.items():
                visit(value, f"{key}.{name}" if key else str(name))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                visit(value, f"{key}.{index}")

    visit(config, "")
    if refused:
        raise MedexpError(
            f"refusing to build {where}: {', '.join(refused)} is outside the trusted packages "
            f"({', '.join(p.rstrip('.') for p in TRUSTED_TARGETS)}); if you trust its author, allow it with "
            f"allowed_targets=[<prefix>] (medexp reproduce: --allow-target <prefix>)"
        )


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
        allowed_targets: ``_target_`` prefixes trusted besides :data:`TRUSTED_TARGETS`.

    Raises:
        MedexpError: for a data override the checkpoint's data module does not take, or a
            ``_target_`` that is not trusted (see :func:`check_targets`).
    """
    check_targets(checkpoint[CONFIG_KEY], allowed_targets, where="the checkpoint's config")
    from omegaconf import OmegaConf

    run_cfg = OmegaConf.create(checkpoint[CONFIG_KEY])
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
    from hydra.utils import get_class

    try:
        return get_class(str(run_cfg.get("model", {}).get("_target_", "")))
    except Exception:  # noqa: BLE001 - any import problem is rebuild()'s to report
        return None


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
    check_targets(checkpoint[CONFIG_KEY], cfg.allowed_targets, where="the checkpoint's config")
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
    check_targets(checkpoint[CONFIG_KEY].get("model", {}), allowed_targets, where="the checkpoint's model config")
    from omegaconf import OmegaConf

    return _model_of(OmegaConf.create(checkpoint[CONFIG_KEY]), checkpoint, model_overrides).eval()


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
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise MedexpError(f"ckpt_path={str(path)!r}: cannot load it safely ({type(exc).__name__}: {exc})") from exc
    if not isinstance(checkpoint, dict) or CONFIG_KEY not in checkpoint:
        raise MedexpError(f"ckpt_path={str(path)!r}: not a medexp checkpoint (no stored run config)")
    return checkpoint
