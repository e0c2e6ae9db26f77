"""Confidence intervals and the compare analysis, each against a computation that shares nothing
with the code under test (SciPy's own routines, or plain loops over hand-made numbers)."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from pipeline.comparison import DocumentLosses, ModelEval, compare_arms
from pipeline.stats import bootstrap_ratio, t_interval


@pytest.mark.parametrize("values", [[0.012, 0.020, 0.009], [-1.0, 2.5], [0.3, 0.1, -0.2, 0.4, 0.0, 0.25]])
def test_t_interval_equals_scipys_one_sample_t_test(values):
    ours = t_interval(values)
    theirs = scipy_stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert ours.mean == pytest.approx(np.mean(values))
    assert (ours.low, ours.high) == pytest.approx((theirs.low, theirs.high), rel=1e-12)
    assert ours.n == len(values)


def test_t_interval_by_hand_with_a_table_quantile():
    # three differences: mean 3, sd 1, t(0.975, 2) = 4.302652729749464 from a printed t-table
    interval = t_interval([2.0, 3.0, 4.0])
    half = 4.302652729749464 * 1.0 / math.sqrt(3)
    assert (interval.low, interval.high) == pytest.approx((3 - half, 3 + half), rel=1e-9)
    assert interval.excludes_zero()
    assert not t_interval([-1.0, 2.0, 3.0]).excludes_zero()


def test_one_seed_has_no_t_interval():
    interval = t_interval([0.5])
    assert interval.mean == 0.5 and math.isnan(interval.low) and math.isnan(interval.high)
    assert not interval.excludes_zero()


def test_bootstrap_ratio_agrees_with_scipys_paired_percentile_bootstrap():
    rng = np.random.default_rng(5)
    tokens = rng.integers(20, 300, size=150).astype(float)
    differences = rng.normal(0.02, 0.3, size=150) * tokens
    ours = bootstrap_ratio(differences, tokens, resamples=20000, seed=1)
    theirs = scipy_stats.bootstrap(
        (differences, tokens),
        lambda d, w, axis=-1: d.sum(axis=axis) / w.sum(axis=axis),
        paired=True,
        vectorized=True,
        method="percentile",
        n_resamples=20000,
        random_state=2,
    ).confidence_interval
    assert ours.mean == pytest.approx(differences.sum() / tokens.sum())
    width = theirs.high - theirs.low
    # two independent Monte Carlo estimates of the same percentiles: equal within 3% of the width
    assert ours.low == pytest.approx(theirs.low, abs=0.03 * width)
    assert ours.high == pytest.approx(theirs.high, abs=0.03 * width)


def test_bootstrap_of_a_mean_covers_the_normal_interval():
    rng = np.random.default_rng(0)
    items = rng.integers(0, 2, size=400).astype(float) - rng.integers(0, 2, size=400)
    ours = bootstrap_ratio(items, np.ones_like(items), resamples=5000, seed=0)
    se = items.std(ddof=1) / math.sqrt(len(items))
    # for a mean of 400 items the percentile bootstrap is the normal interval to within a few %
    assert ours.low == pytest.approx(items.mean() - 1.959964 * se, abs=0.1 * se)
    assert ours.high == pytest.approx(items.mean() + 1.959964 * se, abs=0.1 * se)


def test_bootstrap_is_seeded():
    d, w = np.arange(10.0), np.ones(10)
    assert bootstrap_ratio(d, w, resamples=500, seed=3) == bootstrap_ratio(d, w, resamples=500, seed=3)


def evaluation(nll: list[float], tokens: list[int], task: list[float]) -> ModelEval:
    return ModelEval(DocumentLosses(nll, tokens), None, {"t": task})


def test_compare_arms_pairs_seeds_and_averages_items_over_them():
    tokens = [10, 30]
    evals = {
        "base": evaluation([30.0, 60.0], tokens, [0, 0, 1]),
        ("random", 0): evaluation([20.0, 50.0], tokens, [1, 0, 1]),
        ("random", 1): evaluation([22.0, 52.0], tokens, [0, 0, 1]),
        ("mid", 0): evaluation([18.0, 44.0], tokens, [1, 1, 1]),
        ("mid", 1): evaluation([21.0, 49.0], tokens, [1, 0, 1]),
    }
    rows = compare_arms(evals, arms=["random", "mid"], seeds=[0, 1], reference="random", resamples=200)
    by = {(r.arm, r.metric): r for r in rows}
    # held-out loss: (sum NLL) / 40 tokens; base 90/40, random 70/40 and 74/40, mid 62/40 and 70/40
    loss = by[("mid", "heldout loss")]
    assert loss.start == pytest.approx(90 / 40)
    assert loss.change == pytest.approx(((62 - 90) / 40 + (70 - 90) / 40) / 2)
    paired = [(62 - 70) / 40, (70 - 74) / 40]
    assert loss.vs_reference.mean == pytest.approx(sum(paired) / 2)
    half = 12.706204736174705 * abs(paired[0] - paired[1]) / math.sqrt(2) / math.sqrt(2)  # t(0.975, 1)
    assert (loss.vs_reference.low, loss.vs_reference.high) == pytest.approx((-0.15 - half, -0.15 + half))
    # per document, seed-averaged: doc 0 (18-20 + 21-22)/2 = -1.5, doc 1 (44-50 + 49-52)/2 = -4.5
    assert loss.vs_reference_items.mean == pytest.approx((-1.5 - 4.5) / 40)
    assert loss.vs_reference_items.n == 2
    task = by[("mid", "task t")]
    assert task.start == pytest.approx(1 / 3)
    assert task.vs_reference.mean == pytest.approx(((3 - 2) / 3 + (2 - 1) / 3) / 2)
    assert not task.lower_is_better
    assert by[("random", "heldout loss")].vs_reference is None
    assert by[("random", "heldout loss")].verdict() == "reference"


def test_verdict_needs_every_interval_to_exclude_zero():
    tokens = [1] * 50
    base = [5.0] * 50
    evals = {"base": evaluation(base, tokens, [0.0])}
    for seed, shift in enumerate([0.0, 0.01, -0.01]):
        evals[("random", seed)] = evaluation([4.0 + shift] * 50, tokens, [0.0])
        # clearly lower in every seed and on every document
        evals[("low", seed)] = evaluation([3.0 + shift + 0.001 * i for i in range(50)], tokens, [0.0])
        # lower on average, but the seeds disagree
        evals[("noisy", seed)] = evaluation([4.0 + [-0.5, 0.6, -0.2][seed]] * 50, tokens, [0.0])
    rows = compare_arms(
        evals, arms=["random", "low", "noisy"], seeds=[0, 1, 2], reference="random", resamples=500
    )
    verdicts = {r.arm: r.verdict() for r in rows if r.metric == "heldout loss"}
    assert verdicts == {"random": "reference", "low": "better", "noisy": "no difference"}


def test_one_seed_gives_no_verdict_however_clear_the_items():
    tokens = [1] * 50
    evals = {
        "base": evaluation([5.0] * 50, tokens, [0.0]),
        ("random", 0): evaluation([4.0] * 50, tokens, [0.0]),
        ("low", 0): evaluation([3.0 + 0.001 * i for i in range(50)], tokens, [0.0]),
    }
    rows = compare_arms(evals, arms=["random", "low"], seeds=[0], reference="random", resamples=300)
    low = next(r for r in rows if r.arm == "low" and r.metric == "heldout loss")
    assert math.isnan(low.vs_reference.low) and low.vs_reference_items.excludes_zero()
    assert low.verdict() == "not assessed (1 seed)"
