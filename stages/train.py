"""Train: continual training of the reference model on a selected band, evaluated before and after.

    midrank train --config configs/default.yaml                              # the default band, uniform
    midrank train --config configs/default.yaml train.objective=irdro train.kl_reg=1.0
    torchrun --nproc_per_node=2 -m stages.cli train --config configs/tiny.yaml train.gather_losses=true

Built on the Hugging Face `Trainer` (pipeline/trainer.py) with midrank's objectives
(pipeline/objectives.py) and evaluation (pipeline/evaluation.py). Writes `<out_dir>/train/<run>/`:
`model/` (save_pretrained, safetensors, with the tokenizer), `checkpoints/`, `metrics.json`
(`RunMetrics`: held-out metrics before/after per source, trained tokens, throughput),
`config.yaml`, and the `selection_manifest.json` of the band it trained on. A killed run resumes
from its latest complete checkpoint at the same step and data position; a finished one is not
retrained. The starting model's evaluation is shared by runs with the same inputs
(`train/.eval-before/<hash>.json`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import set_seed

from pipeline.artifacts import write_text_atomic
from pipeline.batching import pad_id_of
from pipeline.config import Config, ConfigError, is_safe_name, save_config
from pipeline.cpu_memory import tune_cpu_malloc
from pipeline.evaluation import HeldOutSet, delta_table, held_out_records, log_delta_table
from pipeline.launcher import check_joinable, rank_and_world
from pipeline.layout import Layout
from pipeline.locks import lock
from pipeline.log import get_logger
from pipeline.model import load_model
from pipeline.outputs import OutputError, RunMetrics, TrainSummary
from pipeline.samples import SamplePolicy
from pipeline.train_data import (
    TrainCollator,
    training_set,
)
from pipeline.train_run import RunPlan, finished_run, start_or_resume, training_data
from pipeline.trainer import (
    MarkedCheckpoints,
    ObjectiveTrainer,
    check_packing,
    resolve_precision,
    trained_tokens_at,
    training_arguments,
)


def heldout_set(cfg: Config, tokenizer, precision: str, rank: int) -> HeldOutSet:
    """The held-out set, evaluated by rank 0 only (empty elsewhere and without train.eval_paths)."""
    tcfg = cfg.train
    records = held_out_records(cfg, tcfg.eval_paths) if tcfg.eval_paths and rank == 0 else []
    policy = SamplePolicy.of(cfg.score, tokenizer, max_tokens=tcfg.eval_max_tokens)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return HeldOutSet(
        records, tokenizer, policy, cfg.model, batch_tokens=cfg.score.batch_tokens, autocast=autocast
    )


def train_summary(
    plan: RunPlan, trainer: ObjectiveTrainer, result, resume: Path | None, train_set
) -> TrainSummary:
    """The run's training numbers, target tokens summed over ranks (every rank calls this)."""
    tokens = trainer.target_tokens.clone()
    world_size = rank_and_world()[1]
    if world_size > 1:
        torch.distributed.all_reduce(tokens)
    seconds = result.metrics["train_runtime"]
    seen = train_set.seen()
    effective, held = trainer.effective.means()
    return TrainSummary(
        objective=plan.cfg.train.objective,
        steps=result.global_step,
        steps_this_run=result.global_step - (int(resume.name.split("-")[-1]) if resume else 0),
        samples_available=len(train_set.dataset),
        dropped=dict(train_set.dropped),
        trained_tokens=trainer.trained.tokens,
        target_tokens_this_run=int(tokens),
        tokens_per_second=int(tokens) / seconds if seconds else math.nan,
        runtime_s=seconds,
        final_train_loss=result.training_loss,
        precision=plan.precision,
        world_size=world_size,
        data=[str(f) for f in plan.data.files],
        samples_seen=seen.samples,
        mean_sample_tokens=seen.mean_sample_tokens,
        distinct_tokens=seen.distinct_tokens,
        positions=seen.positions,
        attention=seen.attention,
        effective_samples=effective,
        batch_samples=held,
    )


def write_results(plan: RunPlan, summary: TrainSummary, heldout: HeldOutSet, before, trainer) -> None:
    """Rank 0: the held-out evaluation after training, metrics.json (last), the band's manifest, config."""
    metrics = RunMetrics(train=summary, config=plan.cfg)
    if before is not None:
        after = heldout.evaluate(trainer.model, "held-out after")
        metrics = dataclasses.replace(metrics, before=before, after=after, table=delta_table(before, after))
        log_delta_table(metrics.table)
    if plan.data.band is not None:
        # a new file over whatever is there (a symlink, too), never written through it
        write_text_atomic(plan.paths.selection, plan.layout.band(plan.data.band).manifest.read_text())
    save_config(plan.cfg, plan.paths.dir)
    metrics.write(plan.paths.metrics)


def check_room(folder: Path, model: torch.nn.Module) -> int:
    """The bytes a run writes at least: a checkpoint (fp32 weights and AdamW's two moments) and the
    model; refused now, not at the first save, when the disk has less."""
    need = 4 * 4 * sum(p.numel() for p in model.parameters())
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(
            errno.ENOSPC, f"{free / 2**20:,.0f} MiB free, a run needs ~{need / 2**20:,.0f}", str(folder)
        )
    return need


@contextlib.contextmanager
def disk_errors_named(folder: Path, need: int) -> Iterator[None]:
    """A save that fails on a disk filled meanwhile (torch reports it as a RuntimeError) as the
    full disk it is, naming the folder."""
    try:
        yield
    except RuntimeError as err:
        if shutil.disk_usage(folder).free >= need:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)) from err


@contextlib.contextmanager
def damage_named(checkpoint: Path | None, trainer: ObjectiveTrainer) -> Iterator[None]:
    """A failure while resuming, before this run's first step, is the checkpoint's: its files are
    read then (weights, optimizer, scheduler, RNG states, configs), and a damaged one fails in
    whichever library reads it. Named, with the way out: resuming from the checkpoint before it."""
    try:
        yield
    except Exception as err:
        if checkpoint is None or trainer.trained.stepped or (isinstance(err, OSError) and err.filename):
            raise
        raise OutputError(
            f"{checkpoint}: damaged checkpoint, cannot resume from it ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}); delete it to resume from the one before, or delete "
            "the run's folder to start again"
        ) from None


def run(cfg: Config) -> Path:
    log = get_logger()
    started = time.perf_counter()
    tcfg, layout = cfg.train, Layout(cfg.out_dir)
    rank, world_size = rank_and_world()
    check_joinable(world_size)
    data = training_data(cfg, layout)
    name = tcfg.name or f"{tcfg.objective}-{data.name}"
    if not is_safe_name(name):
        raise ConfigError(
            f"train.name: the run name derived from the data, {name!r}, is not a plain name; set train.name"
        )
    paths = layout.train_run(name)
    # rank 0 holds the run's lock for the job: its other ranks are the same run
    with lock(layout, f"train-{paths.dir.name}") if rank == 0 else contextlib.nullcontext():
        if finished_run(paths, cfg, layout, data):
            log.info(f"{paths.dir}: already trained, nothing to do")
            return paths.dir
        if tcfg.gather_losses and tcfg.objective in ("uniform", "weighted"):
            log.warning(f"train.gather_losses does nothing for objective {tcfg.objective!r}")
        plan = RunPlan(cfg, layout, paths, data, resolve_precision(tcfg.precision))
        resume = start_or_resume(plan, rank)

        set_seed(tcfg.seed)
        if not torch.cuda.is_available():
            tune_cpu_malloc()
        loaded = load_model(dataclasses.replace(cfg.model, dtype="float32"))  # fp32 master weights
        model, tokenizer = loaded.model, loaded.tokenizer
        heldout = heldout_set(cfg, tokenizer, plan.precision, rank)
        before = heldout.before(model, layout.eval_before(heldout.key), layout) if heldout.records else None

        train_set = training_set(cfg, data.files, tokenizer, world_size)
        collator = TrainCollator(pad_id_of(tokenizer), tcfg.max_tokens, tcfg.pack)
        if tcfg.pack:
            check_packing(model, train_set.dataset, collator)
        train_data, train_collator = train_set.trainer_inputs(collator)
        trainer = ObjectiveTrainer(
            model=model,
            args=training_arguments(tcfg, paths.checkpoints, plan.precision),
            train_dataset=train_data,
            data_collator=train_collator,
            train_cfg=tcfg,
            trained_tokens=trained_tokens_at(resume),
        )
        trainer.add_callback(MarkedCheckpoints(layout))
        room = check_room(paths.dir, model)
        with disk_errors_named(paths.dir, room), damage_named(resume, trainer):
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            summary = train_summary(plan, trainer, result, resume, train_set)
            plan.layout.check_all_inside(plan.layout.make_dir(paths.model))  # saves follow links
            trainer.save_model(str(paths.model))
        if rank == 0:  # results, evaluation and the summary come from one rank
            tokenizer.save_pretrained(paths.model)
            write_results(plan, summary, heldout, before, trainer)
            log.info(
                f"trained {summary.steps_this_run} step(s) ({tcfg.objective}) on {len(train_set.dataset):,} samples, "
                f"{summary.target_tokens_this_run:,} target tokens this run at {summary.tokens_per_second:,.0f} "
                f"tok/s, {summary.trained_tokens:,} trained on in all, {time.perf_counter() - started:.1f}s -> {paths.model}"
            )
        if world_size > 1:
            # other ranks wait for rank 0's evaluation: a rank that exits while the process group is
            # alive aborts the whole job
            torch.distributed.barrier()
            # gloo's worker thread frees the finished collectives' tensors, which takes the GIL;
            # tearing the group down with the GIL held before it has done so deadlocks (seen once
            # in CI, in ~ProcessGroupGloo joining that thread): give it the GIL for a moment
            time.sleep(0.2)
            torch.distributed.destroy_process_group()
        return paths.dir
