"""Train: continual training of the reference model on a selected band, evaluated before and after.

    midrank train --config configs/default.yaml                              # the default band, uniform
    midrank train --config configs/default.yaml train.objective=irdro train.kl_reg=1.0
    torchrun --nproc_per_node=2 -m pipeline.cli train --config configs/tiny.yaml train.gather_losses=true

Built on the Hugging Face `Trainer` (torchrun/accelerate data parallelism, gradient accumulation,
mixed precision, FSDP/DeepSpeed pass-through, checkpoints with optimizer, scheduler, RNG and data
position); midrank adds the objectives (pipeline/objectives.py) and the evaluation. Writes
`<out_dir>/train/<run>/`: `model/` (save_pretrained, safetensors, with the tokenizer),
`checkpoints/`, `metrics.json` (held-out metrics before/after per source, training throughput),
`config.yaml`, and the `selection_manifest.json` of the band it trained on. A killed run resumes
from its latest complete checkpoint at the same step and data position; a finished one is not
retrained.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import digest, write_json_atomic
from pipeline.config import Config, ConfigError, save_config, to_dict
from pipeline.evaluation import evaluate
from pipeline.log import get_logger
from pipeline.model import cpu_supports_bf16, fingerprint, hash_files, load_model, tune_cpu_malloc
from pipeline.objectives import objective_loss, packing_isolates, per_sample_losses, token_nll
from pipeline.ranks import rank_and_world
from pipeline.records import ReadStats
from pipeline.samples import SamplePolicy
from pipeline.sharding import iter_corpus, plan_shards
from pipeline.train_data import TrainCollator, tokenize_dataset


def training_files(cfg: Config) -> tuple[list[Path], Path | None, str]:
    """(files, the selection manifest when training on a band, a short name of the data)."""
    tcfg = cfg.train
    if tcfg.data_paths:
        files = sorted({Path(f) for pattern in tcfg.data_paths for f in glob.glob(pattern)})
        if not files:
            raise ConfigError(f"train.data_paths: no file matches {', '.join(tcfg.data_paths)}")
        return files, None, files[0].stem
    band = tcfg.band or cfg.select.bands[0].resolved_name()
    band_dir = Path(cfg.out_dir) / "selected" / band
    if not (band_dir / "manifest.json").is_file():
        raise ConfigError(f"train.band: {band_dir} is not a finished selection; run `midrank select` first")
    return sorted(band_dir.glob("part-*.parquet")), band_dir / "manifest.json", band


def resolve_precision(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint the Trainer finished: trainer_state.json is the last file it writes."""

    def complete(path: Path) -> bool:
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return False
        return True

    found = [p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and complete(p)]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def heldout_records(cfg: Config) -> list:
    tcfg = cfg.train
    corpus = dataclasses.replace(cfg.corpus, paths=tcfg.eval_paths, num_shards=1)
    records = list(iter_corpus(plan_shards(corpus), corpus, ReadStats()))
    return records[: tcfg.eval_max_samples] if tcfg.eval_max_samples else records


def before_evaluation_path(cfg: Config, heldout: list, eval_kwargs: dict[str, Any]) -> Path:
    """Where the starting model's held-out metrics are kept, shared by every run under out_dir
    that starts from the same weights and evaluates the same records the same way (compare's
    arms, reruns under new names): the name is a hash of exactly those inputs."""
    key = {
        "model": fingerprint(cfg.model),
        "model_config": hash_files([Path(cfg.model.path) / "config.json"]),
        "attention": cfg.model.attn_implementation,
        "records": digest([(r.sample_id, r.source, r.text, r.prompt, r.messages) for r in heldout]),
        "policy": dataclasses.asdict(eval_kwargs["policy"]),
        "autocast": str(eval_kwargs["autocast_dtype"]),
    }
    return Path(cfg.out_dir) / "train" / ".eval-before" / f"{digest(key)[:24]}.json"


def make_trainer_class():
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ExportableState

    class TrainedTokens(TrainerCallback, ExportableState):
        """Target tokens the objective trained on (for midranking_online, the band's only), summed
        over ranks and steps. Saved in each checkpoint's trainer_state.json, so a resumed run
        continues the count rather than restarting it."""

        def __init__(self, tokens: int = 0):
            self.tokens = tokens
            self.pending: torch.Tensor | None = None  # this rank's count since the last step

        def add(self, tokens: torch.Tensor) -> None:
            self.pending = tokens if self.pending is None else self.pending + tokens

        def on_step_end(self, args, state, control, **kwargs):
            # one all-reduce per optimizer step, beside DDP's gradient all-reduce; every rank has
            # run the same number of micro-batches (drop_last), so every rank gets here
            step = torch.zeros((), dtype=torch.long) if self.pending is None else self.pending.detach()
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                step = step.clone()
                torch.distributed.all_reduce(step)
            self.tokens += int(step)
            self.pending = None

        def state(self) -> dict:
            return {"args": {"tokens": self.tokens}, "attributes": {}}

    class ObjectiveTrainer(Trainer):
        """The Trainer with midrank's per-sample objectives as its loss."""

        loss_is_scaled_for_ga = False  # each micro-batch's objective is a mean; the Trainer averages

        def __init__(self, *args, train_cfg, trained_tokens: int = 0, **kwargs):
            self.trained = TrainedTokens(trained_tokens)
            super().__init__(*args, callbacks=[self.trained], **kwargs)
            self.train_cfg = train_cfg
            self.target_tokens = torch.zeros((), dtype=torch.long)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            c = self.train_cfg
            nll, segment = token_nll(model, inputs)
            losses, counts = per_sample_losses(nll, segment, int(inputs["n_samples"]))
            loss, trained = objective_loss(
                c.objective,
                losses,
                counts,
                nll,
                kl_reg=c.kl_reg,
                skip=c.skip,
                keep=c.keep,
                weights=inputs.get("weight"),
                gather=c.gather_losses,
            )
            self.target_tokens = self.target_tokens.to(counts.device) + counts.sum().detach()
            self.trained.add(counts[trained].sum().detach())
            return (loss, None) if return_outputs else loss

    return ObjectiveTrainer


def check_packing(model, dataset, collator: TrainCollator) -> None:
    """Refuse to pack for a model that lets packed samples attend to each other: the shortest
    training samples (of the first 256), as many as share one row, must have the losses they
    have alone. When not even two fit in a row, nothing is ever packed and there is nothing to check."""
    lengths = [len(ids) for ids in dataset.select(range(min(len(dataset), 256)))["input_ids"]]
    chosen, used = [], 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__)[:4]:
        if used + lengths[i] > collator.max_tokens:
            break
        chosen.append(i)
        used += lengths[i]
    if len(chosen) < 2:
        return
    if not packing_isolates(model, [dataset[i] for i in chosen], collator):
        raise ConfigError(
            "train.pack: this model lets packed samples attend to each other (its attention does not "
            "read restarting position_ids as separate sequences); set train.pack=false"
        )


def training_arguments(tcfg, checkpoints: Path, precision: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=tcfg.batch_size,
        gradient_accumulation_steps=tcfg.grad_accum,
        max_steps=tcfg.max_steps,
        learning_rate=tcfg.learning_rate,
        lr_scheduler_type=tcfg.lr_scheduler,
        warmup_steps=tcfg.warmup_steps,
        weight_decay=tcfg.weight_decay,
        max_grad_norm=tcfg.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=tcfg.seed,
        data_seed=tcfg.seed,
        save_strategy="steps",
        save_steps=tcfg.save_steps,
        save_total_limit=tcfg.save_total_limit,
        logging_steps=tcfg.logging_steps,
        report_to="none",
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient: skip DDP's extra graph walk
        dataloader_drop_last=True,  # equal batches: IR-DRO weights and bands are comparable step to step
        activation_checkpointing=tcfg.gradient_checkpointing,
        fsdp=tcfg.fsdp,
        deepspeed=tcfg.deepspeed or None,
    )


def delta_table(before: dict, after: dict) -> list[dict[str, Any]]:
    rows = []
    for name in [*before["per_source"], "overall"]:
        b = before["overall"] if name == "overall" else before["per_source"][name]
        a = after["overall"] if name == "overall" else after["per_source"][name]
        rows.append(
            {
                "source": name,
                "tokens": b["tokens"],
                "loss_before": b["loss"],
                "loss_after": a["loss"],
                "delta": a["loss"] - b["loss"],
                "accuracy_before": b["accuracy"],
                "accuracy_after": a["accuracy"],
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    log = get_logger()
    log.info(
        f"  {'held-out':20s} {'tokens':>9s} {'loss before':>11s} {'after':>8s} {'delta':>8s} {'acc before':>10s} {'after':>7s}"
    )
    for r in rows:
        log.info(
            f"  {r['source'][:20]:20s} {r['tokens']:9,d} {r['loss_before']:11.4f} {r['loss_after']:8.4f} "
            f"{r['delta']:+8.4f} {r['accuracy_before']:10.2%} {r['accuracy_after']:7.2%}"
        )


def finished_run(run_dir: Path, tcfg) -> bool:
    """True when this run is already trained; a different run under the same name is refused."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return False
    metrics = json.loads(metrics_path.read_text())
    if metrics["config"]["train"] != to_dict(tcfg):
        raise ConfigError(
            f"train.name: {run_dir} holds a run with another train config; give this one another name"
        )
    if "trained_tokens" not in metrics["train"]:
        raise ConfigError(
            f"train.name: {run_dir} was trained by an older midrank that did not count the tokens it "
            "trained on; delete that directory to train it again, or give this run another name"
        )
    return True


def training_dataset(cfg: Config, files: list[Path], tokenizer, world_size: int):
    """The tokenized training set, checked against the objective and the batch it must fill."""
    tcfg = cfg.train
    dataset, dropped = tokenize_dataset(
        files, tcfg.text_field, tokenizer, SamplePolicy.of(cfg.score, tokenizer, max_tokens=tcfg.max_tokens)
    )
    if dropped:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(dropped.items()))
        get_logger().warning(
            f"{sum(dropped.values())} training rows have no target token and are not trained on ({reasons})"
        )
    if tcfg.objective == "weighted" and "weight" not in dataset.column_names:
        raise ConfigError(
            f"train.objective: 'weighted' needs a `weight` column, and {files[0]} has none "
            "(select with weights: true, or pick another objective)"
        )
    if len(dataset) < tcfg.batch_size * world_size:
        raise ConfigError(
            f"train.batch_size: {len(dataset)} training samples cannot fill one batch of "
            f"{tcfg.batch_size} x {world_size} rank(s)"
        )
    return dataset, dropped


def trained_tokens_at(checkpoint: Path | None) -> int:
    """The trained-token count a checkpoint carries (0 for a fresh run)."""
    if checkpoint is None:
        return 0
    callbacks = json.loads((checkpoint / "trainer_state.json").read_text()).get("stateful_callbacks", {})
    if "TrainedTokens" not in callbacks:
        raise ConfigError(
            f"train.name: {checkpoint} was written by an older midrank and does not carry the count of "
            "trained tokens; delete its run directory to train again, or give this run another name"
        )
    return int(callbacks["TrainedTokens"]["args"]["tokens"])


def train_summary(
    tcfg, result, resume: Path | None, tokens: int, trained: int, dataset, dropped, files, precision: str
) -> dict:
    seconds = result.metrics["train_runtime"]
    return {
        "objective": tcfg.objective,
        "steps": result.global_step,
        "steps_this_run": result.global_step - (int(resume.name.split("-")[-1]) if resume else 0),
        "samples_available": len(dataset),
        "dropped": dict(dropped),
        "trained_tokens": trained,
        "target_tokens_this_run": tokens,
        "tokens_per_second": tokens / seconds if seconds else math.nan,
        "runtime_s": seconds,
        "final_train_loss": result.training_loss,
        "precision": precision,
        "world_size": rank_and_world()[1],
        "data": [str(f) for f in files],
    }


def run(cfg: Config) -> Path:
    from transformers import set_seed

    log = get_logger()
    started = time.perf_counter()
    tcfg = cfg.train
    rank, world_size = rank_and_world()
    files, manifest_path, data_name = training_files(cfg)
    run_dir = Path(cfg.out_dir) / "train" / (tcfg.name or f"{tcfg.objective}-{data_name}")
    if finished_run(run_dir, tcfg):
        log.info(f"{run_dir}: already trained, nothing to do")
        return run_dir
    if tcfg.gather_losses and tcfg.objective in ("uniform", "weighted"):
        log.warning(f"train.gather_losses does nothing for objective {tcfg.objective!r}")
    precision = resolve_precision(tcfg.precision)
    run_dir.mkdir(parents=True, exist_ok=True)

    set_seed(tcfg.seed)
    if not torch.cuda.is_available():
        tune_cpu_malloc()
    loaded = load_model(dataclasses.replace(cfg.model, dtype="float32"))  # fp32 master weights
    model, tokenizer = loaded.model, loaded.tokenizer
    eval_kwargs = {
        "policy": SamplePolicy.of(cfg.score, tokenizer, max_tokens=tcfg.eval_max_tokens),
        "batch_tokens": cfg.score.batch_tokens,
        "autocast_dtype": {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision),
    }
    heldout = heldout_records(cfg) if tcfg.eval_paths and rank == 0 else []  # rank 0 evaluates
    before_path = before_evaluation_path(cfg, heldout, eval_kwargs) if heldout else None
    if before_path is not None and not before_path.is_file():
        before_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            before_path, evaluate(model, tokenizer, heldout, desc="held-out before", **eval_kwargs)
        )

    dataset, dropped = training_dataset(cfg, files, tokenizer, world_size)
    resume = latest_checkpoint(run_dir / "checkpoints")
    if resume:
        log.info(f"resuming from {resume}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out anyway
    collator = TrainCollator(pad_id, tcfg.max_tokens, tcfg.pack)
    if tcfg.pack:
        check_packing(model, dataset, collator)
    trainer = make_trainer_class()(
        model=model,
        args=training_arguments(tcfg, run_dir / "checkpoints", precision),
        train_dataset=dataset,
        data_collator=collator,
        train_cfg=tcfg,
        trained_tokens=trained_tokens_at(resume),
    )
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    tokens = trainer.target_tokens.clone()
    if world_size > 1:
        torch.distributed.all_reduce(tokens)
    trainer.save_model(str(run_dir / "model"))
    if rank == 0:  # results, evaluation and the summary come from one rank
        tokenizer.save_pretrained(run_dir / "model")
        summary = train_summary(
            tcfg, result, resume, int(tokens), trainer.trained.tokens, dataset, dropped, files, precision
        )
        metrics: dict[str, Any] = {"train": summary, "config": to_dict(cfg)}
        if heldout:
            before = json.loads(before_path.read_text())
            after = evaluate(trainer.model, tokenizer, heldout, desc="held-out after", **eval_kwargs)
            metrics |= {"before": before, "after": after, "table": delta_table(before, after)}
            print_table(metrics["table"])
        if manifest_path is not None:
            shutil.copyfile(manifest_path, run_dir / "selection_manifest.json")
        save_config(cfg, run_dir)
        write_json_atomic(run_dir / "metrics.json", metrics)
        log.info(
            f"trained {summary['steps_this_run']} step(s) ({tcfg.objective}) on {len(dataset):,} samples, "
            f"{summary['target_tokens_this_run']:,} target tokens this run at {summary['tokens_per_second']:,.0f} "
            f"tok/s, {summary['trained_tokens']:,} trained on in all, "
            f"{time.perf_counter() - started:.1f}s -> {run_dir / 'model'}"
        )
    if world_size > 1:
        # other ranks wait for rank 0's evaluation: a rank that exits while the process group is
        # alive aborts the whole job
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return run_dir
