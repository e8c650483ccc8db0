"""``medexp summarize DIR [--metric NAME] [--output DIR]``: one table of the runs of a sweep.

``DIR`` is a Hydra multirun directory (``logs/train/multiruns/<date>_<time>``), any folder with
run directories below it (found by their ``.hydra/overrides.yaml``, at any depth), or one run
directory. Writes into ``DIR`` (or ``--output``):

- ``summary.csv``, ``summary.md``: one row per run: its directory, status (``complete``,
  ``pruned`` by an Optuna pruner, ``failed/unfinished`` without a ``metrics.json``), the swept
  parameters (override keys whose values differ between runs), the objective and the final
  val/test metrics, best first;
- ``summary.png``: the objective against each swept parameter;
- with runs that differ in ``data.fold`` (k-fold cross-validation): ``cv_summary.csv``,
  ``cv_summary.md``: per setting of the other parameters and per metric, the folds' mean, standard
  deviation and a bootstrap 95% confidence interval of the mean (:func:`medexp.utils.stats.pool`);
- for an Optuna sweep (``hparams_search=optuna``): ``study.csv``, ``study.md``: every trial of
  the study as its storage holds it (journal file, SQLite or a database server, named in the
  sweep's ``study.yaml``; ``--storage URL`` and ``--study NAME`` to give it): number, state,
  value, pruning reports, parameters and job directory, best first. Trials whose jobs ran
  elsewhere, or are still running, are there too; the study alone is enough when ``DIR`` holds no
  run. A database password is never stored in ``study.yaml``: give it in ``PGPASSWORD`` (or
  ``~/.pgpass``), or in ``--storage``.

The objective is ``--metric`` or the runs' ``optimized_metric``; whether lower is better follows
from its name (:func:`medexp.utils.config.metric_mode`). Not a Hydra app, and it imports no
torch, so it answers at once.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medexp.reports.tables import markdown_table
from medexp.utils.config import metric_mode
from medexp.utils.errors import MedexpError, user_errors
from medexp.utils.run_info import lookup_metric

COMPLETE = "complete"
FAILED = "failed/unfinished"
FOLD_KEY = "data.fold"
SECTIONS = ("val", "test")  # metrics.json sections shown besides the objective


@dataclass
class Job:
    """One run directory of a sweep.

    ``overrides`` maps each command-line override's key (as written, e.g. ``optimizer.lr``,
    ``+trainer.limit_train_batches``, ``model``) to its value as written.
    """

    name: str
    path: Path
    overrides: dict[str, str]
    status: str
    metrics: dict[str, Any]
    optimized_metric: str | None


def find_jobs(root: Path) -> list[Job]:
    """The run directories in or below ``root``, in natural order of their names (2 before 10).

    Raises:
        MedexpError: when ``root`` is not a folder or holds no run directory.
    """
    if not root.is_dir():
        raise MedexpError(
            f"{root}: no such directory; expected a multirun directory (e.g. logs/train/multiruns/<date>_<time>) "
            "or a run directory"
        )
    paths = sorted({p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"})
    if not paths:
        raise MedexpError(
            f"{root}: no runs found (no .hydra/overrides.yaml in it or below it); expected a Hydra multirun "
            "directory (e.g. logs/train/multiruns/<date>_<time>) or a run directory"
        )
    jobs = [read_job(path, root) for path in paths]
    return sorted(jobs, key=lambda job: _natural(job.name))


def _natural(name: str) -> list[Any]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def read_job(path: Path, root: Path) -> Job:
    """A run directory's overrides, status, ``metrics.json`` and ``optimized_metric``."""
    name = path.relative_to(root).as_posix() if path != root else path.resolve().name
    lines = yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text()) or []
    overrides = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        # the Optuna sweeper's link from a job to its trial (the job's number already says it)
        if not key.startswith("callbacks.optuna_pruning."):
            overrides[key] = value
    metrics: dict[str, Any] = {}
    status = FAILED
    metrics_file = path / "metrics.json"
    if metrics_file.is_file():
        try:
            loaded = json.loads(metrics_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            loaded = None  # being written, or cut short: the run did not finish
        if isinstance(loaded, dict):
            metrics = {k: v for k, v in loaded.items() if k not in ("fit", "val", "test") or isinstance(v, dict)}
            status = str(metrics.get("status", COMPLETE))
    return Job(name, path, overrides, status, metrics, _optimized_metric(path))


def _optimized_metric(path: Path) -> str | None:
    # resolved_config.yaml is written once the run has started; .hydra/config.yaml may still hold
    # an interpolation (${model.monitor}_best), which is of no use here
    for file in (path / "resolved_config.yaml", path / ".hydra" / "config.yaml"):
        if file.is_file():
            try:
                value = (yaml.safe_load(file.read_text()) or {}).get("optimized_metric")
            except yaml.YAMLError:
                continue
            if isinstance(value, str) and "${" not in value:
                return value
    return None


def parse_value(text: str) -> Any:
    """An override's value (as written) as a number, bool or None where it reads as one, else
    the text."""
    lowered = text.strip().lower()
    if lowered == "null":
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def swept_keys(jobs: Sequence[Job]) -> tuple[list[str], dict[str, str]]:
    """Override keys whose values differ between jobs (in order of appearance), and the
    overrides that all jobs share."""
    keys: dict[str, None] = {}
    for job in jobs:
        keys.update(dict.fromkeys(job.overrides))
    swept = [key for key in keys if len({job.overrides.get(key) for job in jobs}) > 1]
    fixed = {key: jobs[0].overrides[key] for key in keys if key not in swept}
    return swept, fixed


def metric_names(jobs: Sequence[Job], sections: Sequence[str] = ("fit", "val", "test")) -> list[str]:
    """Metric names in the given ``metrics.json`` sections of any job, in order of appearance."""
    names: dict[str, None] = {}
    for job in jobs:
        for section in sections:
            values = job.metrics.get(section)
            if isinstance(values, dict):
                names.update(dict.fromkeys(values))
    return list(names)


def choose_objective(jobs: Sequence[Job], metric: str | None) -> str:
    """``metric``, or the jobs' (most common) ``optimized_metric``, checked against the metrics
    the jobs recorded.

    Raises:
        MedexpError: when no objective is known, or it is not among the recorded metrics.
    """
    known = sorted(metric_names(jobs))
    if metric is None:
        counts = Counter(job.optimized_metric for job in jobs if job.optimized_metric)
        if not counts:
            raise MedexpError(f"the runs name no optimized_metric; pass --metric NAME, one of {known}")
        metric = counts.most_common(1)[0][0]
        where = f"optimized_metric={metric!r} of the runs"
    else:
        where = f"--metric={metric!r}"
    if known and metric not in known:
        raise MedexpError(f"{where} is not a metric of these runs; expected one of {known}")
    return metric


@dataclass
class Row:
    job: Job
    objective: float | None
    values: dict[str, Any]  # column -> value, for every column of the table


def summarize(
    root: Path,
    metric: str | None = None,
    output: Path | None = None,
    storage: str | None = None,
    study_name: str | None = None,
) -> dict[str, Path]:
    """Write the summary files of the runs in ``root`` (see the module docstring) and print the
    tables.

    Args:
        storage, study_name: the Optuna study of the sweep; by default those of ``root/study.yaml``.

    Returns:
        The files written, by name (``summary.csv``, ``summary.md``, ``summary.png``,
        ``cv_summary.csv``, ``cv_summary.md`` for a cross-validation sweep, and ``study.csv``,
        ``study.md`` for an Optuna sweep).
    """
    files: dict[str, Path] = {}
    study = find_study(root, storage, study_name)
    if study is not None:
        files.update(summarize_study(root, output or root, *study))
    try:
        jobs = find_jobs(root)
    except MedexpError:
        if files:  # the study is all there is here (its jobs ran elsewhere)
            return files
        raise
    return {**files, **_summarize_jobs(root, jobs, metric, output)}


STUDY_FILE = "study.yaml"


def find_study(root: Path, storage: str | None, study_name: str | None) -> tuple[str, str] | None:
    """``(storage URL, study name)`` of the sweep in ``root``: the arguments, else what the
    Optuna sweeper wrote into ``root/study.yaml``; None when neither names a study.

    Raises:
        MedexpError: when only one of them is known.
    """
    recorded: dict[str, Any] = {}
    if (root / STUDY_FILE).is_file():
        recorded = yaml.safe_load((root / STUDY_FILE).read_text()) or {}
    storage = storage or recorded.get("storage")
    study_name = study_name or recorded.get("study_name")
    if storage is None and study_name is None:
        return None
    if not storage or not study_name:
        given = "--storage" if storage else "--study"
        raise MedexpError(
            f"{given} needs {'--study NAME' if storage else '--storage URL'} too (no {root / STUDY_FILE})"
        )
    return str(storage), str(study_name)


def summarize_study(root: Path, output: Path, storage: str, study_name: str) -> dict[str, Path]:
    """``study.csv`` and ``study.md``: the trials of the study, read from its storage."""
    from hydra_plugins.medexp.storage import load_stored_study, masked

    study = load_stored_study(storage, study_name)
    trials = study.trials
    keys = list(dict.fromkeys(key for trial in trials for key in trial.params))
    complete = [trial for trial in trials if trial.state.name == "COMPLETE"]
    direction = "max" if study.direction.name == "MAXIMIZE" else "min"
    sign = -1.0 if direction == "max" else 1.0
    ordered = sorted(trials, key=lambda t: (t.value is None, sign * (t.value or 0.0), t.number))
    rows = []
    for trial in ordered:
        reports = trial.intermediate_values
        job = root / str(trial.number)
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name.lower(),
                "value": trial.value,
                "reports": len(reports),
                "last_step": max(reports) if reports else None,
                **{key: trial.params.get(key) for key in keys},
                "job": job.name if job.is_dir() else "",
            }
        )
    columns = ["trial", "state", "value", "reports", "last_step", *keys, "job"]
    output.mkdir(parents=True, exist_ok=True)
    states = Counter(row["state"] for row in rows)
    text = [
        f"# Study {study_name!r} in {masked(storage)}",
        "",
        f"{len(trials)} trial(s): "
        + ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        + (
            f"; best value {ordered[0].value:.4g} (trial {ordered[0].number}, {'higher' if direction == 'max' else 'lower'} is better)"
            if complete
            else ""
        ),
        "",
        markdown_table(columns, rows) if rows else "(no trial yet)",
    ]
    return {
        "study.csv": _write_csv(output / "study.csv", columns, rows),
        "study.md": _write_markdown(output / "study.md", text),
    }


def _summarize_jobs(root: Path, jobs: list[Job], metric: str | None, output: Path | None) -> dict[str, Path]:
    objective = choose_objective(jobs, metric)
    mode = metric_mode(objective)
    swept, fixed = swept_keys(jobs)
    others = [name for name in metric_names(jobs, SECTIONS) if name != objective]
    rows = rank([make_row(job, swept, objective, others) for job in jobs], mode)

    output = output or root
    output.mkdir(parents=True, exist_ok=True)
    columns = ["job", "status", *swept, objective, *others]
    statuses = Counter(job.status for job in jobs)
    better = "lower" if mode == "min" else "higher"
    header = [
        f"# Runs in {root}",
        "",
        f"objective: `{objective}` ({better} is better); {len(jobs)} run(s): "
        + ", ".join(f"{count} {status}" for status, count in sorted(statuses.items())),
    ]
    if fixed:
        header.append("shared overrides: " + " ".join(f"`{key}={value}`" for key, value in fixed.items()))
    table = [row.values for row in rows]
    files = {
        "summary.csv": _write_csv(output / "summary.csv", columns, table),
        "summary.md": _write_markdown(output / "summary.md", [*header, "", markdown_table(columns, table)]),
        "summary.png": plot(rows, swept, objective, mode, output / "summary.png"),
    }
    if FOLD_KEY in swept:
        keys = [key for key in swept if key != FOLD_KEY]
        pooled = pool_folds(rows, keys, [objective, *others], mode)
        shown = [{**row, "mean ± std": _pm(row), "95% CI": _ci(row)} for row in pooled]
        text = [
            f"# Cross-validation in {root}",
            "",
            "Per setting and metric, over the complete folds: their number (n), mean ± standard deviation "
            "(ddof=1) and a percentile-bootstrap 95% confidence interval of the mean (10,000 resamples; too "
            f"narrow with few folds). Settings ordered by mean `{objective}`, best first.",
            "",
            markdown_table([*keys, "metric", "n", "mean ± std", "95% CI"], shown) if shown else "(no complete run)",
        ]
        files["cv_summary.csv"] = _write_csv(output / "cv_summary.csv", [*keys, *POOLED], pooled)
        files["cv_summary.md"] = _write_markdown(output / "cv_summary.md", text)
    return files


def make_row(job: Job, swept: list[str], objective: str, others: list[str]) -> Row:
    """A job's line of the summary: name, status, swept values (as written), metrics."""
    values: dict[str, Any] = {"job": job.name, "status": job.status}
    values.update({key: job.overrides.get(key) for key in swept})
    values.update({name: _number(lookup_metric(job.metrics, name)) for name in (objective, *others)})
    return Row(job, values[objective], values)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def rank(rows: list[Row], mode: str) -> list[Row]:
    """Rows best first by objective (``mode`` ``min`` or ``max``); rows without one last, in
    their order."""
    sign = 1.0 if mode == "min" else -1.0
    return sorted(rows, key=lambda row: (row.objective is None, sign * (row.objective or 0.0)))


POOLED = ("metric", "n", "mean", "std", "ci_low", "ci_high")


def pool_folds(rows: list[Row], keys: list[str], metrics: list[str], mode: str) -> list[dict[str, Any]]:
    """Pool the folds of each setting of ``keys``: one row per setting and metric, with the
    setting's values and ``metric``, ``n``, ``mean``, ``std``, ``ci_low``, ``ci_high`` (see
    :func:`medexp.utils.stats.pool`).

    Only complete runs count (a pruned run stopped early; a failed one has no values); settings
    are ordered by their mean objective (``metrics[0]``), best first.
    """
    from medexp.utils.stats import pool

    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.values.get(key) for key in keys), []).append(row)
    settings = []
    for setting, members in groups.items():
        lines = []
        for name in metrics:
            complete = [row for row in members if row.job.status == COMPLETE]
            values = [row.values[name] for row in complete if row.values[name] is not None]
            if values:
                lines.append({**dict(zip(keys, setting)), "metric": name, **pool(values)})
        settings.append(lines)
    sign = 1.0 if mode == "min" else -1.0

    def order(lines: list[dict[str, Any]]) -> tuple[bool, float]:
        objective = lines[0]["mean"] if lines and lines[0]["metric"] == metrics[0] else None
        return objective is None, sign * (objective or 0.0)

    return [line for lines in sorted(settings, key=order) for line in lines]


def _pm(row: dict[str, Any]) -> str:
    return f"{row['mean']:.4g}" + ("" if math.isnan(row["std"]) else f" ± {row['std']:.2g}")


def _ci(row: dict[str, Any]) -> str:
    return "" if math.isnan(row["ci_low"]) else f"[{row['ci_low']:.4g}, {row['ci_high']:.4g}]"


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({key: "" if row.get(key) is None else row[key] for key in columns} for row in rows)
    return path


def _write_markdown(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    print(text)
    return path


def axis(values: Sequence[str | None]) -> tuple[str, list[float], list[str]]:
    """How to plot a parameter's values (as written in the overrides; None: not set).

    Returns:
        ``(scale, positions, categories)``: numbers go on a numeric axis, ``"log"`` when they are
        positive and span two decades or more, else ``"linear"`` (no categories); anything
        else is ``"category"``, at the positions of ``categories`` (in natural order).
    """
    parsed = [None if value is None else parse_value(value) for value in values]
    if parsed and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in parsed):
        x = [float(v) for v in parsed]
        return ("log" if min(x) > 0 and max(x) / min(x) >= 100 else "linear"), x, []
    labels = ["(unset)" if value is None else str(value) for value in values]
    categories = sorted(set(labels), key=_natural)
    return "category", [float(categories.index(label)) for label in labels], categories


def plot(rows: list[Row], swept: list[str], objective: str, mode: str, path: Path) -> Path:
    """The objective against each swept parameter, one panel each (against the run when nothing
    was swept): numbers on a numeric axis (log scale when they span two decades or more), other
    values as categories. Runs that did not complete (e.g. pruned) are drawn as grey crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    parameters = swept or ["job"]
    ncols = min(3, len(parameters))
    nrows = math.ceil(len(parameters) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    scored = [row for row in rows if row.objective is not None]
    for ax, parameter in zip(axes.flat, parameters):
        scale, x, categories = axis([row.values.get(parameter) for row in scored])
        if scale == "category":
            ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 4 else 0)
            ax.set_xlim(-0.5, len(categories) - 0.5)
        else:
            ax.set_xscale(scale)
            if scale == "linear" and all(v.is_integer() for v in x):  # e.g. data.fold, batch sizes
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        complete = [row.job.status == COMPLETE for row in scored]
        points = list(zip(x, [row.objective for row in scored]))
        ax.scatter([p[0] for p, c in zip(points, complete) if c], [p[1] for p, c in zip(points, complete) if c])
        if not all(complete):
            others = [p for p, c in zip(points, complete) if not c]
            ax.scatter(*zip(*others), color="grey", marker="x", label="not complete (e.g. pruned)")
            ax.legend(fontsize="small")
        ax.set_xlabel(parameter)
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(parameters) :]:
        ax.set_visible(False)
    fig.suptitle(f"{objective} ({'lower' if mode == 'min' else 'higher'} is better), {len(scored)} of {len(rows)} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="medexp summarize",
        description="Tabulate the runs of a sweep (summary.csv, summary.md, summary.png; cv_summary.* for a "
        "sweep over data.fold), best first by the objective.",
    )
    parser.add_argument(
        "dir", type=Path, metavar="DIR", help="a multirun directory (logs/train/multiruns/<date>_<time>) or a run"
    )
    parser.add_argument(
        "--metric", metavar="NAME", help="the objective, e.g. val/loss (default: the runs' optimized_metric)"
    )
    parser.add_argument("--output", type=Path, metavar="DIR", help="where the summary files go (default: DIR)")
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="the Optuna study's storage, e.g. postgresql://user@host/db (default: DIR/study.yaml's)",
    )
    parser.add_argument("--study", metavar="NAME", help="the Optuna study's name (default: DIR/study.yaml's)")
    args = parser.parse_args(argv)
    with user_errors():
        summarize(
            args.dir.expanduser(),
            args.metric,
            args.output.expanduser() if args.output else None,
            args.storage,
            args.study,
        )


if __name__ == "__main__":
    main()
