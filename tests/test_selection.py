"""Selection maths against a brute-force computation in plain Python."""

import math
import random
from fractions import Fraction

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.selection import Band, band_for, irdro_weight_expr, select


@pytest.fixture
def scores(tmp_path):
    """Synthetic score shards with many tied losses, several sources and uneven token counts."""
    rng = random.Random(3)
    rows = [
        {
            "sample_id": f"f{i % 7}.jsonl:{i}",
            "source": rng.choice(["web", "code", "books"]),
            "n_tokens": rng.randint(1, 50),
            "loss": round(rng.uniform(0.5, 6.0), 1),  # one decimal: lots of ties
        }
        for i in range(400)
    ]
    for shard in range(4):
        pq.write_table(pa.Table.from_pylist(rows[shard::4]), tmp_path / f"part-{shard:05d}.parquet")
    return rows, pl.scan_parquet(tmp_path / "part-*.parquet")


def exact_ends(strategy: str, params: dict) -> tuple[Fraction, Fraction]:
    """The band's [start, stop) as exact rationals of the decimals as written, from the strategy's
    own definition (docs/design.md §1) — independent of `Band` and `band_for`."""
    q = {k: Fraction(str(v)) for k, v in params.items()}
    skip, keep, low, high = q.get("skip", 0), q.get("keep", 1), q.get("low", 0), q.get("high", 1)
    return {
        "midranking": (skip, skip + keep),
        "top": (Fraction(0), keep),
        "random": (Fraction(0), keep),
        "bottom": (1 - keep, Fraction(1)),
        "band": (1 - high, 1 - low),
        "all": (Fraction(0), Fraction(1)),
    }[strategy]


def brute_force(rows, ends, measure: str, by_source: bool, order_key=None) -> set[str]:
    """Kept ids: sort hardest first (ties by id), walk the cumulative measure, keep the samples whose
    share before them lies in [start, stop), compared in exact rationals."""
    start, stop = ends
    groups = {}
    for row in rows:
        groups.setdefault(row["source"] if by_source else "", []).append(row)
    kept = set()
    for group in groups.values():
        key = order_key or (lambda r: (-r["loss"], r["sample_id"]))
        ordered = sorted(group, key=key)
        size = [r["n_tokens"] if measure == "tokens" else 1 for r in ordered]
        total, before = sum(size), 0
        for row, s in zip(ordered, size, strict=True):
            if start <= Fraction(before, total) < stop:
                kept.add(row["sample_id"])
            before += s
    return kept


CASES = [
    ("midranking", {"skip": 0.1, "keep": 0.3}),
    ("midranking", {"skip": 0.0, "keep": 0.5}),
    ("band", {"low": 0.3, "high": 0.6}),  # cc_net's middle
    ("band", {"low": 0.35, "high": 0.65}),  # Marion et al.'s middle
    ("top", {"keep": 0.5}),
    ("bottom", {"keep": 0.5}),
    ("all", {}),
]


@pytest.mark.parametrize(("strategy", "params"), CASES)
@pytest.mark.parametrize("measure", ["samples", "tokens"])
@pytest.mark.parametrize("by_source", [False, True])
def test_kept_set_equals_brute_force(scores, strategy, params, measure, by_source):
    rows, lazy = scores
    band = band_for(strategy, **params)
    decided = select(lazy, band, measure=measure, by_source=by_source).collect()
    assert decided.height == len(rows)  # every sample is decided
    kept = set(decided.filter(pl.col("kept"))["sample_id"])
    assert kept == brute_force(rows, exact_ends(strategy, params), measure, by_source)
    rejected = decided.filter(~pl.col("kept"))
    assert rejected["reason"].null_count() == 0 and decided.filter(pl.col("kept"))[
        "reason"
    ].null_count() == len(kept)
    if strategy != "all":
        # reasons agree with the side of the band: too_hard rows have higher (or tied) loss than any kept row
        hard = rejected.filter(pl.col("reason") == "too_hard")
        if not by_source and hard.height and kept:
            assert hard["loss"].min() >= decided.filter(pl.col("kept"))["loss"].max()


def equal_samples(n: int) -> pl.LazyFrame:
    return pl.LazyFrame(
        {"sample_id": [f"s{i:03d}" for i in range(n)], "loss": [float(n - i) for i in range(n)]}
    )


@pytest.mark.parametrize(
    ("strategy", "params", "expected"),
    [
        # float arithmetic puts each of these on the wrong side of a boundary: 0.2 + 0.1 > 0.3,
        # 1 - 0.7 > 0.3 and 0.1 + 0.2 > 0.3
        ("midranking", {"skip": 0.2, "keep": 0.1}, 1),
        ("midranking", {"skip": 0.1, "keep": 0.2}, 2),
        ("bottom", {"keep": 0.7}, 7),
    ],
)
def test_samples_exactly_on_a_boundary_fall_on_the_right_side(strategy, params, expected):
    decided = select(equal_samples(10), band_for(strategy, **params)).collect()
    kept = decided.filter(pl.col("kept"))
    assert kept.height == expected
    rows = [
        {"sample_id": s, "loss": x, "n_tokens": 1, "source": ""}
        for s, x in equal_samples(10).collect().rows()
    ]
    assert set(kept["sample_id"]) == brute_force(rows, exact_ends(strategy, params), "samples", False)


def test_random_bands_with_decimal_shares_equal_brute_force():
    """A few hundred random bands with shares of one to three decimals, over sets whose sizes make
    many boundaries land exactly on a sample."""
    rng = random.Random(12)
    for case in range(300):
        n = rng.choice([5, 10, 20, 40, 100, 1000, rng.randint(1, 60)])
        rows = [
            {
                "sample_id": f"s{i:04d}",
                "source": rng.choice("ab"),
                "n_tokens": rng.choice([1, 1, 2, 5, 10]),
                "loss": round(rng.uniform(0, 3), rng.choice([0, 1, 3])),
            }
            for i in range(n)
        ]
        decimals = rng.choice([1, 2, 3])
        a, b = sorted(rng.sample(range(10**decimals + 1), 2))
        strategy = rng.choice(["midranking", "top", "bottom", "band"])
        params = {
            "midranking": {"skip": a / 10**decimals, "keep": (b - a) / 10**decimals},
            "top": {"keep": b / 10**decimals},
            "bottom": {"keep": b / 10**decimals},
            "band": {"low": a / 10**decimals, "high": b / 10**decimals},
        }[strategy]
        measure, by_source = rng.choice(["samples", "tokens"]), rng.random() < 0.3
        frame = pl.LazyFrame(rows)
        decided = select(frame, band_for(strategy, **params), measure=measure, by_source=by_source).collect()
        kept = set(decided.filter(pl.col("kept"))["sample_id"])
        expected = brute_force(rows, exact_ends(strategy, params), measure, by_source)
        assert kept == expected, (case, strategy, params, measure, by_source, n)


# Budgets that force every path of pipeline/band_ends.py on a few hundred rows: histograms of 3
# buckets, several passes narrowing the key, ties narrowed by sample_id one character a pass.
TIGHT = [{"buckets": 3, "max_rows": 1}, {"buckets": 2, "max_rows": 4}, {"buckets": 5, "max_rows": 30}]


@pytest.mark.parametrize(("strategy", "params"), CASES)
@pytest.mark.parametrize("measure", ["samples", "tokens"])
@pytest.mark.parametrize("by_source", [False, True])
@pytest.mark.parametrize("budget", TIGHT)
def test_ends_found_in_many_narrow_passes_equal_brute_force(
    scores, strategy, params, measure, by_source, budget
):
    rows, lazy = scores
    decided = select(lazy, band_for(strategy, **params), measure=measure, by_source=by_source, **budget)
    kept = set(decided.filter(pl.col("kept")).collect()["sample_id"])
    assert kept == brute_force(rows, exact_ends(strategy, params), measure, by_source)


def test_ties_are_narrowed_by_sample_id_of_any_length_and_script():
    """One loss value shared by most rows, so an end is found inside the tie by sample_id alone:
    ids that are prefixes of others, non-ASCII characters, ids of different lengths."""
    rng = random.Random(5)
    alphabet = ["a", "b", "é", "ß", "中", "0", "9", "-", "😀"]
    ids = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(600)}
    rows = [
        {
            "sample_id": i,
            "source": rng.choice("xy"),
            "n_tokens": rng.randint(1, 9),
            "loss": rng.choice([1.0, 2.0, 2.0, 2.0]),
        }
        for i in sorted(ids)
    ]
    frame = pl.LazyFrame(rows)
    for strategy, params in CASES:
        for measure in ("samples", "tokens"):
            for by_source in (False, True):
                decided = select(
                    frame,
                    band_for(strategy, **params),
                    measure=measure,
                    by_source=by_source,
                    buckets=4,
                    max_rows=3,
                )
                kept = set(decided.filter(pl.col("kept")).collect()["sample_id"])
                expected = brute_force(rows, exact_ends(strategy, params), measure, by_source)
                assert kept == expected, (strategy, params, measure, by_source)


def test_ends_over_keys_of_any_magnitude():
    """Keys from -1e308 to 1e308 and subnormals: bucket widths neither overflow nor stall."""
    values = [-1.7e308, 1.7e308, 5e-324, 1e-323, 0.0, -0.0, 1.0, 1.0 + 2**-52, 3.0, -5e-324] * 7
    rows = [
        {"sample_id": f"s{i:03d}", "source": "a", "n_tokens": 1 + i % 3, "loss": v}
        for i, v in enumerate(values)
    ]
    for strategy, params in CASES:
        for measure in ("samples", "tokens"):
            decided = select(
                pl.LazyFrame(rows), band_for(strategy, **params), measure=measure, buckets=3, max_rows=2
            )
            kept = set(decided.filter(pl.col("kept")).collect()["sample_id"])
            assert kept == brute_force(rows, exact_ends(strategy, params), measure, False), (
                strategy,
                measure,
            )


def test_random_strategy_is_seeded_and_brute_forced(scores):
    rows, lazy = scores
    band = band_for("random", keep=0.25)
    first = select(lazy, band, seed=7).collect()
    again = select(lazy, band, seed=7).collect()
    other = select(lazy, band, seed=8).collect()
    kept = set(first.filter(pl.col("kept"))["sample_id"])
    assert (
        kept
        == set(again.filter(pl.col("kept"))["sample_id"])
        != set(other.filter(pl.col("kept"))["sample_id"])
    )
    keys = dict(zip(lazy.collect()["sample_id"], lazy.collect()["sample_id"].hash(7), strict=True))
    assert kept == brute_force(
        rows,
        exact_ends("random", {"keep": 0.25}),
        "samples",
        False,
        order_key=lambda r: (keys[r["sample_id"]], r["sample_id"]),
    )
    assert set(first.filter(~pl.col("kept"))["reason"]) == {"not_sampled"}
    assert len(kept) == 100
    narrow = select(lazy, band, seed=7, buckets=3, max_rows=2).filter(pl.col("kept")).collect()
    assert set(narrow["sample_id"]) == kept  # 64-bit hash keys narrowed pass by pass


@pytest.mark.parametrize("keep", [0.1, 0.37, 0.5])
def test_token_budget_hits_its_target_within_one_sample(scores, keep):
    rows, lazy = scores
    decided = select(lazy, band_for("midranking", skip=0.2, keep=keep), measure="tokens").collect()
    total = sum(r["n_tokens"] for r in rows)
    kept_tokens = decided.filter(pl.col("kept"))["n_tokens"].sum()
    assert abs(kept_tokens - keep * total) <= max(r["n_tokens"] for r in rows)


def test_by_source_keeps_the_band_within_each_source(scores):
    rows, lazy = scores
    decided = select(lazy, band_for("midranking", skip=0.1, keep=0.5), by_source=True).collect()
    for source in {r["source"] for r in rows}:
        part = decided.filter(pl.col("source") == source)
        assert part.filter(pl.col("kept")).height == pytest.approx(0.5 * part.height, abs=1)


def test_selection_is_deterministic_with_ties(scores):
    _, lazy = scores
    band = band_for("midranking", skip=0.1, keep=0.3)
    results = [select(lazy, band).collect().sort("sample_id") for _ in range(3)]
    assert results[0].equals(results[1]) and results[1].equals(results[2])


@pytest.mark.parametrize(
    "params", [{"start": -0.1, "stop": 0.5}, {"start": 0.5, "stop": 0.5}, {"start": 0.2, "stop": 1.2}]
)
def test_band_outside_unit_interval_is_refused(params):
    with pytest.raises(ValueError, match="a band needs 0 <= start < stop <= 1"):
        Band(**params)


def with_weights(kept: pl.LazyFrame, kl_reg: float) -> pl.LazyFrame:
    """The kept set with the IR-DRO weight of `irdro_weight_expr` as a column."""
    return kept.with_columns(weight=irdro_weight_expr(kept, kl_reg))


def closed_form(losses, kl_reg):
    shifted = [math.exp((x - max(losses)) / kl_reg) for x in losses]
    return [len(losses) * s / sum(shifted) for s in shifted]


@pytest.mark.parametrize("kl_reg", [0.1, 1.0, 10.0])
def test_irdro_weights_equal_the_closed_form(kl_reg):
    losses = [0.5, 2.0, 2.0, 3.5, 9.0]
    frame = pl.LazyFrame({"loss": losses})
    weights = with_weights(frame, kl_reg).collect()["weight"].to_list()
    assert weights == pytest.approx(closed_form(losses, kl_reg), rel=1e-12)
    assert np.mean(weights) == pytest.approx(1.0)


def test_irdro_extreme_losses_do_not_overflow_and_limits_hold():
    losses = [1e4, 1e4 - 1, 0.0]
    weights = with_weights(pl.LazyFrame({"loss": losses}), 1.0).collect()["weight"].to_numpy()
    assert np.isfinite(weights).all() and weights[0] > weights[1] > weights[2] >= 0
    uniform = with_weights(pl.LazyFrame({"loss": [1.0, 2.0, 3.0]}), 1e9).collect()["weight"].to_numpy()
    assert uniform == pytest.approx([1.0, 1.0, 1.0])
    hardest = with_weights(pl.LazyFrame({"loss": [1.0, 2.0, 3.0]}), 1e-3).collect()["weight"].to_numpy()
    assert hardest == pytest.approx([0.0, 0.0, 3.0])
    with pytest.raises(ValueError, match="kl_reg must be > 0"):
        with_weights(pl.LazyFrame({"loss": [1.0]}), 0.0)


def test_numpy_shares_are_read_as_the_decimals_they_print():
    band = band_for("midranking", skip=np.float32(0.2), keep=np.float64(0.1))
    assert (band.start, band.stop) == (Fraction(1, 5), Fraction(3, 10))
    assert select(equal_samples(10), band).collect()["kept"].sum() == 1


def test_length_matched_sample_has_the_reference_length_histogram():
    from pipeline.selection import length_matched

    rng = np.random.default_rng(0)
    n = 5000
    lengths = rng.integers(1, 500, n).astype(np.int32)
    scores = pl.LazyFrame(
        {"sample_id": [f"s{i}" for i in range(n)], "n_tokens": lengths, "loss": rng.random(n)}
    )
    reference = rng.integers(100, 300, 400)  # e.g. a band's lengths
    counts = pl.DataFrame({"n_tokens": reference}).group_by("n_tokens").agg(samples=pl.len())
    decided, edges, short = length_matched(scores, counts, seed=3)
    kept = decided.filter(pl.col("kept")).collect()
    assert short == 0 and kept.height == 400
    assert (
        np.histogram(kept["n_tokens"].to_numpy(), edges)[0].tolist()
        == np.histogram(reference, edges)[0].tolist()
    )
    assert abs(int(kept["n_tokens"].sum()) - int(reference.sum())) < 0.02 * reference.sum()
    again, _, _ = length_matched(scores, counts, seed=3)
    other, _, _ = length_matched(scores, counts, seed=4)
    assert again.collect().equals(decided.collect()) and not other.collect().equals(decided.collect())
    assert set(decided.filter(~pl.col("kept")).collect()["reason"]) == {"not_sampled"}
    # brute force: in each bin, the samples first in the order of the seeded hash (ties by id)
    table = scores.collect().with_columns(h=pl.col("sample_id").hash(3))
    wanted = np.histogram(reference, edges)[0]
    expected = set()
    for b in range(len(edges) - 1):
        upper = (
            (table["n_tokens"] <= edges[b + 1]) if b == len(edges) - 2 else (table["n_tokens"] < edges[b + 1])
        )
        inside = table.filter((table["n_tokens"] >= edges[b]) & upper)
        ordered = sorted(zip(inside["h"].to_list(), inside["sample_id"].to_list(), strict=True))
        expected |= {sample_id for _, sample_id in ordered[: wanted[b]]}
    assert set(kept["sample_id"]) == expected
    narrow, _, _ = length_matched(scores, counts, seed=3, buckets=3, max_rows=5)
    assert set(narrow.filter(pl.col("kept")).collect()["sample_id"]) == expected


def _brute_top(rows: list[dict], key: str, share: str, measure: str) -> set[str]:
    """The samples whose position — the measure ahead of them, hardest first by `key`, ties by
    sample_id — is below share x total, in exact rationals."""
    size = (lambda r: r["n_tokens"]) if measure == "tokens" else (lambda r: 1)
    total, before, top = sum(size(r) for r in rows), 0, set()
    for r in sorted(rows, key=lambda r: (-r[key], r["sample_id"])):
        if before < Fraction(share) * total:
            top.add(r["sample_id"])
        before += size(r)
    return top


@pytest.mark.parametrize("measure", ["samples", "tokens"])
@pytest.mark.parametrize(
    "drops",
    [
        {"loss": "0.1"},
        {"loss": "0.1", "bits_per_byte": "0.05"},
        {"loss": "0.2", "bits_per_byte": "0.3"},
        {"loss": "0.05", "bits_per_byte": "0.05", "tokens_per_byte": "0.1"},
    ],
)
def test_multi_key_drop_equals_brute_force(measure, drops):
    """drop_top: the union of each key's top share is dropped, then the band is taken from the rest;
    against sorts in exact rationals that share nothing with the histogram search."""
    from pipeline.band_decision import decide
    from pipeline.config import BandConfig, DropTop

    rows, frame = _drop_rows()
    band = BandConfig(
        strategy="midranking",
        skip=0.1,
        keep=0.5,
        measure=measure,
        drop_top=DropTop(**{k: float(v) for k, v in drops.items()}),
    )
    decided = decide(frame, band, "test").rows.collect()
    dropped_by = {key: _brute_top(rows, key, share, measure) for key, share in drops.items()}
    union = set().union(*dropped_by.values())
    rest = [r for r in rows if r["sample_id"] not in union]
    kept = brute_force(rest, (Fraction("0.1"), Fraction("0.6")), measure, False)
    assert set(decided.filter(pl.col("kept"))["sample_id"]) == kept
    assert set(decided.filter(pl.col("reason") == "dropped_top")["sample_id"]) == union
    for row in decided.filter(pl.col("reason") == "dropped_top").iter_rows(named=True):
        expected = [key for key in drops if row["sample_id"] in dropped_by[key]]
        assert row["dropped_by"] == "+".join(expected)
    assert decided.height == len(rows)  # every sample decided once


@pytest.mark.parametrize("measure", ["samples", "tokens"])
def test_a_random_draw_after_a_drop_equals_brute_force(measure):
    """compare's random_dropped: the drop, then a seeded random share of what remains (ordered by the
    sample_id's seeded hash) — its shares count the rest, not the corpus."""
    from pipeline.band_decision import decide
    from pipeline.config import BandConfig, DropTop

    rows, frame = _drop_rows()
    drops = {"loss": "0.1", "tokens_per_byte": "0.2"}
    band = BandConfig(
        strategy="random", keep=0.3, seed=11, measure=measure, drop_top=DropTop(loss=0.1, tokens_per_byte=0.2)
    )
    decided = decide(frame, band, "test").rows.collect()
    union = set().union(*(_brute_top(rows, key, share, measure) for key, share in drops.items()))
    rest = [r for r in rows if r["sample_id"] not in union]
    ids = [r["sample_id"] for r in rows]
    hashes = dict(zip(ids, pl.Series(ids).hash(11).to_list(), strict=True))
    kept = brute_force(
        rest,
        (Fraction(0), Fraction("0.3")),
        measure,
        False,
        lambda r: (hashes[r["sample_id"]], r["sample_id"]),
    )
    assert set(decided.filter(pl.col("kept"))["sample_id"]) == kept
    assert set(decided.filter(pl.col("reason") == "dropped_top")["sample_id"]) == union
    assert not kept & union


def _drop_rows() -> tuple[list[dict], pl.LazyFrame]:
    """240 rows with tied losses over two sources, their keys in exact rationals where they can be."""
    rng = random.Random(7)
    rows = []
    for i in range(240):
        n_tokens = rng.randint(1, 40)
        loss = rng.choice([1.0, 2.5, 3.0, 3.0, 4.25, 6.0])  # ties on purpose
        rows.append(
            {
                "sample_id": f"c.jsonl:{i}",
                "source": rng.choice(["a", "b"]),
                "n_tokens": n_tokens,
                "loss": loss,
                "nll_sum": loss * n_tokens,
                "n_bytes": rng.randint(n_tokens, 8 * n_tokens),
            }
        )
    for r in rows:
        r["bits_per_byte"] = r["nll_sum"] / (math.log(2) * r["n_bytes"])
        r["tokens_per_byte"] = Fraction(r["n_tokens"], r["n_bytes"])
    frame = pl.LazyFrame(
        [{k: v for k, v in r.items() if k not in ("bits_per_byte", "tokens_per_byte")} for r in rows]
    )
    return rows, frame
