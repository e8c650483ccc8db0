"""`medexp train -m hparams_search=optuna`: medexp's Optuna sweeper and pruning, end to end."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hydra_plugins.medexp.optuna_sweeper import search_space
from hydra_plugins.medexp.storage import open_storage
from tests.conftest import QUIET, medexp_main, run_cli

TINY = [
    *QUIET,
    "data.image_size=16",
    "data.num_samples={train: 96, val: 48, test: 48}",
    "trainer.max_epochs=2",
    "logger=csv",
]


def _study(sweep_dir, storage=None):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the default storage: a journal file in the sweep directory
    return optuna.load_study(
        study_name="study", storage=open_storage(storage or f"journal:///{sweep_dir}/optuna.journal")
    )


def test_search_space_maps_hydra_sweep_syntax_to_optuna_distributions():
    parser = OverridesParser.create()
    space, fixed = search_space(
        parser.parse_overrides(
            [
                "optimizer.lr=tag(log, interval(1e-4, 1e-1))",
                "model.net.dropout=interval(0, 0.5)",
                "data.batch_size=choice(32, 64)",
                "optimizer=adam,sgd",
                "model.depth=range(1, 6, 2)",
                "model.width=tag(int, interval(8, 64))",
                "trainer.max_epochs=3",
            ]
        )
    )
    assert space == {
        "optimizer.lr": FloatDistribution(1e-4, 1e-1, log=True),
        "model.net.dropout": FloatDistribution(0.0, 0.5),
        "data.batch_size": CategoricalDistribution([32, 64]),
        "optimizer": CategoricalDistribution(["adam", "sgd"]),
        "model.depth": IntDistribution(1, 5, step=2),
        "model.width": IntDistribution(8, 64),
    }
    assert fixed == ["trainer.max_epochs=3"]
    with pytest.raises(ValueError, match="needs low < high"):
        search_space(parser.parse_overrides(["optimizer.lr=interval(0.1, 0.01)"]))


def test_an_optuna_sweep_resumes_its_study_when_run_again(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "train",
        "-m",
        "hparams_search=optuna",
        *TINY,
        f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.study_name=study",
        # the default space replaced by one parameter given on the command line
        "hydra.sweeper.params=null",
        "optimizer.lr=tag(log, interval(1e-4, 1e-1))",
    ]
    medexp_main(*args, "hydra.sweeper.n_trials=2", cwd=tmp_path)
    first = [t.params for t in _study(sweep).trials]
    assert len(first) == 2 and all(set(p) == {"optimizer.lr"} for p in first)
    # the same command with more trials continues the study: 1 more trial, in a new job directory
    medexp_main(*args, "hydra.sweeper.n_trials=3", cwd=tmp_path)
    trials = _study(sweep).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert [t.params for t in trials[:2]] == first and trials[2].params not in first  # no replayed draws
    for trial in trials:
        job = sweep / str(trial.number)
        metrics = json.loads((job / "metrics.json").read_text())
        # each job trained with its trial's value, and Optuna got the job's objective
        assert (
            yaml.safe_load((job / "resolved_config.yaml").read_text())["optimizer"]["lr"]
            == trial.params["optimizer.lr"]
        )
        assert trial.value == metrics["fit"]["val/auroc_best"]
        assert list(trial.intermediate_values) == [0, 1]  # reported each epoch for pruning
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = max(trials, key=lambda t: t.value)
    assert results["best_trial"] == best.number and results["best_value"] == best.value
    assert results["direction"] == "maximize" and results["trials"] == {"complete": 3}


def test_pruned_trials_stop_early_and_are_recorded(tmp_path):
    sweep = tmp_path / "sweep"
    # a pruner that prunes everything below AUROC 1.1, i.e. every trial after its first epoch
    run_cli(
        "train",
        "-m",
        "hparams_search=optuna",
        *TINY,
        "trainer.max_epochs=3",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.study_name=study",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "+hydra.sweeper.pruner.lower=1.1",
        "~hydra.sweeper.pruner.n_startup_trials",
        "~hydra.sweeper.pruner.n_warmup_steps",
        cwd=tmp_path,
    )
    trials = _study(sweep).trials
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"]
    for trial in trials:
        metrics = json.loads((sweep / str(trial.number) / "metrics.json").read_text())
        assert metrics["status"] == "pruned" and "test" not in metrics
        assert list(trial.intermediate_values) == [0]


def test_cv_folds_make_each_trial_a_cross_validation_scored_by_its_mean(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        "train",
        "-m",
        "hparams_search=optuna",
        *TINY,
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.study_name=study",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.cv_folds=2",
        # SQLite, the storage for one machine
        f"hydra.sweeper.storage=sqlite:///{sweep}/optuna.db",
        cwd=tmp_path,
    )
    (trial,) = _study(sweep, f"sqlite:///{sweep}/optuna.db").trials
    folds = [json.loads((sweep / str(job) / "metrics.json").read_text())["fit"]["val/auroc_best"] for job in (0, 1)]
    assert trial.value == pytest.approx(sum(folds) / 2) and trial.user_attrs["fold_values"] == folds
    assert trial.user_attrs["cv"]["n"] == 2
    for job, fold in ((0, 0), (1, 1)):
        overrides = yaml.safe_load((sweep / str(job) / ".hydra" / "overrides.yaml").read_text())
        assert f"data.fold={fold}" in overrides and "data.num_folds=2" in overrides
    # and `medexp summarize` pools the trial's folds into the same mean
    medexp_main("summarize", str(sweep), cwd=tmp_path)
    pooled = [row for row in csv.DictReader((sweep / "cv_summary.csv").open()) if row["metric"] == "val/auroc_best"]
    assert len(pooled) == 1 and float(pooled[0]["mean"]) == pytest.approx(trial.value)
    # ... and lists the study's trial, read from its SQLite file
    (row,) = csv.DictReader((sweep / "study.csv").open())
    assert (row["trial"], row["state"], float(row["value"])) == ("0", "complete", pytest.approx(trial.value))
