"""Training data: a selected band (or any Parquet/JSONL with a text field) as token sequences, and
the collator that pads or packs them with a per-token sample index.

    dataset, dropped = tokenize_dataset(files, "text", tokenizer, max_tokens=512, bos_id=1)
    batch = TrainCollator(pad_id=0, max_tokens=512, pack=False)(features)
    batch["segment"]   # (rows, length): the feature index of each target token, -1 elsewhere
    batch["n_samples"] # len(features): with packing there are fewer rows than samples

Sequences are built as in scoring (pipeline/samples.py): the tokenizer's BOS, when it has one, is
prepended as context; the text is truncated to `max_tokens`. Tokenization runs through
`datasets.map`, so it is cached on disk and memory-mapped rather than held in Python lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from pipeline.config import ConfigError


def load_rows(files: list[Path], text_field: str) -> datasets.Dataset:
    """Parquet or JSONL files as one dataset; the text field must be there."""
    suffixes = {f.suffix for f in files}
    if suffixes <= {".parquet"}:
        dataset = datasets.Dataset.from_parquet([str(f) for f in files])
    elif suffixes <= {".jsonl", ".json"}:
        dataset = datasets.Dataset.from_json([str(f) for f in files])
    else:
        raise ConfigError(f"train.data_paths: Parquet or JSONL files only, got {', '.join(sorted(suffixes))}")
    if text_field not in dataset.column_names:
        raise ConfigError(
            f"train.text_field: {files[0]} has no {text_field!r} column (columns: {', '.join(dataset.column_names)})"
        )
    return dataset


def tokenize_dataset(
    files: list[Path], text_field: str, tokenizer, *, max_tokens: int, bos_id: int | None
) -> tuple[datasets.Dataset, int]:
    """(dataset with `input_ids` and, when present, `weight` and `source`; rows dropped as too short)."""
    rows = load_rows(files, text_field)
    keep = [c for c in ("weight", "source") if c in rows.column_names]
    prefix = [] if bos_id is None else [bos_id]

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        encoded = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        return {"input_ids": [(prefix + ids)[:max_tokens] for ids in encoded]}

    tokenized = rows.map(
        encode,
        batched=True,
        remove_columns=[c for c in rows.column_names if c not in keep],
        desc="tokenizing",
    )
    usable = tokenized.filter(lambda ids: len(ids) >= 2, input_columns="input_ids", desc="dropping too_short")
    return usable, len(tokenized) - len(usable)


@dataclass(frozen=True, slots=True)
class TrainCollator:
    """Features -> padded rows. Without packing each sample has its own row; with packing samples
    are placed in order into rows of at most `max_tokens`. A sample's first token (its BOS, or its
    first text token) is context only, so a packed sample never predicts across a boundary."""

    pad_id: int
    max_tokens: int
    pack: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows: list[list[int]] = []
        for index, feature in enumerate(features):
            n = len(feature["input_ids"])
            if self.pack and rows and len(rows[-1]) + n <= self.max_tokens:
                rows[-1].append(index)
            else:
                rows.append([index])
        length = max(sum(len(features[i]["input_ids"]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        segment = torch.full((len(rows), length), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for index in row:
                ids = features[index]["input_ids"]
                input_ids[r, at : at + len(ids)] = torch.tensor(ids)
                attention_mask[r, at : at + len(ids)] = 1
                segment[r, at + 1 : at + len(ids)] = index
                at += len(ids)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "segment": segment,
            "n_samples": torch.tensor(len(features)),
        }
        if "weight" in features[0]:
            batch["weight"] = torch.tensor([f["weight"] for f in features], dtype=torch.float32)
        return batch
