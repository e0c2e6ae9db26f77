"""Held-out evaluation: loss, perplexity and next-token accuracy, overall and per source.

    metrics = evaluate(model, tokenizer, records, policy=SamplePolicy.of(cfg.score, tokenizer, max_tokens=512),
                       batch_tokens=8192)
    losses = sample_losses(model, tokenizer, records, policy=..., batch_tokens=8192)  # per sample, in order
    metrics.overall      # SplitMetrics: samples, tokens, loss, perplexity, accuracy
    metrics.per_source["man"]

It runs the scoring kernel (pipeline/nll.py), so held-out losses are computed exactly as the scores
were: BOS as context, fp32 log-softmax, no padding in any number. Loss is token-weighted (summed NLL
over summed target tokens); accuracy is the share of targets that are the model's argmax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.artifacts import digest
from pipeline.batching import collate, pack_batches, pad_id_of
from pipeline.config import Config, ModelConfig
from pipeline.layout import Layout
from pipeline.log import get_logger
from pipeline.model import fingerprint, hash_files
from pipeline.nll import UNPADDED_MODEL_TYPES, NLLScorer
from pipeline.outputs import DeltaRow, Evaluation, OutputError, SplitMetrics
from pipeline.records import ReadStats, Record
from pipeline.samples import SamplePolicy, make_samples
from pipeline.sharding import iter_corpus, plan_shards


def _metrics(nll: float, tokens: int, correct: int, samples: int) -> SplitMetrics:
    loss = nll / tokens if tokens else float("nan")
    return SplitMetrics(
        samples=samples,
        tokens=tokens,
        loss=loss,
        perplexity=math.exp(loss) if tokens else float("nan"),
        accuracy=correct / tokens if tokens else float("nan"),
    )


def held_out_records(cfg: Config, paths: tuple[str, ...]) -> list[Record]:
    """The records of evaluation files, read like the corpus, the first train.eval_max_samples."""
    corpus = dataclasses.replace(cfg.corpus, paths=tuple(paths), num_shards=1)
    records = list(iter_corpus(plan_shards(corpus), corpus, ReadStats()))
    return records[: cfg.train.eval_max_samples] if cfg.train.eval_max_samples else records


@dataclasses.dataclass(frozen=True, slots=True)
class SampleLoss:
    """One held-out sample's summed NLL, target tokens and correct next-token guesses."""

    sample_id: str
    source: str
    nll: float
    tokens: int
    correct: int


def sample_losses(
    model: torch.nn.Module,
    tokenizer,
    records: Iterable[Record],
    *,
    policy: SamplePolicy,
    batch_tokens: int,
    autocast_dtype: torch.dtype | None = None,
    desc: str = "evaluating",
) -> list[SampleLoss]:
    """Every sample of `records` scored by `model`, in the records' order."""
    samples = [s for r in records for s in make_samples(r, tokenizer, policy)[0]]
    pad_id = pad_id_of(tokenizer)
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scorer = NLLScorer(model)
    losses: list[SampleLoss | None] = [None] * len(samples)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    position = {id(samples[i]): i for i in order}
    with autocast, tqdm(total=sum(s.n_tokens for s in samples), unit="tok", desc=desc, disable=None) as bar:
        for batch in pack_batches([samples[i] for i in order], batch_tokens):
            out = scorer(**collate(batch, pad_id))
            rows = torch.stack([out.nll_sum, out.n_tokens.double(), out.n_correct.double()]).cpu().tolist()
            for sample, nll, tokens, correct in zip(batch, *rows, strict=True):
                losses[position[id(sample)]] = SampleLoss(
                    sample.sample_id, sample.source, nll, int(tokens), int(correct)
                )
            bar.update(int(sum(rows[1])))
    model.train(was_training)
    return losses


def summarize(losses: list[SampleLoss]) -> Evaluation:
    """Loss, perplexity and accuracy overall and per source, token-weighted."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0, 0])
    for loss in losses:
        total = totals[loss.source]
        total[0] += loss.nll
        total[1] += loss.tokens
        total[2] += loss.correct
        total[3] += 1
    per_source = {source: _metrics(*totals[source]) for source in sorted(totals)}
    overall = [sum(t[i] for t in totals.values()) for i in range(4)]
    return Evaluation(overall=_metrics(*overall), per_source=per_source)


def evaluate(model: torch.nn.Module, tokenizer, records: Iterable[Record], **kwargs) -> Evaluation:
    """`summarize(sample_losses(...))`: the held-out metrics of `model`."""
    return summarize(sample_losses(model, tokenizer, records, **kwargs))


def evaluation_key(model: ModelConfig, records: list[Record], policy: SamplePolicy, autocast: Any) -> str:
    """A hash of everything a held-out evaluation of `model`'s starting weights depends on: the
    weights, tokenizer and model config, the attention kernel (and which architectures are scored
    unpadded), the records, how they become tokens, and the autocast dtype. Runs that share it
    share the evaluation."""
    key = {
        "model": fingerprint(model),
        "model_config": hash_files([Path(model.path) / "config.json"]),
        "attention": model.attn_implementation,
        "unpadded": sorted(UNPADDED_MODEL_TYPES),  # the padded and packed paths differ by rounding
        "records": digest([(r.sample_id, r.source, r.text, r.prompt, r.messages) for r in records]),
        "policy": dataclasses.asdict(policy),
        "autocast": str(autocast),
    }
    return digest(key)[:24]


def delta_table(before: Evaluation, after: Evaluation) -> list[DeltaRow]:
    """Per source, then overall: held-out loss and accuracy before and after, and the change."""
    pairs = [(s, before.per_source[s], after.per_source[s]) for s in before.per_source]
    pairs.append(("overall", before.overall, after.overall))
    return [
        DeltaRow(
            source=name,
            tokens=b.tokens,
            loss_before=b.loss,
            loss_after=a.loss,
            delta=a.loss - b.loss,
            accuracy_before=b.accuracy,
            accuracy_after=a.accuracy,
        )
        for name, b, a in pairs
    ]


def log_delta_table(rows: list[DeltaRow]) -> None:
    log = get_logger()
    log.info(
        f"  {'held-out':20s} {'tokens':>9s} {'loss before':>11s} {'after':>8s} {'delta':>8s} {'acc before':>10s} {'after':>7s}"
    )
    for r in rows:
        log.info(
            f"  {r.source[:20]:20s} {r.tokens:9,d} {r.loss_before:11.4f} {r.loss_after:8.4f} "
            f"{r.delta:+8.4f} {r.accuracy_before:10.2%} {r.accuracy_after:7.2%}"
        )


class HeldOutSet:
    """The held-out records and how they are evaluated, with the starting model's evaluation
    kept at a path named by `key` (a hash of its inputs) and shared by every run with the same inputs."""

    def __init__(
        self, records: list[Record], tokenizer, policy: SamplePolicy, model_cfg: ModelConfig, **kwargs
    ):
        self.records, self.tokenizer, self.policy = records, tokenizer, policy
        self.batch_tokens, self.autocast = kwargs["batch_tokens"], kwargs["autocast"]
        self.key = evaluation_key(model_cfg, records, policy, self.autocast) if records else None

    def evaluate(self, model, desc: str) -> Evaluation:
        return evaluate(
            model,
            self.tokenizer,
            self.records,
            policy=self.policy,
            batch_tokens=self.batch_tokens,
            autocast_dtype=self.autocast,
            desc=desc,
        )

    def before(self, model, path: Path, layout: Layout) -> Evaluation:
        """The starting model's evaluation: read from `path`, or computed and written there. Call it
        before training starts: `model` must be the starting model."""
        try:
            return Evaluation.read(path)
        except OutputError:  # not there yet, or written by another version: compute it again
            evaluation = self.evaluate(model, "held-out before")
            layout.make_dir(path.parent)
            evaluation.write(path)
            return evaluation
