"""Build the tiny preset's inputs (configs/tiny.yaml): a small corpus and a random 2-layer Llama with
a byte-level BPE tokenizer trained on that corpus. Seconds on a CPU, no download.

    python -m data.build_tiny --corpus-out data/corpus-tiny --model-out data/models/tiny

The model's losses mean nothing about data quality; it exists so that every code path (batching,
masking, sharding, training) runs quickly in tests and CI. `build_tiny_model` is also what the
tests call to make their own model in a temporary directory.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from data import build_corpus
from pipeline.codec import parse_json

SPECIAL = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
    )


def save_random_llama(
    tokenizer,
    out: Path,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    tied: bool,
    seed: int = 0,
) -> Path:
    """A randomly initialised Llama sized for `tokenizer`, saved with it to `out`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_model(texts: Iterable[str], out: Path, vocab_size: int = 2048, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 64) and a BPE tokenizer trained on `texts`, saved to `out`."""
    tokenizer = train_tokenizer(texts, vocab_size)
    return save_random_llama(
        tokenizer, out, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, tied=False, seed=seed
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-out", type=Path, default=Path("data/corpus-tiny"))
    parser.add_argument("--model-out", type=Path, default=Path("data/models/tiny"))
    parser.add_argument("--per-source", type=int, default=40)
    args = parser.parse_args()
    # The tiny corpus needs no Debian package: whatever sources are present are used.
    build_corpus.build(
        args.corpus_out,
        args.per_source,
        4000,
        build_corpus.SOURCES,
        install=False,
        allow_missing=True,
        ood_per_source=10,
    )
    with (args.corpus_out / "train.jsonl").open(encoding="utf-8") as fh:
        texts = [parse_json(line, str(fh.name), ValueError)["text"] for line in fh]
    tmp = args.model_out.with_name(args.model_out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(texts, tmp)
    shutil.rmtree(args.model_out, ignore_errors=True)
    tmp.rename(args.model_out)
    print(f"[build_tiny] wrote {args.corpus_out} and {args.model_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
