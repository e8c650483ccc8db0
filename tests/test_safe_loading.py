"""A checkpoint or run directory from someone else must not run code here.

Every command that reads a stored config or a checkpoint is tried with the same payloads: a
pickle that runs a command when loaded, and a stored config whose ``_target_``s would load a
pickle (``torch.serialization.load`` with ``weights_only: false``), write a file
(``torch.save``) or run a command under other module paths (``torch.os.system``,
``monai.utils.module.os.system``). Each must be refused in one line, with nothing executed or
written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medexp.checkpoints.allowlist import FETCHING_WHEN_REBUILT, check_targets, make_inert
from medexp.checkpoints.checkpoint import CONFIG_KEY
from medexp.train import train
from medexp.utils.errors import MedexpError
from tests.conftest import QUIET, compose_config, medexp_main, run_cli

FAST = [
    *QUIET,
    "trainer.max_epochs=1",
    "data.image_size=16",
    "data.num_samples={train: 64, val: 32, test: 32}",
    "logger=csv",
]


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


class Attack:
    """The files of one attack and the traces it would leave if it worked."""

    def __init__(self, root: Path, run: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.markers = [root / "pickle_ran", root / "system_ran", root / "monai_system_ran", root / "written.pt"]
        self.evil_pickle = root / "evil.pkl"
        torch.save({"payload": Payload(self.markers[0])}, self.evil_pickle)
        checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
        self.good = checkpoint

    def tampered(self, edit) -> Path:
        import copy

        checkpoint = copy.deepcopy(self.good)
        edit(checkpoint[CONFIG_KEY])
        path = self.root / "tampered.ckpt"
        torch.save(checkpoint, path)
        return path

    def targets(self) -> Path:
        """A checkpoint whose stored config names all four code-running targets."""

        def edit(config):
            config["model"]["net"] = {
                "_target_": "torch.serialization.load",
                "f": str(self.evil_pickle),
                "weights_only": False,
            }
            config["model"]["extra"] = {"_target_": "torch.save", "obj": [1], "f": str(self.markers[3])}
            config["data"]["extra"] = {"_target_": "torch.os.system", "command": f"touch {self.markers[1]}"}
            config["callbacks"] = {
                "evil": {"_target_": "monai.utils.module.os.system", "command": f"touch {self.markers[2]}"}
            }

        return self.tampered(edit)

    def pickle(self) -> Path:
        """A file whose unpickling runs a command."""
        path = self.root / "evil.ckpt"
        torch.save({"state_dict": {}, CONFIG_KEY: {}, "payload": Payload(self.markers[0])}, path)
        return path

    def interpolation(self) -> Path:
        """A stored config whose resolver would build a ``_target_`` after any check of the keys."""

        def edit(config):
            config["model"]["net"]["extra"] = (
                "${oc.create:{_target_: torch.os.system, command: 'touch " + str(self.markers[1]) + "'}}"
            )

        return self.tampered(edit)

    def harmless(self) -> bool:
        return not any(marker.exists() for marker in self.markers)


def command_line(command: str, ckpt: Path, tmp: Path) -> list[str]:
    """``medexp <command>`` on ``ckpt`` with the options it needs (a PNG to predict on, outputs)."""
    out = f"hydra.run.dir={tmp / command.split()[0]}"
    match command:
        case "eval":
            return ["eval", f"ckpt_path={ckpt}", out]
        case "predict":
            image = tmp / "case.png"
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)).save(image)
            return ["predict", f"ckpt_path={ckpt}", f"input={image}", f"output={tmp / 'pred'}", out]
        case "export":
            return ["export", f"ckpt_path={ckpt}", f"output={tmp / 'deploy'}", out]
        case "explain":
            return ["explain", f"ckpt_path={ckpt}", "split=test", f"output={tmp / 'cams'}", out]
        case "compress":
            return ["compress", f"ckpt_path={ckpt}", "method=dynamic", out]
        case "sample":
            return ["sample", f"ckpt_path={ckpt}", "n=4", f"output={tmp / 'samples'}", out]
        case "reproduce":
            return ["reproduce", str(ckpt), "--output", str(tmp / "again")]
        case "train (resume)":
            return ["train", f"ckpt_path={ckpt}", *FAST, out]
        case "train (distillation teacher)":
            return ["train", "model=distill", f"model.teacher_ckpt={ckpt}", *FAST, out]
    raise AssertionError(command)


COMMANDS = [
    "eval",
    "predict",
    "export",
    "explain",
    "compress",
    "sample",
    "reproduce",
    "train (resume)",
    "train (distillation teacher)",
]


def one_line_refusal(proc, *needles: str) -> str:
    """The ``medexp: error:`` report (a line, or a header and its ``  - `` items), checked."""
    lines = proc.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("medexp: error:")]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(starts) == 1, proc.stderr[-3000:]
    report = "\n".join([lines[starts[0]], *(line for line in lines[starts[0] + 1 :] if line.startswith("  - "))])
    for needle in needles:
        assert needle in report, report
    return report


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_pickle_that_runs_code(run, tmp_path, command):
    attack = Attack(tmp_path / "attack", run)
    proc = medexp_main(*command_line(command, attack.pickle(), tmp_path), cwd=tmp_path, check=False)
    line = one_line_refusal(proc, "refused, it holds a pickled posix.system")
    assert "weights_only=False" not in proc.stderr and "weights_only` set to `False" not in proc.stderr, line
    assert attack.harmless()


# what each command says when the stored config names code: the commands that rebuild the
# model check every target; sample and train first find the model is not what they take
REFUSALS = {
    "sample": ["expected a GAN's"],
    "train (resume)": ["holds a model with model.net._target_=torch.serialization.load"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_stored_config_that_names_code(run, tmp_path, command):
    attack = Attack(tmp_path / "attack", run)
    proc = medexp_main(*command_line(command, attack.targets(), tmp_path), cwd=tmp_path, check=False)
    named = [
        "model.net._target_=torch.serialization.load",
        "model.extra._target_=torch.save",
        "torch.os.system (that is posix.system)",
        "monai.utils.module.os.system (that is posix.system)",
    ]
    if command in ("sample", "train (resume)", "train (distillation teacher)"):
        named = REFUSALS.get(command, named[:2])  # the teacher's model config alone is built
    one_line_refusal(proc, *named)
    assert attack.harmless()
    assert not (tmp_path / "again").exists() and not (tmp_path / "deploy").exists()


@pytest.mark.parametrize("command", ["eval", "reproduce"])
def test_interpolations_in_a_stored_config_are_refused(run, tmp_path, command):
    attack = Attack(tmp_path / "attack", run)
    proc = medexp_main(*command_line(command, attack.interpolation(), tmp_path), cwd=tmp_path, check=False)
    one_line_refusal(proc, "model.net.extra=", "is an interpolation")
    assert attack.harmless()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["model"]["net"].update(_target_="os.system"), "model.net._target_=os.system"),
        (lambda c: c.update(hydra={"callbacks": {"x": {"_target_": "os.system"}}}), "it sets 'hydra'"),
        (lambda c: c["model"].update(extra="${oc.env:HOME}"), "calls the resolver 'oc.env'"),
        (
            lambda c: c["model"].update(extra="${repeat:{_target_: os.system},1}"),
            "passes a mapping or list to a resolver",
        ),
    ],
    ids=["target", "hydra-settings", "environment-resolver", "resolver-building-a-node"],
)
def test_reproduce_refuses_a_run_directory_that_names_code(run, tmp_path, edit, message):
    config_file = run / ".hydra" / "config.yaml"
    # the fixture's run was trained in-process: give it the .hydra/ a CLI run has, with a bad config
    config_file.parent.mkdir(exist_ok=True)
    config = yaml.safe_load((run / "resolved_config.yaml").read_text())
    edit(config)
    config_file.write_text(yaml.safe_dump(config))
    (run / ".hydra" / "overrides.yaml").write_text("[]\n")
    proc = medexp_main("reproduce", str(run), "--output", str(tmp_path / "again"), cwd=tmp_path, check=False)
    one_line_refusal(proc, f"refusing to build the config recorded in {run}", message)
    assert not (tmp_path / "again").exists()


def test_a_reproduction_checks_what_the_interpolations_resolved_to(run, tmp_path, monkeypatch):
    """Train's own check of a recorded config, resolved (reproduce sets it for the training run)."""
    from medexp.checkpoints.allowlist import RECORDED_CONFIG_ENV

    monkeypatch.setenv(RECORDED_CONFIG_ENV, "[]")
    cfg = compose_config([*FAST, "+callbacks.evil={_target_: torch.os.system, command: 'true'}"], output_dir=tmp_path)
    with pytest.raises(
        MedexpError, match=r"the recorded config \(resolved\): callbacks\.evil\._target_=torch\.os\.system"
    ):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("ckpt", "message"),
    [
        ("missing.ckpt", "no such file"),
        ("notes.ckpt", "not a PyTorch checkpoint"),
        ("empty.ckpt", "not a PyTorch checkpoint"),
        ("segmentation", "holds a model with model._target_=medexp.tasks.segmentation.SegmentationTask"),
    ],
    ids=["missing", "text", "empty", "another-task"],
)
def test_train_refuses_a_bad_ckpt_path_before_building_anything(run, tmp_path, ckpt, message):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    if ckpt == "segmentation":
        checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
        checkpoint[CONFIG_KEY]["model"]["_target_"] = "medexp.tasks.segmentation.SegmentationTask"
        torch.save(checkpoint, tmp_path / "segmentation")
    proc = medexp_main(
        "train", f"ckpt_path={tmp_path / ckpt}", *FAST, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False
    )
    one_line_refusal(proc, f"ckpt_path='{tmp_path / ckpt}'", message)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_allowlist_holds_resolved_objects_and_the_user_names_exact_ones():
    config = {
        "callbacks": {"evil": {"_target_": "os.system", "command": "rm -rf ~"}},
        "model": {"_target_": "medexp.tasks.classification.ClassificationTask"},
    }
    with pytest.raises(MedexpError, match=r"callbacks\.evil\._target_=os\.system"):
        check_targets(config)
    check_targets(config, ["os.system"])  # the user's own decision, by exact name
    with pytest.raises(MedexpError, match="os.popen"):  # not a prefix: os.system trusts os.system alone
        check_targets({"x": {"_target_": "os.popen"}}, ["os.system"])
    with pytest.raises(MedexpError, match=r"allowed_targets: 'mylab\.Net'"):
        check_targets(config, ["mylab.Net"])
    # a network added in one YAML file, and the other families medexp builds, need no allowance
    for target in [
        "monai.networks.nets.EfficientNetBN",
        "torch.optim.RMSprop",
        "torch.optim.lr_scheduler.OneCycleLR",
        "monai.losses.FocalLoss",
        "monai.transforms.RandZoomd",
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "lightning.pytorch.strategies.DDPStrategy",
    ]:
        check_targets({"x": {"_target_": target}})
    # ...but not the MONAI transforms that read, write or call what they are given
    for target in ["monai.transforms.LoadImage", "monai.transforms.SaveImaged", "monai.transforms.Lambdad"]:
        with pytest.raises(MedexpError, match=target):
            check_targets({"x": {"_target_": target}})


def test_a_package_medexp_does_not_use_is_never_imported_to_check_a_target():

    with pytest.raises(MedexpError, match="not in a package medexp uses"):
        check_targets({"x": {"_target_": "antigravity.fly"}})  # importing it opens a web browser
    assert "antigravity" not in sys.modules


def test_arguments_that_fetch_weights_are_made_inert_when_a_model_is_rebuilt():
    config = {
        "net": {"_target_": "monai.networks.nets.HoVerNet", "pretrained_url": "http://evil/x.pth", "pretrained": True},
        "teacher_ckpt": "/elsewhere/teacher.ckpt",
        "_target_": "medexp.tasks.distillation.DistillationTask",
        "data": {"_target_": "medexp.data.files.FileDataModule", "generated": {"ckpt": "/elsewhere/gan.ckpt"}},
        "note": {"pretrained": True},
    }
    inert = make_inert(config, FETCHING_WHEN_REBUILT)
    assert inert["net"] == {"_target_": "monai.networks.nets.HoVerNet", "pretrained_url": None, "pretrained": False}
    assert inert["teacher_ckpt"] is None and inert["data"]["generated"] is None
    assert inert["note"] == {"pretrained": True}  # only arguments of what is built


def test_the_console_script_in_its_own_process_refuses_both_attacks(run, tmp_path):
    """The same as above through a separate `medexp` process, as a user runs it."""
    attack = Attack(tmp_path / "attack", run)
    for ckpt, needle in [
        (attack.pickle(), "refused, it holds a pickled posix.system"),
        (attack.targets(), "torch.os.system (that is posix.system)"),
    ]:
        proc = run_cli("eval", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path, check=False)
        one_line_refusal(proc, needle)
    assert attack.harmless()
