"""What a stored config may build: an allowlist of resolved objects, and arguments made inert.

A config read from a checkpoint or a run directory is data from whoever wrote it. Hydra builds
whatever its ``_target_`` names, so ``_target_: torch.serialization.load`` would unpickle a file
of the author's choosing and ``_target_: torch.save`` would write one. Comparing the strings is
not enough: ``torch.os.system`` and ``monai.utils.module.os.system`` are ``os.system`` under
other names. So every ``_target_`` is resolved to the object it names, and that object must be
one medexp builds:

- an object named by a ``_target_`` in medexp's own config tree (``medexp.conf``: the nets,
  transforms, losses, optimisers, schedulers, loggers, callbacks, data modules and tasks it uses);
- a network or loss of the kinds those configs take, so a network added in one YAML file keeps
  working: an ``nn.Module`` class exported by ``torch.nn``, ``monai.networks.nets`` or
  ``monai.losses``; an optimiser of ``torch.optim``; a scheduler of ``torch.optim.lr_scheduler``;
  a callback, logger or strategy of ``lightning.pytorch``; a MONAI transform that neither reads, writes nor
  runs a function it is given (``monai.transforms`` outside ``io``, no ``Lambda``);
- a medexp class that is a module, data module, callback or logger;
- what the user names in ``allowed_targets`` (exact dotted names, resolved the same way).

Only modules of the packages medexp depends on are imported to resolve a name (importing a
module runs its code); any other name must already be imported, or is refused. Interpolations
(``${...}``) are refused in a checkpoint's config, which is stored resolved, since a resolver
such as ``oc.decode`` can make a ``_target_`` appear after this check. Arguments that fetch or
read weights from elsewhere (:data:`FETCHING`) are made inert: a checkpoint carries its weights.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

from medexp.utils.errors import MedexpError

# set for the training process of a reproduction (medexp reproduce): its config came from a
# recorded run, and this names the targets the user trusts besides medexp's (a JSON list)
RECORDED_CONFIG_ENV = "MEDEXP_RECORDED_CONFIG_TRUSTS"

# packages whose modules may be imported to resolve a stored `_target_`
IMPORTABLE = ("torch", "lightning", "monai", "torchmetrics", "medexp", "hydra_plugins", "optuna")

# namespaces whose exported classes of the given base class a stored config may build
FAMILIES: tuple[tuple[str, str], ...] = (
    ("torch.nn", "torch.nn.Module"),
    ("monai.networks.nets", "torch.nn.Module"),
    ("monai.losses", "torch.nn.Module"),
    ("torch.optim", "torch.optim.Optimizer"),
    ("torch.optim.lr_scheduler", "torch.optim.lr_scheduler.LRScheduler"),
    ("torch.optim.lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"),
    ("lightning.pytorch.callbacks", "lightning.pytorch.callbacks.Callback"),
    ("lightning.pytorch.loggers", "lightning.pytorch.loggers.Logger"),
    ("lightning.pytorch.strategies", "lightning.pytorch.strategies.Strategy"),
    ("monai.transforms", "monai.transforms.Transform"),
)
# base classes of medexp's own classes that a stored config may build
MEDEXP_BASES = (
    "torch.nn.Module",
    "lightning.pytorch.LightningDataModule",
    "lightning.pytorch.callbacks.Callback",
    "lightning.pytorch.loggers.Logger",
)
# MONAI transforms that read or write files or call a function they are given
_TRANSFORM_EXCLUDED_MODULES = ("monai.transforms.io",)
_TRANSFORM_EXCLUDED_NAMES = ("Lambda", "Save", "Write", "DataStats")

# arguments of built objects that fetch weights from a place the config names (HoVerNet's URL,
# Transchex's hub repository, TorchVisionFCModel's weights), set to what fetches nothing
FETCHING: dict[str, Any] = {"pretrained_url": None, "path_or_repo_id": None, "weights": None}
# ...and, when the weights come from the checkpoint itself, everything that loads other weights
# or checkpoints: pretrained downloads, a distillation teacher, a GAN's generated training data
# (training-only inputs: a rebuilt model predicts without them)
FETCHING_WHEN_REBUILT: dict[str, Any] = {
    **FETCHING,
    "pretrained": False,
    "pretrained_path": None,
    "teacher_ckpt": None,
    "generated": None,
    # a task's starting weights and fine-tuning controls: the checkpoint has the trained weights
    "init_weights": None,
    "freeze": None,
    "unfreeze_at_epoch": None,
    "pretrained_lr_scale": 1.0,
}


def walk_targets(config: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, target)`` for every ``_target_`` in ``config`` (dicts and lists), keys dotted."""
    if isinstance(config, dict):
        if "_target_" in config:
            yield key, config["_target_"]
        for name, value in config.items():
            yield from walk_targets(value, f"{key}.{name}" if key else str(name))
    elif isinstance(config, (list, tuple)):
        for index, value in enumerate(config):
            yield from walk_targets(value, f"{key}.{index}")


def _walk_strings(config: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(config, dict):
        for name, value in config.items():
            yield from _walk_strings(value, f"{key}.{name}" if key else str(name))
    elif isinstance(config, (list, tuple)):
        for index, value in enumerate(config):
            yield from _walk_strings(value, f"{key}.{index}")
    elif isinstance(config, str):
        yield key, config


def resolve(name: str, importable: Sequence[str] = IMPORTABLE) -> Any:
    """The object a dotted ``name`` stands for, importing only modules of ``importable`` packages.

    Raises:
        LookupError: when ``name`` does not resolve, or would need another package imported.
    """
    if not isinstance(name, str) or not name or any(not part.isidentifier() for part in name.split(".")):
        raise LookupError(f"{name!r} is not a dotted Python name")
    parts = name.split(".")
    obj = None
    for cut in range(len(parts), 0, -1):  # the longest prefix that is a module
        module_name = ".".join(parts[:cut])
        if module_name in sys.modules:
            obj = sys.modules[module_name]
        elif parts[0] in importable:
            try:
                obj = importlib.import_module(module_name)
            except ImportError:
                continue
        else:
            continue
        for attribute in parts[cut:]:
            try:
                obj = getattr(obj, attribute)
            except AttributeError:
                raise LookupError(f"{name!r} does not exist") from None
        return obj
    raise LookupError(f"{name!r} is not in a package medexp uses ({', '.join(IMPORTABLE)}); it was not imported")


def canonical_name(obj: Any) -> str:
    """``module.qualname`` of ``obj``: what a ``_target_`` really names (``torch.os.system`` is
    ``posix.system``)."""
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return f"{module}.{getattr(obj, '__qualname__', getattr(obj, '__name__', repr(obj)))}"


@lru_cache(maxsize=1)
def config_targets() -> frozenset[str]:
    """The ``_target_`` names in medexp's packaged config tree (Hydra's own ``hydra/`` group aside:
    launchers and sweepers are never read from a stored config)."""
    from importlib.resources import files

    import yaml

    names: set[str] = set()

    def visit(folder: Any, top: bool) -> None:
        for entry in folder.iterdir():
            if entry.is_dir() and not (top and entry.name == "hydra"):
                visit(entry, False)
            elif entry.name.endswith(".yaml"):
                data = yaml.safe_load(entry.read_text())
                names.update(str(target) for _, target in walk_targets(data))

    visit(files("medexp.conf"), True)
    return frozenset(names)


def _packaged(obj: Any) -> bool:
    """Whether a ``_target_`` of medexp's configs names ``obj`` (resolving only the same-named ones)."""
    name = getattr(obj, "__name__", None)
    for target in config_targets():
        if name is not None and target.rsplit(".", 1)[-1] != name:
            continue
        try:
            if resolve(target) is obj:
                return True
        except LookupError:
            continue
    return False


def _family(obj: Any) -> bool:
    """Whether ``obj`` is a class of :data:`FAMILIES` or :data:`MEDEXP_BASES`."""
    if not inspect.isclass(obj):
        return False
    module = getattr(obj, "__module__", "") or ""
    if module.startswith("medexp."):
        return any(issubclass(obj, base) for base in _bases(MEDEXP_BASES))
    for namespace, base_name in FAMILIES:
        if module.split(".")[0] != namespace.split(".")[0]:
            continue  # a class of another package is not exported by this namespace
        (base,) = _bases((base_name,))
        exported = vars(resolve(namespace)).get(obj.__name__) is obj
        if exported and issubclass(obj, base):
            if base_name == "monai.transforms.Transform":
                return not module.startswith(_TRANSFORM_EXCLUDED_MODULES) and not any(
                    word in obj.__name__ for word in _TRANSFORM_EXCLUDED_NAMES
                )
            return True
    return False


def _bases(names: Sequence[str]) -> list[type]:
    return [resolve(name) for name in names]


def allowed(obj: Any, extra: Sequence[Any] = ()) -> bool:
    """Whether a stored config may build ``obj`` (see the module docstring)."""
    return any(obj is other for other in extra) or _packaged(obj) or _family(obj)


def user_allowed(names: Sequence[str]) -> list[Any]:
    """The objects of ``allowed_targets`` (exact dotted names the user trusts).

    Raises:
        MedexpError: for a name that does not resolve, with the reason.
    """
    objects = []
    for name in names or ():
        try:
            objects.append(resolve(str(name), importable=(*IMPORTABLE, str(name).split(".")[0])))
        except LookupError as exc:
            raise MedexpError(f"allowed_targets: {exc}; expected exact dotted names such as mylab.nets.MyNet") from None
    return objects


def refuse_interpolations(config: Any, where: str) -> None:
    """Refuse ``${...}`` in a config stored resolved: a resolver could build what no check saw.

    Raises:
        MedexpError: naming the key.
    """
    found = [f"{key}={value!r}" for key, value in _walk_strings(config) if "${" in value]
    if found:
        raise MedexpError(
            f"refusing to build {where}: {', '.join(found[:3])} is an interpolation; a checkpoint stores its config "
            "resolved, so this one was edited"
        )


def check_targets(config: Any, allowed_targets: Sequence[str] = (), where: str = "the stored config") -> None:
    """Refuse ``config`` unless every ``_target_`` resolves to an object :func:`allowed` lets it build.

    Raises:
        MedexpError: naming every refused key, its target and what it resolves to.
    """
    extra = user_allowed(allowed_targets)
    refused = []
    for key, target in walk_targets(config):
        label = f"{key + '.' if key else ''}_target_={target}"
        try:
            obj = resolve(str(target))
        except LookupError as exc:
            refused.append(f"{label} ({exc})")
            continue
        if not allowed(obj, extra):
            real = canonical_name(obj)
            refused.append(label if real == str(target) else f"{label} (that is {real})")
    if refused:
        raise MedexpError(
            f"refusing to build {where}: {'; '.join(refused)} is not among what medexp builds (its nets, transforms, "
            "losses, optimisers, schedulers, loggers, callbacks, data modules and tasks); if you trust the config's "
            f"author, allow it by its exact name, e.g. allowed_targets=[{refused[0].split('=', 1)[1].split(' ')[0]}] "
            "(medexp reproduce: --allow-target NAME)"
        )


def make_inert(config: Any, replacements: dict[str, Any] = FETCHING) -> Any:
    """A copy of ``config`` with each built object's arguments in ``replacements`` replaced
    (only keys that are present, only in nodes with a ``_target_``)."""
    if isinstance(config, dict):
        copied = {key: make_inert(value, replacements) for key, value in config.items()}
        if "_target_" in copied:
            for key, value in replacements.items():
                if key in copied:
                    copied[key] = value
        return copied
    if isinstance(config, list):
        return [make_inert(value, replacements) for value in config]
    return config
