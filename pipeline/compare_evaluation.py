"""How compare evaluates a model: per-document losses on the held-out and out-of-distribution sets
and per-item answers on the tasks, loaded in compare.eval_dtype, cached under the report by the
weights and every input they depend on.

    evaluation = cached_evaluation(cfg, model_dir, "midranking-seed0", timer.timed)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.artifacts import digest
from pipeline.comparison import CachedEvaluation, DocumentLosses, ModelEval, TaskItems
from pipeline.config import Config, to_dict
from pipeline.downstream import evaluate_tasks
from pipeline.evaluation import held_out_records, sample_losses
from pipeline.layout import Layout
from pipeline.log import get_logger
from pipeline.model import fingerprint, hash_files, load_model
from pipeline.outputs import OutputError
from pipeline.samples import SamplePolicy


def evaluate_model(cfg: Config, model_dir: Path, label: str) -> ModelEval:
    """Per-document losses and per-item task correctness of one model, loaded in compare.eval_dtype."""
    c, tcfg = cfg.compare, cfg.train
    loaded = load_model(dataclasses.replace(cfg.model, path=str(model_dir), dtype=c.eval_dtype))
    model, tokenizer = loaded.model, loaded.tokenizer
    policy = SamplePolicy.of(cfg.score, tokenizer, max_tokens=tcfg.eval_max_tokens)

    def losses(paths: tuple[str, ...], what: str) -> DocumentLosses:
        rows = sample_losses(
            model,
            tokenizer,
            held_out_records(cfg, paths),
            policy=policy,
            batch_tokens=cfg.score.batch_tokens,
            desc=f"{label}: {what}",
        )
        return DocumentLosses([r.nll for r in rows], [r.tokens for r in rows], [r.source for r in rows])

    heldout = losses(tcfg.eval_paths, "held-out loss")
    ood = losses(c.ood_paths, "out-of-distribution loss") if c.ood_paths else None
    tasks = {}
    if c.tasks or c.hub_tasks:
        scores = evaluate_tasks(
            model,
            tokenizer,
            local=[Path(p) for p in c.tasks],
            hub=list(c.hub_tasks),
            batch_size=c.task_batch_size,
            limit=c.task_limit or None,
        )
        tasks = {name: TaskItems(s.items, s.nll, s.chars) for name, s in scores.items()}
    return ModelEval(heldout, ood, tasks)


def evaluation_inputs(cfg: Config) -> dict[str, Any]:
    """What an evaluation depends on besides the model: the sets, the tasks, how they are read."""
    c, tcfg = cfg.compare, cfg.train
    keys = ("eval_paths", "eval_max_tokens", "eval_max_samples")
    files = [*tcfg.eval_paths, *c.ood_paths, *c.tasks]
    return {
        "train": {k: to_dict(tcfg)[k] for k in keys},
        "compare": {
            k: to_dict(c)[k] for k in ("ood_paths", "tasks", "hub_tasks", "task_limit", "eval_dtype")
        },
        "files": {f: hash_files([Path(f)]) for f in files},
        "samples": {
            k: getattr(cfg.score, k) for k in ("add_bos", "prompt_format", "score_prompt", "long_docs")
        },
    }


def cached_evaluation(cfg: Config, model_dir: Path, label: str, timed: Callable) -> ModelEval:
    """The model's evaluation, read from `evals/<label>.json` when it was made of the same weights
    and inputs, else computed (through `timed(part, fn, *args)`, which counts its time) and
    written there."""
    layout = Layout(cfg.out_dir)
    path = layout.report(cfg.compare.name).evaluation(label)
    weights = fingerprint(dataclasses.replace(cfg.model, path=str(model_dir)))["weights_sha256"]
    key = digest({"weights": weights, "inputs": evaluation_inputs(cfg)})
    try:
        stored = CachedEvaluation.read(path)
        if stored.key == key:
            return stored.evaluation
    except OutputError:  # not there, damaged, or of an older midrank
        pass
    started = time.perf_counter()
    evaluation = timed("evaluate", evaluate_model, cfg, model_dir, label)
    get_logger().info(f"compare: evaluated {label} in {time.perf_counter() - started:.0f}s")
    layout.make_dir(path.parent)
    CachedEvaluation(key=key, evaluation=evaluation).write(path)
    return evaluation
