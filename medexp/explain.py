"""``medexp explain ckpt_path=... input=... method=gradcam output=...`` (or ``python -m
medexp.explain``): saliency maps of a classifier, drawn over its inputs and scored.

The model and the data preprocessing are rebuilt from the run config stored in the checkpoint,
as ``medexp predict`` does. For each image, the map of one class (the predicted one, or
``class_index``) is computed with MONAI's ``monai.visualize``:

- ``gradcam`` (Grad-CAM, Selvaraju et al. 2017) and ``gradcampp`` (Grad-CAM++, Chattopadhyay et
  al. 2018) on a layer of the net (``layer=<module name>``, names as in ``model.net``; by
  default the net's last feature map: the output of the last module whose output still has a
  spatial extent, i.e. the last convolutional block after its normalisation and activation,
  e.g. ``features.5`` of ``model=cnn`` or ``layer4`` of a MONAI ResNet);
- ``occlusion`` (occlusion sensitivity): how much the class's probability drops when a patch
  around each pixel is occluded (negative drops count as 0);
- ``attention`` (attention rollout, Abnar and Zuidema 2020) of a vision transformer
  (``model=vit``): how much each patch flows through the attention of every block into the class
  token the classifier reads; one map for all classes.

Maps are upsampled (bi/trilinear) to the input's size and scaled to [0, 1] per image. Written
into ``output``:

- ``overlays/<image>.png``: the input next to the map over it (3D: the slice with the most
  saliency), the lesion's outline in green where a mask is known;
- ``saliency.csv``: one row per image: ``image``, ``label`` (``split=`` only),
  ``predicted_class`` (the most probable class; multi-label: label) and its ``probability``,
  ``explained_class`` and ``explained_probability``, and the scores of
  :mod:`medexp.metrics.saliency`: ``pointing_mass``, ``mask_fraction`` (the pointing mass of a
  uniform map), ``pointing_lift`` (their ratio) and ``pointing_hit`` where a mask has a lesion;
  ``deletion_auc``, ``insertion_auc`` and, with ``random_reference``, the same for a random
  ordering of the pixels (``*_random``); ``overlay``: the picture's path;
- ``summary.json``: the means of those scores (also logged).

Inputs are image files (``input=``: a file, folder, glob or CSV, see
:func:`medexp.inference.inputs.find_inputs`, prepared by the data module's ``predict_transform``), with
lesion masks from ``mask=`` (a column of the input CSV or a folder of masks named like the
images; scored in the image file's own geometry, the map mapped back through the data's
spatial transforms), or a split of the checkpoint's own data (``split=test``), whose lesion
masks the synthetic data serve; without ``input=`` or ``split=``, the test split.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, open_dict

from medexp.explainability.maps import (
    LAYERLESS,
    METHODS,
    SaliencyMaps,
    check_explainable,
    explain_batch,
    mask_scores,
    overlay_picture,
)
from medexp.metrics.saliency import BASELINES
from medexp.resolvers import register_resolvers
from medexp.utils.config import CONFIG_PATH
from medexp.utils.errors import MedexpError, user_errors
from medexp.utils.validation import Rule, check_options

log = logging.getLogger("medexp")
register_resolvers()

SPLITS = ("val", "test")
# what is explained without input= or split=
DEFAULT_SPLIT = "test"
RULES = (
    Rule("method", tuple(METHODS)),
    Rule("split", SPLITS, optional=True),
    Rule("baseline", BASELINES),
    Rule("steps", "int", 0, exact=True, message="expected 0 (no deletion/insertion curves) or more"),
    Rule("batch_size", "int", 1, exact=True, message="expected a positive integer"),
    Rule("limit", "int", 1, exact=True, optional=True, message="expected a positive number of images or null (all)"),
)

# --- inputs -----------------------------------------------------------------------------------


@dataclass
class Batch:
    """What :func:`explain` gets per step: model inputs, their names, known labels, and per
    image the mask (``(1, *spatial)``, None when unknown) and how to bring a map into the mask's
    geometry."""

    names: list[str]
    images: torch.Tensor
    labels: list[str] | None = None
    masks: list[torch.Tensor | None] = field(default_factory=list)
    # per image: (1, *spatial) map in the model's space -> map in the mask's space
    to_mask_space: Any = None
    # per image: the mask in the model's space, for the picture's outline (None: not drawn)
    outlines: list[torch.Tensor | None] = field(default_factory=list)


def _label_text(label: torch.Tensor) -> str:
    return " ".join(str(int(v)) for v in label.reshape(-1)) if label.numel() > 1 else str(int(label))


def split_batches(datamodule: Any, split: str, batch_size: int, limit: int | None) -> Iterator[Batch]:
    """Batches of a split of the checkpoint's data, as its test loader prepares them; masks
    where the data serve ``mask`` of the images' size."""
    from medexp.inference.loop import split_loader

    loader = split_loader(datamodule, split, batch_size, limit)
    count = len(loader.dataset)
    digits = len(str(max(count - 1, 1)))
    start = 0
    warned = False
    for batch in loader:
        images = batch["image"]
        n = images.shape[0]
        masks: list[torch.Tensor | None] = [None] * n
        if "mask" in batch:
            if tuple(batch["mask"].shape[2:]) == tuple(images.shape[2:]):
                masks = list(batch["mask"])
            elif not warned:
                log.warning(
                    "the %s masks (%s) do not match the images (%s); no mask scores",
                    split,
                    tuple(batch["mask"].shape[2:]),
                    tuple(images.shape[2:]),
                )
                warned = True
        labels = [_label_text(label) for label in batch["label"]] if "label" in batch else None
        yield Batch(
            names=[f"{split}_{index:0{digits}d}" for index in range(start, start + n)],
            images=images.as_subclass(torch.Tensor) if hasattr(images, "as_tensor") else images,
            labels=labels,
            masks=masks,
            to_mask_space=lambda index, saliency: saliency,
            outlines=masks,
        )
        start += n


def file_batches(
    datamodule: Any, inputs: list[Path], masks: list[Path | None], batch_size: int, limit: int | None
) -> Iterator[Batch]:
    """Batches of image files prepared by ``predict_transform``; masks read as the images are
    (channel first, any channel above 0 is lesion) and scored in the file's geometry: the map
    goes back through the spatial transforms (``monai.transforms.Invertd``)."""
    from monai.data import MetaTensor, decollate_batch
    from monai.transforms import Invertd, LoadImage

    from medexp.inference.loop import file_loader

    if limit is not None:
        inputs, masks = inputs[:limit], masks[:limit]
    transform = datamodule.predict_transform()
    invert = Invertd(keys="saliency", transform=transform, orig_keys="image", nearest_interp=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
        read = LoadImage(image_only=True, ensure_channel_first=True)
    root = Path(os.path.commonpath([path.absolute().parent for path in inputs]))
    names = [str((path.absolute().parent / path.name).relative_to(root)) for path in inputs]
    loader = file_loader([{"image": str(path)} for path in inputs], transform, batch_size)
    start = 0
    try:
        for batch in loader:
            images = batch["image"]
            n = images.shape[0]
            items = decollate_batch(images.detach().cpu())
            batch_masks = []
            outlines = []
            for mask_path in masks[start : start + n]:
                mask = None if mask_path is None else read(str(mask_path)).as_tensor().gt(0).any(dim=0, keepdim=True)
                batch_masks.append(mask)
                # the model's space of 2D files is transposed (see ArrayDataModule.predict_transform)
                view = None if mask is None else (mask.transpose(1, 2) if datamodule.spatial_dims == 2 else mask)
                outlines.append(view if view is not None and view.shape[1:] == images.shape[2:] else None)

            def to_mask_space(index: int, saliency: torch.Tensor, items=items) -> torch.Tensor:
                # Invertd takes the transforms to undo from `image`, given a MetaTensor to invert
                mapped = invert({"image": items[index], "saliency": MetaTensor(saliency.cpu())})["saliency"]
                return mapped.as_tensor()

            yield Batch(
                names=[names[k] for k in range(start, start + n)],
                images=images.as_tensor(),
                masks=batch_masks,
                to_mask_space=to_mask_space,
                outlines=outlines,
            )
            start += n
    except RuntimeError as exc:
        if "stack expects each tensor to be equal size" in str(exc):
            raise MedexpError(f"the inputs differ in size after data.transforms; use batch_size=1 ({exc})") from exc
        raise


# --- the command ------------------------------------------------------------------------------

SCORES = (
    "pointing_mass",
    "mask_fraction",
    "pointing_lift",
    "pointing_hit",
    "deletion_auc",
    "insertion_auc",
    "deletion_auc_random",
    "insertion_auc_random",
)
POINTING = ("pointing_mass", "mask_fraction", "pointing_lift", "pointing_hit")


def _combination_problems(cfg: DictConfig) -> list[str]:
    """What :data:`RULES` cannot say: the images come from ``input`` or ``split`` (not both;
    neither: the test split), ``mask`` goes with ``input``, and ``device`` names a device torch
    knows."""
    problems = []
    if cfg.input is not None and cfg.split is not None:
        problems.append("give either input=<image file, folder, glob or CSV> or split=test|val (not both)")
    if cfg.input is None and cfg.mask is not None:
        problems.append("mask= applies to input= files; split= uses the masks its data serve")
    try:
        _device(str(cfg.device))
    except MedexpError as exc:
        problems.append(str(exc))
    return problems


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(spec)
    except RuntimeError as exc:
        raise MedexpError(f"device={spec!r}; expected auto, cpu, cuda or cuda:<n>") from exc


def _text(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of the scores of ``rows`` (NaNs left out); the pointing scores over the images whose
    pointing mass is defined (a lesion in the mask and a map with mass), so ``mask_fraction``
    is the uniform map's pointing mass on the same images."""

    def mean(name: str, subset: Sequence[dict[str, Any]]) -> float | None:
        values = [row[name] for row in subset if isinstance(row.get(name), float) and not math.isnan(row[name])]
        return float(np.mean(values)) if values else None

    scored = [
        row for row in rows if isinstance(row.get("pointing_mass"), float) and not math.isnan(row["pointing_mass"])
    ]
    means = {name: mean(name, scored if name in POINTING else rows) for name in SCORES}
    means["probability"] = mean("probability", rows)
    mass, fraction = means["pointing_mass"], means["mask_fraction"]
    return {
        "images": len(rows),
        "images_scored_with_mask": len(scored),
        "mean": means,
        "pointing_mass_over_uniform": mass / fraction if mass is not None and fraction else None,
    }


def explain(cfg: DictConfig) -> dict[str, Any]:
    """Explain ``cfg.ckpt_path``'s predictions on ``cfg.input`` files or ``cfg.split`` (by default
    the test split); write overlays, ``saliency.csv`` and ``summary.json`` into ``cfg.output``.

    Returns:
        The contents of ``summary.json``.
    """
    from medexp.utils.config import check_config

    check_config(cfg)
    check_options(cfg, RULES, extra=_combination_problems(cfg))
    if cfg.input is None and cfg.split is None:
        with open_dict(cfg):
            cfg.split = DEFAULT_SPLIT
        log.info("explaining the checkpoint's %s split (input=<images> explains your files)", DEFAULT_SPLIT)
    if cfg.method in LAYERLESS and cfg.layer is not None:
        log.warning("layer=%s is ignored: %s has no layer", cfg.layer, METHODS[cfg.method])

    from medexp.checkpoints.checkpoint import INFERENCE, Checkpoint
    from medexp.inference.inputs import find_inputs, mask_files
    from medexp.utils.runtime import tidy_library_output

    tidy_library_output()
    checkpoint = Checkpoint(cfg.ckpt_path, cfg.allowed_targets)
    inputs = find_inputs(str(cfg.input)) if cfg.input is not None else []
    masks = mask_files(inputs, str(cfg.mask), str(cfg.input)) if cfg.mask is not None else [None] * len(inputs)
    datamodule, model = checkpoint.build(cfg.data, model_overrides=INFERENCE)
    check_explainable(model)
    num_classes = int(model.num_classes)
    if cfg.class_index is not None and not 0 <= cfg.class_index < num_classes:
        raise MedexpError(f"class_index={cfg.class_index}; the model has classes 0..{num_classes - 1}")
    if cfg.mask is not None and not any(path is not None for path in masks):
        log.warning("mask=%s: no mask found for any of the %d input(s); no mask scores", cfg.mask, len(inputs))
    elif cfg.mask is not None and None in masks:
        log.warning("mask=%s: %d of %d input(s) have no mask", cfg.mask, masks.count(None), len(inputs))
    device = _device(str(cfg.device))
    model = model.to(device).eval()
    output = Path(cfg.output).expanduser()
    batches = (
        split_batches(datamodule, cfg.split, cfg.batch_size, cfg.limit)
        if cfg.split is not None
        else file_batches(datamodule, inputs, masks, cfg.batch_size, cfg.limit)
    )
    rows, layer = _explain_batches(cfg, model, batches, device, output)
    if not rows:
        raise MedexpError("nothing to explain: no images")
    table = _write_table(cfg, rows, output)
    summary = {
        "checkpoint": str(cfg.ckpt_path),
        "method": cfg.method,
        "layer": layer if cfg.method not in LAYERLESS else None,
        "class_index": cfg.class_index,
        "source": f"split={cfg.split}" if cfg.split is not None else f"input={cfg.input}",
        "steps": cfg.steps,
        "baseline": cfg.baseline,
        **summarise(rows),
        "csv": str(table),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _log_summary(summary)
    log.info("saliency scores: %s", table)
    return summary


def _write_table(cfg: DictConfig, rows: list[dict[str, Any]], output: Path) -> Path:
    """``saliency.csv``: one row per image, with the scores some image has."""
    header = [
        "image",
        *(["label"] if any("label" in row for row in rows) else []),
        "predicted_class",
        "probability",
        "explained_class",
        "explained_probability",
        *(s for s in SCORES if any(s in row for row in rows)),
        *(["overlay"] if cfg.overlays else []),
    ]
    output.mkdir(parents=True, exist_ok=True)
    table = output / "saliency.csv"
    with table.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows([[_text(row.get(column, float("nan"))) for column in header] for row in rows])
    return table


def _explain_batches(
    cfg: DictConfig, model: Any, batches: Iterator[Batch], device: torch.device, output: Path
) -> tuple[list[dict[str, Any]], str | None]:
    """The rows of ``saliency.csv`` (one per image of ``batches``), the overlays written into
    ``output``; and the layer the maps were taken at."""
    occlusion = cfg.get("occlusion") or {}
    generator = torch.Generator().manual_seed(int(cfg.seed))
    rows: list[dict[str, Any]] = []
    with SaliencyMaps(
        model,
        cfg.method,
        cfg.layer,
        patch=occlusion.get("patch"),
        occlusion_mode=occlusion.get("mode", "gaussian"),
        overlap=occlusion.get("overlap", 0.6),
        occlusion_batch=occlusion.get("batch_size", 32),
    ) as maps:
        for batch in batches:
            images = batch.images.to(device)
            if not rows:
                maps.prepare(images)
                default = cfg.layer is None and cfg.method not in LAYERLESS
                note = (
                    " (the net's last feature map; layer=<module name of model.net> picks another)" if default else ""
                )
                log.info("explaining with %s%s", maps.describe(), note)
            out = explain_batch(maps, images, cfg.class_index, cfg.steps, cfg.baseline, cfg.random_reference, generator)
            rows += [_row(cfg, batch, k, out, output) for k in range(len(batch.names))]
    return rows, maps.layer


def _row(cfg: DictConfig, batch: Batch, k: int, out: dict[str, Any], output: Path) -> dict[str, Any]:
    """The row of image ``k`` of ``batch`` given the maps and scores ``out`` of the batch; its
    overlay written (``cfg.overlays``)."""
    from medexp.utils.images import save_png

    name = batch.names[k]
    probabilities = out["probabilities"].cpu()
    predicted, explained = int(out["predicted"][k]), int(out["explained"][k])
    row: dict[str, Any] = {"image": name}
    if batch.labels is not None:
        row["label"] = batch.labels[k]
    row.update(
        predicted_class=predicted,
        probability=float(probabilities[k, predicted]),
        explained_class=explained,
        explained_probability=float(probabilities[k, explained]),
    )
    saliency = out["saliency"][k].cpu()
    mask = batch.masks[k] if batch.masks else None
    if mask is not None:
        mapped = batch.to_mask_space(k, saliency)
        if tuple(mapped.shape[1:]) != tuple(mask.shape[1:]):
            raise MedexpError(
                f"the mask of {name} has shape {tuple(mask.shape[1:])}; its image {tuple(mapped.shape[1:])}"
            )
        row.update(mask_scores(mapped, mask))
    for score in ("deletion_auc", "insertion_auc", "deletion_auc_random", "insertion_auc_random"):
        if score in out:
            row[score] = float(out[score][k])
    if cfg.overlays:
        outline = batch.outlines[k] if batch.outlines else None
        picture = overlay_picture(batch.images[k], saliency, outline)
        path = save_png(picture, output / "overlays" / f"{_overlay_name(name)}.png")
        row["overlay"] = str(path.relative_to(output))
    return row


def _overlay_name(name: str) -> str:
    from medexp.data.paths import file_stem

    path = Path(name)
    return str(path.parent / file_stem(path)) if path.suffix else name


def _log_summary(summary: dict[str, Any]) -> None:
    means = summary["mean"]

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    log.info(
        "%d image(s) explained, mean probability of the predicted class %s",
        summary["images"],
        fmt(means["probability"]),
    )
    if summary["images_scored_with_mask"]:
        log.info(
            "pointing mass %s inside the lesion masks vs %s for a uniform map (%.2fx) over %d image(s) with a lesion; "
            "pointing game %s",
            fmt(means["pointing_mass"]),
            fmt(means["mask_fraction"]),
            summary["pointing_mass_over_uniform"] or float("nan"),
            summary["images_scored_with_mask"],
            fmt(means["pointing_hit"]),
        )
    if means["deletion_auc"] is not None:
        log.info(
            "deletion AUC %s (random order %s, lower is better); insertion AUC %s (random order %s, higher is better)",
            fmt(means["deletion_auc"]),
            fmt(means["deletion_auc_random"]),
            fmt(means["insertion_auc"]),
            fmt(means["insertion_auc_random"]),
        )


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="explain")
def main(cfg: DictConfig) -> None:
    with user_errors():
        explain(cfg)


if __name__ == "__main__":
    main()
