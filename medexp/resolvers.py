"""All of medexp's OmegaConf resolvers: the config glue's (:data:`medexp.utils.config.RESOLVERS`)
and the data's (``${medmnist:name,field}``, from the MedMNIST metadata). Every command registers
them before Hydra composes its config."""

from __future__ import annotations

from medexp.data.medmnist_info import medmnist_property
from medexp.utils.config import RESOLVERS, install_resolvers


def register_resolvers() -> None:
    """Register every resolver medexp's configs use (idempotent)."""
    install_resolvers({**RESOLVERS, "medmnist": medmnist_property})
