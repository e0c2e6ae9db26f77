"""Selection maths: global ranking of scored samples, bands over it, IR-DRO weights (docs/design.md §1).

    band = band_for("midranking", skip=0.1, keep=0.3)
    decided = select(pl.scan_parquet("scores/part-*.parquet"), band, measure="tokens")
    decided.filter(pl.col("kept")).collect()   # the band;  reason: too_hard | too_easy | not_sampled

Every sample is placed on one line, hardest first: by its rank key descending (`loss`, or a key
of pipeline/rank_keys.py such as bits_per_byte), ties by `sample_id` ascending, so a selection is deterministic (the `random` strategy orders by a seeded hash of the
sample_id instead). A sample's position is the share of the measure (samples, or tokens) that
comes before it; a band keeps the samples whose position falls in [start, stop), that is
`start x total <= before < stop x total`. The shares are exact rationals of the decimals the user
wrote (skip 0.2 + keep 0.1 is 3/10, not 0.30000000000000004), turned once into integer thresholds
(`ceil(start x total)`), so a sample exactly on a boundary is never misplaced by rounding: 10
equal samples with skip 0.2, keep 0.1 keep exactly one. In tokens, the kept total is within one
sample of (stop - start) x total. With `by_source`, positions are computed within each source, so
each source keeps its own band and the domain mix is kept.
The whole table is never sorted nor held: the band's two ends (in each source) are found by
histogram passes over the keys (pipeline/band_ends.py), then each row is decided by comparing its
(key, sample_id) with them, which streams. Memory is independent of the number of samples
(bench/bench_select.py runs it on a billion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np
import polars as pl

from pipeline.band_ends import BUCKETS, MAX_ROWS, find_ends, group_totals, mark_past
from pipeline.key_columns import length_bin, length_edges
from pipeline.rank_keys import FLAG_KEYS
from pipeline.shares import exact_share

Strategy = Literal["midranking", "band", "top", "bottom", "random", "all"]
Reason = pl.Enum(["too_hard", "too_easy", "not_sampled", "too_short", "dropped_top"])


Share = float | Fraction


@dataclass(frozen=True, slots=True)
class Band:
    start: Fraction
    """Share of the measure, counted from the highest loss, that comes before the band (floats are
    taken as the decimal they print as: 0.1 is 1/10)."""
    stop: Fraction
    """Share of the measure, counted from the highest loss, at which the band ends."""
    order: Literal["rank_key", "random"] = "rank_key"
    """`rank_key`: hardest first by the band's rank key; `random`: a seeded hash of the sample_id."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", exact_share(self.start))
        object.__setattr__(self, "stop", exact_share(self.stop))
        if not 0 <= self.start < self.stop <= 1:
            raise ValueError(
                f"a band needs 0 <= start < stop <= 1, got [{float(self.start)}, {float(self.stop)})"
            )

    def thresholds(self, total: int) -> tuple[int, int]:
        """The band in integer positions: a sample with `before` of the measure ahead of it is kept
        when first <= before < last. Exact: `before >= start x total` is `before >= ceil(...)`."""
        return math.ceil(self.start * total), math.ceil(self.stop * total)


def band_for(
    strategy: Strategy, *, skip: Share = 0, keep: Share = 1, low: Share = 0, high: Share = 1
) -> Band:
    """The band of a strategy. `skip`/`keep` count from the hardest sample; `low`/`high` are loss
    quantiles counted from the easiest, as cc_net and Marion et al. state their bands. All in exact
    rationals, so skip + keep is the sum of the decimals as written."""
    skip, keep, low, high = map(exact_share, (skip, keep, low, high))
    if strategy == "midranking":
        return Band(skip, skip + keep)
    if strategy == "top":
        return Band(Fraction(0), keep)
    if strategy == "bottom":
        return Band(1 - keep, Fraction(1))
    if strategy == "band":
        return Band(1 - high, 1 - low)
    if strategy == "random":
        return Band(Fraction(0), keep, order="random")
    if strategy == "all":
        return Band(Fraction(0), Fraction(1))
    raise ValueError(f"unknown strategy {strategy!r}")


def _order_key(band: Band, seed: int, key: str) -> pl.Expr:
    """The primary sort key, ascending: minus the rank key (hardest first), or a seeded hash for
    `random`."""
    return -pl.col(key).cast(pl.Float64) if band.order == "rank_key" else pl.col("sample_id").hash(seed)


def select(
    scores: pl.LazyFrame,
    band: Band,
    *,
    measure: Literal["samples", "tokens"] = "samples",
    by_source: bool = False,
    seed: int = 0,
    key: str = "loss",
    buckets: int = BUCKETS,
    max_rows: int = MAX_ROWS,
) -> pl.LazyFrame:
    """All samples with `kept` and `reason`. Needs `sample_id` and the column `key` (larger is
    harder: `loss`, or a key of pipeline/rank_keys.py added beforehand), plus `n_tokens` for
    measure=tokens and `source` for by_source.

    The band's two ends in each group are found by histogram passes (pipeline/band_ends.py:
    `buckets` per pass, at most about `max_rows` rows held), then every row is decided by
    comparing its (key, sample_id) with them, a streaming filter."""
    size = pl.col("n_tokens").cast(pl.Int64) if measure == "tokens" else pl.lit(1, dtype=pl.Int64)
    keyed = scores.with_columns(
        _key=_order_key(band, seed, key), _size=size, _group=pl.col("source") if by_source else pl.lit("")
    )
    totals = group_totals(keyed)
    totals_of = dict(zip(totals["_group"], totals["size"], strict=True))
    thresholds = {group: band.thresholds(size) for group, size in totals_of.items()}
    wanted = {group: [t for t in ends if t < totals_of[group]] for group, ends in thresholds.items()}
    found = find_ends(keyed, totals, wanted, buckets=buckets, max_rows=max_rows)
    ends = {
        group: {
            name: found[group, threshold] if threshold < totals_of[group] else False  # none has all before it
            for name, threshold in zip(("_past_start", "_past_stop"), (first, last), strict=True)
        }
        for group, (first, last) in thresholds.items()
    }
    ended = mark_past(keyed, ends, grouped=by_source)
    after_start, after_stop = pl.col("_past_start"), pl.col("_past_stop")
    kept = after_start & ~after_stop
    if band.order == "random":
        reason = pl.when(kept).then(None).otherwise(pl.lit("not_sampled", dtype=Reason))
    else:
        reason = (
            pl.when(kept)
            .then(None)
            .when(~after_start)
            .then(pl.lit("too_hard", dtype=Reason))
            .otherwise(pl.lit("too_easy", dtype=Reason))
        )
    helpers = ["_key", "_size", "_group", "_past_start", "_past_stop"]
    return ended.with_columns(kept=kept, reason=reason).drop(helpers)


def top_by_keys(
    scores: pl.LazyFrame,
    shares: dict[str, Share],
    *,
    measure: Literal["samples", "tokens"] = "samples",
    by_source: bool = False,
    buckets: int = BUCKETS,
    max_rows: int = MAX_ROWS,
) -> pl.LazyFrame:
    """`scores` with `dropped_by`: the keys in whose top share (hardest first, in `measure`, within
    each source with by_source) the row falls, joined by "+" in the order of `shares`, or null.
    Each key's top is the band [0, share) of that key's ranking, found like any band's end: exact
    and streaming, so the union costs one band per key. A flag key's top holds only the samples
    it flags (above 0): its share is a ceiling, not a quota. Needs each key's column."""
    flagged = scores
    for key, share in shares.items():
        top = Band(Fraction(0), exact_share(share))
        flagged = select(
            flagged, top, measure=measure, by_source=by_source, key=key,
            buckets=buckets, max_rows=max_rows,
        ).drop("reason").rename({"kept": f"_top_{key}"})  # fmt: skip
        if key in FLAG_KEYS:
            flagged = flagged.with_columns(pl.col(f"_top_{key}") & (pl.col(key) > 0))
    names = pl.concat_str(
        [pl.when(pl.col(f"_top_{key}")).then(pl.lit(key)) for key in shares], separator="+", ignore_nulls=True
    )
    return flagged.with_columns(dropped_by=pl.when(names != "").then(names)).drop(
        [f"_top_{key}" for key in shares]
    )


def irdro_weight_expr(kept: pl.LazyFrame, kl_reg: float) -> pl.Expr:
    """IR-DRO weight over the kept set: softmax(loss / kl_reg), rescaled to mean 1, in float64, as
    an expression whose two normalisers (max loss, mean of exp) are computed once, so it can be applied shard by shard.

    The max is subtracted before exp, so extreme losses do not overflow; a large kl_reg tends to
    uniform weights, a small one puts all the weight on the hardest sample."""
    if kl_reg <= 0:
        raise ValueError(f"kl_reg must be > 0, got {kl_reg}")
    loss = pl.col("loss").cast(pl.Float64)
    top = kept.select(loss.max()).collect().item()
    shifted = ((loss - top) / kl_reg).exp()
    total, samples = kept.select(shifted.sum(), pl.len()).collect().row(0)
    mean = total / samples
    return shifted / mean


def length_matched(
    scores: pl.LazyFrame,
    reference: pl.DataFrame,
    seed: int,
    *,
    by_source: bool = False,
    buckets: int = BUCKETS,
    max_rows: int = MAX_ROWS,
) -> tuple[pl.LazyFrame, np.ndarray, int]:
    """All samples with `kept` and `reason`: a seeded random sample with, in every length bin, as
    many samples as `reference` has (the length counts of another selection: `n_tokens`,
    `samples`), so the two sets share a length distribution, and (with it)
    nearly their token count. Returns the decision, the bin edges, and how many samples were
    short (bins of the whole set too small for the reference).

    A control for a band by loss: mean token loss falls with length, so a band can differ from a
    random sample by its lengths alone; this random sample cannot. Each bin keeps its first
    samples in the order of a seeded hash of sample_id, found like a band's end.

    `by_source`: the bins are source x length (`reference` has a `source` column too), so the
    sample also has the other selection's mix of sources, and within each source its lengths."""
    longest = scores.select(pl.col("n_tokens").max()).collect(engine="streaming").item() or 1
    edges = length_edges(int(max(longest, reference["n_tokens"].max() or 1)))

    def cell(source: pl.Expr, length: pl.Expr) -> pl.Expr:
        """A sample's group: its length bin, or (by_source) "<bin>\x1f<source>"."""
        if not by_source:
            return length
        return pl.concat_str([length.cast(pl.String), source.cast(pl.String)], separator="\x1f")

    # the bins of length_bin: [e_i, e_i+1), the edges span every length
    wanted_rows = (
        reference.lazy()
        .select(
            _group=cell(pl.col("source") if by_source else pl.lit(""), length_bin(edges)), samples="samples"
        )
        .group_by("_group")
        .agg(pl.col("samples").sum())
        .collect()
    )
    wanted = dict(zip(wanted_rows["_group"].to_list(), wanted_rows["samples"].to_list(), strict=True))
    keyed = scores.with_columns(
        _group=cell(pl.col("source") if by_source else pl.lit(""), length_bin(edges)),
        _key=pl.col("sample_id").hash(seed),
        _size=pl.lit(1, dtype=pl.Int64),
    )
    totals = group_totals(keyed)
    have = dict(zip(totals["_group"].to_list(), totals["rows"].to_list(), strict=True))
    short = int(sum(max(0, int(w) - have.get(b, 0)) for b, w in wanted.items()))
    quota = {b: int(wanted.get(b, 0)) for b in have}
    thresholds = {b: [q] for b, q in quota.items() if 0 < q < have[b]}
    found = find_ends(keyed, totals, thresholds, buckets=buckets, max_rows=max_rows)
    ends = {b: {"_past_quota": found.get((b, q), q <= 0)} for b, q in quota.items()}  # else all or none
    decided = (
        mark_past(keyed, ends, grouped=True)
        .with_columns(kept=~pl.col("_past_quota"))
        .with_columns(
            reason=pl.when(pl.col("kept")).then(None).otherwise(pl.lit("not_sampled", dtype=Reason))
        )
        .drop("_group", "_key", "_size", "_past_quota")
    )
    return decided, edges, short
