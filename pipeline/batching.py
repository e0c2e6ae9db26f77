"""Token-budget batching: read a window of rows, tokenize, sort by length, pack, collate.

    for item in ShardBatches(...):   # run in a DataLoader worker so tokenization overlaps compute
        item["batch"]        # padded tensors + per-sample metadata, or None
        item["window_end"]   # set on the last item of a window: rows of the shard consumed so far

A window (`score.window_rows` rows) is also the unit of checkpointing: the scorer writes a chunk of
results at each window end, so a killed run resumes at the next window. Within a window, samples
are sorted longest first and packed while `rows x longest <= batch_tokens`, so padding stays small
and the biggest batch of a window comes first.
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


def pack_batches(samples: list[Sample], batch_tokens: int) -> list[list[Sample]]:
    """Greedy packing of samples sorted longest first: each batch's padded size fits the budget."""
    batches: list[list[Sample]] = []
    for sample in samples:
        if batches and (len(batches[-1]) + 1) * len(batches[-1][0].input_ids) <= batch_tokens:
            batches[-1].append(sample)
        else:
            batches.append([sample])
    return batches


def pad_id_of(tokenizer) -> int:
    """The id rows are padded with: the tokenizer's pad token, else 0. Padding is masked out (never
    attended to, never a target), so any id will do."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def collate(samples: list[Sample], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    target_mask = torch.zeros((len(samples), length), dtype=torch.bool)
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
                    yield {"batch": collate(batch, self.pad_id) | {"meta": meta}, "window_end": None}
            yield {
                "batch": None,
                "window_end": position,
                "rows": len(window),
                "records": sum(r is not None for r in window),
                "skipped": dict(skipped),
            }
