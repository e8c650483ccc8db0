"""K-fold cross-validation of a training split: folds stratified by class and grouped by patient.

With ``data.fold=k``, a data module trains on the other folds of its training split and validates
on fold ``k``; the test split is left as it is. The assignment depends only on the training
split and ``data.fold_seed``, never on the training seed, so every job of a sweep over
``data.fold`` (and over seeds) sees the same folds. With ``data.fold_by=site`` the folds are the
acquisition sites instead (leave-one-site-out: fold ``k`` is site ``k``).
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medexp.utils.errors import MedexpError


def check_folds(fold: int | None, num_folds: int) -> None:
    """Validate ``data.fold`` and ``data.num_folds``.

    Raises:
        MedexpError: naming the key, its value and what would be valid.
    """
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise MedexpError(f"data.num_folds={num_folds!r}; expected an integer of at least 2 (5 and 10 are usual)")
    if fold is None:
        return
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise MedexpError(
            f"data.fold={fold!r}; expected an integer in 0..{num_folds - 1} (data.num_folds={num_folds}), "
            "or null for the usual train/val split"
        )


def check_fold_by(fold_by: str | None, fold: int | None, site_names: Sequence[str] | None) -> None:
    """Validate ``data.fold_by``: None (folds drawn from ``data.fold_seed``) or ``site``
    (leave-one-site-out: fold ``k`` is site ``k`` of ``site_names``; ``data.num_folds`` is not
    used).

    Raises:
        MedexpError: naming the key, its value and what would be valid.
    """
    if fold_by is None:
        return
    if fold_by != "site":
        raise MedexpError(
            f"data.fold_by={fold_by!r}; expected null (folds drawn from data.fold_seed) or 'site' "
            "(leave-one-site-out: data.fold=k validates on site k)"
        )
    if not site_names:
        raise MedexpError(
            "data.fold_by=site needs data with sites: data.sites for synthetic data, or a site (or scanner) column "
            "in the manifest of file data"
        )
    if fold is not None and (isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < len(site_names)):
        raise MedexpError(
            f"data.fold={fold!r} with data.fold_by=site; expected an integer in 0..{len(site_names) - 1}, "
            f"one per site {list(site_names)}"
        )


def split_by_fold(folds: np.ndarray, fold: int, what: str) -> np.ndarray:
    """The rows of fold ``fold`` (True) among the training rows' ``folds``, checked that both
    parts are non-empty (``what`` names the fold in the message: a site of leave-one-site-out)."""
    held_out = np.asarray(folds) == fold
    if not held_out.any() or held_out.all():
        part = "validate on" if not held_out.any() else "train on"
        raise MedexpError(
            f"data.fold={fold} ({what}) leaves nothing to {part} in the training split ({len(held_out)} samples)"
        )
    return held_out


def strata(labels: np.ndarray, task: str) -> np.ndarray | None:
    """The stratum of each sample, by which :func:`assign_folds` balances the folds.

    - ``binary``/``multiclass``: the class index.
    - ``multilabel``: the sample's rarest positive label (rarest among these samples), -1 for a
      sample without positives. Exact label combinations would make many strata of one or two
      samples in data with many labels; this way the rare labels, whose validation metrics
      are the noisiest, are spread evenly over the folds.
    - ``segmentation``: whether the mask has any foreground (1) or is empty (0), so every fold
      validates on both kinds of case.

    Args:
        labels: ``(N,)`` class indices, ``(N, L)`` 0/1 indicators or ``(N, 1, *spatial)`` masks.
        task: ``binary``, ``multiclass``, ``multilabel`` or ``segmentation``.

    Returns:
        ``(N,)`` integer strata, or None for tasks with nothing to stratify by.
    """
    labels = np.asarray(labels)
    match task:
        case "binary" | "multiclass":
            return labels.reshape(len(labels)).astype(np.int64)
        case "multilabel":
            positive = labels.reshape(len(labels), -1) > 0
            frequency = positive.sum(axis=0)
            rarest = np.where(positive, frequency, np.iinfo(np.int64).max).argmin(axis=1)
            return np.where(positive.any(axis=1), rarest, -1).astype(np.int64)
        case "segmentation":
            return labels.reshape(len(labels), -1).any(axis=1).astype(np.int64)
        case _:
            return None


def assign_folds(
    labels: Sequence[Hashable] | np.ndarray | None,
    groups: Sequence[Hashable] | np.ndarray | None,
    num_folds: int,
    seed: int,
) -> np.ndarray:
    """Assign every sample to one of ``num_folds`` folds, keeping groups together.

    Groups (patients) are dealt out stratum by stratum, largest first, each to the fold that
    holds the fewest samples of its stratum (then the fewest samples overall). With one sample
    per group, every stratum's count per fold, and every fold's size, is within one of each
    other's; large groups make the balance coarser, never split. The result depends only on the
    arguments (the same inputs and seed give the same folds) and on the order of the samples.

    Args:
        labels: ``(N,)`` stratum of each sample, e.g. its class index (see :func:`strata`);
            None: no stratification. A group's stratum is its most frequent label.
        groups: ``(N,)`` group of each sample, e.g. its patient ID; None, or an entry that is
            None or ``""``: the sample is a group of its own.
        num_folds: number of folds, at least 2.
        seed: seed of the random order in which groups are dealt out.

    Returns:
        ``(N,)`` int64 fold indices in ``0..num_folds-1``; every fold is used.

    Raises:
        MedexpError: when ``num_folds < 2`` or there are fewer groups than folds.
    """
    check_folds(None, num_folds)
    n = len(labels) if labels is not None else len(groups) if groups is not None else 0
    if labels is not None and groups is not None and len(groups) != n:
        raise ValueError(f"{n} labels but {len(groups)} groups")
    members: dict[Any, list[int]] = {}
    for index in range(n):
        group = None if groups is None else groups[index]
        key = ("sample", index) if group is None or group == "" else ("group", _plain(group))
        members.setdefault(key, []).append(index)
    if len(members) < num_folds:
        unit = "samples" if groups is None else "patients (images without a patient ID count as one each)"
        raise MedexpError(
            f"data.num_folds={num_folds} but the training split has only {len(members)} {unit}; "
            f"expected data.num_folds between 2 and {len(members)}"
        )

    keys = list(members)
    stratum_of = [
        0 if labels is None else Counter(_plain(labels[i]) for i in members[key]).most_common(1)[0][0] for key in keys
    ]
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(keys))
    rank = {s: r for r, s in enumerate(_sorted(set(stratum_of)))}
    # by stratum, largest group first, ties in random order
    order = sorted(shuffled.tolist(), key=lambda g: (rank[stratum_of[g]], -len(members[keys[g]])))
    tie_break = rng.permutation(num_folds)
    per_stratum = np.zeros((len(rank), num_folds), dtype=np.int64)
    size = np.zeros(num_folds, dtype=np.int64)
    folds = np.full(n, -1, dtype=np.int64)
    for g in order:
        s, indices = rank[stratum_of[g]], members[keys[g]]
        fold = min(range(num_folds), key=lambda f: (per_stratum[s, f], size[f], tie_break[f]))
        folds[indices] = fold
        per_stratum[s, fold] += len(indices)
        size[fold] += len(indices)
    return folds


def _plain(value: Any) -> Hashable:
    # numpy scalars and 0-d arrays compare and hash like their Python values
    return value.item() if isinstance(value, np.generic | np.ndarray) and np.ndim(value) == 0 else value


def _sorted(values: set) -> list:
    try:
        return sorted(values)
    except TypeError:  # mixed types
        return sorted(values, key=repr)


def write_folds(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the fold assignment, one row per training sample, as a CSV (columns: the rows' keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
