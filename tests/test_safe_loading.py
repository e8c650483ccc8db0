"""A checkpoint or run directory from someone else must not run code here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from medexp.eval import evaluate
from medexp.train import train
from medexp.utils.checkpoint import CONFIG_KEY, check_targets
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, run_cli

FAST = [*QUIET, "trainer.max_epochs=1", "data.image_size=16", "data.num_samples={train: 64, val: 32, test: 32}", "logger=csv"]


class Payload:
    """Unpickling this runs a shell command (the classic malicious pickle)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(compose_config(FAST, output_dir=out))
    return out


def _tampered(run: Path, tmp_path: Path, edit) -> Path:
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    edit(checkpoint[CONFIG_KEY])
    path = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(("key", "target"), [("model", "os.system"), ("data", "subprocess.run"), ("model.net", "builtins.eval"),
                                             ("model.net", "torch.hub.load")])
def test_eval_refuses_a_checkpoint_config_with_an_untrusted_target(run, tmp_path, key, target):
    def edit(config):
        node = config
        for part in key.split("."):
            node = node[part]
        node["_target_"] = target

    ckpt = _tampered(run, tmp_path, edit)
    with pytest.raises(MedexpError, match=rf"refusing to build the checkpoint's config: {key}\._target_={target} is outside"):
        evaluate(compose_config([f"ckpt_path={ckpt}"], "eval", output_dir=tmp_path / "eval"))


def test_a_target_anywhere_in_the_stored_config_counts_and_the_user_can_allow_a_prefix():
    config = {"callbacks": {"evil": {"_target_": "os.system", "command": "rm -rf ~"}}, "model": {"_target_": "medexp.tasks.x"}}
    with pytest.raises(MedexpError, match=r"callbacks\.evil\._target_=os\.system"):
        check_targets(config)
    check_targets(config, allowed=["os."])  # the user's own decision
    check_targets({"model": {"_target_": "mylab.models.Net"}}, allowed=["mylab."])
    with pytest.raises(MedexpError, match="mylabevil"):
        check_targets({"model": {"_target_": "mylabevil.Net"}}, allowed=["mylab."])


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, CONFIG_KEY: {}, "payload": Payload(marker)}, ckpt)
    proc = run_cli("eval", f"ckpt_path={ckpt}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "cannot load it safely" in proc.stderr
    assert not marker.exists()


def test_reproduce_refuses_a_run_directory_whose_config_names_an_untrusted_target(run, tmp_path):
    config_file = run / ".hydra" / "config.yaml"
    # the fixture's run was trained in-process: give it the .hydra/ a CLI run has, with a bad target
    config_file.parent.mkdir(exist_ok=True)
    config = yaml.safe_load((run / "resolved_config.yaml").read_text())
    config["model"]["net"]["_target_"] = "os.system"
    config_file.write_text(yaml.safe_dump(config))
    (run / ".hydra" / "overrides.yaml").write_text("[]\n")
    proc = run_cli("reproduce", str(run), "--output", str(tmp_path / "again"), cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "refusing to build the config recorded in" in proc.stderr and "model.net._target_=os.system" in proc.stderr
    assert not (tmp_path / "again").exists()
