"""Selection maths: global ranking of scored samples, bands over it, IR-DRO weights (DESIGN.md §1).

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
The whole table is never sorted: the band's two ends are found from the numeric keys alone (the
sample_ids of the one or two tied groups at each end are read to break ties), then each row is
decided by comparing its (key, sample_id) with the two ends, which streams. On 10M samples this
takes a third of the memory of sorting everything with pandas (bench/bench_select.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np
import polars as pl

from pipeline.config import exact_share
from pipeline.rank_keys import length_bin, length_edges

Strategy = Literal["midranking", "band", "top", "bottom", "random", "all"]
Reason = pl.Enum(["too_hard", "too_easy", "not_sampled", "too_short"])


Share = float | Fraction


@dataclass(frozen=True, slots=True)
class Band:
    start: Fraction
    """Share of the measure, counted from the highest loss, that comes before the band (floats are
    taken as the decimal they print as: 0.1 is 1/10)."""
    stop: Fraction
    """Share of the measure, counted from the highest loss, at which the band ends."""
    order: Literal["loss", "random"] = "loss"

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
    return -pl.col(key).cast(pl.Float64) if band.order == "loss" else pl.col("sample_id").hash(seed)


def _boundary(scores: pl.LazyFrame, keys: np.ndarray, sizes: np.ndarray, threshold: int) -> tuple | None:
    """The (key, sample_id) of the first sample, in (key, sample_id) order, that has at least
    `threshold` of the measure before it; None when no sample does. Only the numeric keys are
    sorted; sample_ids are read for the one or two tied groups at the boundary."""
    order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_sizes = keys[order], sizes[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    before = np.r_[0, np.cumsum(sorted_sizes)][starts]  # measure before each tied group
    total = int(sorted_sizes.sum())
    if threshold >= total:
        return None
    group = int(np.searchsorted(before, threshold, side="right")) - 1
    for g in (group, group + 1):
        if g >= len(starts):
            return None
        key = sorted_keys[starts[g]]
        tied = scores.filter(pl.col("_key") == key).select("sample_id", "_size").sort("sample_id").collect()
        tied_before = before[g] + np.r_[0, np.cumsum(tied["_size"].to_numpy())[:-1]]
        hits = np.flatnonzero(tied_before >= threshold)
        if len(hits):
            return key, tied["sample_id"][int(hits[0])]
    return None


def _at_or_after(boundary: tuple | None) -> pl.Expr:
    if boundary is None:
        return pl.lit(False)
    key, sample_id = boundary
    return (pl.col("_key") > key) | ((pl.col("_key") == key) & (pl.col("sample_id") >= sample_id))


def select(
    scores: pl.LazyFrame,
    band: Band,
    *,
    measure: Literal["samples", "tokens"] = "samples",
    by_source: bool = False,
    seed: int = 0,
    key: str = "loss",
) -> pl.LazyFrame:
    """All samples with `kept` and `reason`. Needs `sample_id` and the column `key` (larger is
    harder: `loss`, or a key of pipeline/rank_keys.py added beforehand), plus `n_tokens` for
    measure=tokens and `source` for by_source.

    The band is found without sorting the whole table: its two ends are (key, sample_id)
    boundaries computed from the numeric keys alone, then every row is decided by comparing its
    own key with them, a streaming filter."""
    size = pl.col("n_tokens").cast(pl.Int64) if measure == "tokens" else pl.lit(1, dtype=pl.Int64)
    keyed = scores.with_columns(_key=_order_key(band, seed, key), _size=size)
    groups = keyed.select("source").unique().collect()["source"].to_list() if by_source else [None]
    decided = []
    for source in groups:
        part = keyed.filter(pl.col("source") == source) if by_source else keyed
        numeric = part.select("_key", "_size").collect()
        keys, sizes = numeric["_key"].to_numpy(), numeric["_size"].to_numpy()
        first, last = band.thresholds(int(sizes.sum()))
        start = _boundary(part, keys, sizes, first)
        stop = _boundary(part, keys, sizes, last)
        after_start, after_stop = _at_or_after(start), _at_or_after(stop)
        kept = after_start & ~after_stop
        if band.order == "random":
            reason = pl.when(kept).then(None).otherwise(pl.lit("not_sampled", dtype=Reason))
        else:
            too_hard = pl.lit("too_hard", dtype=Reason)
            reason = (
                pl.when(kept)
                .then(None)
                .when(~after_start)
                .then(too_hard)
                .otherwise(pl.lit("too_easy", dtype=Reason))
            )
        decided.append(part.with_columns(kept=kept, reason=reason).drop("_key", "_size"))
    return pl.concat(decided)


def irdro_weight_expr(kept: pl.LazyFrame, kl_reg: float) -> pl.Expr:
    """IR-DRO weight over the kept set: softmax(loss / kl_reg), rescaled to mean 1, in float64, as
    an expression whose two normalisers (max loss, mean of exp) are computed once, so it can be
    applied shard by shard.

    The max is subtracted before exp, so extreme losses do not overflow; a large kl_reg tends to
    uniform weights, a small one puts all the weight on the hardest sample."""
    if kl_reg <= 0:
        raise ValueError(f"kl_reg must be > 0, got {kl_reg}")
    loss = pl.col("loss").cast(pl.Float64)
    top = kept.select(loss.max()).collect().item()
    mean = kept.select(((loss - top) / kl_reg).exp().mean()).collect().item()
    return ((loss - top) / kl_reg).exp() / mean


def length_matched(
    scores: pl.LazyFrame, reference: np.ndarray, seed: int
) -> tuple[pl.LazyFrame, np.ndarray, int]:
    """All samples with `kept` and `reason`: a seeded random sample with, in every length bin, as
    many samples as `reference` (the lengths of another selection) has, so the two sets share a
    length distribution, and (with it) nearly their token count. Returns the decision, the bin
    edges, and how many samples were short (bins of the whole set too small for the reference).

    A control for a band by loss: mean token loss falls with length, so a band can differ from a
    random sample by its lengths alone; this random sample cannot."""
    longest = scores.select(pl.col("n_tokens").max()).collect().item() or 1
    edges = length_edges(int(max(longest, reference.max(initial=1))))
    wanted = np.histogram(reference, bins=edges)[0]
    # numpy.histogram's bins: [e_i, e_i+1), the last closed; the edges span every length
    ranked = scores.with_columns(_bin=length_bin(edges), _key=pl.col("sample_id").hash(seed)).with_columns(
        _rank=pl.col("_key").rank("ordinal").over("_bin")
    )
    quota = pl.LazyFrame({"_bin": np.arange(len(wanted), dtype=np.uint32), "_quota": wanted})
    available = ranked.group_by("_bin").agg(pl.len().alias("_n")).collect()
    have = dict(zip(available["_bin"].to_list(), available["_n"].to_list(), strict=True))
    short = int(sum(max(0, int(w) - have.get(b, 0)) for b, w in enumerate(wanted)))
    decided = (
        ranked.join(quota, on="_bin", how="left", maintain_order="left")
        .with_columns(kept=pl.col("_rank") <= pl.col("_quota").fill_null(0))
        .with_columns(
            reason=pl.when(pl.col("kept")).then(None).otherwise(pl.lit("not_sampled", dtype=Reason))
        )
        .drop("_bin", "_key", "_rank", "_quota")
    )
    return decided, edges, short
