"""``medexp predict ckpt_path=... input=... output=...`` (or ``python -m medexp.predict``): apply a
checkpoint to new images.

Model and data module are rebuilt from the run config stored in the checkpoint (the data
module's splits are not loaded); each input is prepared exactly as the test split was
(:meth:`~medexp.data.base.ArrayDataModule.predict_transform`). Classification writes
``<output>/predictions.csv``; segmentation writes one mask of class indices per input, in the
input's format and geometry, and lists them in ``<output>/predictions.csv``; detection writes one
row per box to ``<output>/predictions.csv`` and every image's boxes to ``<output>/boxes.json``
(:class:`~medexp.inference.writers.BoxWriter`); registration takes a CSV of pairs (``fixed``, ``moving``) and writes each
warped moving image and its displacement field in the fixed image's format and geometry
(:class:`~medexp.inference.writers.RegistrationWriter`).

Classifiers may report how certain they are (``uncertainty=mc_dropout|tta``): the CSV then
holds each image's probabilities averaged over several stochastic passes, and two more columns
(see :class:`~medexp.inference.writers.TableWriter`): ``entropy`` and ``std``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from medexp.inference.loop import UNCERTAINTY
from medexp.resolvers import register_resolvers
from medexp.utils.config import CONFIG_PATH
from medexp.utils.errors import MedexpError, user_errors
from medexp.utils.validation import Rule, check_options

log = logging.getLogger("medexp")
register_resolvers()

RULES = (
    Rule("batch_size", "int", 1, exact=True, message="expected a positive integer"),
    Rule("uncertainty", UNCERTAINTY, optional=True, message=f"expected null or one of {list(UNCERTAINTY)}"),
    # checked with uncertainty=null too: a bad value is a mistake whether or not it is used now
    Rule(
        "samples",
        "int",
        2,
        exact=True,
        message="expected an integer of at least 2 (the passes of uncertainty=mc_dropout)",
    ),
)


def predict(cfg: DictConfig) -> Path:
    """Predict on the images of ``cfg.input`` with ``cfg.ckpt_path``; write into ``cfg.output``.

    Returns:
        The path of ``predictions.csv``.
    """
    from medexp.utils.config import check_config

    check_config(cfg)
    check_options(cfg, RULES)
    method = cfg.get("uncertainty")

    import lightning.pytorch as L
    from hydra.utils import instantiate

    from medexp.checkpoints.checkpoint import INFERENCE, Checkpoint
    from medexp.inference.inputs import find_inputs, find_pairs
    from medexp.inference.loop import Sampled, file_loader
    from medexp.inference.writers import prediction_writer
    from medexp.utils.runtime import tidy_library_output

    tidy_library_output()
    checkpoint = Checkpoint(cfg.ckpt_path, cfg.allowed_targets)
    # what the task predicts on: images, or pairs of images (a CSV with fixed and moving columns)
    pairs = getattr(checkpoint.task_class, "prediction_inputs", "images") == "pairs"
    inputs = find_pairs(str(cfg.input)) if pairs else find_inputs(str(cfg.input))
    output = Path(cfg.output).expanduser()
    datamodule, model = checkpoint.build(cfg.data, model_overrides=INFERENCE)
    kind = model.prediction_writer  # how its task writes predictions
    if kind is None:
        raise MedexpError(model.not_predicted.format(name=type(model).__name__, ckpt=cfg.ckpt_path))
    if method is not None:
        model = Sampled(model, method, int(cfg.samples))
    transform = datamodule.predict_transform()
    writer = prediction_writer(kind, datamodule, transform, inputs, output, uncertainty=method is not None)
    items = [pair.item() for pair in inputs] if pairs else [{"image": str(path)} for path in inputs]
    loader = file_loader(items, transform, cfg.batch_size, datamodule.num_workers)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[writer])
    log.info("predicting on %d image(s) from %s", len(inputs), cfg.input)
    if method is not None:
        log.info("uncertainty: %s over %d passes per image", method, model.passes(datamodule.spatial_dims))
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # the same seed, the same dropout masks
    trainer.predict(model, dataloaders=loader, return_predictions=False)
    table = output / "predictions.csv"
    writer.save(table)
    log.info("predictions: %s", table)
    return table


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors():
        predict(cfg)


if __name__ == "__main__":
    main()
