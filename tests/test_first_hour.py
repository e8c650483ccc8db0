"""A newcomer's first hour: what a first `medexp train` / `medexp explain` shows and accepts."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medexp.train import train
from tests.conftest import compose_config, run_cli

# a first run as a user types it: no progress bar, TensorBoard; everything else as configured
# (callbacks.rich_progress_bar included)
FIRST_RUN = ["debug=limit", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=tensorboard"]
# Lightning's lines that tell a medexp user nothing
NOISE = ["💡 Tip", "litlogger", "GPU available:", "TPU available:", "HPU available:", "Seed set to", "LOCAL_RANK:"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("first")
    proc = run_cli("train", *FIRST_RUN, "hydra.run.dir=run", cwd=cwd)
    return cwd / "run", proc


def test_progress_bar_off_needs_only_the_trainer_switch(first_run):
    run, proc = first_run
    assert json.loads((run / "metrics.json").read_text())["status"] == "complete"
    assert not re.search(r"^(Epoch \d|Validation|Testing) ", proc.stdout + proc.stderr, re.MULTILINE), "a bar was drawn"


def test_the_config_is_printed_as_a_tree_and_saved(first_run):
    run, proc = first_run
    branches = re.findall(r"^[├└]── (\S+)$", proc.stdout, re.MULTILINE)
    # the groups first, in the defaults list's order; then the other keys
    assert branches[:9] == [
        "data",
        "model",
        "optimizer",
        "scheduler",
        "callbacks",
        "logger",
        "trainer",
        "privacy",
        "paths",
    ]
    assert {"extras", "seed", "task_name"} <= set(branches)
    saved = (run / "config_tree.log").read_text()
    assert saved.startswith("CONFIG") and "medexp.data.synthetic.SyntheticDataModule" in saved
    assert re.search(r"seed\n.*12345", saved)


def test_no_library_noise_in_a_run(first_run):
    _, proc = first_run
    output = proc.stdout + proc.stderr
    assert [line for line in output.splitlines() if any(noise in line for noise in NOISE)] == []
    assert "run directory:" in output  # medexp's own lines remain


def test_tensorboard_hparams_hold_the_tested_metrics(first_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run, _ = first_run
    metrics = json.loads((run / "metrics.json").read_text())
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["optimizer.lr"].number_value == pytest.approx(1e-3)
    assert session.hparams["model._target_"].string_value.endswith("ClassificationTask")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    tags = {info.name.tag for info in experiment.metric_infos}
    assert {"final/val/auroc", "final/test/auroc", "final/test/loss"} <= tags
    for split in ("val", "test"):
        for name, value in metrics[split].items():
            assert events.Scalars(f"final/{name}")[-1].value == pytest.approx(value, rel=1e-6), name


def test_explain_defaults_to_the_test_split(first_run, tmp_path):
    run, _ = first_run
    ckpt = run / "checkpoints" / "best.ckpt"
    proc = run_cli("explain", f"ckpt_path={ckpt}", "method=gradcam", "output=cams", "limit=4", "steps=0", cwd=tmp_path)
    summary = json.loads((tmp_path / "cams" / "summary.json").read_text())
    assert summary["source"] == "split=test" and summary["images"] == 4
    with (tmp_path / "cams" / "saliency.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["image"] for row in rows] == ["test_0", "test_1", "test_2", "test_3"]
    assert all(row["label"] for row in rows) and all((tmp_path / "cams" / row["overlay"]).is_file() for row in rows)
    assert "explaining the checkpoint's test split" in proc.stdout


def test_print_config_false_prints_and_saves_no_tree(tmp_path, capsys):
    train(compose_config(["debug=fdr", "extras.print_config=false"], output_dir=tmp_path))
    assert "CONFIG" not in capsys.readouterr().out
    assert not (tmp_path / "config_tree.log").exists()


def test_only_rank_zero_prints_the_tree(tmp_path, capsys, monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from medexp.utils.config_tree import print_config_tree

    monkeypatch.setattr(rank_zero_only, "rank", 1)  # a DDP worker process
    print_config_tree({"data": {"name": "x"}, "seed": 1}, tmp_path)
    assert capsys.readouterr().out == "" and not (tmp_path / "config_tree.log").exists()


def test_filling_a_memory_cache_is_reported(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("0", "1"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for k in range(10):
            Image.fromarray(rng.integers(0, 255, size=(16, 16), dtype=np.uint8)).save(
                tmp_path / "data" / label / f"{k}.png"
            )
    proc = run_cli(
        "train",
        "data=files",
        "data.root=data",
        "data.task=binary",
        "data.num_classes=2",
        "data.cache=memory",
        "data.batch_size=4",
        "debug=fdr",
        "trainer.enable_progress_bar=false",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    splits = list(csv.DictReader((tmp_path / "run" / "splits.csv").open(newline="")))
    for split in ("train", "val", "test"):
        count = sum(row["split"] == split for row in splits)
        assert f"caching {count} {split} cases in memory" in proc.stdout
        assert re.search(rf"cached {count} {split} cases in \d+\.\d s", proc.stdout)


def test_tqdm_is_a_declared_dependency():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert any(re.match(r"tqdm\b", requirement) for requirement in pyproject["project"]["dependencies"])
