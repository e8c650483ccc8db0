"""How fast each ``hydra.sweeper.storage`` serves jobs that share one Optuna study.

For each storage (journal file, SQLite, PostgreSQL) and each number of jobs side by side (1, 2,
4), that many processes work on one new study for ``--seconds``: each asks a trial, reports a
value per "epoch" and asks the pruner after each (what ``OptunaPruning`` does after every
validation), then tells the result. An epoch's own work is ``--epoch-ms`` of sleep, so the
trials are tiny and the storage's share shows. One JSON line per measurement goes to
``--output``; a Markdown table is printed.

    python scripts/benchmark_sweep_storage.py                                   # all three, 1/2/4 jobs
    python scripts/benchmark_sweep_storage.py --storages journal sqlite --seconds 10
    MEDEXP_TEST_POSTGRES_URL=postgresql://me:pw@host/db python scripts/benchmark_sweep_storage.py

PostgreSQL needs ``--postgres-url`` or ``MEDEXP_TEST_POSTGRES_URL`` (``eval "$(.ci/postgres
start)"`` starts a local server); without one it is left out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from hydra_plugins.medexp.storage import check_storage, masked, open_storage


def worker(url: str, study_name: str, seconds: float, epochs: int, epoch_ms: float, ready, queue) -> None:
    """One job: trials until ``seconds`` have passed; puts its counts and latencies on ``queue``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(
        study_name=study_name, storage=open_storage(url), pruner=optuna.pruners.MedianPruner(n_startup_trials=3)
    )
    ready.wait()
    deadline = time.perf_counter() + seconds
    trials, pruned, reports, trial_overhead = 0, 0, [], []
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 1.0)
        overhead = time.perf_counter() - start
        stopped = False
        for epoch in range(epochs):
            time.sleep(epoch_ms / 1000)  # the epoch's training
            start = time.perf_counter()
            trial.report(x * (epoch + 1), step=epoch)
            prune = trial.should_prune()
            reports.append(time.perf_counter() - start)
            if prune:
                stopped = True
                break
        start = time.perf_counter()
        study.tell(trial, state=optuna.trial.TrialState.PRUNED) if stopped else study.tell(trial, x)
        trial_overhead.append(overhead + time.perf_counter() - start)
        trials += 1
        pruned += stopped
    queue.put({"trials": trials, "pruned": pruned, "reports": reports, "ask_tell": trial_overhead})


def measure(url: str, jobs: int, seconds: float, epochs: int, epoch_ms: float) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study_name = f"bench-{uuid.uuid4().hex[:8]}"
    optuna.create_study(study_name=study_name, storage=open_storage(url), direction="maximize")
    context = mp.get_context("spawn")
    ready, queue = context.Barrier(jobs + 1), context.Queue()
    processes = [
        context.Process(target=worker, args=(url, study_name, seconds, epochs, epoch_ms, ready, queue))
        for _ in range(jobs)
    ]
    for process in processes:
        process.start()
    ready.wait()  # every job has opened the study: the clock starts together
    start = time.perf_counter()
    results = [queue.get(timeout=seconds + 300) for _ in processes]
    elapsed = time.perf_counter() - start
    for process in processes:
        process.join()
    stored = optuna.load_study(study_name=study_name, storage=open_storage(url)).trials
    trials = sum(r["trials"] for r in results)
    if len(stored) != trials:  # every trial a job finished is in the study, once
        raise RuntimeError(f"{masked(url)}: the jobs finished {trials} trials, the study holds {len(stored)}")
    reports = sorted(latency for r in results for latency in r["reports"])
    ask_tell = [latency for r in results for latency in r["ask_tell"]]
    return {
        "jobs": jobs,
        "trials": trials,
        "pruned": sum(r["pruned"] for r in results),
        "seconds": round(elapsed, 2),
        "trials_per_min": round(60 * trials / elapsed, 1),
        "report_ms_mean": round(1000 * statistics.fmean(reports), 2),
        "report_ms_p95": round(1000 * reports[int(0.95 * (len(reports) - 1))], 2),
        "ask_tell_ms_mean": round(1000 * statistics.fmean(ask_tell), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storages", nargs="+", default=["journal", "sqlite", "postgres"])
    parser.add_argument("--jobs", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=20.0, help="per storage and number of jobs")
    parser.add_argument("--epochs", type=int, default=5, help="pruning reports per trial")
    parser.add_argument("--epoch-ms", type=float, default=20.0, help="an epoch's simulated work")
    parser.add_argument("--postgres-url", default=os.environ.get("MEDEXP_TEST_POSTGRES_URL"))
    parser.add_argument("--output", type=Path, default=Path("docs/benchmark_sweep_storage.jsonl"))
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="medexp-storage-bench-"))
    urls = {"journal": f"journal:///{folder}/optuna.journal", "sqlite": f"sqlite:///{folder}/optuna.db"}
    if args.postgres_url:
        urls["postgres"] = args.postgres_url
    rows = []
    for storage in args.storages:
        if storage not in urls:
            print(f"{storage}: left out (no --postgres-url / MEDEXP_TEST_POSTGRES_URL)")
            continue
        check_storage(urls[storage], "--storages")
        for jobs in args.jobs:
            row = {"storage": storage, **measure(urls[storage], jobs, args.seconds, args.epochs, args.epoch_ms)}
            row.update(
                epochs=args.epochs,
                epoch_ms=args.epoch_ms,
                cpus=os.cpu_count(),
                host=platform.node(),
                date=time.strftime("%Y-%m-%dT%H:%M:%S"),
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    columns = ["storage", "jobs", "trials", "trials_per_min", "report_ms_mean", "report_ms_p95", "ask_tell_ms_mean"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    ideal = args.epochs * args.epoch_ms / 1000
    print(
        f"\n{args.epochs} reports per trial, {args.epoch_ms:g} ms of work per epoch: at most "
        f"{60 / ideal:.0f} trials/min per job without storage overhead (more where the pruner stops trials early)."
    )


if __name__ == "__main__":
    main()
