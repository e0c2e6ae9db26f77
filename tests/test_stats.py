"""The compare analysis's statistics, each against a computation that shares nothing with the code
under test: SciPy's own tests, hand arithmetic, and a simulation with known variances."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from pipeline.comparison import DocumentLosses, Margins, ModelEval, TaskItems, compare_arms
from pipeline.stats import Estimate, contrast, holm

STRATA, PER_STRATUM = 7, 15  # the embedded held-out set: 15 documents from each of 7 sources


def lengths(rng, sources: np.ndarray) -> np.ndarray:
    """Target tokens per document as on the held-out set: one source of short texts (median 32,
    9-157 tokens), the others longer, up to the 256-token cap."""
    median = np.where(sources == 0, 32.0, 150.0)
    return np.clip(np.round(median * rng.lognormal(0, 0.6, size=len(sources))), 9, 256)


# each source's expected tokens per document: what the token-weighted metric weighs it by
EXPECTED_TOKENS = np.array(
    [lengths(np.random.default_rng(99), np.full(200_000, k)).mean() for k in range(STRATA)]
)


def simulated(rng, *, seeds=5, sd_seed=0.006, sd_doc=0.02, sd_run_doc=0.04, sd_source=0.01, delta=0.01):
    """Two arms' per-document NLL sums (seeds x documents), the documents' tokens and sources on
    the held-out set's design, and the true difference of each metric. Per-token loss = arm mean
    + source x arm + document + arm x document + run + run x document noise (larger per token on
    short documents). The sources are fixed (every one is evaluated), the documents and runs are
    draws: the truth is `delta` plus the sources' x arm effects, weighted equally (0 by
    construction) or by their expected tokens."""
    sources = np.repeat(np.arange(STRATA), PER_STRATUM)
    tokens = lengths(rng, sources)
    document = rng.normal(3.0, 0.5, size=len(sources))
    arms, effects = [], []
    for mean in (delta, 0.0):
        by_source = rng.normal(0, sd_source, size=STRATA)
        by_source -= by_source.mean()
        effects.append(by_source)
        per_token = (
            mean
            + by_source[sources]
            + document
            + rng.normal(0, sd_doc, size=len(sources))
            + rng.normal(0, sd_seed, size=(seeds, 1))
            + rng.normal(0, sd_run_doc, size=(seeds, len(sources))) * np.sqrt(64 / tokens)
        )
        arms.append(per_token * tokens)
    shares = EXPECTED_TOKENS / EXPECTED_TOKENS.sum()
    truths = {False: delta + float(shares @ (effects[0] - effects[1])), True: delta}
    return arms[0], arms[1], tokens, sources, truths


@pytest.mark.parametrize(
    ("variances", "seed"),
    [
        ({}, 0),  # both seeds and documents matter, as measured on the embedded default
        ({"sd_doc": 0.0, "sd_source": 0.0}, 1),  # documents add nothing beyond run-to-run noise
        ({"sd_seed": 0.0, "sd_doc": 0.05}, 2),  # documents dominate
        ({"seeds": 3}, 3),
        # sources respond very differently to the arm (the embedded default's per-source
        # differences spread ~0.03): token-weighted, a source's share of the drawn tokens moves
        # the metric too, which only a linearisation around the overall ratio sees
        ({"sd_source": 0.06}, 4),
    ],
)
@pytest.mark.parametrize("equal", [False, True], ids=["token-weighted", "by-source"])
def test_the_interval_covers_the_true_difference_95_percent_of_the_time(variances, seed, equal):
    rng = np.random.default_rng(seed)
    experiments, covered = 2000, 0
    for _ in range(experiments):
        arm, reference, tokens, sources, truths = simulated(rng, **variances)
        low, high = contrast(arm, reference, tokens, sources, equal_strata=equal).interval()
        covered += low <= truths[equal] <= high
    # 2,000 experiments: the standard error of a 95% coverage is 0.5 points
    assert abs(covered / experiments - 0.95) <= 0.02, covered / experiments


def test_an_interval_over_seeds_alone_would_not_cover():
    """The reason for the second component: with documents varying, the seed part alone is too narrow."""
    rng = np.random.default_rng(5)
    covered = 0
    for _ in range(1000):
        arm, reference, tokens, sources, truths = simulated(rng, sd_doc=0.05, sd_seed=0.002)
        e = contrast(arm, reference, tokens, sources)
        half = scipy_stats.t.ppf(0.975, 8) * math.sqrt(e.seed_variance)
        covered += abs(e.mean - truths[False]) <= half
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
    assert e.item_variance == pytest.approx(0.0, abs=1e-20)


def test_the_mean_is_each_arms_token_weighted_loss_averaged_over_seeds():
    tokens = np.array([10.0, 30.0])
    arm = np.array([[18.0, 44.0], [21.0, 49.0]])
    reference = np.array([[20.0, 50.0], [22.0, 52.0], [19.0, 51.0]])
    e = contrast(arm, reference, tokens)
    assert e.mean == pytest.approx((62 / 40 + 70 / 40) / 2 - (70 / 40 + 74 / 40 + 70 / 40) / 3)
    assert e.seeds == (2, 3) and e.items == 2
    # strata change the variance, not the token-weighted mean
    assert contrast(arm, reference, tokens, np.array(["a", "b"])).mean == pytest.approx(e.mean)
    by_source = contrast(arm, reference, tokens, np.array(["a", "b"]), equal_strata=True)
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
        for arm, level in (
            ("random", 60.0),
            ("random_replicate", 60.0),
            ("random_matched", 59.0),
            ("midranking", 58.0),
        ):
            nll = list(level + rng.normal(0, 0.2, size=docs))
            evals[(arm, seed)] = evaluation(nll, tokens, sources, [1.0, float(level < 60)] * 3)
    arms = ["random", "random_replicate", "random_matched", "midranking"]
    rows = compare_arms(
        evals,
        arms=arms,
        seeds=[0, 1, 2, 3],
        reference="random",
        primary=("midranking", "heldout loss"),
        margins=Margins(loss=0.01, task=0.02),
    )
    by = {(r.arm, r.versus, r.metric): r for r in rows}
    primary = by[("midranking", "random", "heldout loss")]
    assert primary.role == "primary" and primary.verdict() == "better"  # -0.1 nats/token
    assert primary.p_adjusted == pytest.approx(primary.estimate.p_value())
    # the A/A contrast: a calibration, tested alone, outside the family
    replicate = by[("random_replicate", "random", "heldout loss")]
    assert replicate.role == "calibration" and replicate.verdict() == "equivalent"  # within 0.01
    # MidRanking against its matched control too (-2 / 20 tokens = -0.05 nats/token)
    matched = by[("midranking", "random_matched", "heldout loss")]
    assert matched.role == "secondary" and matched.estimate.mean == pytest.approx(-0.05, abs=0.01)
    assert by[("random", "", "heldout loss")].verdict() == "reference"
    assert by[("midranking", "random", "heldout loss: a")].role == "descriptive"
    assert by[("midranking", "random", "heldout loss: a")].verdict() == ""
    assert by[("midranking", "random", "task t accuracy")].role == "descriptive"
    # the secondary family: the other contrasts x tested metrics, Holm-adjusted together
    family = [r for r in rows if r.role == "secondary"]
    tested = {"heldout loss", "heldout loss by source", "task t loss"}
    assert {r.metric for r in family} == tested
    # contrasts: random_matched, midranking (vs random), midranking vs random_matched; less the primary
    assert len(family) == 3 * len(tested) - 1
    raw = [r.estimate.p_value() for r in family]
    assert [r.p_adjusted for r in family] == pytest.approx(holm(raw))
    with pytest.raises(ValueError, match="primary contrast midranking vs random on 'ood loss'"):
        compare_arms(evals, arms=arms, seeds=[0, 1], reference="random", primary=("midranking", "ood loss"))
