"""The first run on a GPU, prepared: the scorer's throughput, MFU and memory on a ~1B Llama, and
its losses checked, in one table. `bench/gpu_check.sh` runs it under a time limit.

    .venv/bin/python bench/gpu_check.py                    # on a GPU: a random ~1.1B Llama in bf16
    .venv/bin/python bench/gpu_check.py --compile          # and once more through torch.compile
    .venv/bin/python bench/gpu_check.py --tiny             # a seconds-long run on the CPU (CI)

Needs nothing but the project's `.venv`: the model is a randomly initialised Llama (TinyLlama-1.1B's
shape, SmolLM2's vocabulary size) and the documents are random token ids of varied lengths, so no
model, corpus or tokenizer is read. They go through the score stage's own batching (length-sorted
token-budget batches, `pipeline/batching.py`) and kernel (`pipeline/nll.py`) with the attention
implementation the README recommends (`sdpa`).

Prints: tokens/s (target tokens), MFU (2 x parameters x tokens/s against the device's measured
dense matmul peak in the same dtype), peak device memory, and the largest difference between a
few samples' losses scored alone and inside a padded batch (must be within the dtype's tolerance,
else the exit status is 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_score import matmul_peak  # noqa: E402  (this script's folder is on the path)

from pipeline.batching import collate, pack_batches  # noqa: E402
from pipeline.nll import BudgetedScorer, NLLScorer  # noqa: E402
from pipeline.samples import Sample  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocabulary
    "1b": (2048, 5632, 22, 32, 4, 49152),
    "tiny": (64, 128, 2, 4, 2, 1024),
}
TOLERANCE = {torch.bfloat16: 0.05, torch.float32: 1e-4}  # nats/token, alone against batched


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_llama(shape: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv_heads, vocab = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def documents(count: int, max_tokens: int, vocab: int) -> list[Sample]:
    """Random ids, lengths log-normal around a fifth of max_tokens and cut to it, as a web corpus."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(max_tokens / 5), 1.0, count).astype(int), 8, max_tokens)
    return [
        Sample(
            f"doc{i}",
            "random",
            0,
            rng.integers(1, vocab, n).tolist(),
            ((1, int(n)),),
            0,
            0,
            0,
            0,
            False,
            n_markup_bytes=0,
            n_mojibake=0,
        )
        for i, n in enumerate(lengths)
    ]


def score(scorer: BudgetedScorer, samples: list[Sample], batch_tokens: int) -> tuple[dict[str, float], int]:
    """Each sample's mean loss, and the target tokens scored."""
    losses, tokens = {}, 0
    for batch in pack_batches(sorted(samples, key=lambda s: -len(s.input_ids)), batch_tokens):
        out = scorer(collate(batch, pad_id=0))
        for sample, nll, n in zip(batch, out[0], out[1], strict=False):
            losses[sample.sample_id] = nll / n
            tokens += int(n)
    return losses, tokens


def timed(scorer, samples, batch_tokens, device) -> tuple[dict[str, float], int, float]:
    sync(device)
    started = time.perf_counter()
    losses, tokens = score(scorer, samples, batch_tokens)
    sync(device)
    return losses, tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU in fp32 (CI)")
    parser.add_argument("--compile", action="store_true", help="also score through torch.compile")
    parser.add_argument("--docs", type=int, default=0, help="documents (default: 2,000; --tiny: 24)")
    parser.add_argument("--max-tokens", type=int, default=0, help="default: 1,024; --tiny: 64")
    parser.add_argument("--batch-tokens", type=int, default=0, help="default: 65,536; --tiny: 512")
    args = parser.parse_args()
    tiny = args.tiny
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    if not tiny and device.type != "cuda":
        sys.exit("gpu_check: no CUDA device here; --tiny runs the check on the CPU")
    dtype = torch.float32 if tiny else torch.bfloat16
    docs = args.docs or (24 if tiny else 2000)
    max_tokens = args.max_tokens or (64 if tiny else 1024)
    batch_tokens = args.batch_tokens or (512 if tiny else 65536)
    shape = "tiny" if tiny else "1b"

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = matmul_peak(dtype, 256 if tiny else 8192, device)
    model = random_llama(shape, dtype, device)
    params = sum(p.numel() for p in model.parameters())
    samples = documents(docs, max_tokens, SHAPES[shape][-1])
    kernel = NLLScorer(model, count_correct=False)  # as the score stage builds it
    scorer = BudgetedScorer(kernel, batch_tokens)
    scorer.probe_worst_batch(max_tokens, SHAPES[shape][-1])  # the largest shape first, as the stage does
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    losses, tokens, seconds = timed(scorer, samples, batch_tokens, device)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    alone = {s.sample_id: score(scorer, [s], batch_tokens)[0][s.sample_id] for s in samples[:4]}
    worst = max(abs(alone[k] - losses[k]) for k in alone)

    # printed as it goes: a compile cut short by the time limit leaves the eager figures standing
    print(
        f"# bench/gpu_check.py — {name}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}, sdpa"
    )
    print(
        f"model: random Llama, {params / 1e6:,.1f}M parameters; {docs:,} documents, {tokens:,} target "
        f"tokens, max_tokens {max_tokens:,}, batch_tokens {batch_tokens:,}"
    )
    print(f"matmul peak (measured): {peak / 1e9:,.0f} GFLOP/s")
    print(f"peak device memory: {memory:.1f} GiB" if device.type == "cuda" else "peak device memory: (CPU)")
    print(
        f"alone vs in a padded batch, 4 samples: max |Δloss| {worst:.2e} nats/token (tolerance {TOLERANCE[dtype]})"
    )
    print(f"{'run':30s} {'tokens/s':>10s} {'MFU':>6s} {'seconds':>8s}")
    row("eager", tokens / seconds, seconds, params, peak)
    if args.compile:
        kernel.compile()
        _, _, warmup = timed(scorer, samples, batch_tokens, device)  # compiles the shapes it meets
        compiled, tokens, seconds = timed(scorer, samples, batch_tokens, device)
        row(f"compiled (first pass {warmup:.0f}s)", tokens / seconds, seconds, params, peak)
        moved = max(abs(compiled[k] - losses[k]) for k in losses)
        print(f"compiled against eager: max |Δloss| {moved:.2e} nats/token over {len(losses):,} documents")
    if not worst <= TOLERANCE[dtype]:
        sys.exit("gpu_check: a sample's loss alone and inside a padded batch differ beyond the tolerance")


def row(label: str, rate: float, seconds: float, params: int, peak: float) -> None:
    print(f"{label:30s} {rate:10,.0f} {2 * params * rate / peak:6.1%} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
