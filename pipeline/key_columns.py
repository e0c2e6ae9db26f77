"""Each rank key's column, computed from the stored score columns (what each key means:
pipeline/rank_keys.py).

    curves = estimate_curves(scores, by_source=False)           # only length_adjusted needs them
    keyed = with_key(scores, "length_adjusted", curves)          # adds the column `length_adjusted`
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from pipeline.artifacts import ProvenanceError
from pipeline.band_ends import find_ends, group_totals
from pipeline.rank_keys import ALL_SOURCES, PER_BYTE, RANK_KEYS, LengthCurve

LENGTH_BINS = 32
"""Log-spaced length bins the curve starts from, before sparse ones are merged."""
MIN_BIN_SAMPLES = 50
"""Samples each bin of the curve holds at least (the last may hold more; a corpus smaller than
this has one bin, and length_adjusted is then the loss minus a constant)."""


def length_edges(max_tokens: int, bins: int = LENGTH_BINS) -> np.ndarray:
    """Log-spaced bin edges of sample lengths (target tokens) from 1 to `max_tokens`, as integers:
    bin i holds the lengths in [edges[i], edges[i + 1])."""
    return np.unique(np.geomspace(1, max(max_tokens, 1) + 1, bins + 1).astype(np.int64))


def length_bin(edges: np.ndarray) -> pl.Expr:
    """Each sample's bin index over `edges` (UInt32): how many inner edges its length reaches."""
    if len(edges) <= 2:  # one bin
        return pl.lit(0, dtype=pl.UInt32)
    return pl.sum_horizontal([(pl.col("n_tokens") >= int(e)).cast(pl.UInt32) for e in edges[1:-1]])


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


def _group(by_source: bool) -> pl.Expr:
    """What a curve is estimated over: each source, or everything (a constant)."""
    return pl.col("source") if by_source else pl.lit(ALL_SOURCES)


def estimate_curves(
    scores: pl.LazyFrame, *, by_source: bool, min_samples: int = MIN_BIN_SAMPLES
) -> dict[str, LengthCurve]:
    """The length curve of the samples in `scores` (needs n_tokens, loss, and source when
    by_source): one over everything (named ALL_SOURCES), or one per source. Streaming passes
    whatever the number of sources or samples: the longest sample (the fine bins span
    1..longest for every source), counts per (source, fine bin), then the exact medians of
    length and loss per (source, merged bin) as order statistics (pipeline/band_ends.py)."""
    group = _group(by_source)
    longest = scores.select(pl.col("n_tokens").max()).collect(engine="streaming").item() or 1
    fine = length_edges(int(longest))
    counted = scores.group_by(_grp=group, _bin=length_bin(fine)).agg(pl.len()).collect(engine="streaming")
    merged_edges, mapping = {}, []
    for name in sorted(counted["_grp"].unique().to_list()):
        mine = counted.filter(pl.col("_grp") == name)
        counts = np.zeros(len(fine) - 1, dtype=np.int64)
        counts[mine["_bin"].to_numpy()] = mine["len"].to_numpy()
        edges = merge_sparse(fine, counts, min_samples)
        merged_edges[name] = edges
        # merged edges are a subset of the fine ones: fine bin i lies in the merged bin holding fine[i]
        merged = np.searchsorted(edges, fine[:-1], side="right") - 1
        mapping.append(pl.DataFrame({"_grp": name, "_bin": np.arange(len(fine) - 1), "_merged": merged}))
    to_merged = pl.concat(mapping).with_columns(pl.col("_bin").cast(pl.UInt32)).lazy()
    binned = (
        scores.with_columns(_grp=group, _bin=length_bin(fine))
        .join(to_merged, on=["_grp", "_bin"])
        .with_columns(_group=pl.concat_str(pl.col("_grp"), pl.lit("\x1f"), pl.col("_merged").cast(pl.String)))
    )
    lengths = _medians(binned, pl.col("n_tokens"))
    losses = _medians(binned, pl.col("loss"))
    curves = {}
    for name in merged_edges:
        bins = sorted((int(g.rpartition("\x1f")[2]), g) for g in lengths if g.startswith(name + "\x1f"))
        curves[name] = LengthCurve(
            edges=merged_edges[name].tolist(),
            lengths=[lengths[g][0] for _, g in bins],
            losses=[losses[g][0] for _, g in bins],
            samples=[lengths[g][1] for _, g in bins],
        )
    return curves


def _medians(binned: pl.LazyFrame, value: pl.Expr) -> dict[str, tuple[float, int]]:
    """Median of `value` and count in each _group: the middle order statistic (the mean of the
    two middle ones for an even count), exact, in memory independent of the group sizes."""
    keyed = binned.with_columns(_key=value.cast(pl.Float64), _size=pl.lit(1, dtype=pl.Int64))
    totals = group_totals(keyed)
    count = dict(zip(totals["_group"].to_list(), totals["rows"].to_list(), strict=True))
    middle = {g: [(n + 1) // 2, n // 2 + 1] for g, n in count.items()}  # 1-based positions
    found = find_ends(keyed, totals, middle, values_only=True)
    return {g: ((found[g, a][0] + found[g, b][0]) / 2, count[g]) for g, (a, b) in middle.items()}


def with_key(
    frame: pl.LazyFrame, key: str, curves: dict[str, LengthCurve] | None = None, *, by_source: bool = False
) -> pl.LazyFrame:
    """`frame` with a column named `key` holding each row's key in float64 (larger is harder);
    `loss` is already there. length_adjusted needs the curves (per source when by_source): the
    expected loss is computed once per distinct (source, length) and joined back, so the cost
    does not grow with the number of curves."""
    if key == "loss":
        return frame
    if key == "bits_per_byte":
        return frame.with_columns(
            (pl.col("nll_sum") / (math.log(2) * pl.col("n_bytes").cast(pl.Float64))).alias(key)
        )
    if key in PER_BYTE:
        return frame.with_columns(
            (pl.col(PER_BYTE[key]).cast(pl.Float64) / pl.col("n_bytes").cast(pl.Float64)).alias(key)
        )
    if key == "ifd":
        return frame.with_columns((pl.col("nll_sum") / pl.col("nll_sum_uncond")).alias(key))
    if key == "reducible":
        return frame.with_columns((pl.col("loss") - pl.col("loss_target")).alias(key))
    if key != "length_adjusted":
        raise ValueError(f"unknown rank key {key!r}; one of {list(RANK_KEYS)}")
    if curves is None:
        raise ValueError("length_adjusted needs the corpus's length curves (estimate_curves)")
    grouped = frame.with_columns(_group=_group(by_source))
    pairs = grouped.select("_group", "n_tokens").unique().collect(engine="streaming")
    expected = np.full(pairs.height, np.nan)
    names, lengths = pairs["_group"].to_numpy(), pairs["n_tokens"].to_numpy()
    for name, curve in curves.items():
        mine = names == name
        expected[mine] = curve.at(lengths[mine])
    table = pairs.with_columns(_expected=pl.Series(expected).fill_nan(None)).lazy()
    return (
        grouped.join(table, on=["_group", "n_tokens"], how="left", maintain_order="left")
        .with_columns((pl.col("loss").cast(pl.Float64) - pl.col("_expected")).alias(key))
        .drop("_group", "_expected")
    )


def check_key_columns(scores: pl.LazyFrame, key: str, where: str) -> None:
    """The per-byte keys need n_bytes >= 1 on every row; ifd needs the unconditional NLL; reducible
    the target model's loss (pipeline/target_scores.py)."""
    if key == "reducible" and "loss_target" not in scores.collect_schema().names():
        raise ProvenanceError(
            f"{where}: rank key reducible needs the target model's scores joined (pipeline/target_scores.py)"
        )
    if key == "ifd":
        missing = scores.select(pl.col("nll_sum_uncond").null_count()).collect().item()
        if missing:
            raise ProvenanceError(
                f"{where}: {missing:,} scored samples have no unconditional loss (nll_sum_uncond); rank_by=ifd "
                "needs instruction data scored with score.unconditional=true (into another out_dir)"
            )
        return
    if key != "bits_per_byte" and key not in PER_BYTE:
        return
    empty, example = (
        scores.select(
            empty=(pl.col("n_bytes") < 1).sum(),
            example=pl.col("sample_id").filter(pl.col("n_bytes") < 1).first(),
        )
        .collect()
        .row(0)
    )
    if empty:
        raise ProvenanceError(
            f"{where}: {empty:,} scored samples cover no byte of text (n_bytes 0, e.g. {example}), so they "
            f"have no {key}; rank by loss, or set min_tokens to leave them out"
        )
