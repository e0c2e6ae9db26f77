"""Training data: a selected band (or any Parquet/JSONL with a text field) as token sequences, and
the collator that pads or packs them with a per-token sample index.

    dataset, dropped = tokenize_dataset(files, "text", tokenizer, SamplePolicy.of(cfg.score, tokenizer, max_tokens=512))
    batch = TrainCollator(pad_id=0, max_tokens=512, pack=False)(features)
    batch["segment"]   # (rows, length): the feature index of each target token, -1 elsewhere
    batch["n_samples"] # len(features): with packing there are fewer rows than samples

Sequences are built by the scorer's own policy (pipeline/samples.py, `SamplePolicy.of(cfg.score,
...)`): the tokenizer's BOS, when it has one, is prepended as context; the text is truncated to
`max_tokens`; for instruction data (a `prompt` or `messages` column) the targets are the ones that
were scored — the responses, or every token with `score.score_prompt`. Tokenization runs through
`datasets.map`, so it is cached on disk and memory-mapped rather than held in Python lists.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from pipeline.artifacts import readable_parquet
from pipeline.config import Config, ConfigError
from pipeline.log import format_counts, get_logger
from pipeline.readers import InputError
from pipeline.records import Record
from pipeline.samples import SamplePolicy, make_samples


def load_rows(files: list[Path], text_field: str) -> datasets.Dataset:
    """Parquet or JSONL files as one dataset; the text field (or a `messages` list) must be there."""
    suffixes = {f.suffix for f in files}
    if suffixes <= {".parquet"}:
        remedy = "replace it (a selected band: delete its folder and run `midrank select` again)"
        dataset = datasets.Dataset.from_parquet([str(f) for f in readable_parquet(files, InputError, remedy)])
    elif suffixes <= {".jsonl", ".json"}:
        dataset = datasets.Dataset.from_json([str(f) for f in files])
    else:
        raise ConfigError(f"train.data_paths: Parquet or JSONL files only, got {', '.join(sorted(suffixes))}")
    if text_field not in dataset.column_names and "messages" not in dataset.column_names:
        raise ConfigError(
            f"train.text_field: {files[0]} has no {text_field!r} column (columns: {', '.join(dataset.column_names)})"
        )
    return dataset


def record_of(row: dict[str, Any], text_field: str) -> Record:
    """A training row as a corpus record: plain text, a prompt/response pair, or a chat."""
    messages = row.get("messages")
    return Record(
        row.get("sample_id") or "",
        row.get("source") or "",
        row.get(text_field) or "",
        prompt=row.get("prompt"),
        messages=tuple(messages) if messages else None,
    )


def tokenize_dataset(
    files: list[Path], text_field: str, tokenizer, policy: SamplePolicy
) -> tuple[datasets.Dataset, Counter]:
    """(dataset with `input_ids`, `targets` and, when present, `weight`; rows dropped, by reason).

    Sequences and targets are built by the scorer's own `make_samples`, truncated to max_tokens:
    a response is trained on exactly where it was scored, prompts and templates are context."""
    rows = load_rows(files, text_field)
    keep = [c for c in ("weight",) if c in rows.column_names]

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "targets": [], "dropped": []}
        for i in range(len(next(iter(batch.values())))):
            record = record_of({k: v[i] for k, v in batch.items()}, text_field)
            made, reason = make_samples(record, tokenizer, policy)
            out["input_ids"].append(made[0].input_ids if made else [])
            out["targets"].append([list(span) for span in made[0].targets] if made else [])
            out["dropped"].append(reason or "")
        return out

    tokenized = rows.map(
        encode,
        batched=True,
        remove_columns=[c for c in rows.column_names if c not in keep],
        desc="tokenizing",
    )
    dropped = Counter(reason for reason in tokenized["dropped"] if reason)
    usable = tokenized.filter(
        lambda reason: not reason, input_columns="dropped", desc="dropping unusable rows"
    )
    return usable.remove_columns("dropped"), dropped


@dataclass(frozen=True, slots=True)
class TrainCollator:
    """Features (`input_ids`, `targets` spans) -> rows. Without packing each sample has its own
    row, right-padded, with an `attention_mask`. With packing, samples are placed in order into
    rows of at most `max_tokens` and kept apart: `position_ids` restart at 0 for each sample and
    there is no 2-D `attention_mask`, which transformers reads as packed sequences — a
    block-diagonal causal mask (SDPA, eager) or the variable-length kernel (flash-attention) — so
    a packed sample's loss is the loss it has alone, whatever shares its row.

        input_ids     BOS a1 a2 BOS b1 b2 b3 PAD
        position_ids   0  1  2   0  1  2  3   0      (each padding token is a sequence of its own)
        segment       -1  0  0  -1  1  1  1  -1
    """

    pad_id: int
    max_tokens: int
    pack: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows: list[list[int]] = []
        lengths: list[int] = []
        for index, feature in enumerate(features):
            n = len(feature["input_ids"])
            if self.pack and rows and lengths[-1] + n <= self.max_tokens:
                rows[-1].append(index)
                lengths[-1] += n
            else:
                rows.append([index])
                lengths.append(n)
        length = max(lengths)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        segment = torch.full((len(rows), length), -1, dtype=torch.long)
        # packed: each sample's positions count from 0; padded: the real tokens are attended to
        where = "position_ids" if self.pack else "attention_mask"
        placement = torch.zeros((len(rows), length), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for index in row:
                ids = features[index]["input_ids"]
                input_ids[r, at : at + len(ids)] = torch.tensor(ids)
                placement[r, at : at + len(ids)] = torch.arange(len(ids)) if self.pack else 1
                for first, last in features[index]["targets"]:
                    segment[r, at + first : at + last] = index
                at += len(ids)
        batch = {"input_ids": input_ids, "segment": segment, "n_samples": torch.tensor(len(features))}
        batch[where] = placement
        if "weight" in features[0]:
            batch["weight"] = torch.tensor([f["weight"] for f in features], dtype=torch.float32)
        return batch


def cut_to_targets(feature: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """The feature with only its targets number `start` to `stop` (counted from 0, in order) left
    as targets: the tokens before them stay as context, the sequence ends after the last."""
    spans, seen = [], 0
    for first, last in feature["targets"]:
        lo, hi = max(first, first + start - seen), min(last, first + stop - seen)
        if lo < hi:
            spans.append([lo, hi])
        seen += last - first
    return feature | {"input_ids": feature["input_ids"][: spans[-1][1]], "targets": spans}


def plan_token_batches(counts: list[int], per_batch: int, n_batches: int, seed: int) -> list[list[list[int]]]:
    """`n_batches` micro-batches of exactly `per_batch` target tokens each, as [sample, first
    target, end target] lists: the samples in a seeded order (a new one for each pass over them),
    each batch filled in turn; a sample that overflows a batch is split, its rest opening the next
    batch (trained with its earlier tokens as context). So a pass trains every target token exactly
    once, and every run with the same `per_batch` and `n_batches` trains on the same number of
    target tokens, however long its samples are."""
    if not any(counts):
        raise ValueError("no sample has a target token")
    rng = random.Random(seed)
    order: list[int] = []
    carry: list[int] | None = None  # [sample, first target left]
    batches = []
    while len(batches) < n_batches:
        batch, left = [], per_batch
        while left:
            if carry is not None:
                i, begin = carry
                carry = None
            else:
                if not order:
                    order = rng.sample(range(len(counts)), len(counts))[::-1]  # popped from the end
                i, begin = order.pop(), 0
            if counts[i] == 0:
                continue
            end = min(counts[i], begin + left)
            batch.append([i, begin, end])
            left -= end - begin
            if end < counts[i]:
                carry = [i, end]
        batches.append(batch)
    return batches


@dataclass(frozen=True, slots=True)
class TokenBudgetCollator:
    """Collates planned micro-batches (`plan_token_batches`): each item names its samples and which
    of their target tokens to train on; `collator` lays them out (padded or packed)."""

    dataset: Any
    collator: TrainCollator

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = [
            cut_to_targets(self.dataset[i], start, stop)
            for item in items
            for i, start, stop in item["members"]
        ]
        return self.collator(features)


@dataclass(frozen=True, slots=True)
class TrainingSet:
    dataset: Any
    """The tokenized rows (a datasets.Dataset: input_ids, targets, weight)."""
    dropped: Counter
    """Rows with no target token, by reason."""
    batches: list | None = None
    """Token-budget micro-batches ([sample, first target, end target] lists), when
    train.target_tokens_per_batch."""
    counts: list[int] | None = None
    """Target tokens of each row (token-budget batches)."""

    def trainer_inputs(self, collator: TrainCollator) -> tuple[Any, Any]:
        """(the dataset the Trainer iterates, the collator that turns its items into batches)."""
        if self.batches is None:
            return self.dataset, collator
        return datasets.Dataset.from_dict({"members": self.batches}), TokenBudgetCollator(
            self.dataset, collator
        )

    def seen(self) -> Seen:
        """What the token-budget batches trained on, and the compute they took (None otherwise)."""
        if self.batches is None:
            return Seen()
        covered: dict[int, set[int]] = {}
        lengths = []
        for batch in self.batches:
            for i, start, stop in batch:
                covered.setdefault(i, set()).update(range(start, stop))
                lengths.append(len(cut_to_targets(self.dataset[i], start, stop)["input_ids"]))
        mean = sum(self.counts[i] for i in covered) / len(covered)
        distinct = sum(len(targets) for targets in covered.values())
        return Seen(len(covered), mean, distinct, sum(lengths), sum(n * n for n in lengths))


@dataclass(frozen=True, slots=True)
class Seen:
    samples: int | None = None
    """Distinct samples trained on."""
    mean_sample_tokens: float | None = None
    distinct_tokens: int | None = None
    positions: int | None = None
    """Positions the model processed (targets and their context), summed over micro-batches."""
    attention: int | None = None
    """Sum of squared sequence lengths: what attention costs (each packed sample attends only to itself)."""


def training_set(cfg: Config, files: list[Path], tokenizer, world_size: int) -> TrainingSet:
    """The tokenized training set, checked against the objective and the batch it must fill."""
    tcfg = cfg.train
    dataset, dropped = tokenize_dataset(
        files, tcfg.text_field, tokenizer, SamplePolicy.of(cfg.score, tokenizer, max_tokens=tcfg.max_tokens)
    )
    if dropped:
        get_logger().warning(
            f"{sum(dropped.values())} training rows have no target token and are not trained on "
            f"({format_counts(dropped)})"
        )
    if tcfg.objective == "weighted" and "weight" not in dataset.column_names:
        raise ConfigError(
            f"train.objective: 'weighted' needs a `weight` column, and {files[0]} has none "
            "(select with weights: true, or pick another objective)"
        )
    if tcfg.target_tokens_per_batch:
        counts = [sum(end - start for start, end in spans) for spans in dataset["targets"]]
        if not counts:
            raise ConfigError(f"train.data_paths: {files[0]} holds no sample with a target token")
        n_batches = tcfg.max_steps * tcfg.grad_accum * world_size
        batches = plan_token_batches(counts, tcfg.target_tokens_per_batch, n_batches, tcfg.seed)
        return TrainingSet(dataset, dropped, batches, counts)
    if len(dataset) < tcfg.batch_size * world_size:
        raise ConfigError(
            f"train.batch_size: {len(dataset)} training samples cannot fill one batch of "
            f"{tcfg.batch_size} x {world_size} rank(s)"
        )
    return TrainingSet(dataset, dropped)
