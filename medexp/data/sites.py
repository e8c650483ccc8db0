"""Acquisition sites of synthetic data: the same anatomy imaged by scanners that differ.

Each site applies its own intensity changes to the phantoms (:func:`apply_site`), so a model
trained on one site meets a real domain shift on another: the setting of per-site evaluation,
leave-one-site-out cross-validation (``data.fold_by=site``) and test-time adaptation
(:mod:`medexp.callbacks.adaptation`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from medexp.utils.errors import MedexpError


@dataclass(frozen=True)
class SiteShift:
    """How one site's images differ from the phantoms as generated (all defaults: no change).

    Applied in this order to intensities in [0, 1], clipped to [0, 1] at the end:

    Attributes:
        bias: strength of a multiplicative linear bias field (a coil's inhomogeneity): the image
            is scaled by ``1 + bias * g``, ``g`` a ramp in [-1, 1] along a random direction per image.
        contrast: scales intensities about mid-grey, ``0.5 + contrast * (x - 0.5)``.
        brightness: added after the contrast change.
        gamma: ``x ** gamma`` (after clipping to [0, 1]).
        noise: standard deviation of Gaussian noise added last.
    """

    bias: float = 0.0
    contrast: float = 1.0
    brightness: float = 0.0
    gamma: float = 1.0
    noise: float = 0.0

    def is_identity(self) -> bool:
        return self == SiteShift()


def parse_sites(sites: Mapping[Any, Any] | None) -> tuple[list[str], list[SiteShift]]:
    """``data.sites`` (site name -> shift settings, see :class:`SiteShift`) -> names and shifts.

    Raises:
        MedexpError: naming the site and key, for unknown keys, values that are not numbers,
            ``contrast``/``gamma`` not above 0, ``noise``/``bias`` below 0, or fewer than 2 sites.
    """
    if sites is None:
        return [], []
    if not isinstance(sites, Mapping) or len(sites) < 2:
        raise MedexpError(
            f"data.sites={sites!r}; expected null or a mapping of at least 2 site names to their settings, "
            "e.g. {a: {}, b: {contrast: 0.6, noise: 0.05}}"
        )
    valid = [field.name for field in fields(SiteShift)]
    names, shifts = [], []
    for name, settings in sites.items():
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise MedexpError(f"data.sites.{name}: unknown key(s) {unknown}; expected some of {valid}")
        for key, value in settings.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
                raise MedexpError(f"data.sites.{name}.{key}={value!r}; expected a number")
        shift = SiteShift(**{key: float(value) for key, value in settings.items()})
        if shift.contrast <= 0 or shift.gamma <= 0:
            raise MedexpError(f"data.sites.{name}: contrast={shift.contrast}, gamma={shift.gamma}; both must be > 0")
        if shift.noise < 0 or shift.bias < 0:
            raise MedexpError(f"data.sites.{name}: noise={shift.noise}, bias={shift.bias}; both must be >= 0")
        names.append(str(name))
        shifts.append(shift)
    return names, shifts


def check_train_sites(train_sites: Sequence[Any] | None, names: list[str]) -> list[int] | None:
    """``data.train_sites`` (names of sites, or None for all) -> their indices in ``names``.

    Raises:
        MedexpError: for train sites without ``data.sites``, an empty list, or unknown names.
    """
    if train_sites is None:
        return None
    if not names:
        raise MedexpError(f"data.train_sites={list(train_sites)} needs data.sites (the sites to choose from)")
    chosen = [str(name) for name in train_sites]
    unknown = [name for name in chosen if name not in names]
    if not chosen or unknown:
        raise MedexpError(f"data.train_sites={chosen}: expected a non-empty subset of the sites {names}")
    return sorted(names.index(name) for name in set(chosen))


def deal_sites(n: int, pool: Sequence[int]) -> np.ndarray:
    """``(n,)`` site indices: the sites of ``pool`` in turn, so each holds a near-equal share."""
    return np.asarray(pool, dtype=np.int64)[np.arange(n) % len(pool)]


def apply_site(images: np.ndarray, shift: SiteShift, rng: np.random.Generator) -> np.ndarray:
    """One site's version of ``images``.

    Args:
        images: ``(n, C, *spatial)`` uint8 phantoms.
        shift: the site's changes.
        rng: draws the bias field directions and the noise.

    Returns:
        ``(n, C, *spatial)`` uint8.
    """
    if shift.is_identity():
        return images
    x = images.astype(np.float32) / 255
    spatial = images.shape[2:]
    if shift.bias:
        axes = np.meshgrid(*[np.linspace(-1.0, 1.0, size, dtype=np.float32) for size in spatial], indexing="ij")
        direction = rng.normal(size=(len(images), len(spatial))).astype(np.float32)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-6
        ramp = np.einsum("nd,d...->n...", direction, np.stack(axes)) / np.sqrt(len(spatial))
        x *= 1 + shift.bias * ramp[:, None]
    x = 0.5 + shift.contrast * (x - 0.5) + shift.brightness
    x = np.clip(x, 0.0, 1.0) ** shift.gamma
    if shift.noise:
        x += rng.normal(0.0, shift.noise, size=x.shape).astype(np.float32)
    return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)
