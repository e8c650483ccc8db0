"""A Hydra sweeper that drives Optuna (>= 4) through its ask-and-tell API.

hydra-optuna-sweeper 1.3 pins optuna < 3 and its SQLite storage breaks on SQLAlchemy 2, so
medexp carries this small replacement. ``hydra/sweeper=optuna`` (see ``conf/hparams_search/``)
selects it. What it adds over a plain loop of trials:

- the study lives in ``storage`` (:mod:`hydra_plugins.medexp.storage`): by default a journal
  file in the sweep directory, safe for parallel launchers and shared filesystems; SQLite for
  one machine, a PostgreSQL or MySQL server for many nodes. The storage is checked before any
  job starts. Re-running the same command loads the study and runs trials until ``n_trials``
  trials are finished in total (an interrupted sweep resumes; its unfinished trials are marked
  failed);
- ``n_jobs`` trials are asked at once and launched as one batch, so a parallel launcher
  (submitit) runs them side by side;
- pruning: each job reports its validation metric to its trial through the shared storage
  (``medexp.callbacks.pruning.OptunaPruning``) and stops early when the pruner says so;
- ``cv_folds=k``: every trial is a k-fold cross-validation (k jobs, ``data.fold=0..k-1``), and
  Optuna is told the mean over the folds.

The search space uses Hydra's sweep syntax, from ``params`` or the command line::

    optimizer.lr: tag(log, interval(1e-4, 1e-1))   # float, log scale
    model.net.dropout: interval(0.0, 0.5)          # float
    data.batch_size: choice(32, 64, 128)           # categorical
    model.net.num_layers: range(1, 5)              # integer 1..4 (tag(int, interval(1, 4)) too)

Job directories are numbered by trial (``<sweep dir>/<trial>``, or ``<trial * k + fold>`` with
``cv_folds``), continuing across resumed runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.medexp.storage import check_storage, journal_path, masked, open_storage
from medexp.utils.errors import MedexpError

log = logging.getLogger("medexp")

# the job override that connects a job's pruning callback to its trial
TRIAL_KEY = "callbacks.optuna_pruning.trial"


def search_space(overrides: Sequence[Override]) -> tuple[dict[str, Any], list[str]]:
    """Split parsed overrides into Optuna distributions and fixed ``key=value`` overrides.

    Raises:
        ValueError: for a sweep Optuna cannot sample (an empty choice, a reversed interval).
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space: dict[str, Any] = {}
    fixed: list[str] = []
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed.append(f"{key}={override.get_value_element_as_str()}")
            continue
        sweep = override.value()
        log_scale = "log" in sweep.tags
        if isinstance(sweep, IntervalSweep):
            low, high = sweep.start, sweep.end
            if low is None or high is None or not low < high:
                raise ValueError(f"{key}=interval({low}, {high}): needs low < high")
            if "int" in sweep.tags:
                space[key] = IntDistribution(int(low), int(high), log=log_scale)
            else:
                space[key] = FloatDistribution(float(low), float(high), log=log_scale)
        elif isinstance(sweep, RangeSweep) and all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
            if not sweep.start < sweep.stop:
                raise ValueError(f"{key}=range({sweep.start}, {sweep.stop}): empty range")
            # Hydra's range excludes stop, Optuna's high is inclusive
            last = sweep.start + (sweep.stop - 1 - sweep.start) // sweep.step * sweep.step
            space[key] = IntDistribution(sweep.start, last, step=sweep.step, log=log_scale)
        else:  # choice(...), a,b,c, or a float range: categories, kept as the override strings
            choices = list(override.sweep_string_iterator())
            if not choices:
                raise ValueError(f"{key}: an empty choice")
            space[key] = CategoricalDistribution([_number(c) for c in choices])
    return space, fixed


def _number(text: str) -> str | int | float:
    # numbers stay numbers so a study's table sorts them; everything else is the override string
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


class OptunaSweeper(Sweeper):
    """Hydra sweeper over an Optuna study (see the module docstring).

    Args:
        study_name: the study's name in ``storage``; re-running with the same name resumes it.
        storage: ``journal:///<file>`` (default ``<sweep dir>/optuna.journal``),
            ``sqlite:///<file>``, or a ``postgresql://``/``mysql://`` database URL.
        direction: ``maximize``, ``minimize``, or null to derive it from ``optimized_metric``
            (lower is better for losses and errors).
        n_trials: trials to have finished in total, counting those of earlier runs of the study.
        n_jobs: trials launched at once.
        sampler: an Optuna sampler, or a partial one (``_partial_: true``) whose ``seed`` the
            sweeper advances when it resumes a study.
        pruner: an Optuna pruner.
        params: the search space, ``{key: "interval(...)" | "choice(...)" | ...}``.
        cv_folds: null, or k for a k-fold cross-validation per trial.
    """

    def __init__(
        self,
        study_name: str,
        storage: str,
        direction: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        sampler: Any = None,
        pruner: Any = None,
        params: dict[str, str] | None = None,
        cv_folds: int | None = None,
    ) -> None:
        if direction not in (None, "maximize", "minimize"):
            raise ValueError(f"hydra.sweeper.direction={direction!r}; expected maximize, minimize or null")
        for name, value, least in (("n_trials", n_trials, 1), ("n_jobs", n_jobs, 1), ("cv_folds", cv_folds or 2, 2)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"hydra.sweeper.{name}={value!r}; expected an integer >= {least}")
        self.study_name, self.storage, self.direction = study_name, storage, direction
        self.n_trials, self.n_jobs, self.cv_folds = n_trials, n_jobs, cv_folds
        self.sampler, self.pruner = sampler, pruner
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _direction(self) -> str:
        if self.direction is not None:
            return self.direction
        from medexp.utils.config import metric_mode

        metric = self.config.get("optimized_metric")
        if not metric:
            raise ValueError("hydra.sweeper.direction=null needs `optimized_metric` in the config")
        return "maximize" if metric_mode(metric) == "max" else "minimize"

    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from optuna.trial import TrialState

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space, fixed = search_space(parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + arguments))
        if not space:
            raise ValueError(
                "nothing to search: give hydra.sweeper.params or sweep overrides such as 'optimizer.lr=interval(1e-4,1e-1)'"
            )

        sweep_dir = Path(self.config.hydra.sweep.dir)
        # before any job starts: the storage is reachable, and is the one earlier runs used
        check_storage(self.storage)
        self._check_not_moved(sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        # where `medexp summarize` finds the study (without a password: PGPASSWORD, ~/.pgpass)
        OmegaConf.save(
            OmegaConf.create({"study_name": self.study_name, "storage": masked(self.storage)}), sweep_dir / "study.yaml"
        )
        storage = open_storage(self.storage)
        study = optuna.create_study(
            study_name=self.study_name, storage=storage, direction=self._direction(), load_if_exists=True
        )
        # trials of an interrupted run never got an answer: count them as failed, not running
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            study.tell(stale.number, state=TrialState.FAIL)
        done = len(study.trials)
        study = optuna.load_study(
            study_name=self.study_name, storage=storage, sampler=self._sampler(done), pruner=self.pruner
        )
        if done:
            log.info(
                "study %r in %s: %d trials finished, %d to go",
                self.study_name,
                masked(self.storage),
                done,
                max(0, self.n_trials - done),
            )
        folds = self.cv_folds or 1
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [self._job_overrides(trial, fixed, fold) for trial in trials for fold in range(folds)]
            self.validate_batch_is_legal(batch)
            # job numbers continue across resumed runs, so no job directory is reused
            returns = self.launcher.launch(batch, initial_job_idx=trials[0].number * folds)
            for index, trial in enumerate(trials):
                self._tell(study, trial, returns[index * folds : (index + 1) * folds])
            done += len(trials)
        return self._report(study, sweep_dir)

    def _check_not_moved(self, sweep_dir: Path) -> None:
        """A sweep directory whose study is in the SQLite file of medexp's earlier default, run
        now with the journal default, would silently start a new study: say how to continue it."""
        old = sweep_dir / "optuna.db"
        path = journal_path(self.storage)
        if path is None or path.exists() or not old.is_file():
            return
        raise MedexpError(
            f"hydra.sweeper.storage={self.storage}: no journal yet, but {old} holds this sweep's earlier study; "
            f"continue it with hydra.sweeper.storage=sqlite:///{old} (or move it away to start a new study)"
        )

    def _sampler(self, done: int) -> Any:
        """The sampler, its seed moved on by the trials already finished: a resumed study must
        not replay the draws of its first trials."""
        if not isinstance(self.sampler, functools.partial):
            return self.sampler
        seed = self.sampler.keywords.get("seed")
        return self.sampler() if seed is None else self.sampler(seed=seed + done)

    def _job_overrides(self, trial: Any, fixed: list[str], fold: int) -> list[str]:
        overrides = [*fixed, *(f"{key}={value}" for key, value in trial.params.items())]
        if self.cv_folds:
            # folds of one trial report the same epochs: pruning would mix them, so it is off
            return [*overrides, f"data.fold={fold}", f"data.num_folds={self.cv_folds}"]
        return [*overrides, f"{TRIAL_KEY}={trial.number}"]

    def _tell(self, study: Any, trial: Any, returns: Sequence[Any]) -> None:
        from optuna.trial import TrialState

        values, pruned = [], False
        for job in returns:
            try:
                result = job.return_value
            except Exception as exc:  # the job raised: the sweep goes on without this trial
                log.warning("trial %d failed: %s", trial.number, exc)
                study.tell(trial, state=TrialState.FAIL)
                return
            result = result if isinstance(result, dict) else {"objective": result}
            pruned |= result.get("status") == "pruned"
            values.append(result.get("objective"))
        if pruned:
            study.tell(trial, state=TrialState.PRUNED)
        elif any(value is None for value in values):
            log.warning(
                "trial %d: optimized_metric %r was not logged", trial.number, self.config.get("optimized_metric")
            )
            study.tell(trial, state=TrialState.FAIL)
        elif len(values) > 1:
            from medexp.utils.stats import pool

            pooled = pool(values)
            trial.set_user_attr("fold_values", values)
            trial.set_user_attr("cv", pooled)
            study.tell(trial, pooled["mean"])
        else:
            study.tell(trial, values[0])

    def _report(self, study: Any, sweep_dir: Path) -> dict[str, Any]:
        from optuna.trial import TrialState

        states = [trial.state.name.lower() for trial in study.trials]
        summary: dict[str, Any] = {
            "study_name": self.study_name,
            "storage": masked(self.storage),
            "direction": study.direction.name.lower(),
            "optimized_metric": self.config.get("optimized_metric"),
            "trials": {state: states.count(state) for state in sorted(set(states))},
        }
        if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            best = study.best_trial
            summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
            log.info(
                "best trial %d: %s = %s with %s", best.number, summary["optimized_metric"], best.value, best.params
            )
        OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optimization_results.yaml")
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            raise RuntimeError(f"no trial of study {self.study_name!r} completed; see the jobs' logs in {sweep_dir}")
        return summary
