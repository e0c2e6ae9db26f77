"""midrank's objectives inside the Hugging Face `Trainer`: the trainer class, its arguments, the
count of trained tokens that survives a resume, checkpoints, precision, and the packing check.

    trainer = ObjectiveTrainer(model=model, args=training_arguments(cfg.train, checkpoints, "bf16"),
                               train_dataset=dataset, data_collator=collator, train_cfg=cfg.train,
                               trained_tokens=trained_tokens_at(resume))

The Trainer brings torchrun/accelerate data parallelism, gradient accumulation, mixed precision,
FSDP/DeepSpeed and resumable checkpoints (optimizer, scheduler, RNG, data position); the loss is
the configured objective over per-sample losses (pipeline/objectives.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from pipeline.codec import parse_json
from pipeline.config import ConfigError, TrainConfig
from pipeline.layout import Layout
from pipeline.log import get_logger
from pipeline.model import cpu_supports_bf16
from pipeline.objectives import head_is_plain, objective_loss, packing_isolates, per_sample_losses, token_nll
from pipeline.train_data import TrainCollator


class TrainedTokens(TrainerCallback, ExportableState):
    """Target tokens the objective trained on (for midranking_online, the band's only), summed
    over ranks and steps. Saved in each checkpoint's trainer_state.json, so a resumed run
    continues the count rather than restarting it."""

    def __init__(self, tokens: int = 0):
        self.tokens = tokens
        self.pending: torch.Tensor | None = None  # this rank's count since the last step
        self.stepped = False

    def add(self, tokens: torch.Tensor) -> None:
        self.pending = tokens if self.pending is None else self.pending + tokens

    def on_step_end(self, args, state, control, **kwargs):
        self.stepped = True  # this run took a step: a later failure is not its checkpoint's
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


class MarkedCheckpoints(TrainerCallback):
    """Each checkpoint-N folder the Trainer saves gets midrank's marker, so that the run's
    `checkpoints/` can later be deleted whole (pipeline/layout.py deletes no unmarked folder)."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            self.layout.mark(folder)


class EffectiveSamples:
    """Per micro-batch, how many samples the objective effectively learns from, (sum w)^2 / sum w^2
    of the samples' weights in it (Kish's effective sample size), beside how many it holds: a
    reweighting objective (IR-DRO) spends the same compute on fewer effective samples."""

    def __init__(self):
        self.effective: list[float] = []
        self.held: list[int] = []

    def add(self, weights: torch.Tensor) -> None:
        w = weights.detach().double()
        squares = float((w * w).sum())
        self.effective.append(float(w.sum()) ** 2 / squares if squares > 0 else 0.0)
        self.held.append(w.numel())

    def means(self) -> tuple[float | None, float | None]:
        """(mean effective samples, mean samples) per micro-batch of this run on this rank."""
        if not self.held:
            return None, None
        return sum(self.effective) / len(self.effective), sum(self.held) / len(self.held)


class ObjectiveTrainer(Trainer):
    """The Trainer with midrank's per-sample objectives as its loss."""

    loss_is_scaled_for_ga = False  # each micro-batch's objective is a mean; the Trainer averages

    def __init__(self, *args, train_cfg, trained_tokens: int = 0, **kwargs):
        self.trained = TrainedTokens(trained_tokens)
        super().__init__(*args, callbacks=[self.trained], **kwargs)
        self.train_cfg = train_cfg
        self.target_tokens = torch.zeros((), dtype=torch.long)
        self.effective = EffectiveSamples()
        self.head_chunk_tokens = train_cfg.head_chunk_tokens
        if self.head_chunk_tokens and (
            train_cfg.fsdp or train_cfg.deepspeed or not head_is_plain(self.model)
        ):
            get_logger().info("train: the LM head runs on every position (sharded or non-plain head)")
            self.head_chunk_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        c = self.train_cfg
        nll, segment = token_nll(model, inputs, self.head_chunk_tokens)
        losses, counts = per_sample_losses(nll, segment, int(inputs["n_samples"]))
        loss, weights = objective_loss(
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
        self.trained.add(counts[weights != 0].sum().detach())
        if model.training:
            self.effective.add(weights)
        return (loss, None) if return_outputs else loss


def resolve_precision(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def trainer_checkpoints(checkpoints: Path) -> list[Path]:
    """The Trainer's `checkpoint-<step>` folders in `checkpoints`, finished or not."""
    return [
        p
        for p in checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if p.name.split("-")[-1].isdigit() and p.is_dir()
    ]


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint the Trainer finished: trainer_state.json is the last file it writes."""

    def complete(path: Path) -> bool:
        try:
            parse_json((path / "trainer_state.json").read_bytes(), str(path), ValueError)
        except (OSError, ValueError):
            return False
        return True

    found = [p for p in trainer_checkpoints(checkpoints) if complete(p)]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def trained_tokens_at(checkpoint: Path | None) -> int:
    """The trained-token count a checkpoint carries (0 for a fresh run)."""
    if checkpoint is None:
        return 0
    state = parse_json((checkpoint / "trainer_state.json").read_bytes(), str(checkpoint), ConfigError)
    callbacks = state.get("stateful_callbacks", {})
    if "TrainedTokens" not in callbacks:
        raise ConfigError(
            f"train.name: {checkpoint} was written by an older midrank and does not carry the count of "
            "trained tokens; delete its run directory to train again, or give this run another name"
        )
    try:
        return int(callbacks["TrainedTokens"]["args"]["tokens"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"{checkpoint / 'trainer_state.json'}: damaged (no count of trained tokens); delete "
            f"{checkpoint} to resume from the checkpoint before it"
        ) from None


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


def training_arguments(tcfg: TrainConfig, checkpoints: Path, precision: str) -> TrainingArguments:
    """The Trainer's arguments; with token-budget micro-batches each dataset item is a whole
    micro-batch, so the Trainer takes one item at a time."""
    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=1 if tcfg.target_tokens_per_batch else tcfg.batch_size,
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
