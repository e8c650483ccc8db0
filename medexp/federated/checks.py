"""Settings that ``medexp federate`` cannot run with, found before anything is built.

The types and ranges of the ``federated.*`` keys are rules of :mod:`medexp.utils.validation`;
these are combinations, reported with them (``validate_config(config, extra=...)``).
"""

from __future__ import annotations

from typing import Any


def check_federated(config: dict[str, Any]) -> list[str]:
    """Problems of a resolved ``medexp federate`` config, one message each, naming the key,
    its value and what would work."""
    federated = config.get("federated") or {}
    trainer = config.get("trainer") or {}
    problems = []
    if federated.get("sites") is None and federated.get("split") != "column":
        problems.append(
            f"federated.sites=null with federated.split={federated.get('split')}; only split=column takes the "
            "number of sites from the data: give a number of sites (at least 2)"
        )
    if trainer.get("max_epochs") != federated.get("local_epochs"):
        problems.append(
            f"trainer.max_epochs={trainer.get('max_epochs')} but federated.local_epochs={federated.get('local_epochs')}: "
            "each site trains federated.local_epochs epochs per round (federated.rounds rounds); set those instead"
        )
    # sites are simulated one after the other in this process, each on one device
    if (
        trainer.get("devices") not in (1, "1")
        or trainer.get("num_nodes", 1) != 1
        or "ddp" in str(trainer.get("strategy", ""))
    ):
        problems.append(
            f"trainer.devices={trainer.get('devices')}, trainer.num_nodes={trainer.get('num_nodes', 1)}, "
            f"trainer.strategy={trainer.get('strategy', 'auto')}: medexp federate simulates the sites one after the "
            "other on one device; use trainer=default, cpu or gpu with trainer.devices=1"
        )
    scheduler = config.get("scheduler") or {}
    if str(scheduler.get("_target_", "")).endswith("ReduceLROnPlateau"):
        problems.append(
            "scheduler=plateau follows a validation metric, which a site's local training does not compute; "
            "use scheduler=none, cosine or multistep (over federated.local_epochs)"
        )
    generated = (config.get("data") or {}).get("generated")
    if generated and generated.get("ratio", 0):
        problems.append(
            f"data.generated.ratio={generated.get('ratio')}: generated images belong to no site; "
            "medexp federate trains on real data only (data.generated=null)"
        )
    if (config.get("model") or {}).get("calibrate"):
        problems.append(
            "model.calibrate=true is not available in medexp federate (no best checkpoint to calibrate); set it to false"
        )
    return problems
