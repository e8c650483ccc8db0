"""``medexp sample ckpt_path=... n=64 output=...`` (or ``python -m medexp.sample``): generate images
with a generative model's checkpoint (``model=gan``, ``model=ddpm``).

Writes ``<output>/samples.png`` (a grid; a conditional model's classes in blocks) and
``<output>/samples.npz`` (``images`` ``(n, C, *spatial)`` float32 in the data's intensity range,
``labels`` for a conditional model). With ``features_ckpt`` (a classifier trained on the same
data), also ``<output>/quality.json``: domain FID and KID of the samples against the real images
of ``reference_split`` (see :mod:`medexp.metrics.domain`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from medexp.resolvers import register_resolvers
from medexp.utils.config import CONFIG_PATH
from medexp.utils.errors import MedexpError, user_errors
from medexp.utils.validation import Rule, check_options

log = logging.getLogger("medexp")
register_resolvers()

SPLITS = ("train", "val", "test")
# a diffusion model's sampling settings that `medexp sample` may change (null: as trained)
SAMPLING = ("sampler", "sample_steps", "guidance_scale")
RULES = (
    Rule("n", "int", 1, exact=True, message="expected a positive number of images"),
    Rule("reference_split", SPLITS),
    Rule("sampler", ("ddim", "ddpm"), optional=True),
    Rule("sample_steps", "int", 1, optional=True),
    Rule("guidance_scale", "number", 0, optional=True),
)


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Generate ``cfg.n`` images with ``cfg.ckpt_path`` into ``cfg.output``.

    Returns:
        Paths written (``grid``, ``npz``, and ``quality`` with ``features_ckpt``), and the quality
        measures when computed.
    """
    from medexp.utils.config import check_config

    check_config(cfg)
    check_options(cfg, RULES)

    import torch

    from medexp.checkpoints.checkpoint import Checkpoint
    from medexp.utils.runtime import tidy_library_output

    tidy_library_output()
    checkpoint = Checkpoint(cfg.ckpt_path, cfg.allowed_targets)
    model = checkpoint.build_generator({key: cfg[key] for key in SAMPLING if cfg.get(key) is not None})
    images, labels = model.sample(cfg.n, _labels(cfg, model), torch.Generator().manual_seed(cfg.seed))
    output = Path(cfg.output).expanduser()
    written = _write_samples(output, images, labels, model)
    log.info("%d samples: %s, %s", cfg.n, written["grid"], written["npz"])
    if cfg.features_ckpt:
        written.update(_quality(cfg, checkpoint, model, images, output))
    return written


def _labels(cfg: DictConfig, model: Any) -> Any:
    """The classes to generate: ``label`` for all, else a conditional model's classes in blocks;
    None for an unconditional one."""
    import torch

    kind = getattr(model, "generator_kind", "GAN")
    if cfg.label is not None:
        if not model.conditional:
            raise MedexpError(f"label={cfg.label}: this {kind} is not class-conditional; leave label unset")
        if not 0 <= cfg.label < model.num_classes:
            raise MedexpError(f"label={cfg.label}; this {kind} generates classes 0..{model.num_classes - 1}")
        return torch.full((cfg.n,), int(cfg.label))
    if model.conditional:
        return torch.arange(cfg.n) * model.num_classes // cfg.n  # classes in blocks
    return None


def _write_samples(output: Path, images: Any, labels: Any, model: Any) -> dict[str, Any]:
    """``samples.png`` (a grid) and ``samples.npz`` (images, intensity range, classes)."""
    import numpy as np

    from medexp.utils.images import grid, save_png

    output.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {"grid": save_png(grid(images, (model.low, model.high)), output / "samples.png")}
    arrays = {"images": images.numpy().astype(np.float32), "intensity_range": np.array([model.low, model.high])}
    if labels is not None:
        arrays["labels"] = labels.numpy().astype(np.int64)
    written["npz"] = output / "samples.npz"
    np.savez_compressed(written["npz"], **arrays)
    return written


def _quality(cfg: DictConfig, checkpoint: Any, model: Any, images: Any, output: Path) -> dict[str, Any]:
    """Domain FID and KID of ``images`` against the generator's ``reference_split``, measured with the
    features of the classifier ``features_ckpt``; written to ``quality.json``."""
    import torch

    from medexp.metrics.domain import DomainFeatures, quality_metrics
    from medexp.utils.run_info import write_json

    features = DomainFeatures.from_checkpoint(cfg.features_ckpt, model.low, model.high)
    datamodule, _ = checkpoint.build(cfg.data, model_overrides=model.generator_overrides)
    datamodule.setup("test")
    loader = torch.utils.data.DataLoader(datamodule.datasets[cfg.reference_split], batch_size=256)
    real_count = len(datamodule.datasets[cfg.reference_split])
    subset = min(cfg.n, real_count)
    if cfg.kid_subset_size > subset:
        raise MedexpError(
            f"kid_subset_size={cfg.kid_subset_size} but there are {cfg.n} samples and {real_count} real "
            f"{cfg.reference_split} images; set kid_subset_size to at most {subset}"
        )
    metrics = quality_metrics(features, cfg.kid_subset_size)
    for batch in loader:
        for metric in metrics.values():
            metric.update(batch["image"], real=True)
    for start in range(0, cfg.n, 256):
        for metric in metrics.values():
            metric.update(images[start : start + 256], real=False)
    kid_mean, kid_std = metrics["domain_kid"].compute_with_std()
    quality = {
        "domain_fid": float(metrics["domain_fid"].compute()),
        "domain_kid": float(kid_mean),
        "domain_kid_std": float(kid_std),
        "samples": cfg.n,
        "reference": f"{cfg.reference_split} split ({real_count} images)",
        "features_ckpt": str(cfg.features_ckpt),
        "num_features": features.num_features,
    }
    write_json(output / "quality.json", quality)
    log.info(
        "domain FID %.3f, KID %.4f ± %.4f against the %s split",
        quality["domain_fid"],
        kid_mean,
        kid_std,
        cfg.reference_split,
    )
    return {"quality": output / "quality.json", **quality}


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def main(cfg: DictConfig) -> None:
    with user_errors():
        sample(cfg)


if __name__ == "__main__":
    main()
