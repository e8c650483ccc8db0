"""Statistics of repeated runs (cross-validation folds, seeds); numpy only, so it imports fast."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pool(values: Sequence[float], n_boot: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Mean, standard deviation and a bootstrap 95% confidence interval of the mean of ``values``.

    The interval is the percentile bootstrap: the 2.5th and 97.5th percentiles of the means of
    ``n_boot`` resamples (with replacement) of ``values``, drawn from ``seed``, so the same
    values always give the same interval.

    Read it with care when the values are a few cross-validation folds:

    - With k values there are only k**k equally likely resamples (3125 for k=5), and the interval
      is about mean +- 1.96 * std * sqrt((k - 1) / k) / sqrt(k): narrower than a t interval (whose
      factor is 2.78 for k=5) and too narrow for small k. It describes the spread of these values,
      not more.
    - Folds share most of their training data, so their scores are not independent; no estimate
      from the fold scores alone captures the variance of k-fold cross-validation (Bengio and
      Grandvalet, 2004). The interval shows fold-to-fold variation of one data set and one fold
      assignment, not how a model would vary on new data.

    Args:
        values: one value per fold (run); NaN propagates into every statistic.
        n_boot: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        ``{"n", "mean", "std" (ddof=1), "ci_low", "ci_high"}``; ``std`` and the interval are NaN
        for a single value.

    Raises:
        ValueError: for no values, or ``n_boot < 1``.
    """
    data = np.asarray(values, dtype=np.float64).ravel()
    if data.size == 0:
        raise ValueError("pool() needs at least one value")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}; expected at least 1")
    n = data.size
    result = {"n": n, "mean": float(data.mean()), "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    if n < 2:
        return result
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 1_000_000 // n)  # bounded memory for long value lists
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = data[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    result.update(std=float(data.std(ddof=1)), ci_low=float(low), ci_high=float(high))
    return result
