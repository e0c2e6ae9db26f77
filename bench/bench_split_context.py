"""How far a split window's loss is from the whole document's, by the context it gets.

    .venv/bin/python bench/bench_split_context.py                     # SmolLM2-135M, 24 long documents
    .venv/bin/python bench/bench_split_context.py --model data/models/tiny \
        --corpus data/corpus-tiny/train.jsonl --docs 2 --min-tokens 100 --max-tokens 64 --contexts 1,16,48

Under `score.long_docs: split`, a window sees at most the C tokens before its targets
(`score.split_context_tokens`); the first windows, whose context reaches the document's start,
see all of it. For each long document this scores the whole document in one pass (fp32, BOS
first) and every window of `split_windows` the way the scorer does. Windows that see the whole
prefix must equal the document over their targets (checked; exit 1 otherwise); for the others it
prints, per C, the window loss minus the whole-document loss over the same targets (nats/token):
the price of a bounded context. It also tries those windows with a BOS in place of their first
context token, to see whether a BOS at the window start helps. Needs `make data model` for the
default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.codec import parse_json  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.samples import split_windows

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="data/models/smollm2-135m")
    parser.add_argument("--corpus", default="data/corpus/train.jsonl")
    parser.add_argument("--docs", type=int, default=24, help="documents (file order) of the length range")
    parser.add_argument("--min-tokens", type=int, default=900, help="shortest document used (tokens)")
    parser.add_argument("--max-doc-tokens", type=int, default=2000, help="longest document used (tokens)")
    parser.add_argument("--max-tokens", type=int, default=256, help="score.max_tokens of the windows")
    parser.add_argument("--contexts", default="1,64,192", help="split_context_tokens values to compare")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if not all(1 <= c < args.max_tokens for c in contexts):
        parser.error(f"--contexts: each must be within [1, max_tokens - 1], got {args.contexts}")
    for path in (args.model, args.corpus):
        if not Path(path).exists():
            sys.exit(f"{path} is missing: run `make data model` first")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    bos = tokenizer.bos_token_id
    documents = []
    with Path(args.corpus).open(encoding="utf-8") as lines:
        for line in lines:
            ids = [
                bos,
                *tokenizer(
                    parse_json(line, args.corpus, ValueError)["text"], add_special_tokens=False
                ).input_ids,
            ]
            if args.min_tokens < len(ids) <= args.max_doc_tokens:
                documents.append(ids)
            if len(documents) == args.docs:
                break

    def token_nll(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        return F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")

    if not documents:
        sys.exit(f"no document of {args.min_tokens}-{args.max_doc_tokens} tokens in {args.corpus}")
    whole = [token_nll(ids) for ids in documents]  # whole[d][j - 1]: token j given all before it
    print(
        f"# bench/bench_split_context.py — {Path(args.model).name}, fp32, {len(documents)} documents of "
        f"{args.min_tokens}-{args.max_doc_tokens} tokens, windows of max_tokens {args.max_tokens}"
    )
    print(
        f"{'context C':>9s} {'window start':>13s} {'windows':>8s} {'mean error':>11s} {'mean |error|':>13s} {'max |error|':>12s}"
    )
    for context in contexts:
        errors: dict[str, list[float]] = {"C tokens": [], "BOS + C-1": []}
        for ids, reference in zip(documents, whole, strict=True):
            for start, first, end in split_windows(len(ids), args.max_tokens, context):
                target = reference[first - 1 : end - 1].sum().item()
                if start == 0:  # sees the whole prefix: must score as the document does
                    nll = token_nll(ids[:end])[first - 1 :].sum().item()
                    if abs(nll - target) > 1e-3 * (end - first):
                        sys.exit(
                            f"a window that sees the whole prefix differs from the document: {nll} vs {target}"
                        )
                    continue
                for name, window in (
                    ("C tokens", ids[start:end]),
                    ("BOS + C-1", [bos, *ids[start + 1 : end]]),
                ):
                    nll = token_nll(window)[first - start - 1 :].sum().item()
                    errors[name].append((nll - target) / (end - first))
        for name, values in errors.items():
            if not values:
                print(f"{context:9d} {name:>13s} {0:8d}  (no window without the whole prefix)")
                continue
            t = torch.tensor(values)
            print(
                f"{context:9d} {name:>13s} {len(values):8d} {t.mean().item():+11.4f} "
                f"{t.abs().mean().item():13.4f} {t.abs().max().item():12.4f}"
            )


if __name__ == "__main__":
    main()
