"""Held-out evaluation: loss, perplexity and next-token accuracy, overall and per source.

    metrics = evaluate(model, tokenizer, records, policy=SamplePolicy.of(cfg.score, tokenizer, max_tokens=512),
                       batch_tokens=8192)
    metrics["overall"]   # {"samples", "tokens", "loss", "perplexity", "accuracy"}
    metrics["per_source"]["man"]

It runs the scoring kernel (pipeline/nll.py), so held-out losses are computed exactly as the scores
were: BOS as context, fp32 log-softmax, no padding in any number. Loss is token-weighted (summed NLL
over summed target tokens); accuracy is the share of targets that are the model's argmax.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from tqdm import tqdm

from pipeline.batching import collate, pack_batches
from pipeline.nll import NLLScorer
from pipeline.records import Record
from pipeline.samples import SamplePolicy, make_samples


def _metrics(nll: float, tokens: int, correct: int, samples: int) -> dict[str, Any]:
    loss = nll / tokens if tokens else float("nan")
    return {
        "samples": samples,
        "tokens": tokens,
        "loss": loss,
        "perplexity": math.exp(loss) if tokens else float("nan"),
        "accuracy": correct / tokens if tokens else float("nan"),
    }


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    records: Iterable[Record],
    *,
    policy: SamplePolicy,
    batch_tokens: int,
    autocast_dtype: torch.dtype | None = None,
    desc: str = "evaluating",
) -> dict[str, Any]:
    samples = [s for r in records for s in make_samples(r, tokenizer, policy)[0]]
    samples.sort(key=lambda s: -len(s.input_ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scorer = NLLScorer(model)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0, 0])
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast, tqdm(total=sum(s.n_tokens for s in samples), unit="tok", desc=desc, disable=None) as bar:
        for batch in pack_batches(samples, batch_tokens):
            out = scorer(**collate(batch, pad_id))
            rows = torch.stack([out.nll_sum, out.n_tokens.double(), out.n_correct.double()]).cpu().tolist()
            for sample, nll, tokens, correct in zip(batch, *rows, strict=True):
                total = totals[sample.source]
                total[0] += nll
                total[1] += int(tokens)
                total[2] += int(correct)
                total[3] += 1
            bar.update(int(sum(rows[1])))
    model.train(was_training)
    per_source = {source: _metrics(*totals[source]) for source in sorted(totals)}
    overall = [sum(t[i] for t in totals.values()) for i in range(4)]
    return {"overall": _metrics(*overall), "per_source": per_source}
