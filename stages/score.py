"""Stage one: score every sample's loss with the reference model -> scores/part-{shard:05d}.parquet.

    midrank score --config configs/default.yaml score.batch_tokens=8192
    torchrun --nproc_per_node=8 -m stages.cli score --config configs/default.yaml   # one GPU a rank

Each rank scores the shards with `shard % world_size == rank`, no communication. A shard is
checkpointed after every window of rows and renamed into place when complete; rerunning skips
finished shards and resumes unfinished ones at their last checkpoint. The pieces live in the
library: batching (`pipeline/batching.py`), the kernel and its token budget (`pipeline/nll.py`),
the score files (`pipeline/scores.py`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from pipeline.batching import ShardBatches
from pipeline.compiling import (
    COST_S,
    kind_of,
    mark_warm,
    measured_gain,
    repeated_blocks,
    warm_marker,
    worth_compiling,
)
from pipeline.config import Config, save_config
from pipeline.cpu_memory import tune_cpu_malloc
from pipeline.launcher import rank_and_world, shards_of_rank
from pipeline.layout import Layout
from pipeline.locks import check_free, lock
from pipeline.log import RowProgress, format_counts, get_logger
from pipeline.model import LoadedModel, load_model
from pipeline.nll import BudgetedScorer, NLLScorer
from pipeline.readers import InputError
from pipeline.scores import (
    ShardWriter,
    add_stats,
    clear_finished_checkpoints,
    empty_stats,
    is_scored,
    make_provenance,
    rows_checkpointed,
    save_plan,
    shard_lock,
    window_table,
    write_summary,
)
from pipeline.sharding import ShardPlan, plan_shards


def score_shard(
    cfg: Config,
    plan: ShardPlan,
    writer: ShardWriter,
    tokenizer: Any,
    scorer: BudgetedScorer,
    progress: RowProgress,
) -> dict[str, Any]:
    """Score one shard from its last checkpoint on, a window of rows at a time."""
    log = get_logger()
    shard = writer.shard
    if writer.rows_done:
        log.info(f"shard {shard}: resuming after row {writer.rows_done} ({writer.chunks} checkpoints)")
    dataset = ShardBatches(plan, shard, cfg.corpus, cfg.score, tokenizer, writer.rows_done)
    workers = cfg.score.num_workers
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=8 if workers else None)
    metas: list[dict[str, list]] = []
    results: list[np.ndarray] = []
    window_started = time.perf_counter()
    for item in loader:
        if item["batch"] is not None:
            meta = item["batch"].pop("meta")
            metas.append(meta)
            results.append(scorer(item["batch"])[:, : len(meta["sample_id"])])  # less the empty rows
            continue
        table, bad = window_table(shard, metas, results)
        metas, results = [], []
        skipped = dict(item["skipped"])
        if bad:
            skipped["non_finite"] = len(bad)
            log.warning(f"shard {shard}: {len(bad)} non-finite loss(es) not written, e.g. {bad[:3]}")
        now = time.perf_counter()
        stats = {
            "rows": item["rows"],
            "records": item["records"],
            "samples": table.num_rows,
            "tokens": int(table.column("n_tokens").to_numpy().sum()),
            "seconds": now - window_started,
            "skipped": skipped,
        }
        window_started = now
        writer.write_chunk(table, item["window_end"], stats)
        progress.advance(item["rows"], stats["tokens"])
    return writer.finish()


def compiling_pays(
    cfg: Config,
    plan: ShardPlan,
    layout: Layout,
    todo: list[int],
    loaded: LoadedModel,
    scorer: BudgetedScorer,
    rate: float,
) -> bool:
    """`score.compile=auto`, decided before the first batch so that one run's losses are all eager
    or all compiled. A resumed run, and each rank, decides for itself (`true` or `false` keeps a
    score set uniform): compiled and eager losses differ by rounding, and the provenance key does
    not tell them apart, as it does not for `score.compile` itself. The work ahead: the rows of
    the shards to do less those checkpointed, at the padded tokens per row of the first window
    still to score. The eager speed: the start-up probe's `rate`, then a second probe's."""
    kernel = scorer.scorer
    core = kernel.body if kernel.fast_path else kernel.model
    gain = measured_gain(kind_of(loaded.device, loaded.dtype), whole=not repeated_blocks(core))
    if gain is None:
        return False
    left = {shard: plan.shard_rows(shard) - rows_checkpointed(layout, shard) for shard in todo}
    first = next((shard for shard in todo if left[shard] > 0), None)
    if first is None:
        return False
    done = plan.shard_rows(first) - left[first]
    batches = ShardBatches(plan, first, cfg.corpus, cfg.score, loaded.tokenizer, start_row=done)

    def rates() -> Iterator[float]:
        yield rate
        yield scorer.probe_worst_batch(cfg.score.max_tokens, len(loaded.tokenizer))

    warm = warm_marker(loaded.model, loaded.dtype, kernel.unpadded).is_file()
    padded_tokens = sum(left.values()) * batches.padded_tokens_per_row()
    return worth_compiling(padded_tokens, rates(), gain, COST_S["warm" if warm else "cold"])


def run(cfg: Config) -> Path:
    log = get_logger()
    started = time.perf_counter()
    rank, world_size = rank_and_world()
    layout = Layout(cfg.out_dir)
    layout.make_dir(layout.scores_dir)
    plan = plan_shards(cfg.corpus)
    if plan.total_rows == 0:
        raise InputError(f"corpus.paths: {', '.join(cfg.corpus.paths)} hold no rows; nothing to score")
    save_plan(layout, plan)
    provenance = make_provenance(cfg, plan)
    assigned = shards_of_rank(len(plan.shards), rank, world_size)
    todo = [shard for shard in assigned if not is_scored(layout, shard, provenance)]
    for shard in set(assigned) - set(todo):
        clear_finished_checkpoints(layout, shard)
    if not todo:
        log.info(
            f"nothing to do: the {len(assigned)} shard(s) of rank {rank} in {layout.scores_dir} are already scored"
        )
        write_summary(layout, len(plan.shards))
        return layout.scores_dir
    check_free(layout, [shard_lock(shard) for shard in todo])  # before the model loads
    save_config(cfg, layout.scores_dir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the DataLoader worker forks
    loaded = load_model(cfg.model)
    if loaded.device.type == "cpu":
        allocator = tune_cpu_malloc()
        log.info(f"malloc: {allocator} (model.cpu_allocator={cfg.model.cpu_allocator})")
        if "jemalloc" in os.environ.get("LD_PRELOAD", "") and allocator != "jemalloc":
            # the loader only prints a message when it cannot use a preloaded library
            log.warning(f"jemalloc is in LD_PRELOAD but did not load: running on {allocator}'s malloc")
    kernel = NLLScorer(loaded.model, cfg.score.head_chunk_tokens, count_correct=False)
    if not kernel.fast_path:
        log.warning("this model's logits are not lm_head(hidden): scoring through its full forward (slower)")
    else:
        log.info(
            "the padding is not computed (pipeline/unpadded.py)"
            if kernel.unpadded
            else "the padding is computed: this model is not one scored unpadded (docs/scoring.md)"
        )
    scorer = BudgetedScorer(kernel, cfg.score.batch_tokens)
    rate = scorer.probe_worst_batch(cfg.score.max_tokens, len(loaded.tokenizer))
    total_rows = sum(plan.shard_rows(s) for s in todo)
    compiled = cfg.score.compile is True or (
        cfg.score.compile == "auto" and compiling_pays(cfg, plan, layout, todo, loaded, scorer, rate)
    )
    if compiled:
        kernel.compile()
    log.info(f"rank {rank}/{world_size}: {len(todo)} of {len(assigned)} shard(s) to score, {total_rows} rows")
    totals = empty_stats()
    with RowProgress(total_rows, "scoring", disable=rank != 0) as progress:
        for shard in todo:
            with lock(layout, shard_lock(shard)):  # the shard's files are this run's alone
                if is_scored(layout, shard, provenance):  # finished meanwhile by a run that held it
                    progress.advance(plan.shard_rows(shard))
                    continue
                writer = ShardWriter(layout, shard, provenance)
                progress.advance(writer.rows_done)
                totals = add_stats(totals, score_shard(cfg, plan, writer, loaded.tokenizer, scorer, progress))
    if compiled and totals["samples"]:  # something ran compiled, so the graphs are in the cache
        mark_warm(warm_marker(loaded.model, loaded.dtype, kernel.unpadded))
    elapsed = time.perf_counter() - started
    log.info(
        f"scored {totals['samples']} samples from {totals['rows']} rows (skipped: {format_counts(totals['skipped'])}), "
        f"{totals['tokens']:,} tokens, {progress.tokens / elapsed:,.0f} tok/s, {elapsed:.1f}s -> {layout.scores_dir}"
    )
    summary = write_summary(layout, len(plan.shards))
    if summary is not None and summary.samples == 0:
        log.warning(f"no sample was scored (skipped: {format_counts(summary.skipped)}); check the corpus")
    return layout.scores_dir
