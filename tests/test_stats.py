"""The compare analysis's statistics, each against a computation that shares nothing with the code
under test: SciPy's own tests, hand arithmetic, and a simulation with known variances."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from pipeline.comparison import DocumentLosses, Margins, ModelEval, TaskItems, compare_arms
from pipeline.stats import Estimate, contrast, holm


def simulated(rng, *, seeds=5, docs=105, sd_seed=0.006, sd_doc=0.02, sd_run_doc=0.04, delta=0.01):
    """Two arms' per-document NLL sums (seeds x docs) and the documents' tokens, drawn from a
    two-way model: per-token loss = arm mean + document + arm x document + run + run x document
    noise (larger per token on short documents)."""
    tokens = rng.integers(10, 256, size=docs).astype(float)
    document = rng.normal(3.0, 0.5, size=docs)
    arms = []
    for mean in (delta, 0.0):
        per_token = (
            mean
            + document
            + rng.normal(0, sd_doc, size=docs)
            + rng.normal(0, sd_seed, size=(seeds, 1))
            + rng.normal(0, sd_run_doc, size=(seeds, docs)) * np.sqrt(64 / tokens)
        )
        arms.append(per_token * tokens)
    return arms[0], arms[1], tokens


@pytest.mark.parametrize(
    ("variances", "seed"),
    [
        ({}, 0),  # both seeds and documents matter, as measured on the embedded default
        ({"sd_doc": 0.0}, 1),  # documents add nothing beyond run-to-run noise
        ({"sd_seed": 0.0, "sd_doc": 0.05}, 2),  # documents dominate
        ({"seeds": 3}, 3),
    ],
)
def test_the_interval_covers_the_true_difference_95_percent_of_the_time(variances, seed):
    rng = np.random.default_rng(seed)
    experiments, covered = 2000, 0
    for _ in range(experiments):
        arm, reference, tokens = simulated(rng, **variances)
        low, high = contrast(arm, reference, tokens).interval()
        covered += low <= 0.01 <= high
    # 2,000 experiments: the standard error of a 95% coverage is 0.5 points
    assert abs(covered / experiments - 0.95) <= 0.02, covered / experiments


def test_the_source_weighted_interval_covers_too():
    rng = np.random.default_rng(11)
    covered = 0
    for _ in range(2000):
        arm, reference, tokens = simulated(rng)
        sources = np.arange(len(tokens)) % 7
        low, high = contrast(arm, reference, tokens, sources).interval()
        covered += low <= 0.01 <= high
    assert abs(covered / 2000 - 0.95) <= 0.02


def test_an_interval_over_seeds_alone_would_not_cover():
    """The reason for the second component: with documents varying, the seed part alone is too narrow."""
    rng = np.random.default_rng(5)
    covered = 0
    for _ in range(1000):
        arm, reference, tokens = simulated(rng, sd_doc=0.05, sd_seed=0.002)
        e = contrast(arm, reference, tokens)
        half = scipy_stats.t.ppf(0.975, 8) * math.sqrt(e.seed_variance)
        covered += abs(e.mean - 0.01) <= half
    assert covered / 1000 < 0.8


def test_without_document_effects_it_is_welchs_interval():
    # every document of a model has the same per-token loss: only the runs vary
    tokens = np.array([12.0, 40.0, 7.0, 90.0])
    per_model_a = np.array([3.10, 3.05, 3.12, 3.08, 3.11])
    per_model_b = np.array([3.00, 3.04, 2.98, 3.02])
    e = contrast(np.outer(per_model_a, tokens), np.outer(per_model_b, tokens), tokens)
    welch = scipy_stats.ttest_ind(per_model_a, per_model_b, equal_var=False)
    ci = welch.confidence_interval(0.95)
    assert e.mean == pytest.approx(per_model_a.mean() - per_model_b.mean())
    assert e.interval() == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert e.p_value() == pytest.approx(welch.pvalue, rel=1e-9)
    assert e.item_variance == 0.0


def test_the_mean_is_each_arms_token_weighted_loss_averaged_over_seeds():
    tokens = np.array([10.0, 30.0])
    arm = np.array([[18.0, 44.0], [21.0, 49.0]])
    reference = np.array([[20.0, 50.0], [22.0, 52.0], [19.0, 51.0]])
    e = contrast(arm, reference, tokens)
    assert e.mean == pytest.approx((62 / 40 + 70 / 40) / 2 - (70 / 40 + 74 / 40 + 70 / 40) / 3)
    assert e.seeds == (2, 3) and e.items == 2
    by_source = contrast(arm, reference, tokens, np.array(["a", "b"]))
    # each source's loss, equally weighted: (nll_a / 10 + nll_b / 30) / 2
    assert by_source.mean == pytest.approx(
        np.mean([(18 / 10 + 44 / 30) / 2, (21 / 10 + 49 / 30) / 2])
        - np.mean([(20 / 10 + 50 / 30) / 2, (22 / 10 + 52 / 30) / 2, (19 / 10 + 51 / 30) / 2])
    )


def test_one_seed_leaves_the_interval_undefined():
    e = contrast(np.array([[1.0, 2.0]]), np.array([[1.0, 2.0], [1.5, 2.5]]), np.array([1.0, 1.0]))
    assert not e.defined and math.isnan(e.interval()[0]) and math.isnan(e.p_value())


@pytest.mark.parametrize(
    "values", [[0.004, 0.001, -0.002, 0.003, 0.0], [0.02, 0.03, 0.025], [-0.001, 0.0015]]
)
def test_tost_equals_two_one_sided_scipy_t_tests(values):
    x = np.array(values)
    e = Estimate(x.mean(), x.std(ddof=1) / math.sqrt(len(x)), len(x) - 1, (len(x), 0), 1, 0.0, 0.0)
    margin = 0.005
    lower = scipy_stats.ttest_1samp(x, -margin, alternative="greater").pvalue
    upper = scipy_stats.ttest_1samp(x, margin, alternative="less").pvalue
    assert e.p_equivalent(margin) == pytest.approx(max(lower, upper), rel=1e-9)
    assert e.p_value() == pytest.approx(scipy_stats.ttest_1samp(x, 0.0).pvalue, rel=1e-9)


def test_holm_by_hand():
    # sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> 0.06, monotone)
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adjusted = holm([0.01, math.nan, 0.02])  # NaN (one seed) is not a test: m = 2
    assert (
        adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    )


def evaluation(nll: list[float], tokens: list[int], sources: list[str], task: list[float]) -> ModelEval:
    items = TaskItems(correct=task, nll=[1.0 + x for x in task], chars=[4] * len(task))
    return ModelEval(DocumentLosses(nll, tokens, sources), None, {"t": items})


def test_compare_arms_roles_verdicts_and_holm():
    rng = np.random.default_rng(2)
    docs, tokens, sources = 60, [20] * 60, ["a", "b", "c"] * 20
    evals = {"base": evaluation([70.0] * docs, tokens, sources, [0.0, 1.0] * 3)}
    for seed in range(4):
        noise = rng.normal(0, 0.2, size=docs)
        evals[("random", seed)] = evaluation(list(60.0 + noise), tokens, sources, [1.0, 0.0] * 3)
        evals[("same", seed)] = evaluation(
            list(60.0 + rng.normal(0, 0.2, size=docs)), tokens, sources, [1.0, 0.0] * 3
        )
        evals[("low", seed)] = evaluation(
            list(58.0 + rng.normal(0, 0.2, size=docs)), tokens, sources, [1.0, 1.0] * 3
        )
    rows = compare_arms(
        evals,
        arms=["random", "same", "low"],
        seeds=[0, 1, 2, 3],
        reference="random",
        primary=("low", "heldout loss"),
        margins=Margins(loss=0.01, task=0.02),
    )
    by = {(r.arm, r.metric): r for r in rows}
    assert by[("low", "heldout loss")].role == "primary"
    assert by[("low", "heldout loss")].verdict() == "better"  # -0.1 nats/token
    assert by[("same", "heldout loss")].verdict() == "equivalent"  # within 0.01, narrowly measured
    assert by[("random", "heldout loss")].verdict() == "reference"
    assert (
        by[("low", "heldout loss: a")].role == "descriptive"
        and by[("low", "heldout loss: a")].verdict() == ""
    )
    assert by[("low", "task t accuracy")].role == "descriptive"
    # the secondary family: every non-reference arm x tested metric but the primary, Holm-adjusted
    family = [r for r in rows if r.role == "secondary"]
    assert {r.metric for r in family} == {"heldout loss", "heldout loss by source", "task t loss"}
    assert len(family) == 2 * 3 - 1
    raw = [r.estimate.p_value() for r in family]
    assert [r.p_adjusted for r in family] == pytest.approx(holm(raw))
    primary = by[("low", "heldout loss")]
    assert primary.p_adjusted == pytest.approx(primary.estimate.p_value())
