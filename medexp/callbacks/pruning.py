"""Stop an Optuna trial early when its pruner says the run will not beat the others."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as L

log = logging.getLogger("medexp")


class OptunaPruning(L.Callback):
    """Report the monitored metric to an Optuna trial after each validation; stop when pruned.

    The trial lives in the study's storage (a journal file, SQLite or a database server: see
    :mod:`hydra_plugins.medexp.storage`), not in this process, so this works whether
    the sweeper runs the job in-process or a launcher (submitit) runs it elsewhere. The sweeper
    sets ``trial``; with ``trial=None`` (an ordinary run, or a reproduced trial) it does nothing.
    A pruned run stops like early stopping, and ``medexp train`` records ``status: pruned``.

    Args:
        study_name, storage: the study (see ``hydra.sweeper``).
        trial: the trial's number in the study.
        monitor: the metric reported, e.g. ``val/auroc``.
        pruner: the sweeper's pruner (an Optuna pruner decides in the process that asks it).
    """

    def __init__(
        self, study_name: str, storage: str, trial: int | None = None, monitor: str = "val/loss", pruner: Any = None
    ) -> None:
        self.study_name, self.storage, self.trial_number, self.monitor = study_name, storage, trial, monitor
        self.pruner = pruner
        self.pruned = False
        self._trial: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.trial_number is None or stage != "fit" or not trainer.is_global_zero:
            return
        import optuna

        from hydra_plugins.medexp.storage import open_storage

        storage = open_storage(self.storage)
        study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=self.pruner)
        study_id = storage.get_study_id_from_name(self.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.trial_number)
        # a Trial bound to the stored trial: report() and should_prune() go through the storage
        self._trial = optuna.trial.Trial(study, trial_id)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # only the validations of fit: not the sanity check, nor `trainer.validate` afterwards
        if self.trial_number is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        prune = False
        if self._trial is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                raise KeyError(
                    f"OptunaPruning: metric {self.monitor!r} was not logged; logged: {sorted(trainer.callback_metrics)}"
                )
            self._trial.report(float(value), step=trainer.current_epoch)
            prune = self._trial.should_prune()
        # every DDP rank must stop together
        prune = trainer.strategy.broadcast(prune)
        if prune:
            log.info(
                "trial %d pruned at epoch %d (%s=%s)",
                self.trial_number,
                trainer.current_epoch,
                self.monitor,
                float(trainer.callback_metrics[self.monitor]),
            )
            self.pruned = True
            trainer.should_stop = True
