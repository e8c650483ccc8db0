"""Scores of saliency maps: do they point at the lesion, and at what the model needs?

All functions take batches: saliency maps ``(B, 1, *spatial)`` with values in [0, 1] (higher:
more salient; :func:`normalise` makes them so), lesion masks ``(B, 1, *spatial)`` (any value
above 0 is lesion) and images ``(B, C, *spatial)``, in 2D or 3D. Per-image scores come back as
``(B,)`` float tensors, ``NaN`` where a score is undefined for that image (no lesion in the
mask, a map without mass).

- :func:`pointing_mass`: the share of the map's mass inside the mask; a uniform map scores the
  mask's area fraction (:func:`mask_fraction`), so ``pointing_mass / mask_fraction`` (the
  *lift*) is 1 for a map that knows nothing about the lesion.
- :func:`pointing_hit`: the pointing game, whether the map's maximum lies in the mask.
- :func:`deletion_insertion`: the deletion and insertion AUCs of Petsiuk et al. (RISE, BMVC
  2018): the explained class's probability as pixels are removed (replaced by a baseline) or
  inserted (into the baseline) from most to least salient. A faithful map makes deletion
  drop the probability fast (low deletion AUC) and insertion raise it fast (high insertion AUC);
  compare with a random ordering (:func:`random_maps`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BASELINES = ("mean", "blur", "zero")


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map of ``(B, 1, *spatial)`` scaled linearly to [0, 1] by its own minimum and maximum;
    maps that are constant (e.g. all zero: nothing found) and non-finite values become 0."""
    maps = torch.nan_to_num(maps.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    flat = maps.reshape(maps.shape[0], -1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    span = (high - low).reshape(-1, *[1] * (maps.ndim - 1))
    low = low.reshape(span.shape)
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()


def mask_fraction(masks: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the share of pixels (voxels) inside the lesion mask, ``mean(mask > 0)``: the
    pointing mass of a uniform map. 0 for an empty mask."""
    return _flat(masks > 0).mean(dim=1)


def pointing_mass(saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the share of saliency mass inside the mask, ``sum(S * M) / sum(S)`` with ``S``
    the map in [0, 1] and ``M = mask > 0``, both at the input's resolution.

    1 means all of the map's mass lies on the lesion; a uniform map scores
    :func:`mask_fraction`. ``NaN`` where the mask is empty or the map has no mass.
    """
    s, m = _flat(saliency), _flat(masks > 0)
    total = s.sum(dim=1)
    mass = (s * m).sum(dim=1) / total.clamp_min(1e-12)
    return torch.where((total > 0) & (m.sum(dim=1) > 0), mass, torch.full_like(mass, float("nan")))


def pointing_hit(saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(B,)``: 1.0 where the map's most salient pixel (the first, for ties) lies inside the
    mask, else 0.0 (the pointing game of Zhang et al., ECCV 2016); ``NaN`` where the mask is
    empty or the map is constant."""
    s, m = _flat(saliency), _flat(masks > 0)
    hit = m.gather(1, s.argmax(dim=1, keepdim=True)).squeeze(1)
    undefined = (m.sum(dim=1) == 0) | (s.max(dim=1).values <= s.min(dim=1).values)
    return torch.where(undefined, torch.full_like(hit, float("nan")), hit)


def random_maps(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Maps of uniform random values shaped like ``like``: the reference ordering of
    :func:`deletion_insertion` that knows nothing about the image."""
    return torch.rand(like.shape, generator=generator, device="cpu").to(like.device)


def salience_order(saliency: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, N)`` pixel indices (of the flattened spatial grid) from most to least salient.
    Ties (e.g. the zeros of a Grad-CAM map) come in a random order drawn from ``generator``, not
    in raster order, which would favour the image's top rows."""
    s = _flat(saliency)
    b, n = s.shape
    shuffle = torch.stack([torch.randperm(n, generator=generator) for _ in range(b)]).to(s.device)
    order = torch.argsort(s.gather(1, shuffle), dim=1, descending=True, stable=True)
    return shuffle.gather(1, order)


def baseline_images(images: torch.Tensor, kind: str = "mean", sigma: float | None = None) -> torch.Tensor:
    """What removed pixels are replaced with: ``mean``: each image's per-channel mean;
    ``blur``: the image under a Gaussian blur of ``sigma`` pixels (default: 1/16 of the
    image's smallest side, at least 1); ``zero``: zeros."""
    if kind not in BASELINES:
        raise ValueError(f"baseline {kind!r}; expected one of {list(BASELINES)}")
    if kind == "zero":
        return torch.zeros_like(images)
    if kind == "mean":
        spatial = tuple(range(2, images.ndim))
        return images.mean(dim=spatial, keepdim=True).expand_as(images).clone()
    from monai.transforms import GaussianSmooth

    sigma = sigma if sigma is not None else max(1.0, min(images.shape[2:]) / 16)
    smooth = GaussianSmooth(sigma=sigma)
    return torch.stack([torch.as_tensor(smooth(image)) for image in images.detach().cpu()]).to(images)


def auc(curves: torch.Tensor) -> torch.Tensor:
    """``(B, steps + 1)`` values at fractions ``0, 1/steps, ..., 1`` -> ``(B,)`` areas under the
    curve by the trapezoidal rule over [0, 1]."""
    steps = curves.shape[1] - 1
    return torch.trapezoid(curves, dx=1.0 / steps, dim=1)


@torch.no_grad()
def deletion_insertion(
    probabilities: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    saliency: torch.Tensor,
    target: torch.Tensor,
    steps: int = 20,
    baseline: str = "mean",
    generator: torch.Generator | None = None,
    chunk: int = 64,
) -> dict[str, torch.Tensor]:
    """Deletion and insertion curves and their AUCs.

    Pixels are ranked from most to least salient (:func:`salience_order`). At step ``k`` of
    ``0..steps`` the top ``round(k / steps * N)`` of the ``N`` pixels (all channels of a pixel
    together) are

    - deletion: replaced in the image by the baseline (:func:`baseline_images`);
    - insertion: copied from the image into the baseline;

    and the model's probability of the class ``target`` is recorded. The curves run over
    fractions ``0, 1/steps, ..., 1``; their areas (:func:`auc`, in [0, 1]) are the scores: a
    deletion curve starts at the image's probability and ends at the baseline's, an insertion
    curve the other way round.

    Args:
        probabilities: ``(n, C, *spatial)`` images -> ``(n, num_classes)`` probabilities.
        images: ``(B, C, *spatial)``; saliency: ``(B, 1, *spatial)``; target: ``(B,)`` classes.
        steps: points of the curve besides the start.
        baseline: ``mean``, ``blur`` or ``zero``, see :func:`baseline_images`.
        generator: the order of ties.
        chunk: about how many images one call of ``probabilities`` gets (the whole curve of an
            image, ``steps + 1`` images, at least).

    Returns:
        ``deletion_auc``, ``insertion_auc``: ``(B,)``; ``deletion_curve``, ``insertion_curve``:
        ``(B, steps + 1)``.
    """
    if steps < 1:
        raise ValueError(f"steps should be >= 1, got {steps}.")
    b, c, *spatial = images.shape
    n = int(torch.tensor(spatial).prod())
    order = salience_order(saliency, generator)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=order.device).expand(b, n))
    counts = torch.round(torch.linspace(0, n, steps + 1, device=images.device)).long()
    base = baseline_images(images, baseline)
    target = torch.as_tensor(target, device=images.device).long().reshape(b)
    per_forward = max(1, chunk // (steps + 1))  # images whose variants share a forward pass
    parts: dict[str, list[torch.Tensor]] = {"deletion": [], "insertion": []}
    for start in range(0, b, per_forward):
        rows = slice(start, start + per_forward)
        # (k, steps + 1, 1, *spatial): which pixels are gone (deletion) or in (insertion) at each step
        chosen = (rank[rows, None, :] < counts[None, :, None]).reshape(-1, steps + 1, 1, *spatial)
        image, fill = images[rows, None], base[rows, None]
        classes = target[rows, None].expand(-1, steps + 1).reshape(-1, 1)
        for name, variants in (
            ("deletion", torch.where(chosen, fill, image)),
            ("insertion", torch.where(chosen, image, fill)),
        ):
            probs = probabilities(variants.reshape(-1, c, *spatial))
            parts[name].append(probs.float().gather(1, classes).reshape(-1, steps + 1))
    curves = {name: torch.cat(values) for name, values in parts.items()}
    return {
        "deletion_auc": auc(curves["deletion"]),
        "insertion_auc": auc(curves["insertion"]),
        "deletion_curve": curves["deletion"],
        "insertion_curve": curves["insertion"],
    }
