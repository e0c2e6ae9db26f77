"""Corpus check: read every record of the configured corpus through the shard plan, before scoring.

    midrank corpus --config configs/default.yaml corpus.on_error=skip

Counts records per source and skipped rows by reason (with `on_error: raise`, stops at the first
bad row with its file, line and field). Writes nothing.
"""

from __future__ import annotations

import time

from pipeline.config import Config
from pipeline.log import RowProgress, get_logger
from pipeline.records import ReadStats
from pipeline.sharding import iter_shard, plan_shards


def run(cfg: Config) -> ReadStats:
    log = get_logger()
    started = time.perf_counter()
    plan = plan_shards(cfg.corpus)
    log.info(f"{len(plan.files)} input(s), {plan.total_rows} rows, {len(plan.shards)} shards")
    stats = ReadStats()
    with RowProgress(plan.total_rows, "reading", disable=None) as progress:  # no bar off a terminal
        for shard in range(len(plan.shards)):
            shard_stats = ReadStats()
            for _ in iter_shard(plan, shard, cfg.corpus, shard_stats):
                pass
            stats.merge(shard_stats)
            progress.advance(shard_stats.rows)
    for source, count in sorted(stats.per_source.items()):
        log.info(f"  {source:24s} {count:>10d} records")
    log.info(f"corpus: {stats.summary()} in {time.perf_counter() - started:.1f}s")
    if stats.records == 0:
        log.warning(
            f"corpus.paths: {', '.join(cfg.corpus.paths)} hold no usable record; nothing could be scored"
        )
    return stats
