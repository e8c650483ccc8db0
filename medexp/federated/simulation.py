"""The rounds of a federated simulation, one site after the other in this process.

Each round: every site trains the global weights on its own training samples (a fresh Lightning
Trainer, see :func:`medexp.federated.local.local_update`), the server averages the results by
sample count (:func:`medexp.federated.aggregate.federated_average`), and the new global model is
validated on each site's validation samples and on the whole validation split.

A minimal loop on Lightning rather than Flower's simulation engine: Flower simulates clients as
Ray actors (``flwr[simulation]`` installs Ray, FastAPI and uvicorn, and replaces pinned versions of
protobuf, packaging and rich), which is a lot of machinery for running N local updates in turn on
one machine, and would take the training out of the Hydra run that records it. The local update
here is the part a Flower or NVIDIA FLARE client would run at each site.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch

from medexp.federated.aggregate import federated_average
from medexp.federated.local import local_seed, local_update
from medexp.federated.sites import SitePlan
from medexp.utils.run_info import to_floats

log = logging.getLogger("medexp")
ALGORITHMS = ("fedavg", "fedprox")
GLOBAL = "global"


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the weights that sites train and the server averages: the parameters and the
    buffers in the state dict (BatchNorm statistics), not metric states such as the best score."""
    state = model.state_dict()
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items() if name in names}


def set_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load ``weights`` (see :func:`model_weights`) into ``model``, leaving its other state."""
    missing = {name for name, _ in model.named_parameters()} - set(weights)
    if missing:  # never expected: the weights come from the same model
        raise RuntimeError(f"weights for {sorted(missing)[:5]} are missing")
    model.load_state_dict(weights, strict=False)


@contextlib.contextmanager
def quiet_trainers() -> Iterator[None]:
    """Silence what every one of the many short-lived Trainers would print (device summary,
    "max_epochs reached", no validation loop during local training)."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(val_dataloader|does not have many workers).*")
            yield
    finally:
        logger.setLevel(level)


def evaluate_sites(
    trainer: L.Trainer, model: L.LightningModule, datamodule: Any, plan: SitePlan, split: str
) -> tuple[dict[str, float], dict[str, dict[str, float] | None]]:
    """Metrics of ``model`` on the whole ``split`` (``val`` or ``test``) and on each site's part.

    Returns:
        The global metrics (``<split>/<name>``), and each site's (None for a site without samples
        of the split).
    """
    run = trainer.validate if split == "val" else trainer.test
    whole = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    overall = to_floats(run(model, dataloaders=whole, verbose=False)[0])
    per_site: dict[str, dict[str, float] | None] = {}
    for name, rows in zip(plan.names, plan.indices[split]):
        if len(rows) == 0:
            per_site[name] = None
            continue
        loader = datamodule.subset_loader(split, rows, shuffle=False)
        per_site[name] = to_floats(run(model, dataloaders=loader, verbose=False)[0])
    return overall, per_site


def simulate(
    model: L.LightningModule,
    datamodule: Any,
    plan: SitePlan,
    *,
    rounds: int,
    algorithm: str,
    mu: float,
    seed: int,
    local_trainer: Callable[[list[L.Callback]], L.Trainer],
    eval_trainer: L.Trainer,
    history: Path,
) -> dict[str, Any]:
    """Train ``model`` over the sites of ``plan`` for ``rounds`` rounds; test the final global model.

    Args:
        model: the task; holds the final global weights afterwards.
        datamodule: a set-up :class:`~medexp.data.base.ArrayDataModule`.
        plan: the sites and their samples (:func:`medexp.federated.sites.plan_sites`).
        rounds: communication rounds.
        algorithm: ``fedavg`` or ``fedprox``.
        mu: FedProx's proximal weight.
        seed: the run's seed (each site's update is seeded from it, see :func:`local_seed`).
        local_trainer: a fresh Trainer for one local update, given its callbacks.
        eval_trainer: the Trainer that validates and tests the global model.
        history: the CSV written after every round, one row per round and site plus a
            ``global`` row: training samples, the local update's ``train/*`` metrics, and the
            global model's ``val/*`` metrics on the site's validation samples.

    Returns:
        ``val`` and ``test`` (the final global model on the whole splits) and ``sites``
        (``{name: {samples, val, test}}``).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"federated.algorithm={algorithm!r}; expected one of {list(ALGORITHMS)}")
    weights = plan.counts("train")
    rows: list[dict[str, Any]] = []
    with quiet_trainers():
        for round_ in range(1, rounds + 1):
            start = model_weights(model)
            states, trained = [], []
            for site, indices in enumerate(plan.indices["train"]):
                set_weights(model, start)
                trained.append(
                    local_update(
                        model,
                        local_trainer,
                        partial(datamodule.subset_loader, "train", indices, shuffle=True),
                        seed=local_seed(seed, round_, site),
                        mu=mu if algorithm == "fedprox" else None,
                    )
                )
                states.append(model_weights(model))
            set_weights(model, federated_average(start, states, weights))
            overall, per_site = evaluate_sites(eval_trainer, model, datamodule, plan, "val")
            for name, count, local, metrics in zip(plan.names, weights, trained, per_site.values()):
                rows.append({"round": round_, "site": name, "train_samples": count, **local, **(metrics or {})})
            mean_local = {
                key: sum(local.get(key, 0.0) * w for local, w in zip(trained, weights)) / sum(weights)
                for key in trained[0]
            }
            rows.append({"round": round_, "site": GLOBAL, "train_samples": sum(weights), **mean_local, **overall})
            _write_rows(history, rows)
            _log_round(round_, rounds, model.monitor, overall, per_site)
        val, val_sites = overall, per_site  # the last round's validation is the final model's
        test, test_sites = evaluate_sites(eval_trainer, model, datamodule, plan, "test")
    sites = {
        name: {
            "samples": {split: len(plan.indices[split][index]) for split in plan.indices},
            "val": val_sites[name],
            "test": test_sites[name],
        }
        for index, name in enumerate(plan.names)
    }
    return {"val": val, "test": test, "sites": sites}


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    # columns in order of first appearance: a site whose validation is empty has fewer keys
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _log_round(
    round_: int, rounds: int, monitor: str, overall: dict[str, float], per_site: dict[str, dict[str, float] | None]
) -> None:
    sites = ", ".join(f"{name} {m[monitor]:.4f}" if m and monitor in m else f"{name} -" for name, m in per_site.items())
    log.info(
        "round %d/%d: global %s %.4f; sites: %s", round_, rounds, monitor, overall.get(monitor, float("nan")), sites
    )
