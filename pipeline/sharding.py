"""Deterministic sharding: the corpus, in a fixed file order, cut into `num_shards` contiguous row
ranges of near-equal size (shard i holds global rows [i*N/S, (i+1)*N/S)).

    plan = plan_shards(cfg.corpus)            # counts rows: one streaming pass, no corpus in memory
    for record in iter_shard(plan, 3, cfg.corpus, stats): ...

The plan depends only on the inputs (their row counts, sizes and sampled content) and
`num_shards`, so every rank (and every stage: scoring, then joining text back at selection)
computes the same one without talking to the others, and a stage can tell that the corpus changed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from pipeline.config import CorpusConfig
from pipeline.readers import InputError, InputFile, count_rows, discover_inputs, fingerprint, read_rows
from pipeline.records import ReadStats, Record, needed_columns, to_record


@dataclass(frozen=True, slots=True)
class Segment:
    """Rows [start, stop) of the input file `file_index`: one piece of a shard."""

    file_index: int
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class ShardPlan:
    files: tuple[InputFile, ...]
    num_rows: tuple[int, ...]
    shards: tuple[tuple[Segment, ...], ...]
    fingerprints: tuple[str, ...]
    """Per input, its size and a hash of sampled content (`readers.fingerprint`): the scores hold
    the plan, so a corpus edited after scoring is caught before texts are joined to old losses."""

    @property
    def total_rows(self) -> int:
        return sum(self.num_rows)

    def shard_rows(self, shard: int) -> int:
        return sum(s.stop - s.start for s in self.shards[shard])

    def stored(self) -> StoredPlan:
        """The plan as plan.json holds it."""
        return StoredPlan(
            files=[
                PlannedFile(**asdict(f), num_rows=n, fingerprint=p)
                for f, n, p in zip(self.files, self.num_rows, self.fingerprints, strict=True)
            ],
            shards=[[[s.file_index, s.start, s.stop] for s in shard] for shard in self.shards],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedFile:
    """An input as plan.json records it: the file, its rows, and its content's fingerprint."""

    path: str
    name: str
    format: str
    default_source: str
    split: str | None = None
    num_rows: int
    fingerprint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredPlan:
    """scores/plan.json: the inputs and, per shard, its [file index, start row, stop row] segments."""

    files: list[PlannedFile]
    shards: list[list[list[int]]]


def cut_into_shards(
    num_rows: list[int] | tuple[int, ...], num_shards: int
) -> tuple[tuple[Segment, ...], ...]:
    total = sum(num_rows)
    bounds = [i * total // num_shards for i in range(num_shards + 1)]
    file_starts = [0]
    for n in num_rows:
        file_starts.append(file_starts[-1] + n)
    shards = []
    for lo, hi in itertools.pairwise(bounds):
        segments = []
        for index, n in enumerate(num_rows):
            f_lo, f_hi = file_starts[index], file_starts[index] + n
            a, b = max(lo, f_lo), min(hi, f_hi)
            if a < b:
                segments.append(Segment(index, a - f_lo, b - f_lo))
        shards.append(tuple(segments))
    return tuple(shards)


def plan_shards(cfg: CorpusConfig) -> ShardPlan:
    files = tuple(discover_inputs(cfg.paths, cfg.format, cfg.text_glob))
    num_rows = tuple(count_rows(f) for f in files)
    fingerprints = tuple(fingerprint(f) for f in files)
    return ShardPlan(files, num_rows, cut_into_shards(num_rows, cfg.num_shards), fingerprints)


def changed_inputs(plan: ShardPlan, scored: StoredPlan) -> list[str]:
    """The inputs of `plan` that differ from the plan the scores were made with (`scored`, as
    saved in plan.json): added, removed, or of other rows, size or content."""
    before = {(f.path, f.split): f for f in scored.files}
    now = {(f.path, f.split): f for f in plan.stored().files}
    changed = []
    if len(scored.shards) != len(plan.shards):
        changed.append(f"corpus.num_shards: {len(scored.shards)} -> {len(plan.shards)}")
    for key in sorted(before.keys() | now.keys(), key=str):
        if key not in now:
            changed.append(f"{key[0]}: gone")
        elif key not in before:
            changed.append(f"{key[0]}: new")
        elif before[key] != now[key]:
            what = [k for k in ("num_rows", "fingerprint") if getattr(before[key], k) != getattr(now[key], k)]
            changed.append(f"{key[0]}: {' and '.join(what) or 'settings'} changed")
    return changed


def iter_shard_rows(
    plan: ShardPlan, shard: int, cfg: CorpusConfig, stats: ReadStats, start_row: int = 0
) -> Iterator[Record | None]:
    """One item per row of the shard from its `start_row`-th row on: the record, or None for a row
    that was counted as skipped in `stats`. Bad rows raise under `on_error: raise`."""
    columns = needed_columns(cfg)
    to_skip = start_row
    for segment in plan.shards[shard]:
        f = plan.files[segment.file_index]
        start = segment.start + min(to_skip, segment.stop - segment.start)
        to_skip -= start - segment.start
        seen = 0
        for row, value in read_rows(f, start, segment.stop, columns):
            seen += 1
            yield to_record(f, row, value, cfg, stats)
        if seen != segment.stop - start:
            raise InputError(
                f"{f.path}: expected rows {start}..{segment.stop - 1} but the file ended after "
                f"{start + seen} rows; did it change after the shard plan was made?"
            )


def iter_shard(plan: ShardPlan, shard: int, cfg: CorpusConfig, stats: ReadStats) -> Iterator[Record]:
    """The valid records of one shard, in order; bad rows are counted in `stats` or raise."""
    return (r for r in iter_shard_rows(plan, shard, cfg, stats) if r is not None)


def iter_corpus(plan: ShardPlan, cfg: CorpusConfig, stats: ReadStats) -> Iterator[Record]:
    for shard in range(len(plan.shards)):
        yield from iter_shard(plan, shard, cfg, stats)


def shard_records(
    plan: ShardPlan, shard: int, cfg: CorpusConfig, stats: ReadStats, wanted: set[str] | None = None
) -> dict[str, Record]:
    """The valid records of one shard by sample_id (only the `wanted` ids, when given): how texts
    are joined back to score rows."""
    return {
        r.sample_id: r for r in iter_shard(plan, shard, cfg, stats) if wanted is None or r.sample_id in wanted
    }
