"""Token-budget batching: read a window of rows, tokenize, sort by length, pack, collate.

    for item in ShardBatches(...):   # run in a DataLoader worker so tokenization overlaps compute
        item["batch"]        # padded tensors + per-sample metadata, or None
        item["window_end"]   # set on the last item of a window: rows of the shard consumed so far

A window (`score.window_rows` rows) is also the unit of checkpointing: the scorer writes a chunk of
results at each window end, so a killed run resumes at the next window. Within a window, samples
are sorted longest first and packed while `rows x batch_length(longest) <= batch_tokens`, so
padding stays small and the biggest batch of a window comes first.

Batches take one of a few shapes. A batch is padded to `batch_length(longest)`: a multiple of 16
up to 128 tokens; above, a multiple of an eighth of the largest power of two below the length (at
most 12.5% longer; 24 lengths up to 512). Each group's last, short batch of a window is filled
with empty rows up to `batch_rows`. Why: on the CPU, memory grew with the number of distinct
batch shapes seen. Measured on SmolLM2-135M in bf16 (glibc's heap kept, pipeline/cpu_memory.py):
40 batches of random shapes grew the resident set by 260-400 MB every 20 batches; 140 batches of
these shapes levelled off after about 80 (1,406 -> 1,551 MB, then flat). Over a long run glibc's
heap still fragments (+20% for 10x the documents); jemalloc's does not (pipeline/cpu_memory.py).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset

from pipeline.config import CorpusConfig, ScoreConfig
from pipeline.records import ReadStats, record_digest
from pipeline.samples import Sample, SamplePolicy, make_samples, unconditional_samples
from pipeline.sharding import ShardPlan, iter_shard_rows


def batch_length(longest: int) -> int:
    """The padded length of a batch whose longest sample has `longest` tokens."""
    step = 16 if longest <= 128 else 1 << (max(longest - 1, 1).bit_length() - 4)
    return -(-longest // step) * step


def batch_rows(length: int, batch_tokens: int) -> int:
    """Rows of a full batch of padded `length` within the budget (one if a row alone exceeds it)."""
    return max(1, batch_tokens // length)


def pack_batches(samples: list[Sample], batch_tokens: int) -> list[list[Sample]]:
    """Greedy packing of samples sorted longest first: each batch's padded size fits the budget,
    except a lone row, which may be up to `batch_length` of a budget-long sample."""
    batches: list[list[Sample]] = []
    for sample in samples:
        if batches and len(batches[-1]) < batch_rows(
            batch_length(len(batches[-1][0].input_ids)), batch_tokens
        ):
            batches[-1].append(sample)
        else:
            batches.append([sample])
    return batches


def pad_id_of(tokenizer) -> int:
    """The id rows are padded with: the tokenizer's pad token, else 0. Padding is masked out (never
    attended to, never a target), so any id will do."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def collate(
    samples: list[Sample], pad_id: int, padding_side: str = "right", rows: int = 0
) -> dict[str, torch.Tensor]:
    """Padded tensors of `samples`, `batch_length` long; with `rows`, empty rows follow the samples
    up to that many (each attends to its first position only, whatever the padding side, so every
    query has a key; none is a target)."""
    length = batch_length(max(len(s.input_ids) for s in samples))
    shape = (max(rows, len(samples)), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    attention_mask[len(samples) :, 0] = 1
    target_mask = torch.zeros(shape, dtype=torch.bool)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        start = 0 if padding_side == "right" else length - n
        input_ids[row, start : start + n] = torch.tensor(s.input_ids)
        attention_mask[row, start : start + n] = 1
        for first, end in s.targets:
            target_mask[row, start + first : start + end] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}


META_FIELDS = (
    "sample_id",
    "source",
    "window",
    "n_chars",
    "char_start",
    "char_end",
    "n_bytes",
    "n_markup_bytes",
    "n_mojibake",
    "truncated",
    "record_hash",
    "unconditional",
)


class ShardBatches(IterableDataset):
    """The batches of one shard from row `start_row` on, window by window."""

    def __init__(
        self,
        plan: ShardPlan,
        shard: int,
        corpus: CorpusConfig,
        score: ScoreConfig,
        tokenizer: Any,
        start_row: int = 0,
    ):
        self.plan, self.shard, self.corpus, self.score = plan, shard, corpus, score
        self.tokenizer, self.start_row = tokenizer, start_row
        self.policy = SamplePolicy.of(score, tokenizer)
        self.pad_id = pad_id_of(tokenizer)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stats = ReadStats()
        rows = iter_shard_rows(self.plan, self.shard, self.corpus, stats, self.start_row)
        position = self.start_row
        while window := list(itertools.islice(rows, self.score.window_rows)):
            position += len(window)
            skipped = Counter(stats.skipped)
            stats.skipped.clear()
            samples: list[Sample] = []
            companions: list[Sample] = []  # responses without their prompts (score.unconditional)
            for record in window:
                if record is None:
                    continue
                made, reason = make_samples(record, self.tokenizer, self.policy)
                digest = record_digest(record)
                made = [dataclasses.replace(sample, record_hash=digest) for sample in made]
                samples.extend(made)
                if self.policy.unconditional_ids:
                    for sample in made:
                        companions.extend(unconditional_samples(sample, self.policy.unconditional_ids))
                if reason:
                    skipped[reason] += 1
            # packed apart: the samples' own batches (and so their bf16 numbers) are the same with
            # or without the unconditional pass
            for group in (samples, companions):
                group.sort(key=lambda s: -len(s.input_ids))
                for batch in pack_batches(group, self.score.batch_tokens):
                    meta = {name: [getattr(s, name) for s in batch] for name in META_FIELDS}
                    full = batch_rows(batch_length(len(batch[0].input_ids)), self.score.batch_tokens)
                    tensors = collate(batch, self.pad_id, rows=full)
                    yield {"batch": tensors | {"meta": meta}, "window_end": None}
            yield {
                "batch": None,
                "window_end": position,
                "rows": len(window),
                "records": sum(r is not None for r in window),
                "skipped": dict(skipped),
            }

    def padded_tokens_per_row(self) -> float:
        """The tokens, padding included, that the model computes per row of the first window: how
        `score.compile=auto` estimates the work ahead before scoring starts."""
        padded = 0
        for item in self:
            if item["batch"] is not None:
                padded += item["batch"]["input_ids"].numel()
            elif item["rows"]:
                return padded / item["rows"]
        return 0.0
