"""Hydra/OmegaConf glue: the config search path, custom resolvers, checks and instantiation.

Kept free of torch/lightning imports so composing a config stays fast.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medexp.utils.errors import MedexpError

# conf/ is installed as the package `medexp.conf` (see pyproject.toml), so this works from any cwd.
CONFIG_PATH = "pkg://medexp.conf"

# Metric names (after the stage prefix) for which lower is better; everything else is maximised.
_LOWER_IS_BETTER = ("loss", "mse", "mae", "hd95", "hausdorff", "ece", "error", "fid", "kid", "kl", "folding")


def metric_mode(metric: str) -> str:
    """``"min"`` if lower values of ``metric`` (e.g. ``val/loss``) are better, else ``"max"``."""
    name = metric.rsplit("/", 1)[-1].lower()
    return "min" if any(stem in name for stem in _LOWER_IS_BETTER) else "max"


def epoch_fraction(fraction: float, max_epochs: int) -> int:
    """The epoch at ``fraction`` of a run of ``max_epochs`` (scheduler milestones)."""
    return max(1, int(fraction * max_epochs))


def gpus_per_node(accelerator: str, devices: Any, local: bool = False) -> Any:
    """The GPUs a launcher asks for, per node, for a job of this trainer (``hydra/launcher``).

    ``trainer.devices`` when the trainer runs on GPUs, else none. ``accelerator=auto`` counts as a
    GPU only for ``local`` jobs on a machine that has one, as for a run started here; a cluster's
    jobs get GPUs when the trainer asks for them (``trainer=gpu``, ``trainer=ddp``).
    """
    if str(accelerator) in ("gpu", "cuda"):
        return devices
    if str(accelerator) == "auto" and local:
        import torch

        return devices if torch.cuda.is_available() else None
    return None


def span(value_range: Any) -> float:
    """The width ``high - low`` of an intensity range ``[low, high]`` (``data.intensity_range``)."""
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"intensity range {list(value_range)}; expected [low, high] with high > low")
    return high - low


def plus_if(base: int, flag: bool, extra: int) -> int:
    """``base + extra`` when ``flag`` is true, else ``base`` (e.g. a GAN's input width with a
    one-hot class code appended when it is conditional)."""
    return int(base) + (int(extra) if flag else 0)


def floordiv(a: int, b: int) -> int:
    """``a // b`` for shapes derived from sizes (e.g. a generator's starting resolution)."""
    return int(a) // int(b)


def patch_for(size: Any) -> int:
    """A vision transformer's default patch side for images of ``size`` (an int or one per axis):
    about 7x7 to 14x14 tokens, i.e. 4 px up to 64 px, 8 px up to 128 px, 16 px above, halved
    until it divides every side (1 at worst)."""
    sides = [int(side) for side in size] if hasattr(size, "__len__") else [int(size)]
    largest = max(sides)
    patch = 4 if largest <= 64 else 8 if largest <= 128 else 16
    while patch > 1 and any(side % patch for side in sides):
        patch //= 2
    return patch


def members_for(budget: int, images: int, epochs: int | None, most: int) -> int:
    """How many networks an ensemble trained side by side (``model.ensemble``) can have within a
    budget of ``budget`` training image passes (members x epochs x training images), from 1 to
    ``most``: a small dataset gets several, a large one one. Epochs without an end (None or -1,
    a run bounded by ``trainer.max_time`` alone) get one network."""
    if epochs is None or int(epochs) <= 0:
        return 1
    return max(1, min(int(most), int(budget) // (int(images) * int(epochs))))


def epochs_for(budget: int, images: int, members: int, least: int) -> int:
    """How many epochs (``trainer.max_epochs``) fill a budget of ``budget`` training image passes
    (members x epochs x training images), and at least ``least``: a small dataset trains for
    longer, a large one for ``least`` epochs (``trainer.max_time`` still ends a run that is too
    slow)."""
    return max(int(least), int(budget) // (int(images) * int(members)))


def slice_axis(spatial_dims: int) -> int | None:
    """The axis of a ``(B, C, D, H, W)`` batch a slice-sequence model unrolls for volumes (the
    depth, 2); None for data whose samples already are sequences of 2D frames."""
    return 2 if int(spatial_dims) == 3 else None


def repeat(value: Any, times: int) -> list[Any]:
    """``[value] * times``, e.g. one size per spatial axis: ``${repeat:${data.image_size},${data.spatial_dims}}``."""
    return [value] * int(times)


def install_resolvers(resolvers: dict[str, Any]) -> None:
    """Register OmegaConf resolvers (idempotent); every command calls this (through
    :func:`medexp.resolvers.register_resolvers`) before Hydra composes its config, so it also has
    Hydra report a config file's YAML syntax error in one line
    (:func:`medexp.utils.errors.report_config_files_briefly`)."""
    from medexp.utils.errors import report_config_files_briefly

    report_config_files_briefly()
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, _containers_out(fn))


def _containers_out(fn: Any) -> Any:
    """``fn`` with list and dict results as OmegaConf containers: OmegaConf.resolve (Hydra's
    ``--cfg job --resolve``) cannot store a plain list a resolver returns."""

    @functools.wraps(fn)
    def resolver(*args: Any) -> Any:
        value = fn(*args)
        return OmegaConf.create(value) if isinstance(value, list | tuple | dict) else value

    return resolver


# the resolvers of the config glue; medexp.resolvers adds the data's (MedMNIST metadata)
RESOLVERS = {
    "epoch_fraction": epoch_fraction,
    "monitor_mode": metric_mode,
    "gpus_per_node": gpus_per_node,
    "span": span,
    "plus_if": plus_if,
    "floordiv": floordiv,
    "patch_for": patch_for,
    "members_for": members_for,
    "epochs_for": epochs_for,
    "slice_axis": slice_axis,
    "repeat": repeat,
}


def check_config(cfg: DictConfig) -> dict[str, Any]:
    """Report every missing ``???`` value at once and resolve all interpolations.

    Returns:
        The fully resolved config as plain containers (what a checkpoint stores).

    Raises:
        MedexpError: naming the missing keys, or the key whose value could not be resolved.
    """
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise MedexpError(
                f"missing required config value(s): {', '.join(missing)}; set them on the command line, "
                f"e.g. `{missing[0]}=...`"
            )
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        # OmegaConf wraps a resolver's own error (which already names the bad value) in
        # several layers; report the innermost one and the key being resolved.
        cause: BaseException = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        message = re.sub(r"^\w+ raised while resolving interpolation: ", "", str(cause).split("\n    full_key:")[0])
        key = getattr(exc, "full_key", None)
        raise MedexpError(f"{message} (while resolving {key})" if key else message) from exc


# Keys of a group that are settings of the whole group, not objects to build: the privacy
# switches of `logger` (logger.log_images, logger.hash_paths; see medexp.utils.privacy).
GROUP_SETTINGS = ("log_images", "hash_paths")


def build(node: Any) -> Any:
    """``instantiate(node)`` with plain containers, our own errors raised inside it unwrapped
    (Hydra wraps them in an ``InstantiationException`` that buries the message)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as exc:
        if isinstance(exc.__cause__, MedexpError):
            raise exc.__cause__ from None
        raise


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``name: {_target_: ...}`` group (callbacks, loggers).

    Entries set to null (e.g. ``callbacks.rich_progress_bar=null``) are skipped, so a user can
    switch one off from the command line; so are the group settings in ``GROUP_SETTINGS``.
    """
    from hydra.utils import instantiate

    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise MedexpError(f"expected a mapping of name -> {{_target_: ...}}, got {cfg!r}")
    objects = []
    for name, entry in cfg.items():
        if entry is None or name in GROUP_SETTINGS:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise MedexpError(f"config entry {name!r} has no _target_: {entry}")
        objects.append(instantiate(entry))
    return objects
