"""Confidence intervals for a difference between two arms of an experiment.

    t_interval([0.012, 0.020, 0.009])                     # paired seeds: mean difference, 95% t-interval
    bootstrap_ratio(differences, weights, resamples=2000, seed=0)   # items resampled with replacement

Two kinds of noise blur an arm's difference from the reference: the training run (seed: data
order, random sample) and the evaluation set (which documents or task items happen to be in it).
`t_interval` covers the first — one difference per seed, seeds paired across arms; `bootstrap_ratio`
the second — per-item differences (already averaged over seeds) resampled with replacement, the
statistic a ratio of sums so that a token-weighted loss difference is resampled as it is computed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95


@dataclass(frozen=True, slots=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    """Seeds (t-interval) or items (bootstrap) behind it."""

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @classmethod
    def undefined(cls, mean: float, n: int) -> Interval:
        return cls(mean, math.nan, math.nan, n)


def t_interval(differences: list[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of paired differences with its Student-t interval: mean ± t(n-1) · sd / √n
    (undefined for one difference)."""
    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return Interval.undefined(mean, n)
    half = scipy_stats.t.ppf((1 + confidence) / 2, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def bootstrap_ratio(
    differences: np.ndarray,
    weights: np.ndarray,
    *,
    resamples: int,
    seed: int,
    confidence: float = CONFIDENCE,
    chunk: int = 256,
) -> Interval:
    """sum(differences) / sum(weights) with its percentile bootstrap interval: items drawn with
    replacement, `resamples` times, from one seeded generator (drawn in chunks of resample rows,
    so memory stays small). Weights of 1 make it a plain mean."""
    differences, weights = np.asarray(differences, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    n = len(differences)
    rng = np.random.default_rng(seed)
    statistic = np.empty(resamples)
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        picks = rng.integers(0, n, size=(rows, n))
        statistic[start : start + rows] = differences[picks].sum(axis=1) / weights[picks].sum(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(statistic, [tail, 100 - tail])
    return Interval(float(differences.sum() / weights.sum()), float(low), float(high), n)
