"""What a training run is, and whether it is done: its data (a band or files), the settings that
decide its weights (recorded in `started.json` when it starts), a finished run found again, and
the checkpoint a killed run resumes from (only under the settings it started with).

    data = training_data(cfg, layout)
    if finished_run(paths, cfg, layout, data): ...
    resume = start_or_resume(RunPlan(cfg, layout, paths, data, precision), rank)
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

from pipeline.artifacts import digest
from pipeline.codec import encode
from pipeline.config import Config, ConfigError, TrainConfig, to_dict
from pipeline.launcher import rank_and_world
from pipeline.layout import Layout, RunPaths, part_files
from pipeline.log import get_logger
from pipeline.outputs import OutputError, RunMetrics, RunStart
from pipeline.trainer import latest_checkpoint, trainer_checkpoints


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


def without_resume_flag(train: TrainConfig) -> TrainConfig:
    """The train section as it decides the weights (how a resume is allowed does not)."""
    return dataclasses.replace(train, resume_changed_config=False)


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
    if without_resume_flag(metrics.config.train) != without_resume_flag(cfg.train):
        raise ConfigError(f"train.name: {paths.dir} holds a run with another train config; {rename}")
    if metrics.config.model != cfg.model:
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


def run_identity(cfg: Config, layout: Layout, data: TrainingData) -> RunStart:
    """What decides the weights a run ends with: the train and model settings, how records become
    tokens, the data (the band's manifest, or the files), and the number of ranks (the data order)."""
    band = layout.band(data.band).manifest.read_text() if data.band else None
    return RunStart(
        train={k: v for k, v in to_dict(cfg.train).items() if k not in NOT_WEIGHTS},
        model=cfg.model,
        samples={k: getattr(cfg.score, k) for k in ("add_bos", "prompt_format", "score_prompt")},
        data=digest(band) if band else [str(f) for f in data.files],
        world_size=rank_and_world()[1],
    )


def check_resumable(identity: RunStart, paths: RunPaths, resume: Path | None, allow: bool) -> None:
    """A killed run resumes only as the run that made its checkpoints, unless `allow`
    (train.resume_changed_config): then the new settings apply from the checkpoint on."""
    if resume is None or allow:
        return
    try:
        made = encode(RunStart.read(paths.started))
    except OutputError as err:
        raise ConfigError(
            f"train.resume_changed_config: {resume} was made by a run that did not record its settings "
            f"({err}); set train.resume_changed_config=true to resume it anyway, or give this run another name"
        ) from None
    changed = []
    for part, value in encode(identity).items():
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
    for folder in (plan.paths.dir, plan.paths.checkpoints):
        plan.layout.make_dir(folder)
    plan.layout.check_all_inside(plan.paths.dir)  # the Trainer and save_pretrained follow links
    if plan.layout.evals_before_dir.exists():  # the starting model's, written after it runs
        plan.layout.check_all_inside(plan.layout.evals_before_dir)
    # The Trainer's checkpoint-N folders inside the run's own checkpoints/ are this run's, even one
    # a kill left unmarked (between its save and the marking callback) or half written
    if rank == 0:
        for checkpoint in trainer_checkpoints(plan.paths.checkpoints):
            plan.layout.mark(checkpoint)
    for folder in (plan.paths.dir, plan.paths.checkpoints):  # checkpoints: deleted once finished
        plan.layout.check_replaceable(folder)
    resume = latest_checkpoint(plan.paths.checkpoints)
    identity = run_identity(plan.cfg, plan.layout, plan.data)
    check_resumable(identity, plan.paths, resume, plan.cfg.train.resume_changed_config)
    if resume:
        get_logger().info(f"resuming from {resume}")
    elif rank == 0:
        identity.write(plan.paths.started)  # what the checkpoints will be made under
    return resume


@dataclasses.dataclass(frozen=True, slots=True)
class RunPlan:
    """What one training run is: its config, where it writes, what it trains on, in which precision."""

    cfg: Config
    layout: Layout
    paths: RunPaths
    data: TrainingData
    precision: str


def drop_checkpoints(layout: Layout, paths: RunPaths) -> None:
    """A finished run's checkpoints, which serve only a resume (model/ holds its weights): the
    compositions of stages that train many runs (compare's arms, the target model) drop them, at
    ~3x the model's size each."""
    if rank_and_world()[0] == 0 and paths.metrics.is_file() and paths.checkpoints.exists():
        layout.remove(paths.checkpoints)
