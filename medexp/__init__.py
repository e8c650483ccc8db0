"""medexp: Hydra-composed PyTorch Lightning experiments for deep learning on medical images.

From Python (see :mod:`medexp.api`)::

    import medexp
    run = medexp.train(["model=resnet18"])                 # metrics.json's contents and run_dir
    medexp.evaluate(run["best_checkpoint"])
    medexp.load(run["best_checkpoint"]).predict("scan.png")

Importing medexp imports nothing heavy: the API loads torch, Lightning and the rest when called.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_API = ("train", "evaluate", "load")
__all__ = ["__version__", *_API]


class _Package(types.ModuleType):
    """The ``medexp`` package. ``medexp.train`` is also the module of ``medexp train``
    (:mod:`medexp.train`); whenever that module is imported (and so bound here), it becomes
    callable as :func:`medexp.api.train`, and stays the module for everything else
    (``from medexp.train import ...``, ``python -m medexp.train``, patching)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            value.__class__ = _CallableCommand
        super().__setattr__(name, value)


class _CallableCommand(types.ModuleType):
    """A command module that is also its API function (see :class:`_Package`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(_api(), self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


def _api() -> types.ModuleType:
    # imported by name, not by an import statement: the package itself sits below every layer of
    # medexp (pyproject.toml, [tool.importlinter]), the API above the commands it calls
    return importlib.import_module("medexp.api")


def __getattr__(name: str) -> Any:
    if name == "train":
        return importlib.import_module("medexp.train")  # bound as a callable command (_Package)
    if name in _API:
        return getattr(_api(), name)
    raise AttributeError(f"module 'medexp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


sys.modules[__name__].__class__ = _Package
