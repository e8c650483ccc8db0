"""Each logger option writes its real files (wandb offline: no network, no account)."""

from __future__ import annotations

import csv

import pytest

from medexp.train import train
from tests.conftest import QUIET

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


def test_many_loggers_at_once(compose_cfg, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(compose_cfg(*FAST, "logger=many"))
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert (tmp_path / "logs" / "mlflow.db").is_file()
