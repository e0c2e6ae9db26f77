"""One interval per contrast between two arms of an experiment, over both sources of noise, and
the tests that turn it into a verdict (docs/compare.md, "Statistics").

    estimate = contrast(arm_nll, reference_nll, tokens)       # (seeds, documents) arrays, per-doc tokens
    estimate.mean, estimate.interval()                         # difference, 95% interval
    estimate.p_value(), estimate.p_equivalent(margin=0.005)    # difference from 0; TOST within +-margin
    holm([0.01, 0.04, 0.03])                                   # Holm-adjusted p-values

Two kinds of noise blur an arm's difference from the reference: the training run (seed: data
order, its random sample) and the evaluation set (which documents or task items happen to be in
it). The arms' runs are independent draws (each its own sample and order), the documents are
shared. The difference is estimated as it is reported — every model's loss (token-weighted, or
each source's averaged), the mean over an arm's seeds, one arm minus the other — and its variance
is the sum of

- each arm's run-to-run variance: the sample variance of its models' values over seeds / seeds;
- the document-sampling variance, within each stratum (the held-out set draws a fixed number of
  documents per source): the variance of a sum of its documents' parts of the difference
  (linearised for the ratio of sums), less the run-to-run noise those parts hold (each
  document's own variance over seeds / seeds), floored at zero

— the moment estimator of a two-way (seed x document) random-effects model, with Satterthwaite's
degrees of freedom for its Student-t interval. tests/test_stats.py checks its coverage by
simulation with known seed and document variances on the held-out set's own design, and that it
is Welch's interval when documents add nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
ALPHA = 0.05


@dataclass(frozen=True, slots=True)
class Estimate:
    """A difference, its standard error and degrees of freedom (t-distributed); NaN where the
    run-to-run noise is unmeasured (an arm with one seed)."""

    mean: float
    se: float
    df: float
    seeds: tuple[int, int]
    """Runs of the arm and of the reference behind it."""
    items: int
    """Documents (or task items) behind it."""
    seed_variance: float
    """The run-to-run part of se²."""
    item_variance: float
    """The document-sampling part of se²."""

    @property
    def defined(self) -> bool:
        return math.isfinite(self.se)

    def interval(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        if not self.defined:
            return math.nan, math.nan
        if self.se == 0:
            return self.mean, self.mean
        half = scipy_stats.t.ppf((1 + confidence) / 2, self.df) * self.se
        return self.mean - half, self.mean + half

    def p_value(self) -> float:
        """Two-sided p of "no difference"."""
        if not self.defined:
            return math.nan
        if self.se == 0:
            return 0.0 if self.mean != 0 else 1.0
        return float(2 * scipy_stats.t.sf(abs(self.mean) / self.se, self.df))

    def equivalence_bound(self, alpha: float = ALPHA) -> float:
        """The smallest margin TOST at `alpha` would accept: |mean| + t(1 - alpha, df) * se."""
        if not self.defined:
            return math.nan
        return abs(self.mean) + float(scipy_stats.t.ppf(1 - alpha, self.df)) * self.se

    def detectable(self, power: float = 0.8, alpha: float = ALPHA) -> float:
        """The smallest true difference a two-sided test at `alpha` finds with `power`, at this se
        and df: (t(1 - alpha/2) + t(power)) * se."""
        if not self.defined:
            return math.nan
        return float(scipy_stats.t.ppf(1 - alpha / 2, self.df) + scipy_stats.t.ppf(power, self.df)) * self.se

    def p_equivalent(self, margin: float) -> float:
        """Two one-sided tests (TOST): the larger p of "difference <= -margin" and "difference >=
        margin"; below alpha, the difference lies within +-margin (its 1-2alpha interval does)."""
        if not self.defined:
            return math.nan
        if self.se == 0:
            return 0.0 if abs(self.mean) < margin else 1.0
        below = scipy_stats.t.sf((self.mean + margin) / self.se, self.df)
        above = scipy_stats.t.cdf((self.mean - margin) / self.se, self.df)
        return float(max(below, above))


def contrast(
    arm: np.ndarray,
    reference: np.ndarray,
    tokens: np.ndarray,
    strata: np.ndarray | None = None,
    *,
    equal_strata: bool = False,
) -> Estimate:
    """The difference arm - reference of a ratio metric over shared documents: `arm` and
    `reference` are (seeds, documents) arrays of per-document sums (NLL), `tokens` the per-document
    denominators (target tokens, characters, or 1 for a plain mean). `strata`: per-document labels
    of how the set was drawn (a fixed number of documents per source): the document variance is
    computed within each stratum. The metric is sum(NLL) / sum(tokens), or with `equal_strata` the
    mean over strata, equally weighted, of each stratum's ratio."""
    a, r = np.asarray(arm, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    t = np.asarray(tokens, dtype=np.float64)
    if a.ndim != 2 or r.ndim != 2 or not a.shape[1] == r.shape[1] == len(t) or len(t) == 0:
        raise ValueError(f"need (seeds, documents) arrays over the same documents, got {a.shape}, {r.shape}")
    labels = np.zeros(len(t), dtype=np.int64) if strata is None else np.unique(strata, return_inverse=True)[1]
    n_strata, docs = int(labels.max()) + 1, len(t)
    stratum_tokens = np.bincount(labels, weights=t, minlength=n_strata)
    share = np.full(n_strata, 1.0 / n_strata) if equal_strata else stratum_tokens / t.sum()
    weight = (share / stratum_tokens)[labels]  # the metric is sum_d weight_d * nll_d
    value_a, value_r = a @ weight, r @ weight  # each model's metric
    mean = float(value_a.mean() - value_r.mean())
    seeds = (a.shape[0], r.shape[0])
    if min(seeds) < 2 or docs < 2:  # run-to-run or document noise unmeasured
        return Estimate(mean, math.nan, math.nan, seeds, docs, math.nan, math.nan)
    seed_parts = [value_a.var(ddof=1) / seeds[0], value_r.var(ddof=1) / seeds[1]]

    def deviations(x: np.ndarray) -> np.ndarray:
        """Per seed and document: its part of the metric's linearisation, centred within its
        stratum (each stratum's deviations sum to zero). With equal_strata each stratum's ratio
        has a fixed weight, so a document deviates from its stratum's ratio; token-weighted, a
        stratum's weight is its share of the tokens, which moves with the documents drawn, so a
        document deviates from the overall ratio (the combined ratio estimator)."""
        if equal_strata:
            sums = np.stack([np.bincount(labels, weights=row, minlength=n_strata) for row in x])
            return weight * (x - (sums / stratum_tokens)[:, labels] * t)
        z = weight * (x - (x @ weight)[:, None] * t)  # weight is 1 / all tokens here
        centres = np.stack([np.bincount(labels, weights=row, minlength=n_strata) for row in z]) / np.bincount(
            labels, minlength=n_strata
        )
        return z - centres[:, labels]

    dev_a, dev_r = deviations(a), deviations(r)
    influence = dev_a.mean(axis=0) - dev_r.mean(axis=0)  # each document's part of the difference
    noise = dev_a.var(axis=0, ddof=1) / seeds[0] + dev_r.var(axis=0, ddof=1) / seeds[1]
    item_parts = []
    for stratum in range(n_strata):
        mine = labels == stratum
        n = int(mine.sum())
        if n >= 2:  # the variance of a sum of n draws, less the run-to-run noise it holds
            item_parts.append((max(0.0, n / (n - 1) * (influence[mine] ** 2 - noise[mine]).sum()), n - 1))
    parts = [(seed_parts[0], seeds[0] - 1), (seed_parts[1], seeds[1] - 1), *item_parts]
    variance = sum(v for v, _ in parts)
    denominator = sum(v * v / df for v, df in parts)
    df = variance * variance / denominator if denominator > 0 else math.inf
    item_variance = sum(v for v, _ in item_parts)
    return Estimate(mean, math.sqrt(variance), df, seeds, docs, sum(seed_parts), item_variance)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error at alpha under any dependence): the i-th
    smallest p times (m - i), made non-decreasing, capped at 1. NaN stays NaN and does not count."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[i] = running
    return adjusted
