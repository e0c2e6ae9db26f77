"""The report's example texts: rows by region of a band's key (lowest, around its ends, inside,
highest, and what its drop_top dropped, per set of keys), each joined with the start of its text.

    regions = examples_by_band(cfg, scores, bands, provenance)   # [(band, [{region, rows}])]
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import polars as pl

from pipeline.artifacts import ProvenanceError
from pipeline.config import Config
from pipeline.key_columns import with_key
from pipeline.layout import Layout
from pipeline.log import get_logger
from pipeline.outputs import Provenance
from pipeline.readers import InputError
from pipeline.records import CorpusError, ReadStats, record_id, sample_text
from pipeline.report_figures import LOSS, DrawnBand
from pipeline.scores import check_corpus_unchanged
from pipeline.sharding import plan_shards, shard_records

EXAMPLE_COLUMNS = ("sample_id", "shard", "source", "loss", "n_tokens", "char_start", "char_end")
# what the rank keys are derived from
KEY_COLUMNS = ("nll_sum", "n_bytes", "n_markup_bytes", "n_mojibake", "nll_sum_uncond")


def example_regions(scores: pl.LazyFrame, band: DrawnBand | None, k: int) -> dict[str, pl.LazyFrame]:
    """The rows to show, by region, lowest first (by the band's key, else loss): the bottom is
    boilerplate, the top noise."""
    if band is None:
        lowest = scores.bottom_k(k, by=["loss", "sample_id"])
        highest = scores.top_k(k, by=["loss", "sample_id"])
        median = scores.select(LOSS.median()).collect().item()
        return {
            "lowest loss": lowest,
            "median": scores.filter(LOSS >= median).bottom_k(k, by="loss"),
            "highest loss": highest,
        }
    key, value = band.key, band.value
    ranked = band.ranked(scores)
    lowest = ranked.bottom_k(k, by=[key, "sample_id"])
    highest = ranked.top_k(k, by=[key, "sample_id"])
    median = band.kept.select(value.median()).collect().item()
    columns = list(dict.fromkeys([*EXAMPLE_COLUMNS, key, *KEY_COLUMNS]))
    inside = band.kept.filter(value >= median).bottom_k(k, by=key).select(columns)
    dropped = band.dropped(scores)
    if dropped is not None:  # drop_top: its rows are not the band's to rank; show them per key set
        ranked = ranked.join(dropped.select("sample_id"), on="sample_id", how="anti")
        highest = ranked.top_k(k, by=[key, "sample_id"])
    if band.interval is None:
        regions = {f"lowest {key}": lowest, "kept (around its median)": inside, f"highest {key}": highest}
    else:
        low, high = band.interval
        regions = {
            f"lowest {key}": lowest,
            "just below the band": ranked.filter(value < low).top_k(k, by=key),
            "inside the band (around its median)": inside,
            "just above the band": ranked.filter(value > high).bottom_k(k, by=key),
            f"highest {key}": highest,
        }
    return regions | dropped_regions(dropped, k)


def dropped_regions(dropped: pl.LazyFrame | None, k: int) -> dict[str, pl.LazyFrame]:
    """drop_top's dropped samples by the set of keys that dropped them (a key alone shows what
    only it catches), `k` of each drawn by sample-id hash, so not only the extreme ones."""
    if dropped is None:
        return {}
    counts = (
        dropped.group_by("dropped_by").len().sort("len", "dropped_by", descending=[True, False]).collect()
    )
    return {
        f"dropped by {row['dropped_by']} ({row['len']:,} samples)": dropped.filter(
            pl.col("dropped_by") == row["dropped_by"]
        ).bottom_k(k, by=pl.col("sample_id").hash(0))
        for row in counts.to_dicts()
    }


def attach_texts(cfg: Config, provenance: Provenance, rows: list[dict[str, Any]]) -> None:
    """Join each example row with the first `inspect.example_chars` of its text, reading only its
    shards (and only from the corpus that was scored)."""
    max_chars = cfg.inspect.example_chars
    wanted: dict[int, set[str]] = defaultdict(set)
    for row in rows:
        wanted[row["shard"]].add(record_id(row["sample_id"]))
    records = {}
    try:
        plan = plan_shards(cfg.corpus)
        check_corpus_unchanged(Layout(cfg.out_dir), plan, provenance)
        for shard, ids in sorted(wanted.items()):
            records |= shard_records(plan, shard, cfg.corpus, ReadStats(), ids)
    except (InputError, CorpusError, ProvenanceError, OSError) as err:
        get_logger().warning(f"example texts left out: {err}")
    for row in rows:
        record = records.get(record_id(row["sample_id"]))
        if record is None:
            row["text"], row["text_cut"] = None, False
            continue
        # instruction data: the question shows why an answer scores as it does
        if record.messages is not None:
            text = "\n".join(f"[{m['role']}] {m['content']}" for m in record.messages)
        elif record.prompt is not None:
            text = f"[prompt] {record.prompt}\n[response] {record.text}"
        else:
            text = sample_text(record, row["sample_id"], row["char_start"], row["char_end"])
        row["text"], row["text_cut"] = text[:max_chars], len(text) > max_chars


def with_ifd(rows: pl.LazyFrame) -> pl.LazyFrame:
    """The plain ratio nll_sum / nll_sum_uncond beside each example, where the scores have both."""
    if not {"nll_sum", "nll_sum_uncond"} <= set(rows.collect_schema().names()):
        return rows
    return with_key(rows, "ifd")


def examples_by_band(
    cfg: Config, scores: pl.LazyFrame, bands: list[DrawnBand], provenance: Provenance
) -> list[tuple]:
    """(band, its example regions with texts) per band, or (None, regions) with no band."""
    regions_per_band = [
        (
            band,
            [
                {
                    "region": r,
                    "rows": with_ifd(f)
                    .drop(KEY_COLUMNS, strict=False)
                    .sort(band.key if band else "loss", "sample_id")
                    .collect()
                    .to_dicts(),
                }
                for r, f in example_regions(scores, band, cfg.inspect.examples).items()
            ],
        )
        for band in bands or [None]
    ]
    rows = [row for _, regions in regions_per_band for r in regions for row in r["rows"]]
    attach_texts(cfg, provenance, rows)
    return regions_per_band
