"""Faults around the run directory, and more devices than a CPU machine has, each driven through
`medexp train` (or `train()` where a subprocess adds nothing) with the outcome it should have.

The cases, by group (one test each; a parametrised test counts each parameter):

- moved run: a run directory copied elsewhere and resumed from ``last.ckpt`` keeps its best
  checkpoint and score (1); without its best checkpoint, it says so and chooses again (2)
- one run per directory: a second run in a running run's directory refuses at once, naming the
  first's PID and host, and leaves its record alone (3); a lock left by a run that died (here in
  the copied run of case 1) is taken over with a warning (4); a lock from another host is refused,
  naming it (5); DDP workers (rank > 0) take no lock (6); a multirun locks each job's own
  directory as the job starts (7). (Resuming in the run's own directory after it ended:
  tests/test_faults.py.)
- unwritable run directory, one line each: under a regular file (8), an existing directory even
  root cannot write (9), a read-only directory (10; not as root), a multirun's sweep directory (11)
- devices: ``trainer.devices=3`` on CPU refused with accelerator auto and no GPU (12) and
  cpu (13); accepted with ``trainer=ddp_sim`` (14) or an explicit strategy (15)
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from omegaconf import OmegaConf

from medexp.train import train
from medexp.utils.errors import MedexpError
from medexp.utils.runlock import RunDirGuard, RunDirLock
from medexp.utils.validation import validate_config
from tests.conftest import ENV, QUIET, REPO, compose_config, run_cli

TINY = [*QUIET, "data.image_size=16", "data.num_samples={train: 64, val: 32, test: 32}", "report=false"]
# learns within 2 epochs (val AUROC about 0.7), so a broken epoch is clearly worse
LEARNS = [
    *QUIET,
    "data.image_size=16",
    "data.num_samples={train: 256, val: 64, test: 16}",
    "data.batch_size=16",
    "optimizer.lr=0.003",
    "trainer.deterministic=true",
    "report=false",
]
FAST = [*QUIET, "debug=limit", "report=false"]  # in-process runs: 4 batches an epoch


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`medexp` with this repository importable (for the test-only callbacks below)."""
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), ENV.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("medexp")), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"medexp {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return proc


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single ``medexp: error:`` line a refused command printed, and nothing else."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("medexp: error: "), proc.stderr[-3000:]
    return lines[0]


def val_scores(run: Path) -> dict[int, float]:
    """val/auroc of every training epoch in the run's CSV log (not the validation after fit)."""
    with (run / "csv" / "metrics.csv").open(newline="") as file:
        return {int(row["epoch"]): float(row["val/auroc"]) for row in csv.DictReader(file) if row.get("val/auroc_best")}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class BreakWeights(L.Callback):
    """Test-only: from ``from_epoch`` on, zero the weights before each validation of ``fit``, so
    those epochs score AUROC 0.5, worse than any epoch that learned something."""

    def __init__(self, from_epoch: int) -> None:
        self.from_epoch = from_epoch

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.current_epoch >= self.from_epoch:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.zero_()


# --- a run directory that moved -----------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(proc.stdout)


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory):
    """A run of 2 epochs, copied elsewhere with the lock file of a run that died (a crashed run
    copied as it was), then resumed there for 2 epochs whose weights are broken."""
    tmp = tmp_path_factory.mktemp("moved_run")
    first, copy = tmp / "first", tmp / "elsewhere" / "run"
    cli("train", *LEARNS, "trainer.max_epochs=2", f"hydra.run.dir={first}", cwd=tmp)
    shutil.copytree(first, copy)
    dead = _dead_pid()
    (copy / ".lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "then"}))
    # the command a user types: the copied run's overrides and directory come from the checkpoint
    resumed = cli(
        "train",
        f"ckpt_path={copy}/checkpoints/last.ckpt",
        "trainer.max_epochs=4",
        "+callbacks.break_weights._target_=tests.test_fault_cases.BreakWeights",
        "+callbacks.break_weights.from_epoch=2",
        cwd=tmp,
    )
    return {"first": first, "copy": copy, "dead": dead, "resumed": resumed}


def test_a_copied_run_resumed_with_worse_epochs_keeps_its_best_checkpoint(moved_run):  # case 1
    first, copy = moved_run["first"], moved_run["copy"]
    scores = val_scores(copy)
    assert sorted(scores) == [0, 1, 2, 3] and scores[2] == scores[3] == 0.5 < max(scores[0], scores[1])
    best_epoch = max(scores, key=scores.get)
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["best_score"] == pytest.approx(max(scores.values()))
    assert metrics["fit"]["val/auroc_best"] == pytest.approx(max(scores.values()))
    assert metrics["best_checkpoint"] == str(copy / "checkpoints" / "best.ckpt")  # not the old directory
    assert metrics["val"]["val/auroc"] == pytest.approx(max(scores.values()))  # the tested checkpoint is the best
    best, original = load(copy / "checkpoints" / "best.ckpt"), load(first / "checkpoints" / "best.ckpt")
    assert best["epoch"] == best_epoch
    for name, value in original["state_dict"].items():
        assert torch.equal(best["state_dict"][name], value), name
    assert load(copy / "checkpoints" / "last.ckpt")["epoch"] == 3


def test_a_copied_run_without_its_best_checkpoint_says_so_and_chooses_again(tmp_path, caplog):  # case 2
    first, copy = tmp_path / "first", tmp_path / "copy"
    train(compose_config([*FAST, "trainer.max_epochs=1"], output_dir=first))
    shutil.copytree(first, copy)
    (copy / "checkpoints" / "best.ckpt").unlink()  # only last.ckpt was copied along
    with caplog.at_level("WARNING", logger="medexp"):
        metrics = train(
            compose_config([*FAST, "trainer.max_epochs=2", f"ckpt_path={copy}/checkpoints/last.ckpt"], output_dir=copy)
        )
    assert (
        f"the run moved from {first / 'checkpoints'} to {copy / 'checkpoints'}, but {copy / 'checkpoints' / 'best.ckpt'} is not there"
        in caplog.text
    )
    assert metrics["best_checkpoint"] == str(copy / "checkpoints" / "best.ckpt")
    assert load(copy / "checkpoints" / "best.ckpt")["epoch"] == 1  # chosen among the resumed epochs
    assert load(first / "checkpoints" / "best.ckpt")["epoch"] == 0  # the original is untouched


# --- one run per directory ----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A run, and a second one started in its directory while it trains."""
    tmp = tmp_path_factory.mktemp("two_runs")
    run = tmp / "run"
    medexp = Path(sys.executable).with_name("medexp")
    first = subprocess.Popen(
        [str(medexp), "train", *TINY, "trainer.max_epochs=1", f"hydra.run.dir={run}"],
        cwd=tmp,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (run / ".lock").is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    started = time.time()
    second = run_cli("train", *TINY, f"hydra.run.dir={run}", cwd=tmp, check=False)
    second_seconds = time.time() - started
    first_done = first.poll() is not None
    stdout, stderr = first.communicate(timeout=300)
    return {
        "run": run,
        "tmp": tmp,
        "first": first,
        "first_stderr": stderr,
        "second": second,
        "second_seconds": second_seconds,
        "first_done_when_refused": first_done,
    }


def test_a_second_run_in_a_running_runs_directory_refuses_at_once(two_runs):  # case 3
    run, first = two_runs["run"], two_runs["first"]
    message = one_line_error(two_runs["second"])
    assert not two_runs["first_done_when_refused"], "the first run ended before the second started: nothing was tried"
    assert f"{run} is in use by another run (PID {first.pid} on host {socket.gethostname()}, started " in message
    assert "hydra.run.dir=" in message
    assert two_runs["second_seconds"] < 30  # before anything is built (a run of its own takes longer)
    assert first.returncode == 0, two_runs["first_stderr"][-3000:]
    overrides = OmegaConf.load(run / ".hydra" / "overrides.yaml")
    assert "trainer.max_epochs=1" in overrides  # the first run's record, not the second's
    assert json.loads((run / "metrics.json").read_text())["status"] == "complete"
    assert not (run / ".lock").exists(), "the lock outlived its run"


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_warning(moved_run):  # case 4
    log = moved_run["resumed"].stdout + moved_run["resumed"].stderr
    assert f"taking over the lock left by PID {moved_run['dead']} on host {socket.gethostname()}" in log
    assert json.loads((moved_run["copy"] / "metrics.json").read_text())["status"] == "complete"
    assert not (moved_run["copy"] / ".lock").exists()


def test_a_lock_held_on_another_host_is_refused_naming_it(tmp_path):  # case 5
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 4321, "host": "node-17", "started": "2024-01-01T10:00:00"}))
    message = one_line_error(run_cli("train", *TINY, f"hydra.run.dir={run}", cwd=tmp_path, check=False))
    assert "locked by a run on another host (PID 4321 on host node-17, started 2024-01-01T10:00:00)" in message
    assert f"delete {run / '.lock'}" in message
    assert not (run / ".hydra").exists()  # nothing written


def test_ddp_workers_join_the_locked_directory(tmp_path, monkeypatch):  # case 6
    run = tmp_path / "run"
    held = RunDirLock(run)
    held.acquire()  # the rank-0 process
    try:
        config = OmegaConf.create({"hydra": {"run": {"dir": str(run)}}})
        monkeypatch.setenv("LOCAL_RANK", "1")  # as Lightning's launcher starts a worker
        RunDirGuard().on_run_start(config)
        monkeypatch.delenv("LOCAL_RANK")
        with pytest.raises(SystemExit):  # any other process is refused
            RunDirGuard().on_run_start(config)
    finally:
        held.release()
    assert not (run / ".lock").exists()


def test_a_multirun_locks_each_jobs_own_directory(tmp_path):  # case 7
    sweep = tmp_path / "sweep"
    held = RunDirLock(sweep / "1")  # another process works in the second job's directory
    held.acquire()
    try:
        proc = run_cli(
            "train",
            "-m",
            *TINY,
            "train=false",
            "test=false",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
            cwd=tmp_path,
            check=False,
        )
    finally:
        held.release()
    assert (
        f"{sweep / '1'} is in use by another run (PID {os.getpid()} on host {socket.gethostname()}"
        in one_line_error(proc)
    )
    assert (sweep / "0" / "metrics.json").is_file() and not (sweep / "0" / ".lock").exists()  # released as it ended
    assert not (sweep / "1" / "metrics.json").exists()


# --- an unwritable run directory: one line --------------------------------------------------


def _unwritable(kind: str, tmp_path: Path) -> Path:
    if kind == "under a regular file":
        (tmp_path / "afile").write_text("")
        return tmp_path / "afile" / "run"
    if kind == "existing, even root cannot write":
        if not Path("/proc/self/fdinfo").is_dir():
            pytest.skip("needs Linux /proc")
        return Path("/proc/self/fdinfo")
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked


@pytest.mark.parametrize("kind", ["under a regular file", "existing, even root cannot write", "read-only (chmod)"])
def test_an_unwritable_run_directory_is_one_line(kind, tmp_path):  # cases 8-10
    run = _unwritable(kind, tmp_path)
    message = one_line_error(run_cli("train", *TINY, f"hydra.run.dir={run}", cwd=tmp_path, check=False))
    assert message.startswith(f"medexp: error: cannot write to {run} (")
    assert "set by hydra.run.dir; choose a writable directory (hydra.run.dir=...)" in message


def test_an_unwritable_sweep_directory_is_one_line(tmp_path):  # case 11
    (tmp_path / "afile").write_text("")
    proc = run_cli(
        "train", "-m", *TINY, "seed=1,2", f"hydra.sweep.dir={tmp_path}/afile/sweep", cwd=tmp_path, check=False
    )
    assert "set by hydra.sweep.dir; choose a writable directory (hydra.sweep.dir=...)" in one_line_error(proc)


# --- more devices than a CPU machine has ----------------------------------------------------

needs_cpu_only = pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(), reason="accelerator=auto picks the GPU here"
)


@needs_cpu_only
def test_three_devices_on_a_cpu_only_machine_are_refused(tmp_path):  # case 12
    with pytest.raises(MedexpError) as error:
        train(compose_config([*TINY, "trainer.devices=3"], output_dir=tmp_path))
    assert str(error.value) == (
        "1 problem(s) in the config:\n  - trainer.devices=3 on CPU (trainer.accelerator=auto and no GPU here) would start "
        "3 training processes on this machine; to simulate DDP on CPU say so with trainer=ddp_sim trainer.devices=3, "
        "otherwise use trainer.devices=1"
    )
    assert not (tmp_path / "checkpoints").exists()


def test_three_devices_with_accelerator_cpu_are_refused(tmp_path):  # case 13
    with pytest.raises(
        MedexpError, match=r"trainer.devices=3 on CPU \(trainer.accelerator=cpu\) would start 3 training"
    ):
        train(compose_config([*TINY, "trainer=cpu", "trainer.devices=3"], output_dir=tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer=ddp_sim", "trainer.devices=3"],  # case 14
        ["trainer=cpu", "trainer.devices=2", "+trainer.strategy=ddp"],
    ],
)  # case 15
def test_several_cpu_processes_asked_for_explicitly_are_accepted(overrides, tmp_path):
    from medexp.utils.config import check_config

    validate_config(check_config(compose_config([*TINY, *overrides], output_dir=tmp_path)))
