"""Score files: their schema and provenance, checkpointed shard writing, and reading them back.

    scores/plan.json                       the shard plan (identical for every rank)
    scores/part-00003.parquet              one finished shard: rows + provenance + stats metadata
    scores/.part-00003.chunks/chunk-*.parquet   checkpoints of an unfinished shard
    scores/summary.json                    totals, written once every shard is finished

A finished shard is never recomputed, and its provenance `key` (model and tokenizer hashes,
scoring policy, dtype, corpus plan) must match the current run's: mixing is refused. Paths come
from `pipeline.layout`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import (
    ProvenanceError,
    check_same_key,
    code_version,
    digest,
    read_json_metadata,
    write_json_atomic,
    write_table_atomic,
)
from pipeline.codec import decode, encode, read_json
from pipeline.config import Config, to_dict
from pipeline.layout import Layout
from pipeline.outputs import OutputError, Provenance, ScoresSummary
from pipeline.records import needed_columns
from pipeline.sharding import ShardPlan, StoredPlan, changed_inputs

# Bumped when a change alters what a scorer writes (2: record_hash; 3: markup, mojibake; 4: markup
# tags on one line only, a chat template's special tokens not markup).
SCORING_VERSION = 4
PROVENANCE_KEY = b"midrank.provenance"
STATS_KEY = b"midrank.stats"

# A row: where the sample came from; what was scored (n_tokens targets, their summed NLL; the loss is
# derived, the worst token flags garbage); the span of the record's text it covers, to join it back;
# a hash of the record, to tell that the text joined back is the one scored; the UTF-8 bytes the
# targets cover, for bits per byte; of those bytes, the ones inside markup tags and the
# wrong-charset sequences (pipeline/text_flags.py); with score.unconditional, the summed NLL of the
# same targets without the prompt (else null). Scores of another SCORING_VERSION are not read.
SCORE_SCHEMA = pa.schema(
    {"sample_id": pa.string(), "shard": pa.int32(), "source": pa.string(), "window": pa.int32()}
    | {"n_tokens": pa.int32(), "nll_sum": pa.float64(), "loss": pa.float64(), "max_token_nll": pa.float32()}
    | {"n_chars": pa.int32(), "char_start": pa.int32(), "char_end": pa.int32(), "truncated": pa.bool_()}
    | {"record_hash": pa.int64(), "n_bytes": pa.int64(), "nll_sum_uncond": pa.float64()}
    | {"n_markup_bytes": pa.int64(), "n_mojibake": pa.int32()}
)


SCORE_POLARS_SCHEMA = pl.from_arrow(SCORE_SCHEMA.empty_table()).schema


def make_provenance(cfg: Config, plan: ShardPlan) -> Provenance:
    """What decides the numbers a scorer writes (`key`), and where they came from."""
    # here, not at the top: select and inspect read score files and need no torch
    from pipeline.model import fingerprint, resolve_device, resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device))
    # only what decides a record's content: the fields its mode reads (renaming an unused field, or
    # adding a config option, must not invalidate finished scores); the plan covers paths and shards
    corpus_fields = {
        "mode": cfg.corpus.mode,
        "format": cfg.corpus.format,
        "text_glob": cfg.corpus.text_glob,
        "columns": needed_columns(cfg.corpus),
    }
    key = {
        "scoring_version": SCORING_VERSION,
        **fingerprint(cfg.model),
        "dtype": str(dtype).removeprefix("torch."),
        "max_tokens": cfg.score.max_tokens,
        "long_docs": cfg.score.long_docs,
        "add_bos": cfg.score.add_bos,
        "corpus_plan_sha256": digest(encode(plan.stored())),
        "corpus_fields_sha256": digest(corpus_fields),
    }
    if cfg.score.long_docs == "split":  # how windows are laid out; truncation ignores it
        key["split_context_tokens"] = cfg.score.resolved_split_context()
    if cfg.corpus.mode != "text":  # how instruction data becomes tokens; plain text ignores these
        key |= {"prompt_format": cfg.score.prompt_format, "score_prompt": cfg.score.score_prompt}
    if cfg.score.unconditional:  # nll_sum_uncond is written, after this context
        key |= {"unconditional_prefix": cfg.score.unconditional_prefix}
    return Provenance(key=key, model_path=cfg.model.path, code_version=code_version(), config=to_dict(cfg))


def scored_plan(layout: Layout) -> StoredPlan | None:
    """The shard plan the scores in out_dir were made with (plan.json), or None before scoring."""
    if not layout.score_plan.is_file():
        return None
    try:
        return read_json(layout.score_plan, StoredPlan, ProvenanceError)
    except ProvenanceError as err:
        raise ProvenanceError(f"{err}; score again into another out_dir") from None


def save_plan(layout: Layout, plan: ShardPlan) -> None:
    """The shard plan beside the scores; a later run with another plan is refused, naming what
    changed."""
    previous = scored_plan(layout)
    if previous is None:
        write_json_atomic(layout.score_plan, encode(plan.stored()))
    elif previous != plan.stored():
        changed = changed_inputs(plan, previous) or ["the shard plan differs"]
        raise ProvenanceError(
            f"{layout.scores_dir} holds scores of another corpus ({'; '.join(changed[:3])}); "
            "use another out_dir, or delete the old scores to rescore"
        )


def window_table(
    shard: int, metas: list[dict[str, list]], results: list[np.ndarray]
) -> tuple[pa.Table, list[str]]:
    """The rows of one window of scored samples (`results`: (3, rows) arrays of nll_sum,
    n_tokens, max_token_nll per batch); the responses scored without their prompts are summed
    into their sample's `nll_sum_uncond`. Samples with a non-finite loss are left out and
    returned by id."""
    if not results:
        return SCORE_SCHEMA.empty_table(), []
    values = np.concatenate(results, axis=1)
    meta = {k: [v for m in metas for v in m[k]] for k in metas[0]}
    companion = np.asarray(meta.pop("unconditional"), dtype=bool)
    uncond: dict[str, float] = {}
    for sample_id, nll in zip(np.asarray(meta["sample_id"])[companion], values[0][companion], strict=True):
        uncond[sample_id] = uncond.get(sample_id, 0.0) + float(nll)
    main = ~companion
    values = values[:, main]
    meta = {k: [v for v, keep in zip(column, main, strict=True) if keep] for k, column in meta.items()}
    nll_sum, n_tokens, max_nll = values[0], values[1].astype(np.int32), values[2].astype(np.float32)
    nll_uncond = np.array([uncond.get(sid, np.nan) for sid in meta["sample_id"]]) if uncond else None
    finite = np.isfinite(nll_sum)
    bad = [sid for sid, ok in zip(meta["sample_id"], finite, strict=True) if not ok]
    columns = {
        "sample_id": meta["sample_id"],
        "shard": np.full(len(nll_sum), shard, dtype=np.int32),
        "source": meta["source"],
        "window": np.asarray(meta["window"], dtype=np.int32),
        "n_tokens": n_tokens,
        "nll_sum": nll_sum,
        "loss": nll_sum / np.maximum(n_tokens, 1),
        "max_token_nll": max_nll,
        "n_chars": np.asarray(meta["n_chars"], dtype=np.int32),
        "char_start": np.asarray(meta["char_start"], dtype=np.int32),
        "char_end": np.asarray(meta["char_end"], dtype=np.int32),
        "truncated": np.asarray(meta["truncated"], dtype=bool),
        "record_hash": np.asarray(meta["record_hash"], dtype=np.int64),
        "n_bytes": np.asarray(meta["n_bytes"], dtype=np.int64),
        "n_markup_bytes": np.asarray(meta["n_markup_bytes"], dtype=np.int64),
        "n_mojibake": np.asarray(meta["n_mojibake"], dtype=np.int32),
        # a non-finite unconditional NLL is left null: the sample still ranks by loss, and ifd refuses it
        "nll_sum_uncond": pa.array(nll_uncond, mask=~np.isfinite(nll_uncond))
        if nll_uncond is not None
        else pa.nulls(len(nll_sum), pa.float64()),
    }
    table = pa.Table.from_pydict(columns, schema=SCORE_SCHEMA)
    return (table.filter(pa.array(finite)) if bad else table), bad


def scan_scores(files: list[Path]) -> pl.LazyFrame:
    """The score files (of this SCORING_VERSION: `score_files`) as one lazy table."""
    if not files:  # a rank with no shard of its own still takes part in a select job
        return pl.LazyFrame(schema=SCORE_POLARS_SCHEMA)
    return pl.scan_parquet(files, schema=SCORE_POLARS_SCHEMA)


COUNTS = ("rows", "records", "samples", "tokens", "seconds")


def empty_stats() -> dict[str, Any]:
    return dict.fromkeys(COUNTS, 0) | {"skipped": {}}


def add_stats(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    skipped = Counter(total["skipped"])
    skipped.update(part["skipped"])
    return {k: total[k] + part[k] for k in COUNTS} | {"skipped": dict(skipped)}


def shard_lock(shard: int) -> str:
    """The lock a scorer holds while it works on a shard (pipeline/locks.py)."""
    return f"score-shard-{shard:05d}"


def rows_checkpointed(layout: Layout, shard: int) -> int:
    """The rows of a shard its checkpoint holds, read without the shard's lock: an estimate for
    planning (`score.compile=auto`), which the writer that takes the lock reads again."""
    try:
        chunks = layout.score_chunk_files(shard)
        return int(read_json_metadata(chunks[-1], STATS_KEY)["rows_end"]) if chunks else 0
    except (OSError, KeyError, ProvenanceError):  # finished or cleared meanwhile; the writer reads again
        return 0


class ShardWriter:
    """Results of one shard, checkpointed as chunk files, finished into `part-XXXXX.parquet`.
    Made under the shard's lock: it clears what a killed writer of the shard left half-written."""

    def __init__(self, layout: Layout, shard: int, provenance: Provenance):
        self.layout = layout
        self.shard = shard
        self.path = layout.score_shard(shard)
        self.chunk_dir = layout.check_inside(layout.score_chunks(shard))
        self.provenance = provenance
        self.stats = empty_stats()
        self.rows_done = 0
        self.chunks = 0
        marker = layout.score_chunk_provenance(shard)
        stale = [*self.chunk_dir.glob(".*.tmp"), *self.path.parent.glob(f".{self.path.name}.*.tmp")]
        for path in stale:  # a write cut short by a kill
            layout.remove(path)
        if marker.is_file():
            check_same_key(Provenance.read(marker).key, provenance.key, str(self.chunk_dir))
            for chunk in layout.score_chunk_files(shard):
                meta = read_json_metadata(chunk, STATS_KEY)
                self.stats = add_stats(self.stats, meta["stats"])
                self.rows_done = meta["rows_end"]
                self.chunks += 1
        else:
            layout.make_dir(self.chunk_dir)
            provenance.write(marker)

    def write_chunk(self, table: pa.Table, rows_end: int, stats: dict[str, Any]) -> None:
        meta = {STATS_KEY: json.dumps({"rows_end": rows_end, "stats": stats}).encode()}
        write_table_atomic(table, self.layout.score_chunk(self.shard, self.chunks), meta)
        self.chunks += 1
        self.rows_done = rows_end
        self.stats = add_stats(self.stats, stats)

    def finish(self) -> dict[str, Any]:
        chunks = self.layout.score_chunk_files(self.shard)
        tables = [pq.read_table(c).replace_schema_metadata(None) for c in chunks]
        table = pa.concat_tables(tables) if tables else SCORE_SCHEMA.empty_table()
        metadata = {
            PROVENANCE_KEY: json.dumps(encode(self.provenance)).encode(),
            STATS_KEY: json.dumps(self.stats).encode(),
        }
        write_table_atomic(table.replace_schema_metadata(None), self.path, metadata)
        self.layout.remove(self.chunk_dir)
        return self.stats


def file_key(path: Path) -> dict[str, Any]:
    """The provenance key in a score file's metadata (a cut or foreign file is an error)."""
    key = read_json_metadata(path, PROVENANCE_KEY).get("key") if path.is_file() else None
    if not isinstance(key, dict):
        raise ProvenanceError(f"{path}: no provenance key in its metadata; not a midrank score file")
    return key


def is_scored(layout: Layout, shard: int, provenance: Provenance) -> bool:
    """Whether a shard is already scored; one scored under another provenance is refused."""
    if not layout.score_shard(shard).is_file():
        return False
    check_same_key(file_key(layout.score_shard(shard)), provenance.key, str(layout.score_shard(shard)))
    return True


def clear_finished_checkpoints(layout: Layout, shard: int) -> None:
    """The checkpoints of a scored shard, left behind by a kill between its final rename and
    their removal."""
    if layout.score_chunks(shard).exists():
        layout.remove(layout.score_chunks(shard))  # never beyond out_dir, even through a symlink


def check_corpus_unchanged(layout: Layout, plan: ShardPlan, provenance: Provenance) -> None:
    """Refuse a corpus that is not the one that was scored: joining its texts to the old losses
    would pair scores with other documents."""
    if digest(encode(plan.stored())) == provenance.key["corpus_plan_sha256"]:
        return
    scored = scored_plan(layout) or StoredPlan(files=[], shards=[])
    changed = changed_inputs(plan, scored) or ["the shard plan differs"]
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    raise ProvenanceError(
        f"{layout.scores_dir}: the corpus changed since it was scored ({'; '.join(changed[:3])}{more}); "
        "restore it, or score it again into another out_dir"
    )


def score_set(layout: Layout) -> tuple[list[Path], Provenance]:
    """Every shard's file, as many as the scores were planned with, and the provenance they share
    (each file's metadata read once). An unfinished or damaged score set, one of another
    SCORING_VERSION, or files scored under different conditions are errors that say what to do."""
    plan = scored_plan(layout)
    if plan is None:
        raise ProvenanceError(f"{layout.scores_dir}: nothing scored yet; run `midrank score` first")
    num_shards = len(plan.shards)
    if num_shards == 0:
        raise ProvenanceError(f"{layout.score_plan}: a plan of no shards; not a midrank score set")
    files = [layout.score_shard(s) for s in range(num_shards)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ProvenanceError(
            f"{layout.scores_dir}: {len(missing)} of {num_shards} score shards are missing ({', '.join(missing[:3])}...); "
            "run `midrank score` to finish scoring first"
        )
    first = None
    for path in files:
        data = read_json_metadata(path, PROVENANCE_KEY)  # a cut file fails here
        key = data.get("key") if isinstance(data, dict) else None
        version = key.get("scoring_version") if isinstance(key, dict) else None
        if version != SCORING_VERSION:
            raise ProvenanceError(
                f"{path}: scored by another midrank (scoring version {version}; this one reads "
                f"{SCORING_VERSION}: docs/scoring.md#provenance); score again into another out_dir"
            )
        if first is None:
            first = decode(Provenance, data, f"{path}: provenance", ProvenanceError)
        else:
            check_same_key(key, first.key, str(path))
    return files, first


def score_files(layout: Layout) -> list[Path]:
    """score_set's files."""
    return score_set(layout)[0]


def write_summary(layout: Layout, num_shards: int) -> ScoresSummary | None:
    """Totals over every shard, once all are finished (by whichever rank finishes last)."""
    paths = [layout.score_shard(s) for s in range(num_shards)]
    if not all(p.is_file() for p in paths):
        return None
    total = empty_stats()
    for p in paths:
        total = add_stats(total, read_json_metadata(p, STATS_KEY))
    provenance = decode(
        Provenance, read_json_metadata(paths[0], PROVENANCE_KEY), str(paths[0]), ProvenanceError
    )
    summary = ScoresSummary(**total, shards=num_shards, provenance=provenance)
    try:
        unchanged = ScoresSummary.read(layout.scores_summary) == summary
    except OutputError:
        unchanged = False
    if not unchanged:  # a finished score set is re-checked without a write (a read-only disk too)
        summary.write(layout.scores_summary)
    return summary
