"""End to end through the installed `medexp` command, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import ENV, QUIET, medexp_main, run_cli
from tests.helpers import write_medmnist_npz

LIMIT = [*QUIET, "debug=limit"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`medexp train` with the default config; only the run directory and the console are changed."""
    cwd = tmp_path_factory.mktemp("default")
    run_cli("train", "hydra.run.dir=run", *QUIET, cwd=cwd)
    return cwd / "run"


def test_default_train_beats_chance(default_run):
    metrics = json.loads((default_run / "metrics.json").read_text())
    assert metrics["test"]["test/auroc"] > 0.85
    assert metrics["test"]["test/balanced_accuracy"] > 0.7
    assert metrics["monitor"] == "val/auroc"
    assert metrics["best_score"] == pytest.approx(metrics["fit"]["val/auroc_best"])
    # the test metrics are those of the best checkpoint, as are the recorded val metrics
    assert metrics["val"]["val/auroc"] == pytest.approx(metrics["best_score"], abs=1e-6)


def test_run_directory_holds_what_reproduces_it(default_run):
    config = yaml.safe_load((default_run / ".hydra" / "config.yaml").read_text())
    assert config["data"]["_target_"].endswith("SyntheticDataModule")
    assert (default_run / ".hydra" / "overrides.yaml").is_file()
    resolved = yaml.safe_load((default_run / "resolved_config.yaml").read_text())
    assert resolved["paths"]["output_dir"] == str(default_run.resolve())
    assert resolved["model"]["num_classes"] == resolved["data"]["num_classes"] == 2
    info = json.loads((default_run / "run_info.json").read_text())
    assert info["seed"] == config["seed"] == 12345
    assert {"torch", "lightning", "monai", "torchmetrics", "python"} <= set(info["versions"])
    assert "medexp" in info["git"]
    if info["git"]["medexp"] is not None:
        assert len(info["git"]["medexp"]["commit"]) == 40 and isinstance(info["git"]["medexp"]["dirty"], bool)
    assert info["command"][:3] == ["python", "-m", "medexp.train"]
    assert (default_run / "checkpoints" / "best.ckpt").is_file() and (
        default_run / "checkpoints" / "last.ckpt"
    ).is_file()
    header = (default_run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/auroc" in header and "train/loss" in header
    ckpt = torch.load(default_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["medexp_config"]["model"]["net"]["_target_"] == "medexp.nets.simple_cnn.SimpleCNN"


def test_eval_reproduces_the_train_time_test_metrics(default_run, tmp_path):
    medexp_main(
        "eval",
        f"ckpt_path={default_run / 'checkpoints' / 'best.ckpt'}",
        "splits=[val,test]",
        "hydra.run.dir=eval",
        "trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )
    recorded = json.loads((default_run / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for split in ("val", "test"):
        assert evaluated[split].keys() == recorded[split].keys()
        for name, value in recorded[split].items():
            assert evaluated[split][name] == pytest.approx(value, abs=1e-6), name


def test_python_m_entry_points(tmp_path):
    for module, args in (("medexp.train", ["debug=fdr", *QUIET[:2]]), ("medexp.eval", ["--help"])):
        proc = subprocess.run(
            [sys.executable, "-m", module, *args, "trainer.enable_progress_bar=false", "hydra.run.dir=run"],
            cwd=tmp_path,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]


def test_multirun_makes_one_run_directory_per_job(tmp_path):
    medexp_main("train", "-m", "optimizer.lr=1e-3,3e-4", *LIMIT, "hydra.sweep.dir=sweep", cwd=tmp_path)
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = [yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["optimizer"]["lr"] for job in jobs]
    assert lrs == [1e-3, 3e-4]
    for job in jobs:
        assert "test/auroc" in json.loads((job / "metrics.json").read_text())["test"]


def test_named_experiment_on_a_medmnist_file(tmp_path):
    write_medmnist_npz(tmp_path / "data" / "breastmnist.npz", {"train": 64, "val": 32, "test": 32}, num_classes=2)
    medexp_main(
        "train",
        "experiment=breastmnist_resnet18",
        "data.root=data",
        "trainer.max_epochs=2",
        "data.batch_size=32",
        *QUIET,
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    config = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())
    assert config["model"]["net"]["_target_"] == "monai.networks.nets.resnet18"
    assert config["scheduler"]["milestones"] == [1, 1]
    assert "test/auroc" in json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]


def test_the_resolved_config_prints_with_resolver_lists(tmp_path):
    """`--cfg job --resolve` shows the values resolvers compute, lists included (MedMNIST's
    flip axes), where OmegaConf could not store a resolver's plain list before."""
    write_medmnist_npz(tmp_path / "data" / "breastmnist.npz", {"train": 8, "val": 4, "test": 4}, num_classes=2)
    proc = run_cli("train", "data=medmnist", "data.root=data", "--cfg", "job", "--resolve", cwd=tmp_path)
    config = yaml.safe_load(proc.stdout)
    assert config["data"]["flip_axes"] == [1] and config["data"]["num_classes"] == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=resnet19"], ["Could not find 'model/resnet19'", "resnet18", "densenet121"]),
        (["data=medmnist", "data.name=brestmnist"], ["medexp: error:", "data.name='brestmnist'", "breastmnist"]),
        (["data=medmnist", "data.root=nowhere"], ["medexp: error:", "nowhere/breastmnist.npz", "data.download=true"]),
        (["model.monitor=val/acc"], ["medexp: error:", "model.monitor='val/acc'", "val/accuracy"]),
        (["trainer.max_epohcs=3"], ["Could not override 'trainer.max_epohcs'"]),
    ],
    ids=["unknown-model", "unknown-dataset", "missing-file", "unknown-monitor", "typo-in-key"],
)
def test_bad_input_gives_a_short_clear_error(tmp_path, args, expected):
    proc = medexp_main("train", *args, "hydra.run.dir=run", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_of_a_missing_checkpoint(tmp_path):
    proc = medexp_main("eval", "ckpt_path=missing.ckpt", "hydra.run.dir=run", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "medexp: error: ckpt_path='missing.ckpt': no such file" in proc.stderr


def test_unknown_command(tmp_path):
    proc = medexp_main("fit", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown command 'fit'" in proc.stderr


def test_help_lists_the_groups_and_options_hydra_lists(tmp_path):
    # `medexp <command> --help` reads the packaged YAML names instead of asking Hydra, which
    # rebuilds its config repository once per group; both must list the same groups and options
    ours = run_cli("train", "--help", "model=unet", cwd=tmp_path).stdout
    hydra = subprocess.run(
        [sys.executable, "-m", "medexp.train", "--help", "model=unet"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout

    def groups(text: str) -> str:
        return text.split("== Configuration groups ==")[1].split("== Config ==")[0].strip()

    def config(text: str) -> dict:
        return yaml.safe_load(
            text.split("Override anything in the config (foo.bar=value)")[1].split("Powered by Hydra")[0]
        )

    assert groups(ours) == groups(hydra) and "privacy: dp, none" in groups(ours)
    assert config(ours) == config(hydra) and config(ours)["model"]["net"]["_target_"] == "monai.networks.nets.UNet"
