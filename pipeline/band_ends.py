"""A band's ends found in memory independent of the corpus size, by histogram passes over the
scores (docs/design.md §4; pipeline/selection.py decides the rows with them).

    ends = find_ends(keyed, totals, {"web": [100, 400]})  # keyed: _group, _key, _size, sample_id
    ends["web", 100]  # (key, sample_id) of the sample covering position 100, or True / False

Samples are ordered by (_key, sample_id) ascending within their group. A sample's `before` is the
measure (_size, >= 1) of the samples ahead of it. For an integer threshold T the end is the one
sample P that covers T: before(P) < T <= before(P) + size(P). Then `before >= T` holds exactly for
the samples strictly after P, so a band is decided by comparing each row's (key, sample_id) with
two such samples. T <= 0 is every sample (True); T beyond the group's total is none (False).

How P is found without holding the group: a pass builds a histogram of the keys in the group's
[min, max] range (`buckets` equal-width buckets: rows, measure, min and max key of each); the
bucket whose cumulative measure crosses T holds P, and its [min, max] becomes the next range.
Bucketing is monotone in the key, so each bucket's rows are exactly those with a key in its
[min, max], and a range holding two keys always splits. Once a range holds at most `max_rows`
samples they are read and sorted. A range of one key value (ties) with more than `max_rows`
samples narrows by sample_id, one character a pass, the same way. Every open end is advanced in
the same pass, so a band's two ends in every source cost about three passes over the key column.
Memory: the histograms (buckets x ends) and up to 2 x `max_rows`
samples, whatever the number of rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import polars as pl

End = tuple[Any, str | None] | bool
"""(key, sample_id) of the sample covering a threshold; True: every sample is at or after it
(threshold <= 0); False: none is (threshold beyond the group's measure)."""

BUCKETS = 1 << 16
MAX_ROWS = 2_000_000


@dataclass(frozen=True, slots=True)
class Range:
    """The samples of a group with lo <= key <= hi (and, once lo == hi, a sample_id starting with
    `prefix`), with `offset` of the measure ahead of them in the group."""

    group: Any
    lo: Any
    hi: Any
    offset: int
    rows: int
    prefix: str | None = None

    def rows_in(self) -> pl.Expr:
        inside = (pl.col("_group") == self.group) & pl.col("_key").is_between(self.lo, self.hi)
        if self.prefix:
            inside &= pl.col("sample_id").str.starts_with(self.prefix)
        return inside


def group_totals(keyed: pl.LazyFrame) -> pl.DataFrame:
    """One pass: rows, measure and key range of each group."""
    stats = {
        "rows": pl.len(),
        "size": pl.col("_size").sum(),
        "lo": pl.col("_key").min(),
        "hi": pl.col("_key").max(),
    }
    return keyed.group_by("_group").agg(**stats).collect(engine="streaming").sort("_group", nulls_last=True)


def find_ends(
    keyed: pl.LazyFrame,
    totals: pl.DataFrame,
    thresholds: dict[Any, list[int]],
    *,
    buckets: int = BUCKETS,
    max_rows: int = MAX_ROWS,
    values_only: bool = False,
) -> dict[tuple[Any, int], End]:
    """The end of every (group, threshold); `keyed` has _group, _key (Float64 or UInt64),
    _size (Int64, >= 1) and sample_id; `totals` is group_totals(keyed). `values_only`:
    only the end's key is wanted (an order statistic), so a tie is not narrowed by sample_id."""
    ends: dict[tuple[Any, int], End] = {}
    open_ends: dict[tuple[Any, int], Range] = {}
    for row in totals.iter_rows(named=True):
        for threshold in thresholds.get(row["_group"], []):
            if threshold <= 0 or threshold > row["size"]:
                ends[row["_group"], threshold] = threshold <= 0
            else:
                open_ends[row["_group"], threshold] = Range(
                    row["_group"], row["lo"], row["hi"], 0, row["rows"]
                )
    while open_ends:
        # a set's order follows string hashes, which differ by process: sorted, every run reads alike
        ranges = sorted(set(open_ends.values()), key=lambda r: (str(r.group), r.lo, r.hi, r.prefix or ""))
        small = [r for r in ranges if r.rows <= max_rows]
        by_key = [r for r in ranges if r.rows > max_rows and r.lo != r.hi]
        by_id = [r for r in ranges if r.rows > max_rows and r.lo == r.hi]
        if values_only:
            ends.update({end: (where.lo, None) for end, where in open_ends.items() if where in by_id})
            by_id = []
        if small:
            ends.update(_read_and_sort(keyed, small, open_ends, max_rows))
        narrowed = _narrow(open_ends, _key_histograms(keyed, by_key, buckets)) if by_key else {}
        for part in by_id:
            narrowed.update(_narrow(open_ends, {part: _id_histogram(keyed, part)}))
        for end, where in narrowed.items():
            if isinstance(where, Range):
                open_ends[end] = where
            else:
                ends[end] = where
        for found in ends:
            open_ends.pop(found, None)
    return ends


def _read_and_sort(
    keyed: pl.LazyFrame,
    ranges: list[Range],
    open_ends: dict[tuple[Any, int], Range],
    max_rows: int,
) -> dict[tuple[Any, int], End]:
    """The ends inside ranges small enough to hold: their rows read in one pass (a few, when
    together they pass 2 x max_rows), sorted."""
    found = {}
    for batch in _batches(ranges, 2 * max_rows):
        inside = pl.any_horizontal([r.rows_in().alias(f"_in{i}") for i, r in enumerate(batch)])
        # concat_str copies the ids: a filtered string column would otherwise keep, as views, the
        # string buffers of every row scanned (3.4 GB at 100M samples instead of 0.2)
        own_copy = pl.concat_str(pl.col("sample_id"), pl.lit("")).alias("sample_id")
        held = keyed.filter(inside).select("_group", "_key", "_size", own_copy).collect(engine="streaming")
        for part in batch:
            rows = held.filter(part.rows_in()).sort("_key", "sample_id")
            covered = part.offset + np.cumsum(rows["_size"].to_numpy())
            for (group, threshold), where in open_ends.items():
                if where == part:
                    i = int(np.searchsorted(covered, threshold, side="left"))
                    found[group, threshold] = (rows["_key"][i], rows["sample_id"][i])
    return found


def _batches(ranges: list[Range], budget: int) -> list[list[Range]]:
    batches, rows = [[]], 0
    for part in sorted(ranges, key=lambda r: r.rows):
        if batches[-1] and rows + part.rows > budget:
            batches.append([])
            rows = 0
        batches[-1].append(part)
        rows += part.rows
    return batches


def _key_histograms(keyed: pl.LazyFrame, ranges: list[Range], buckets: int) -> dict[Range, pl.DataFrame]:
    """One pass: each range's histogram of `buckets` equal-width key buckets (rows, measure, key
    min and max of each), ascending. Keys are halved before subtracting so the width of a float
    range cannot overflow; a range too narrow for the arithmetic splits at its minimum instead."""
    integer = keyed.collect_schema()["_key"].is_integer()
    table = pl.DataFrame(
        {
            "_group": [r.group for r in ranges],
            "_id": list(range(len(ranges))),
            "_lo": [r.lo for r in ranges],
            "_hi": [r.hi for r in ranges],
            "_width": [_width(r, integer) for r in ranges],
        },
        schema_overrides={"_lo": keyed.collect_schema()["_key"], "_hi": keyed.collect_schema()["_key"]},
    )
    key, lo = pl.col("_key"), pl.col("_lo")
    offset = (key - lo).cast(pl.Float64) if integer else key * 0.5 - lo * 0.5
    bucket = (
        pl.when(pl.col("_width") > 0)
        .then((offset / pl.col("_width") * buckets).floor().clip(0, buckets - 1).cast(pl.Int64))
        .otherwise((key > lo).cast(pl.Int64))
    )
    histograms = (
        keyed.join(table.lazy(), on="_group")
        .filter(key.is_between(lo, pl.col("_hi")))
        .group_by("_id", _bucket=bucket)
        .agg(rows=pl.len(), size=pl.col("_size").sum(), lo=key.min(), hi=key.max())
        .collect(engine="streaming")
    )
    return {
        part: histograms.filter(pl.col("_id") == i).sort("_bucket").select("rows", "size", "lo", "hi")
        for i, part in enumerate(ranges)
    }


def _width(part: Range, integer: bool) -> float:
    width = float(part.hi - part.lo) if integer else part.hi * 0.5 - part.lo * 0.5
    return width if math.isfinite(width) and width > 0 else 0.0


def _id_histogram(keyed: pl.LazyFrame, part: Range) -> pl.DataFrame:
    """One pass over a range of one key value: its rows by the next character of sample_id after
    the prefix ("" for a sample_id that is the prefix), in sample_id order."""
    prefix = part.prefix or ""
    histogram = (
        keyed.filter(part.rows_in())
        .group_by(_char=pl.col("sample_id").str.slice(len(prefix), 1))
        .agg(rows=pl.len(), size=pl.col("_size").sum())
        .collect(engine="streaming")
        .sort("_char")
    )
    return histogram.with_columns(lo=pl.lit(part.lo), hi=pl.lit(part.hi), prefix=prefix + pl.col("_char"))


def _narrow(
    open_ends: dict[tuple[Any, int], Range], histograms: dict[Range, pl.DataFrame]
) -> dict[tuple[Any, int], Range | End]:
    """Each end's range replaced by the bucket of it whose cumulative measure crosses the
    threshold; the end itself when that bucket is the samples whose sample_id is the prefix
    (identical in key and sample_id, so any of them is the end)."""
    narrowed: dict[tuple[Any, int], Range | End] = {}
    for (group, threshold), part in open_ends.items():
        histogram = histograms.get(part)
        if histogram is None:
            continue
        covered = part.offset + np.cumsum(histogram["size"].to_numpy())
        i = int(np.searchsorted(covered, threshold, side="left"))
        bucket = histogram.row(i, named=True)
        if bucket.get("_char") == "":
            narrowed[group, threshold] = (part.lo, bucket["prefix"])
            continue
        narrowed[group, threshold] = replace(
            part,
            lo=bucket["lo"],
            hi=bucket["hi"],
            offset=int(covered[i] - bucket["size"]),
            rows=bucket["rows"],
            prefix=bucket.get("prefix", part.prefix),
        )
    return narrowed


def mark_past(keyed: pl.LazyFrame, ends: dict[Any, dict[str, End]], *, grouped: bool) -> pl.LazyFrame:
    """`keyed` with a Boolean column per name in `ends[group]`: whether the row comes strictly
    after that end of its group (`before >= threshold`). Ends of one group are constants; of
    several, a table joined on _group."""
    key_type = keyed.collect_schema()["_key"]
    names = sorted({name for of_group in ends.values() for name in of_group})
    schema = {"_group": keyed.collect_schema()["_group"]}
    for name in names:
        schema |= {name: pl.Boolean, f"{name}_key": key_type, f"{name}_id": pl.String}
    rows = [{"_group": group} | _end_columns(of_group) for group, of_group in ends.items()]
    table = pl.DataFrame(rows, schema=schema)
    if grouped:
        ended = keyed.join(table.lazy(), on="_group", how="left", maintain_order="left")
    else:  # one group: its ends are constants, no join
        row = table.row(0, named=True) if table.height else {c: None for c in schema}
        ended = keyed.with_columns(
            pl.lit(v, dtype=schema[c]).alias(c) for c, v in row.items() if c != "_group"
        )
    key, sample_id = pl.col("_key"), pl.col("sample_id")
    past = {}
    for name in names:
        end_key = pl.col(f"{name}_key")
        after = (key > end_key) | ((key == end_key) & (sample_id > pl.col(f"{name}_id")))
        past[name] = pl.when(pl.col(name).is_not_null()).then(pl.col(name)).otherwise(after)
    helpers = [f"{name}{part}" for name in names for part in ("_key", "_id")]
    return ended.with_columns(**past).drop(helpers)


def _end_columns(of_group: dict[str, End]) -> dict[str, Any]:
    """An end as columns: `<name>` the answer when it is the same for every row (True, False),
    else null and `<name>_key`, `<name>_id` to compare each row with."""
    columns = {}
    for name, end in of_group.items():
        if isinstance(end, bool):
            columns |= {name: end, f"{name}_key": None, f"{name}_id": None}
        else:
            columns |= {name: None, f"{name}_key": end[0], f"{name}_id": end[1]}
    return columns
