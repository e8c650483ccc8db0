"""Every DataModule a config names follows the one base (medexp.data.base.DataModule)."""

from __future__ import annotations

import pytest
import yaml
from hydra.utils import get_class

from medexp.data.base import DataModule
from tests.conftest import REPO

# files without a _target_ extend another data config through their defaults list
CONFIGS = [yaml.safe_load(path.read_text()) for path in (REPO / "conf" / "data").glob("*.yaml")]
TARGETS = sorted({config["_target_"] for config in CONFIGS if "_target_" in config})


@pytest.mark.parametrize("target", TARGETS)
def test_every_configured_datamodule_follows_the_base(target):
    cls = get_class(target)
    assert issubclass(cls, DataModule)
    for method in ("predict_transform", "fingerprint"):
        assert getattr(cls, method) is not getattr(DataModule, method), f"{target} does not implement {method}"
