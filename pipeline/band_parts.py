"""A band's rows as files: each shard's kept (or rejected) rows with their text joined back from the
corpus records, in the columns of the corpus mode.

    write_part(rows, records, band_dir, shard, "text")   # band_dir/part-{shard:05d}.parquet
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.artifacts import ProvenanceError, write_table_atomic
from pipeline.layout import part_path
from pipeline.records import record_digest, record_id, sample_text

MESSAGES = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))


def write_part(rows: pl.DataFrame, records: dict, where: Path, shard: int, mode: str) -> None:
    """One shard's rows of a band with their text (and prompt or messages) joined back from the
    corpus records. The columns follow the corpus mode, not the rows, so every part of a band
    (an empty one too) has the same schema."""
    texts, prompts, messages = [], [], []
    columns = ("sample_id", "char_start", "char_end", "record_hash")
    for sample_id, char_start, char_end, record_hash in rows.select(columns).iter_rows():
        record = records.get(record_id(sample_id))
        if record is None or record_digest(record) != record_hash:  # not the record that was scored
            found = "missing" if record is None else "not the one that was scored"
            raise ProvenanceError(
                f"{sample_id}: the corpus record is {found}; the corpus changed since it was scored "
                "(restore it, or score it again into another out_dir)"
            )
        texts.append(sample_text(record, sample_id, char_start, char_end))
        prompts.append(record.prompt)
        messages.append(list(record.messages) if record.messages is not None else None)
    table = rows.with_columns(text=pl.Series(texts, dtype=pl.String))
    if mode in ("prompt_response", "alpaca"):
        table = table.with_columns(prompt=pl.Series(prompts, dtype=pl.String))
    if mode == "chat":
        table = table.with_columns(messages=pl.Series(messages, dtype=MESSAGES))
    write_table_atomic(table.to_arrow(), part_path(where, shard), {})
