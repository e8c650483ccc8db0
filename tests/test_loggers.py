"""Each logger option writes its real files (wandb offline: no network, no account)."""

from __future__ import annotations

import csv
import json

import pytest

from medexp.train import train
from tests.conftest import QUIET, compose_config

FAST = [*QUIET, "debug=limit", "trainer.max_epochs=2", "trainer.log_every_n_steps=1"]


def test_csv_logger_writes_epoch_metrics(compose_cfg, tmp_path):
    train(compose_cfg(*FAST, "logger=csv"))
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    # both training epochs, then the best checkpoint validated once more after fit
    assert {row["epoch"] for row in rows if row.get("val/auroc")} == {"0", "1", "2"}
    assert any(row.get("test/auroc") for row in rows)
    assert "optimizer._target_" in (tmp_path / "csv" / "hparams.yaml").read_text()


def test_tensorboard_logger_writes_events(compose_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(compose_cfg(*FAST, "logger=tensorboard"))
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"val/auroc", "train/loss"} <= set(events.Tags()["scalars"])


def test_wandb_offline_writes_a_run(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(compose_cfg(*FAST, "logger=wandb"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb")), "the offline run has no data file"


def test_mlflow_logger_writes_a_local_store(compose_cfg, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    train(compose_cfg(*FAST, "logger=mlflow"))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'logs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medexp").experiment_id])
    assert "val/auroc" in run.data.metrics and run.data.params["data.task"] == "binary"


def test_many_loggers_at_once_and_a_resumed_run_continues_their_runs(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_SILENT", "true")
    train(compose_config([*FAST, "logger=many", "trainer.max_epochs=1"], output_dir=tmp_path))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    ids = json.loads((tmp_path / "run_info.json").read_text())["loggers"]
    assert set(ids) == {"wandb", "mlflow"}
    # resumed in the same run directory (what `medexp train ckpt_path=<run>/.../last.ckpt` does)
    last = tmp_path / "checkpoints" / "last.ckpt"
    train(compose_config([*FAST, "logger=many", f"ckpt_path={last}"], output_dir=tmp_path))
    assert json.loads((tmp_path / "run_info.json").read_text())["loggers"] == ids
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'logs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medexp").experiment_id])
    assert run.info.run_id == ids["mlflow"]
    epochs = {m.value for m in client.get_metric_history(run.info.run_id, "epoch")}
    assert {0, 1} <= epochs  # both parts logged into the one MLflow run
    # wandb: the resumed part is an offline run with the same id, synced into the same run
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id> (wandb appends -1 when both parts start in the same second)
    assert len(runs) == 2 and all(f"-{ids['wandb']}" in r.name for r in runs)
    epochs = {row["epoch"] for row in csv.DictReader((tmp_path / "csv" / "metrics.csv").open()) if row.get("val/auroc")}
    assert {"0", "1"} <= epochs  # the CSV log kept the epoch before the resume
