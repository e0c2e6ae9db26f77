"""Score artifacts: the Parquet schema, provenance, checkpoint chunks and atomic shard files.

    scores/plan.json                       the shard plan (identical for every rank)
    scores/part-00003.parquet              one finished shard: rows + provenance + stats metadata
    scores/.part-00003.chunks/chunk-*.parquet   checkpoints of an unfinished shard
    scores/summary.json                    totals, written once every shard is finished

Every file is written to a temporary name and renamed, so a file that exists is complete. A
finished shard is never recomputed, and its provenance `key` (model and tokenizer hashes, scoring
policy, dtype, corpus plan) must match the current run's: mixing is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import pipeline

SCORING_VERSION = 1  # bump when a change alters the numbers a scorer writes
PROVENANCE_KEY = b"midrank.provenance"
STATS_KEY = b"midrank.stats"

SCORE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("shard", pa.int32()),
        ("source", pa.string()),
        ("window", pa.int32()),
        ("n_tokens", pa.int32()),
        ("nll_sum", pa.float64()),
        ("loss", pa.float64()),
        ("max_token_nll", pa.float32()),
        ("n_chars", pa.int32()),
        ("char_start", pa.int32()),
        ("char_end", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)


class ProvenanceError(ValueError):
    """Scores are incomplete, or made under different conditions and would be mixed."""


class NoScoresError(ProvenanceError):
    """The score set holds no sample: nothing to rank or plot."""


def code_version() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(pipeline.__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"{pipeline.__version__}+{commit}"


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_table_atomic(table: pa.Table, path: Path, metadata: dict[bytes, bytes]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table.replace_schema_metadata(metadata), tmp, compression="zstd")
    os.replace(tmp, path)


def read_json_metadata(path: Path, key: bytes) -> dict:
    metadata = pq.read_schema(path).metadata or {}
    if key not in metadata:
        raise ProvenanceError(f"{path}: no {key.decode()} metadata; not a midrank score file")
    return json.loads(metadata[key])


def check_same_key(found: dict, expected: dict, where: str) -> None:
    if found != expected:
        diffs = [
            f"{k}: {found.get(k)!r} != {expected.get(k)!r}"
            for k in sorted(set(found) | set(expected))
            if found.get(k) != expected.get(k)
        ]
        raise ProvenanceError(
            f"{where} was scored under different conditions ({'; '.join(diffs)}); refusing to mix. "
            "Use another out_dir, or delete the old scores to rescore."
        )


def shard_path(scores_dir: Path, shard: int) -> Path:
    return scores_dir / f"part-{shard:05d}.parquet"


def score_files(scores_dir: Path, num_shards: int) -> list[Path]:
    files = [shard_path(scores_dir, s) for s in range(num_shards)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ProvenanceError(
            f"{scores_dir}: {len(missing)} of {num_shards} score shards are missing ({', '.join(missing[:3])}...); "
            "run `midrank score` to finish scoring first"
        )
    return files


def common_provenance(files: list[Path]) -> dict[str, Any]:
    first = read_json_metadata(files[0], PROVENANCE_KEY)
    for path in files[1:]:
        check_same_key(read_json_metadata(path, PROVENANCE_KEY)["key"], first["key"], str(path))
    return first


def chunk_dir(scores_dir: Path, shard: int) -> Path:
    return scores_dir / f".part-{shard:05d}.chunks"


COUNTS = ("rows", "records", "samples", "tokens", "seconds")


def empty_stats() -> dict[str, Any]:
    return dict.fromkeys(COUNTS, 0) | {"skipped": {}}


def add_stats(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    skipped = Counter(total["skipped"])
    skipped.update(part["skipped"])
    return {k: total[k] + part[k] for k in COUNTS} | {"skipped": dict(skipped)}


class ShardWriter:
    """Results of one shard, checkpointed as chunk files, finished into `part-XXXXX.parquet`."""

    def __init__(self, scores_dir: Path, shard: int, provenance: dict[str, Any]):
        self.shard = shard
        self.path = shard_path(scores_dir, shard)
        self.chunk_dir = chunk_dir(scores_dir, shard)
        self.provenance = provenance
        self.stats = empty_stats()
        self.rows_done = 0
        self.chunks = 0
        marker = self.chunk_dir / "provenance.json"
        for stale in self.chunk_dir.glob(".*.tmp"):  # a write cut short by a kill
            stale.unlink()
        if marker.is_file():
            check_same_key(json.loads(marker.read_text())["key"], provenance["key"], str(self.chunk_dir))
            for chunk in sorted(self.chunk_dir.glob("chunk-*.parquet")):
                meta = read_json_metadata(chunk, STATS_KEY)
                self.stats = add_stats(self.stats, meta["stats"])
                self.rows_done = meta["rows_end"]
                self.chunks += 1
        else:
            self.chunk_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(marker, provenance)

    def write_chunk(self, table: pa.Table, rows_end: int, stats: dict[str, Any]) -> None:
        meta = {STATS_KEY: json.dumps({"rows_end": rows_end, "stats": stats}).encode()}
        write_table_atomic(table, self.chunk_dir / f"chunk-{self.chunks:06d}.parquet", meta)
        self.chunks += 1
        self.rows_done = rows_end
        self.stats = add_stats(self.stats, stats)

    def finish(self) -> dict[str, Any]:
        chunks = sorted(self.chunk_dir.glob("chunk-*.parquet"))
        tables = [pq.read_table(c, schema=SCORE_SCHEMA).replace_schema_metadata(None) for c in chunks]
        table = pa.concat_tables(tables) if tables else SCORE_SCHEMA.empty_table()
        metadata = {
            PROVENANCE_KEY: json.dumps(self.provenance).encode(),
            STATS_KEY: json.dumps(self.stats).encode(),
        }
        write_table_atomic(table.replace_schema_metadata(None), self.path, metadata)
        shutil.rmtree(self.chunk_dir)
        return self.stats
