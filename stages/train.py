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
import glob
import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import set_seed

from pipeline.artifacts import digest, write_json_atomic
from pipeline.batching import pad_id_of
from pipeline.config import Config, ConfigError, is_safe_name, save_config, to_dict
from pipeline.cpu_memory import tune_cpu_malloc
from pipeline.evaluation import HeldOutSet, delta_table, held_out_records, log_delta_table
from pipeline.launcher import rank_and_world
from pipeline.layout import Layout, RunPaths, part_files
from pipeline.locks import lock
from pipeline.log import format_counts, get_logger
from pipeline.model import load_model
from pipeline.outputs import OutputError, RunMetrics, TrainSummary
from pipeline.samples import SamplePolicy
from pipeline.train_data import (
    TokenBudgetCollator,
    TrainCollator,
    cut_to_targets,
    plan_token_batches,
    tokenize_dataset,
)
from pipeline.trainer import (
    ObjectiveTrainer,
    check_packing,
    latest_checkpoint,
    resolve_precision,
    trained_tokens_at,
    training_arguments,
)


@dataclasses.dataclass(frozen=True, slots=True)
class TrainingData:
    files: list[Path]
    band: str | None
    """The selected band trained on; None for `train.data_paths`."""
    name: str


def training_data(cfg: Config, layout: Layout) -> TrainingData:
    tcfg = cfg.train
    if tcfg.data_paths:
        files = sorted({Path(f) for pattern in tcfg.data_paths for f in glob.glob(pattern)})
        if not files:
            raise ConfigError(f"train.data_paths: no file matches {', '.join(tcfg.data_paths)}")
        return TrainingData(files, None, files[0].stem)
    band = tcfg.band or cfg.select.bands[0].resolved_name()
    if not layout.band(band).manifest.is_file():
        raise ConfigError(
            f"train.band: {layout.band(band).dir} is not a finished selection; run `midrank select` first"
        )
    return TrainingData(part_files(layout.band(band).dir), band, band)


def without_resume_flag(train: dict) -> dict:
    """The train section as it decides the weights (how a resume is allowed does not)."""
    return {k: v for k, v in train.items() if k != "resume_changed_config"}


def finished_run(paths: RunPaths, cfg: Config, layout: Layout, data: TrainingData) -> bool:
    """True when this run is already trained; a different run under the same name (other train or
    model settings, or another selection of its band) is refused."""
    if not paths.metrics.is_file():
        return False
    try:
        metrics = RunMetrics.read(paths.metrics)
    except OutputError as err:
        raise ConfigError(
            f"train.name: {paths.dir} holds a run written by an older midrank ({err}); delete that "
            "directory to train it again, or give this run another name"
        ) from None
    rename = "give this one another name (train.name; compare.name for compare's runs)"
    if without_resume_flag(metrics.config["train"]) != without_resume_flag(to_dict(cfg.train)):
        raise ConfigError(f"train.name: {paths.dir} holds a run with another train config; {rename}")
    if metrics.config.get("model") != to_dict(cfg.model):
        raise ConfigError(f"train.name: {paths.dir} holds a run of another model; {rename}")
    band = layout.band(data.band).manifest if data.band else None
    if band and (not paths.selection.is_file() or paths.selection.read_bytes() != band.read_bytes()):
        raise ConfigError(
            f"train.name: {paths.dir} was trained on another selection of {data.band} (it was selected "
            f"again since); {rename}"
        )
    return True


# train settings that do not decide the weights: changing them does not make a resume another run
NOT_WEIGHTS = {"name", "band", "eval_paths", "eval_max_samples", "eval_max_tokens", "logging_steps"}
NOT_WEIGHTS |= {"save_steps", "save_total_limit", "resume_changed_config"}


def run_identity(cfg: Config, layout: Layout, data: TrainingData) -> dict[str, Any]:
    """What decides the weights a run ends with: the train and model settings, how records become
    tokens, the data (the band's manifest, or the files), and the number of ranks (the data order)."""
    band = layout.band(data.band).manifest.read_text() if data.band else None
    return {
        "train": {k: v for k, v in to_dict(cfg.train).items() if k not in NOT_WEIGHTS},
        "model": to_dict(cfg.model),
        "samples": {k: getattr(cfg.score, k) for k in ("add_bos", "prompt_format", "score_prompt")},
        "data": digest(band) if band else [str(f) for f in data.files],
        "world_size": rank_and_world()[1],
    }


def check_resumable(identity: dict[str, Any], paths: RunPaths, resume: Path | None, allow: bool) -> None:
    """A killed run resumes only as the run that made its checkpoints, unless `allow`
    (train.resume_changed_config): then the new settings apply from the checkpoint on."""
    if resume is None or allow:
        return
    try:
        made = json.loads(paths.started.read_text())
    except (OSError, ValueError):
        made = None
    if not isinstance(made, dict):
        raise ConfigError(
            f"train.resume_changed_config: {resume} was made by a run that did not record its settings "
            f"({paths.started} is missing or damaged); set train.resume_changed_config=true to resume it "
            "anyway, or give this run another name"
        )
    changed = []
    for part, value in identity.items():
        if isinstance(value, dict):
            before = made.get(part) if isinstance(made.get(part), dict) else {}
            changed += [
                f"{part}.{k}: {before.get(k)!r} -> {v!r}" for k, v in value.items() if before.get(k) != v
            ]
        elif made.get(part) != value:
            changed.append(
                "the training data (the band was selected again)"
                if part == "data"
                else f"{part}: {made.get(part)!r} -> {value!r}"
            )
    if changed:
        raise ConfigError(
            f"train.resume_changed_config: {paths.dir} was started under other settings ({'; '.join(changed)}); "
            "set train.resume_changed_config=true to resume it with the new ones, or give this run another name"
        )


def start_or_resume(plan: RunPlan, rank: int) -> Path | None:
    """The checkpoint to resume from (None: a fresh start, whose settings are recorded)."""
    plan.paths.dir.mkdir(parents=True, exist_ok=True)
    resume = latest_checkpoint(plan.paths.checkpoints)
    identity = run_identity(plan.cfg, plan.layout, plan.data)
    check_resumable(identity, plan.paths, resume, plan.cfg.train.resume_changed_config)
    if resume:
        get_logger().info(f"resuming from {resume}")
    elif rank == 0:
        write_json_atomic(plan.paths.started, identity)  # what the checkpoints will be made under
    return resume


def heldout_set(cfg: Config, tokenizer, precision: str, rank: int) -> HeldOutSet:
    """The held-out set, evaluated by rank 0 only (empty elsewhere and without train.eval_paths)."""
    tcfg = cfg.train
    records = held_out_records(cfg, tcfg.eval_paths) if tcfg.eval_paths and rank == 0 else []
    policy = SamplePolicy.of(cfg.score, tokenizer, max_tokens=tcfg.eval_max_tokens)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return HeldOutSet(
        records, tokenizer, policy, cfg.model, batch_tokens=cfg.score.batch_tokens, autocast=autocast
    )


@dataclasses.dataclass(frozen=True, slots=True)
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


@dataclasses.dataclass(frozen=True, slots=True)
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


@dataclasses.dataclass(frozen=True, slots=True)
class RunPlan:
    """What one training run is: its config, where it writes, what it trains on, in which precision."""

    cfg: Config
    layout: Layout
    paths: RunPaths
    data: TrainingData
    precision: str


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
    metrics = RunMetrics(train=summary, config=to_dict(plan.cfg))
    if before is not None:
        after = heldout.evaluate(trainer.model, "held-out after")
        metrics = dataclasses.replace(metrics, before=before, after=after, table=delta_table(before, after))
        log_delta_table(metrics.table)
    if plan.data.band is not None:
        shutil.copyfile(plan.layout.band(plan.data.band).manifest, plan.paths.selection)
    save_config(plan.cfg, plan.paths.dir)
    metrics.write(plan.paths.metrics)


def run(cfg: Config) -> Path:
    log = get_logger()
    started = time.perf_counter()
    tcfg, layout = cfg.train, Layout(cfg.out_dir)
    rank, world_size = rank_and_world()
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
        before = heldout.before(model, layout.eval_before(heldout.key)) if heldout.records else None

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
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        summary = train_summary(plan, trainer, result, resume, train_set)
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
