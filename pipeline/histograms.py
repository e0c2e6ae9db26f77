"""Histograms and quantiles of score columns, computed inside Polars queries.

    edges = uniform_edges(*value_range(scores, pl.col("loss")), bins=60)
    counts = histogram(scores, pl.col("loss"), edges)                  # np.ndarray, len(edges) - 1
    per_source = histogram(scores, pl.col("loss"), edges, by="source")  # {source: counts}

Only bin indices and counts leave the query, never the rows, so this works on scores far larger
than memory. Bins follow `numpy.histogram`: [edge_i, edge_i+1) with the last bin closed, and a
single-valued set gets the range (v - 0.5, v + 0.5), so the counts equal NumPy's on the same data.
"""

from __future__ import annotations

import numpy as np
import polars as pl


def value_range(scores: pl.LazyFrame, value: pl.Expr) -> tuple[float, float]:
    low, high = scores.select(value.min().alias("low"), value.max().alias("high")).collect().row(0)
    if low is None:
        raise ValueError("no values to bin: the score set is empty")
    return float(low), float(high)


def uniform_edges(low: float, high: float, bins: int) -> np.ndarray:
    if low == high:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, bins + 1)


def _bin_index(value: pl.Expr, edges: np.ndarray) -> pl.Expr:
    """The bin of each value; values outside [edges[0], edges[-1]] fall in no bin (null)."""
    inside = (value >= edges[0]) & (value <= edges[-1])
    index = (pl.lit(pl.Series(edges)).search_sorted(value, side="right") - 1).clip(0, len(edges) - 2)
    return pl.when(inside).then(index)


def histogram(
    scores: pl.LazyFrame, value: pl.Expr, edges: np.ndarray, by: str | None = None
) -> np.ndarray | dict[str, np.ndarray]:
    """Counts per bin, or per bin of each group of column `by`."""
    keys = [by] if by else []
    counted = (
        scores.select(*keys, _bin=_bin_index(value, edges))
        .drop_nulls("_bin")
        .group_by(*keys, "_bin")
        .agg(_n=pl.len())
        .collect()
    )

    def dense(part: pl.DataFrame) -> np.ndarray:
        counts = np.zeros(len(edges) - 1, dtype=np.int64)
        counts[part["_bin"].to_numpy()] = part["_n"].to_numpy()
        return counts

    if by is None:
        return dense(counted)
    return {key: dense(part) for (key,), part in counted.partition_by(by, as_dict=True).items()}


def histogram_2d(
    scores: pl.LazyFrame, x: pl.Expr, x_edges: np.ndarray, y: pl.Expr, y_edges: np.ndarray
) -> np.ndarray:
    """Counts of shape (len(x_edges) - 1, len(y_edges) - 1), as `numpy.histogram2d` gives."""
    counted = (
        scores.select(_x=_bin_index(x, x_edges), _y=_bin_index(y, y_edges))
        .drop_nulls()
        .group_by("_x", "_y")
        .agg(_n=pl.len())
        .collect()
    )
    counts = np.zeros((len(x_edges) - 1, len(y_edges) - 1), dtype=np.int64)
    counts[counted["_x"].to_numpy(), counted["_y"].to_numpy()] = counted["_n"].to_numpy()
    return counts


QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


def quantiles(scores: pl.LazyFrame, value: pl.Expr, qs: tuple[float, ...] = QUANTILES) -> dict[float, float]:
    """Quantiles with linear interpolation (NumPy's default method)."""
    row = (
        scores.select([value.quantile(q, interpolation="linear").alias(str(q)) for q in qs]).collect().row(0)
    )
    return dict(zip(qs, row, strict=True))
