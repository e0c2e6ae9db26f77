"""Rank keys: what a band ranks samples by (DESIGN.md §7), each derived from stored score columns.

    curves = estimate_curves(scores, by_source=False)           # only length_adjusted needs one
    keyed = scores.with_columns(key_expr("length_adjusted", curves).alias("length_adjusted"))

- `loss`: mean NLL of the target tokens, nats/token (the paper's key).
- `bits_per_byte`: nll_sum / (ln 2 x n_bytes), the bits the model needs per byte of the text the
  targets cover. It does not depend on the tokenizer: two models with different vocabularies put
  the same text on the same scale.
- `length_adjusted`: loss minus the loss expected at the sample's length. Mean token loss falls
  with length (the first tokens of a text are the hardest to predict), so on a corpus of mixed
  lengths a band by plain loss is partly a length filter: the top holds the shortest samples. The
  expectation is the corpus's own (its `LengthCurve`): the median loss in log-spaced length bins,
  sparse bins merged with the next until each holds MIN_BIN_SAMPLES samples, and linear in
  log(length) between the bins' median lengths (flat beyond the first and the last). Medians,
  not means: the garbage a band is meant to drop should not pull the expectation up. The curve
  is estimated over the samples that are ranked, over the whole corpus or within each source,
  and recorded in the band's manifest, so the key can be recomputed from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import polars as pl

from pipeline.artifacts import ProvenanceError

RankKey = Literal["loss", "bits_per_byte", "length_adjusted"]
RANK_KEYS: tuple[str, ...] = get_args(RankKey)

LENGTH_BINS = 32
"""Log-spaced length bins the curve starts from, before sparse ones are merged."""
MIN_BIN_SAMPLES = 50
"""Samples each bin of the curve holds at least (the last may hold more; a corpus smaller than
this has one bin, and length_adjusted is then the loss minus a constant)."""
ALL_SOURCES = "*"
"""The curve's name when it is estimated over every source together."""


def length_edges(max_tokens: int, bins: int = LENGTH_BINS) -> np.ndarray:
    """Log-spaced bin edges of sample lengths (target tokens) from 1 to `max_tokens`, as integers:
    bin i holds the lengths in [edges[i], edges[i + 1])."""
    return np.unique(np.geomspace(1, max(max_tokens, 1) + 1, bins + 1).astype(np.int64))


def length_bin(edges: np.ndarray) -> pl.Expr:
    """Each sample's bin index over `edges` (UInt32): how many inner edges its length reaches."""
    if len(edges) <= 2:  # one bin
        return pl.lit(0, dtype=pl.UInt32)
    return pl.sum_horizontal([(pl.col("n_tokens") >= int(e)).cast(pl.UInt32) for e in edges[1:-1]])


@dataclass(frozen=True, slots=True)
class LengthCurve:
    """The expected loss at each length, as the manifest records it."""

    edges: list[int]
    """Bin edges in tokens after merging: bin i holds lengths in [edges[i], edges[i + 1])."""
    lengths: list[float]
    """Each bin's median length (tokens): where its median loss is placed on the curve."""
    losses: list[float]
    """Each bin's median loss (nats/token)."""
    samples: list[int]

    def expected(self) -> pl.Expr:
        """The expected loss at each row's `n_tokens`: piecewise linear in log(length)."""
        log_length = pl.col("n_tokens").cast(pl.Float64).log()
        xs, ys = [math.log(v) for v in self.lengths], self.losses
        expr = pl.when(log_length <= xs[0]).then(pl.lit(ys[0]))
        for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False):
            expr = expr.when(log_length <= x1).then(y0 + (log_length - x0) * ((y1 - y0) / (x1 - x0)))
        return expr.otherwise(pl.lit(ys[-1]))

    def at(self, lengths: np.ndarray) -> np.ndarray:
        """The same curve evaluated in numpy (for plotting)."""
        return np.interp(np.log(lengths), np.log(self.lengths), self.losses)


def merge_sparse(edges: np.ndarray, counts: np.ndarray, min_samples: int) -> np.ndarray:
    """Edges of bins that each hold at least `min_samples`: consecutive bins merged, low lengths
    first; a short remainder at the long end joins the last full bin."""
    kept, held = [int(edges[0])], 0
    for upper, count in zip(edges[1:], counts, strict=True):
        held += int(count)
        if held >= min_samples:
            kept.append(int(upper))
            held = 0
    if held or len(kept) == 1:  # the remainder (or everything, when no bin filled up)
        if len(kept) > 1:
            kept.pop()
        kept.append(int(edges[-1]))
    return np.asarray(kept, dtype=np.int64)


def estimate_curve(scores: pl.LazyFrame, min_samples: int = MIN_BIN_SAMPLES) -> LengthCurve:
    """The length curve of the samples in `scores` (needs n_tokens, loss): two streaming
    group-bys, one for the counts per fine bin, one for the medians per merged bin."""
    longest = scores.select(pl.col("n_tokens").max()).collect(engine="streaming").item() or 1
    fine = length_edges(int(longest))
    counted = scores.group_by(_bin=length_bin(fine)).agg(pl.len()).collect(engine="streaming")
    counts = np.zeros(len(fine) - 1, dtype=np.int64)
    counts[counted["_bin"].to_numpy()] = counted["len"].to_numpy()
    edges = merge_sparse(fine, counts, min_samples)
    medians = (
        scores.group_by(_bin=length_bin(edges))
        .agg(
            length=pl.col("n_tokens").cast(pl.Float64).median(),
            loss=pl.col("loss").cast(pl.Float64).median(),
            samples=pl.len(),
        )
        .sort("_bin")
        .collect(engine="streaming")
    )
    return LengthCurve(
        edges=edges.tolist(),
        lengths=medians["length"].to_list(),
        losses=medians["loss"].to_list(),
        samples=medians["samples"].to_list(),
    )


def estimate_curves(scores: pl.LazyFrame, *, by_source: bool) -> dict[str, LengthCurve]:
    """One curve over every source (named ALL_SOURCES), or one per source."""
    if not by_source:
        return {ALL_SOURCES: estimate_curve(scores)}
    sources = scores.select(pl.col("source").unique().sort()).collect()["source"].to_list()
    return {s: estimate_curve(scores.filter(pl.col("source") == s)) for s in sources}


def expected_loss(curves: dict[str, LengthCurve]) -> pl.Expr:
    if ALL_SOURCES in curves:
        return curves[ALL_SOURCES].expected()
    expr = pl.when(pl.lit(False)).then(pl.lit(None, dtype=pl.Float64))
    for source, curve in curves.items():
        expr = expr.when(pl.col("source") == source).then(curve.expected())
    return expr.otherwise(pl.lit(None, dtype=pl.Float64))


def key_expr(key: str, curves: dict[str, LengthCurve] | None = None) -> pl.Expr:
    """The key's value of every row, in float64; larger is harder."""
    if key == "loss":
        return pl.col("loss").cast(pl.Float64)
    if key == "bits_per_byte":
        return pl.col("nll_sum") / (math.log(2) * pl.col("n_bytes").cast(pl.Float64))
    if key == "length_adjusted":
        if curves is None:
            raise ValueError("length_adjusted needs the corpus's length curve (estimate_curves)")
        return pl.col("loss").cast(pl.Float64) - expected_loss(curves)
    raise ValueError(f"unknown rank key {key!r}; one of {list(RANK_KEYS)}")


def check_key_columns(scores: pl.LazyFrame, key: str, where: str) -> None:
    """bits_per_byte needs n_bytes on every row; scores written before midrank stored it have none."""
    if key != "bits_per_byte":
        return
    missing = scores.select(pl.col("n_bytes").null_count()).collect().item()
    if missing:
        raise ProvenanceError(
            f"{where}: {missing:,} scored samples have no n_bytes (scored by a midrank older than the "
            "bits_per_byte key); rank them by loss or length_adjusted, or score again into another out_dir"
        )
