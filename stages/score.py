"""Stage one: score every sample's loss with the reference model -> scores/part-{shard:05d}.parquet.

    midrank score --config configs/default.yaml score.batch_tokens=8192
    torchrun --nproc_per_node=8 -m pipeline.cli score --config configs/default.yaml   # one GPU a rank

Each rank scores the shards with `shard % world_size == rank`, no communication. A shard is
checkpointed after every window of rows and renamed into place when complete; rerunning skips
finished shards and resumes unfinished ones at their last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.artifacts import (
    PROVENANCE_KEY,
    SCORE_SCHEMA,
    SCORING_VERSION,
    STATS_KEY,
    ShardWriter,
    add_stats,
    check_same_key,
    chunk_dir,
    code_version,
    digest,
    empty_stats,
    read_json_metadata,
    shard_path,
    write_json_atomic,
)
from pipeline.batching import ShardBatches
from pipeline.config import Config, save_config, to_dict
from pipeline.log import get_logger
from pipeline.model import fingerprint, load_model, resolve_device, resolve_dtype, tune_cpu_malloc
from pipeline.nll import NLLScorer
from pipeline.ranks import rank_and_world, shards_of_rank
from pipeline.records import needed_columns
from pipeline.sharding import ShardPlan, plan_shards


def make_provenance(cfg: Config, plan: ShardPlan) -> dict[str, Any]:
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
        "corpus_plan_sha256": digest(plan.to_dict()),
        "corpus_fields_sha256": digest(corpus_fields),
    }
    if cfg.score.long_docs == "split":  # how windows are laid out; truncation ignores it
        key["split_context_tokens"] = cfg.score.resolved_split_context()
    if cfg.corpus.mode != "text":  # how instruction data becomes tokens; plain text ignores these
        key |= {"prompt_format": cfg.score.prompt_format, "score_prompt": cfg.score.score_prompt}
    return {"key": key, "model_path": cfg.model.path, "code_version": code_version(), "config": to_dict(cfg)}


def save_plan(scores_dir: Path, plan: ShardPlan) -> None:
    path = scores_dir / "plan.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        check_same_key(
            {"plan": digest(previous)}, {"plan": digest(plan.to_dict())}, f"{scores_dir} (its corpus plan)"
        )
    else:
        write_json_atomic(path, plan.to_dict())


class Budget:
    """The batch token budget; halved on out-of-memory, never below one row."""

    def __init__(self, tokens: int):
        self.tokens = tokens


def score_batch(scorer: NLLScorer, batch: dict[str, torch.Tensor], budget: Budget) -> np.ndarray:
    """(3, rows) array of nll_sum, n_tokens, max_token_nll; splits the batch to fit the budget."""
    rows, length = batch["input_ids"].shape
    if rows > 1 and rows * length > budget.tokens:
        half = rows // 2
        parts = [{k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()}]
        return np.concatenate([score_batch(scorer, p, budget) for p in parts], axis=1)
    try:
        out = scorer(batch["input_ids"], batch["attention_mask"], batch["target_mask"])
    except torch.OutOfMemoryError:
        if rows == 1:
            raise
        torch.cuda.empty_cache()
        budget.tokens = max(length, budget.tokens // 2)
        get_logger().warning(
            f"out of memory at {rows}x{length} tokens; batch_tokens halved to {budget.tokens}"
        )
        return score_batch(scorer, batch, budget)
    # one device->host copy per batch
    return torch.stack([out.nll_sum, out.n_tokens.double(), out.max_token_nll.double()]).cpu().numpy()


def probe_worst_batch(scorer: NLLScorer, budget: Budget, max_tokens: int, vocab_size: int) -> None:
    """Score one batch of the largest shape first: an out-of-memory error surfaces (and the budget
    shrinks) before any real work, and on CPU the heap reaches its high-water mark at once, so
    peak memory does not depend on which documents come later."""
    rows = max(1, budget.tokens // max_tokens)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (rows, max_tokens), generator=generator)
    mask = torch.ones_like(ids)
    score_batch(scorer, {"input_ids": ids, "attention_mask": mask, "target_mask": mask.bool()}, budget)


def window_table(
    shard: int, metas: list[dict[str, list]], results: list[np.ndarray]
) -> tuple[pa.Table, list[str]]:
    """The rows of one window; samples with a non-finite loss are left out and returned by id."""
    if not results:
        return SCORE_SCHEMA.empty_table(), []
    values = np.concatenate(results, axis=1)
    meta = {k: [v for m in metas for v in m[k]] for k in metas[0]}
    nll_sum, n_tokens, max_nll = values[0], values[1].astype(np.int32), values[2].astype(np.float32)
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
    }
    table = pa.Table.from_pydict(columns, schema=SCORE_SCHEMA)
    return (table.filter(pa.array(finite)) if bad else table), bad


def score_shard(
    cfg: Config,
    plan: ShardPlan,
    shard: int,
    writer: ShardWriter,
    tokenizer: Any,
    scorer: NLLScorer,
    budget: Budget,
    bar: tqdm,
) -> dict[str, Any]:
    log = get_logger()
    if writer.rows_done:
        log.info(f"shard {shard}: resuming after row {writer.rows_done} ({writer.chunks} checkpoints)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out anyway
    dataset = ShardBatches(
        plan,
        shard,
        cfg.corpus,
        cfg.score,
        tokenizer,
        pad_id,
        writer.rows_done,
    )
    workers = cfg.score.num_workers
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=8 if workers else None)
    metas: list[dict[str, list]] = []
    results: list[np.ndarray] = []
    window_started = time.perf_counter()
    for item in loader:
        if item["batch"] is not None:
            metas.append(item["batch"].pop("meta"))
            results.append(score_batch(scorer, item["batch"], budget))
            continue
        table, bad = window_table(shard, metas, results)
        metas, results = [], []
        skipped = dict(item["skipped"])
        if bad:
            skipped["non_finite"] = len(bad)
            log.warning(f"shard {shard}: {len(bad)} non-finite loss(es) not written, e.g. {bad[:3]}")
        tokens = int(table.column("n_tokens").to_numpy().sum())
        now = time.perf_counter()
        stats = {
            "rows": item["rows"],
            "records": item["records"],
            "samples": table.num_rows,
            "tokens": tokens,
            "seconds": now - window_started,
            "skipped": skipped,
        }
        window_started = now
        writer.write_chunk(table, item["window_end"], stats)
        bar.update(item["rows"])
        bar.tokens += tokens
        bar.set_postfix_str(f"{bar.tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s")
    return writer.finish()


def summarize(scores_dir: Path, num_shards: int) -> dict[str, Any] | None:
    paths = [shard_path(scores_dir, s) for s in range(num_shards)]
    if not all(p.is_file() for p in paths):
        return None
    total = empty_stats()
    for p in paths:
        total = add_stats(total, read_json_metadata(p, STATS_KEY))
    summary = total | {"shards": num_shards, "provenance": read_json_metadata(paths[0], PROVENANCE_KEY)}
    write_json_atomic(scores_dir / "summary.json", summary)
    return summary


def run(cfg: Config) -> Path:
    log = get_logger()
    started = time.perf_counter()
    rank, world_size = rank_and_world()
    scores_dir = Path(cfg.out_dir) / "scores"
    scores_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(cfg.corpus)
    save_plan(scores_dir, plan)
    provenance = make_provenance(cfg, plan)
    mine = shards_of_rank(len(plan.shards), rank, world_size)
    todo = []
    for shard in mine:
        path = shard_path(scores_dir, shard)
        if path.is_file():
            check_same_key(read_json_metadata(path, PROVENANCE_KEY)["key"], provenance["key"], str(path))
            shutil.rmtree(
                chunk_dir(scores_dir, shard), ignore_errors=True
            )  # a kill between rename and cleanup
        else:
            todo.append(shard)
    if not todo:
        log.info(f"nothing to do: the {len(mine)} shard(s) of rank {rank} in {scores_dir} are already scored")
        summarize(scores_dir, len(plan.shards))
        return scores_dir
    save_config(cfg, scores_dir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the DataLoader worker forks
    loaded = load_model(cfg.model)
    if loaded.device.type == "cpu":
        tune_cpu_malloc()
    scorer = NLLScorer(loaded.model, cfg.score.head_chunk_tokens)
    if not scorer.fast_path:
        log.warning("this model's logits are not lm_head(hidden): scoring through its full forward (slower)")
    budget = Budget(cfg.score.batch_tokens)
    probe_worst_batch(scorer, budget, cfg.score.max_tokens, len(loaded.tokenizer))
    writers = {s: ShardWriter(scores_dir, s, provenance) for s in todo}
    total_rows = sum(plan.shard_rows(s) - writers[s].rows_done for s in todo)
    log.info(f"rank {rank}/{world_size}: {len(todo)} of {len(mine)} shard(s) to score, {total_rows} rows")
    totals = empty_stats()
    with tqdm(total=total_rows, unit="row", desc="scoring", disable=rank != 0, dynamic_ncols=True) as bar:
        bar.tokens = 0
        for shard in todo:
            totals = add_stats(
                totals, score_shard(cfg, plan, shard, writers[shard], loaded.tokenizer, scorer, budget, bar)
            )
    elapsed = time.perf_counter() - started
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(totals["skipped"].items())) or "none"
    log.info(
        f"scored {totals['samples']} samples from {totals['rows']} rows (skipped: {skipped}), "
        f"{totals['tokens']:,} tokens, {bar.tokens / elapsed:,.0f} tok/s, {elapsed:.1f}s -> {scores_dir}"
    )
    summarize(scores_dir, len(plan.shards))
    return scores_dir
