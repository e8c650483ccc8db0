"""Which samples each simulated site holds.

Three ways to split, ``federated.split``:

- ``iid``: every site gets about the same number of samples of every class (stratum);
- ``dirichlet``: non-IID label skew (Hsu et al., 2019): for every class, the shares of the sites
  are drawn from ``Dirichlet(alpha, ..., alpha)``; small ``alpha`` (0.1) gives each site
  mostly one class, large ``alpha`` (100) approaches ``iid``;
- ``column``: the data's own site of each sample (e.g. a ``site`` column of a manifest).

The same shares split the train, val and test splits, so each site is evaluated on data like its
own. Everything is drawn from ``federated.seed`` alone (not the training seed), so runs with
different training seeds federate over the same sites.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medexp.data.folds import strata
from medexp.utils.errors import MedexpError

SPLIT_METHODS = ("iid", "dirichlet", "column")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SitePlan:
    """The simulated sites and the samples each holds.

    Attributes:
        names: site names, in the order sites train in each round.
        indices: ``{split: [indices into that split's dataset, one array per site]}``; a sample of
            a val/test split whose site trains nowhere (``column``) is in no site's array but
            still counts in the global metrics.
    """

    names: list[str]
    indices: dict[str, list[np.ndarray]]

    def counts(self, split: str) -> list[int]:
        """Samples of ``split`` per site."""
        return [len(rows) for rows in self.indices[split]]


def site_shares(
    keys: Sequence[Any], num_sites: int, method: str, alpha: float, rng: np.random.Generator
) -> dict[Any, np.ndarray]:
    """The share of each site in the samples of each stratum.

    Args:
        keys: the strata (e.g. class indices), drawn in sorted order so the shares depend only on
            the set of strata and ``rng``.
        num_sites: sites.
        method: ``iid`` (equal shares) or ``dirichlet`` (shares drawn from ``Dirichlet(alpha)``).
        alpha: the Dirichlet concentration.
        rng: the source of the draws.

    Returns:
        ``{stratum: (num_sites,) shares summing to 1}``.
    """
    if method == "iid":
        return {key: np.full(num_sites, 1.0 / num_sites) for key in sorted(keys)}
    return {key: rng.dirichlet(np.full(num_sites, float(alpha))) for key in sorted(keys)}


def deal(groups: np.ndarray, shares: dict[Any, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Give each sample a site: the samples of each stratum, shuffled, cut at the cumulative shares.

    Args:
        groups: ``(N,)`` the stratum of each sample (keys of ``shares``).
        shares: see :func:`site_shares`.
        rng: shuffles the samples within each stratum.

    Returns:
        ``(N,)`` int64 site index of each sample.
    """
    sites = np.empty(len(groups), dtype=np.int64)
    for key, share in shares.items():
        rows = np.flatnonzero(groups == key)
        rng.shuffle(rows)
        # rounded cumulative cuts: every sample gets a site and the counts follow the shares
        cuts = np.round(np.cumsum(share) * len(rows)).astype(np.int64)
        for site, (start, stop) in enumerate(zip(np.concatenate([[0], cuts[:-1]]), cuts)):
            sites[rows[start:stop]] = site
    return sites


def split_strata(datamodule: Any, split: str) -> np.ndarray | None:
    """The stratum of each sample of ``split`` (its class; see :func:`medexp.data.folds.strata`),
    or None when the labels are not held in memory (segmentation masks still in files)."""
    from medexp.data.base import dataset_labels

    dataset = datamodule.datasets[split]
    if datamodule.task == "segmentation" and not hasattr(dataset, "labels"):
        return None  # file data list mask paths, not masks
    return strata(dataset_labels(dataset), datamodule.task)


def split_site_values(datamodule: Any, split: str) -> np.ndarray | None:
    """The site of each sample of ``split`` as the data give it, as strings: the ``sites`` of the
    split's dataset (one per sample), or the ``site`` of each case of file data; None when the
    data have no sites. Read from memory: no image is loaded."""
    values = getattr(datamodule.datasets[split], "sites", None)
    cases = getattr(datamodule, "cases", {}).get(split) if values is None else None
    if cases and all(getattr(case, "site", None) not in (None, "") for case in cases):
        values = [case.site for case in cases]
    if values is None:
        return None
    return np.asarray([str(v.item() if hasattr(v, "item") else v) for v in values])


def label_counts(datamodule: Any, plan: SitePlan) -> dict[str, dict[str, dict[int, int]]]:
    """Samples per stratum (class) of each site and split, ``{site: {split: {class: count}}}``,
    to show how skewed the sites are; empty where the labels are not in memory. A site whose
    validation or test samples are all of one class has undefined per-site AUROC, sensitivity or
    specificity there (torchmetrics warns and reports 0)."""
    counts: dict[str, dict[str, dict[int, int]]] = {name: {} for name in plan.names}
    for split in SPLITS:
        groups = split_strata(datamodule, split)
        if groups is None:
            continue
        for name, rows in zip(plan.names, plan.indices[split]):
            keys, numbers = np.unique(groups[rows], return_counts=True)
            counts[name][split] = {int(k): int(n) for k, n in zip(keys, numbers)}
    return counts


def plan_sites(
    datamodule: Any,
    num_sites: int | None,
    method: str,
    alpha: float = 1.0,
    seed: int = 0,
) -> SitePlan:
    """Split a set-up data module's train, val and test splits over simulated sites.

    Args:
        datamodule: an :class:`~medexp.data.base.ArrayDataModule` after ``setup()``.
        num_sites: sites (``iid``, ``dirichlet``); with ``column``: the number of sites the data
            must have, or None for whatever they have.
        method: ``iid``, ``dirichlet`` or ``column`` (see the module docstring).
        alpha: the Dirichlet concentration of ``dirichlet``.
        seed: ``federated.seed``.

    Raises:
        MedexpError: for an unknown ``method``, data without sites for ``column``, data without
            labels for ``dirichlet``, or a site left without training samples.
    """
    where = datamodule.describe()
    match method:
        case "column":
            plan = _plan_from_column(datamodule, num_sites, where)
        case "iid" | "dirichlet":
            plan = _plan_by_shares(datamodule, int(num_sites), method, alpha, seed, where)
        case _:
            raise MedexpError(f"federated.split={method!r}; expected one of {list(SPLIT_METHODS)}")
    empty = [name for name, count in zip(plan.names, plan.counts("train")) if count == 0]
    if empty:
        hint = {
            "dirichlet": f"raise federated.alpha={alpha} (less skew), lower federated.sites or change federated.seed",
            "iid": "lower federated.sites or use more training data",
        }.get(method, "check the data's site column")
        raise MedexpError(
            f"federated.split={method}: site(s) {empty} get no training samples of {where} "
            f"({len(datamodule.datasets['train'])} in all); {hint}"
        )
    return plan


def _plan_by_shares(datamodule: Any, num_sites: int, method: str, alpha: float, seed: int, where: str) -> SitePlan:
    groups = {split: split_strata(datamodule, split) for split in SPLITS}
    if method == "dirichlet" and any(g is None for g in groups.values()):
        raise MedexpError(
            f"federated.split=dirichlet skews the classes across sites, but {where} holds no labels to split by "
            "(segmentation masks read from files); use federated.split=iid"
        )
    # no labels (iid only): one stratum
    groups = {
        split: np.zeros(len(datamodule.datasets[split]), np.int64) if g is None else g for split, g in groups.items()
    }
    keys = set().union(*(np.unique(g).tolist() for g in groups.values()))
    shares = site_shares(sorted(keys), num_sites, method, alpha, np.random.default_rng([seed, 0]))
    indices = {}
    for position, split in enumerate(SPLITS):
        sites = deal(groups[split], shares, np.random.default_rng([seed, 1 + position]))
        indices[split] = [np.flatnonzero(sites == site) for site in range(num_sites)]
    return SitePlan([f"site_{site}" for site in range(num_sites)], indices)


def _plan_from_column(datamodule: Any, num_sites: int | None, where: str) -> SitePlan:
    values = {split: split_site_values(datamodule, split) for split in SPLITS}
    if values["train"] is None:
        raise MedexpError(
            f"federated.split=column needs the site of every sample, but {where} has none; give the data a site "
            "(e.g. a `site` column in the manifest) or use federated.split=dirichlet or iid"
        )
    names = sorted(set(values["train"].tolist()))
    if num_sites is not None and num_sites != len(names):
        raise MedexpError(
            f"federated.sites={num_sites} but the training split of {where} has {len(names)} site(s) {names}; "
            f"set federated.sites={len(names)} or federated.sites=null"
        )
    indices = {}
    for split in SPLITS:
        if values[split] is None:
            raise MedexpError(f"federated.split=column: the {split} split of {where} has no site per sample")
        indices[split] = [np.flatnonzero(values[split] == name) for name in names]
    return SitePlan(names, indices)
