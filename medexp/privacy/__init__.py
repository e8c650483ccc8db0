"""Privacy of the training data: differential privacy (:mod:`medexp.privacy.dp`, ``privacy=dp``)
and encryption at rest of checkpoints and cached files (:mod:`medexp.privacy.encryption`,
``encryption.key_env``). What loggers receive is :mod:`medexp.utils.privacy`'s concern.

Kept import-light: Opacus, Lightning and ``cryptography`` are imported only when used.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any


def _missing(package: str, setting: str) -> list[str]:
    if find_spec(package) is None:
        return [f"{setting} needs the package {package!r}, which is not installed: pip install 'medexp[privacy]'"]
    return []


def check_config(config: dict[str, Any]) -> list[str]:
    """Problems of a resolved train config's ``privacy`` and ``encryption`` settings (combinations
    that cannot work, packages missing), one message each; reported with
    :func:`medexp.utils.validation.validate_config`'s."""
    problems: list[str] = []
    if config.get("privacy"):
        from medexp.privacy.dp import check_config as check_dp

        problems += _missing("opacus", "privacy=dp") + check_dp(config)
    if (config.get("encryption") or {}).get("key_env") is not None:
        from medexp.privacy.encryption import check_config as check_encryption

        problems += _missing("cryptography", "encryption.key_env") + check_encryption(config)
    return problems
