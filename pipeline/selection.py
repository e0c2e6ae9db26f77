"""Selection maths: global ranking of scored samples, bands over it, IR-DRO weights (DESIGN.md §1).

    band = band_for("midranking", skip=0.1, keep=0.3)
    decided = select(pl.scan_parquet("scores/part-*.parquet"), band, measure="tokens")
    decided.filter(pl.col("kept"))          # the band;  reason: too_hard | too_easy | not_sampled

Every sample is placed on one line, hardest first: by `loss` descending, ties by `sample_id`
ascending, so a selection is deterministic (the `random` strategy orders by a seeded hash of the
sample_id instead). A sample's position is the share of the measure (samples, or tokens) that
comes before it; a band keeps the samples whose position falls in [start, stop) (compared as
`start x total <= before < stop x total`). In tokens, the
kept total is therefore within one sample of (stop - start) x total. With `by_source`, positions
are computed within each source, so each source keeps its own band and the domain mix is kept.
Everything is a Polars lazy query: nothing per row goes through Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl

Strategy = Literal["midranking", "band", "top", "bottom", "random", "all"]
Reason = pl.Enum(["too_hard", "too_easy", "not_sampled"])


@dataclass(frozen=True, slots=True)
class Band:
    start: float
    """Share of the measure, counted from the highest loss, that comes before the band."""
    stop: float
    """Share of the measure, counted from the highest loss, at which the band ends."""
    order: Literal["loss", "random"] = "loss"

    def __post_init__(self) -> None:
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise ValueError(f"a band needs 0 <= start < stop <= 1, got [{self.start}, {self.stop})")


def band_for(
    strategy: Strategy, *, skip: float = 0.0, keep: float = 1.0, low: float = 0.0, high: float = 1.0
) -> Band:
    """The band of a strategy. `skip`/`keep` count from the hardest sample; `low`/`high` are loss
    quantiles counted from the easiest, as cc_net and Marion et al. state their bands."""
    if strategy == "midranking":
        return Band(skip, min(1.0, skip + keep))
    if strategy == "top":
        return Band(0.0, keep)
    if strategy == "bottom":
        return Band(1.0 - keep, 1.0)
    if strategy == "band":
        return Band(1.0 - high, 1.0 - low)
    if strategy == "random":
        return Band(0.0, keep, order="random")
    if strategy == "all":
        return Band(0.0, 1.0)
    raise ValueError(f"unknown strategy {strategy!r}")


def select(
    scores: pl.LazyFrame,
    band: Band,
    *,
    measure: Literal["samples", "tokens"] = "samples",
    by_source: bool = False,
    seed: int = 0,
) -> pl.LazyFrame:
    """All samples with `position` (share of the measure before them), `kept` and `reason`.
    Needs `sample_id` and `loss`, plus `n_tokens` for measure=tokens and `source` for by_source."""
    if band.order == "loss":
        ordered = scores.sort(["loss", "sample_id"], descending=[True, False])
    else:
        ordered = (
            scores.with_columns(_key=pl.col("sample_id").hash(seed)).sort(["_key", "sample_id"]).drop("_key")
        )
    ordered = ordered.with_columns(
        _size=pl.col("n_tokens").cast(pl.Int64) if measure == "tokens" else pl.lit(1, dtype=pl.Int64)
    )
    size = pl.col("_size")
    before = size.cum_sum() - size
    total = size.sum()
    if by_source:
        before, total = before.over("source"), total.over("source")
    before, total = before.cast(pl.Float64), total.cast(pl.Float64)
    # Compared as products, not as before / total: a query engine may divide by multiplying with a
    # reciprocal, which puts a sample sitting exactly on a boundary on the wrong side of it.
    framed = ordered.with_columns(
        position=before / total,
        kept=(before >= band.start * total) & (before < band.stop * total),
        _before_band=before < band.start * total,
    ).drop("_size")
    kept = pl.col("kept")
    if band.order == "random":
        reason = pl.when(kept).then(None).otherwise(pl.lit("not_sampled", dtype=Reason))
    else:
        reason = (
            pl.when(kept)
            .then(None)
            .when(pl.col("_before_band"))
            .then(pl.lit("too_hard", dtype=Reason))
            .otherwise(pl.lit("too_easy", dtype=Reason))
        )
    return framed.with_columns(reason=reason).drop("_before_band")


def irdro_weights(kept: pl.LazyFrame, kl_reg: float) -> pl.LazyFrame:
    """IR-DRO weights over the kept set: softmax(loss / kl_reg), rescaled to mean 1, in float64.

    The max is subtracted before exp, so extreme losses do not overflow; a large kl_reg tends to
    uniform weights, a small one puts all the weight on the hardest sample."""
    if kl_reg <= 0:
        raise ValueError(f"kl_reg must be > 0, got {kl_reg}")
    loss = pl.col("loss").cast(pl.Float64)
    unnormalised = ((loss - loss.max()) / kl_reg).exp()
    return kept.with_columns(weight=unnormalised / unnormalised.mean())
