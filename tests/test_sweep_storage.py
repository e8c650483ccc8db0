"""Optuna studies on storage many jobs share (journal file, PostgreSQL), checked before any job
starts; SLURM jobs that checkpoint and requeue themselves before their time limit.

The PostgreSQL tests need a server: ``.ci/run`` starts one (``.ci/postgres``) and exports
``MEDEXP_TEST_POSTGRES_URL``; elsewhere they skip, and in CI (``CI=true``) its absence fails.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from sqlalchemy.engine import make_url

from hydra_plugins.medexp.storage import check_storage, masked, open_storage
from medexp.utils.errors import MedexpError
from tests.conftest import ENV, QUIET, run_cli
from tests.helpers import signal_when

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

optuna.logging.set_verbosity(optuna.logging.WARNING)
TINY = [
    *QUIET,
    "data.image_size=16",
    "data.num_samples={train: 64, val: 32, test: 32}",
    "trainer.max_epochs=2",
    "logger=csv",
]


@pytest.fixture(scope="module")
def postgres_url() -> str:
    url = os.environ.get("MEDEXP_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but MEDEXP_TEST_POSTGRES_URL is not set: .ci/run starts a server (.ci/postgres)")
        pytest.skip('no PostgreSQL server: MEDEXP_TEST_POSTGRES_URL is not set (eval "$(.ci/postgres start)")')
    return url


def _problem(url: str) -> str:
    with pytest.raises(MedexpError) as caught:
        check_storage(url)
    message = str(caught.value)
    assert message.startswith("hydra.sweeper.storage=") and "\n" not in message
    return message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost/0", "unknown storage 'redis'; expected one of journal:///<file>"),
        ("journal:////proc/medexp/optuna.journal", "cannot create the folder /proc/medexp"),
        ("sqlite:///:memory:", "a study shared by jobs needs a file"),
        ("mysql://me:secret-pw@127.0.0.1/optuna", "the database driver 'MySQLdb' is not installed"),
        ("postgresql://me:secret-pw@127.0.0.1:1/optuna", "no database server answers at 127.0.0.1:1"),
    ],
    ids=["unknown-scheme", "unwritable-folder", "in-memory", "no-driver", "no-server"],
)
def test_storage_problems_are_named_in_one_line_without_the_password(url, expected):
    if url.startswith("mysql") and any(
        __import__("importlib").util.find_spec(m) for m in ("MySQLdb", "pymysql")
    ):  # pragma: no cover - a MySQL driver is not among the test extras
        pytest.skip("a MySQL driver is installed here")
    message = _problem(url)
    assert expected in message
    assert "secret-pw" not in message


def test_a_bad_storage_stops_the_sweep_before_any_job_starts(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "train",
        "-m",
        "hparams_search=optuna",
        *TINY,
        f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.storage=postgresql://me:secret-pw@127.0.0.1:1/optuna",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "hydra.sweeper.storage=postgresql://me@127.0.0.1:1/optuna: no database server answers" in proc.stderr
    assert "secret-pw" not in proc.stdout + proc.stderr
    assert not sweep.exists(), "the sweep started"


def test_a_sweep_dir_with_the_old_sqlite_study_is_not_silently_restarted(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    optuna.create_study(study_name="study", storage=f"sqlite:///{sweep}/optuna.db")
    proc = run_cli("train", "-m", "hparams_search=optuna", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert f"continue it with hydra.sweeper.storage=sqlite:///{sweep}/optuna.db" in proc.stderr
    assert not (sweep / "0").exists()


def test_wrong_credentials_and_a_missing_database_on_a_real_server(postgres_url):
    url = make_url(postgres_url)
    check_storage(postgres_url)  # the server of the tests answers
    wrong = url.set(password="not-the-password").render_as_string(hide_password=False)
    message = _problem(wrong)
    assert f"refused the credentials of user {url.username!r}" in message and "not-the-password" not in message
    assert url.password not in _problem(wrong)
    missing = url.set(database="no_such_db").render_as_string(hide_password=False)
    assert "has no database 'no_such_db'" in _problem(missing)
    assert masked(postgres_url) == f"postgresql://{url.username}@{url.host}:{url.port}/{url.database}"


def _parallel_sweep(tmp_path: Path, study: str, n_trials: int, storage: list[str]) -> None:
    run_cli(
        "train",
        "-m",
        "hparams_search=optuna",
        "hydra/launcher=local",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.cpus_per_task=1",
        *TINY,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweeper.n_trials={n_trials}",
        "hydra.sweeper.n_jobs=4",
        *storage,
        cwd=tmp_path,
    )


def _check_study(sweep: Path, study: optuna.Study, n_trials: int) -> None:
    """Every trial once, each with its own job: its own parameters, pruning reports and value."""
    trials = study.trials
    assert [t.number for t in trials] == list(range(n_trials)), "a trial was lost or duplicated"
    jobs = sorted(int(p.name) for p in sweep.iterdir() if p.name.isdigit())
    assert jobs == list(range(n_trials)), "job directories do not match the trials"
    for trial in trials:
        job = sweep / str(trial.number)
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert f"callbacks.optuna_pruning.trial={trial.number}" in overrides
        config = yaml.safe_load((job / "resolved_config.yaml").read_text())
        assert config["optimizer"]["lr"] == trial.params["optimizer.lr"]
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == trial.state.name.lower(), (trial.number, metrics["status"], trial.state)
        reports = trial.intermediate_values
        if trial.state.name == "COMPLETE":
            assert list(reports) == [0, 1]  # one pruning report per epoch, through the shared storage
            assert trial.value == metrics["fit"]["val/auroc_best"] == max(reports.values())
        else:
            assert trial.state.name == "PRUNED" and list(reports) == [0, 1][: len(reports)] and reports


@pytest.mark.parametrize("kind", ["journal", "postgres"])
def test_four_jobs_side_by_side_share_one_study_and_a_resume_adds_to_it(kind, tmp_path, request):
    sweep = tmp_path / "sweep"
    if kind == "postgres":
        url = request.getfixturevalue("postgres_url")
        study_name = f"concurrency-{uuid.uuid4().hex[:8]}"
        storage = [f"hydra.sweeper.storage={url}"]
    else:
        url, study_name, storage = f"journal:///{sweep}/optuna.journal", "study", []  # the default
    _parallel_sweep(tmp_path, study_name, 4, storage)
    first = optuna.load_study(study_name=study_name, storage=open_storage(url))
    _check_study(sweep, first, 4)
    first_params = [t.params for t in first.trials]
    # side by side: each of the 4 jobs started (Hydra wrote its config) before any of them ended
    starts = [(sweep / str(n) / ".hydra" / "config.yaml").stat().st_mtime for n in range(4)]
    ends = [(sweep / str(n) / "metrics.json").stat().st_mtime for n in range(4)]
    assert max(starts) < min(ends), "the jobs did not run side by side"
    # the same command with more trials resumes the study: 2 more, no trial redone
    _parallel_sweep(tmp_path, study_name, 6, storage)
    study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    _check_study(sweep, study, 6)
    assert [t.params for t in study.trials[:4]] == first_params
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["storage"] == masked(url) and sum(results["trials"].values()) == 6
    if kind == "postgres":
        assert make_url(url).password not in (sweep / "study.yaml").read_text() + str(results)
        _summarize_from_the_server(tmp_path, sweep, study, url)


def _summarize_from_the_server(tmp_path: Path, sweep: Path, study: optuna.Study, url: str) -> None:
    # study.yaml names the server without its password: libpq reads it from PGPASSWORD
    medexp = Path(sys.executable).with_name("medexp")
    env = {**ENV, "PGPASSWORD": make_url(url).password}
    proc = subprocess.run([str(medexp), "summarize", str(sweep)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "study.csv").open()))
    assert sorted(int(row["trial"]) for row in rows) == list(range(6))
    for row in rows:
        trial = study.trials[int(row["trial"])]
        assert row["state"] == trial.state.name.lower() and row["job"] == row["trial"]
        assert int(row["reports"]) == len(trial.intermediate_values)
    assert f"# Study {study.study_name!r} in {masked(url)}" in proc.stdout
    # the runs' own table too, as for any sweep
    assert len(list(csv.DictReader((sweep / "summary.csv").open()))) == 6


# ---------------------------------------------------------------------------------- SLURM


def test_slurm_requeue_signal_checkpoints_requeues_and_the_requeued_job_resumes_its_trial(tmp_path):
    # no SLURM here: its environment variables, and an scontrol that records its arguments
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "medexp",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    # a trial of a study in a journal file, as a sweep job would report to it
    journal = f"journal:///{tmp_path}/optuna.journal"
    study = optuna.create_study(study_name="study", storage=open_storage(journal), direction="maximize")
    trial = study.ask()
    run = tmp_path / "run"
    args = [
        *QUIET,
        "data.image_size=16",
        "data.num_samples={train: 512, val: 64, test: 64}",
        "data.batch_size=32",
        "trainer.max_epochs=3",
        "logger=csv",
        f"hydra.run.dir={run}",
        "+callbacks.optuna_pruning._target_=medexp.callbacks.pruning.OptunaPruning",
        "+callbacks.optuna_pruning.study_name=study",
        f"+callbacks.optuna_pruning.storage={journal}",
        f"+callbacks.optuna_pruning.trial={trial.number}",
        "+callbacks.optuna_pruning.monitor=val/auroc",
    ]
    medexp = str(Path(sys.executable).with_name("medexp"))
    proc = subprocess.Popen(
        [medexp, "train", *args],
        cwd=tmp_path,
        env={**ENV, **slurm},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = run / "checkpoints" / "last.ckpt"
    # SLURM's warning before the time limit (#SBATCH --signal=USR1@120), while epoch 1 is under way
    assert signal_when(proc, lambda: torch.load(last, weights_only=True)["epoch"] == 0, signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGUSR1, stderr[-3000:]
    interrupted = run / "checkpoints" / "interrupted.ckpt"
    assert "medexp: requeued: SIGUSR1 at epoch 1, after batch" in stderr
    assert "requeued SLURM job 4242, which resumes from it" in stderr
    assert calls.read_text().split() == ["requeue", "4242"]
    saved = torch.load(interrupted, map_location="cpu", weights_only=True)["medexp_resume"]
    assert saved["epoch"] == 1 and 0 < saved["batches_done"] < 16
    assert json.loads((run / "metrics.json").read_text())["status"] == "requeued"
    assert not list(run.rglob("hpc_ckpt_*.ckpt")), "Lightning's own SLURM requeue ran too"

    # SLURM starts the same command again, telling it it was restarted
    again = subprocess.run(
        [medexp, "train", *args],
        cwd=tmp_path,
        env={**ENV, **slurm, "SLURM_RESTART_COUNT": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    info = json.loads((run / "run_info.json").read_text())
    assert metrics["status"] == "complete" and info["resumed_from"] == [str(interrupted)]
    assert not interrupted.exists() and calls.read_text().split() == ["requeue", "4242"]
    # the validations of fit (the final validation of the best checkpoint has no val/auroc_best)
    rows = [row for row in csv.DictReader((run / "csv" / "metrics.csv").open()) if row.get("val/auroc_best")]
    assert [row["epoch"] for row in rows] == ["0", "1", "2"], "an epoch validated twice or not at all"
    # the same Optuna trial got every epoch's report, across both starts of the job
    reports = optuna.load_study(study_name="study", storage=open_storage(journal)).trials[0].intermediate_values
    assert reports == {int(row["epoch"]): pytest.approx(float(row["val/auroc"])) for row in rows}


def test_under_submitit_the_checkpoint_is_saved_before_submitits_requeue_handler_runs(tmp_path, monkeypatch):
    from medexp.train import train
    from tests.conftest import compose_config

    # submitit's worker sets its handler for SIGUSR2 (sbatch --signal=USR2@<signal_delay_s>)
    # before the job runs: it resubmits the job, requeues it and exits
    for key, value in {"SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "7"}.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    interrupted = run / "checkpoints" / "interrupted.ckpt"
    seen = []

    def submitit_handler(signum, frame):
        seen.append((signum, interrupted.is_file()))
        raise SystemExit(-1)

    before = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit):
            train(
                compose_config(
                    [
                        *QUIET,
                        "debug=limit",
                        "trainer.max_epochs=2",
                        "+callbacks.send._target_=tests.test_faults.SendSignals",
                        f"+callbacks.send.signals=[{int(signal.SIGUSR2)}]",
                        "+callbacks.send.epoch=0",
                        "+callbacks.send.batch=1",
                    ],
                    output_dir=run,
                )
            )
        assert seen == [(signal.SIGUSR2, True)], "submitit's handler ran before the checkpoint was saved"
        assert 0 < torch.load(interrupted, weights_only=True)["medexp_resume"]["batches_done"] < 4  # mid-epoch
        assert signal.getsignal(signal.SIGUSR2) == submitit_handler  # put back
    finally:
        signal.signal(signal.SIGUSR2, before)
    # the array task's id is what scontrol would requeue
    from medexp.callbacks.faults import slurm_job_id

    assert slurm_job_id() == "70_7"
