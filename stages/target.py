"""Target: the target model of the `reducible` rank key — the reference model fine-tuned on a
small target set, then the corpus scored by it into a score set of its own (docs/reducible.md).

    midrank target --config configs/default.yaml target.paths=[data/target/target.jsonl]   # make target

Runs the `train` stage on target.paths (`<out_dir>/train/target/`: the model, the held-out loss
before and after, the trained tokens) and then the `score` stage with that model into
target.out_dir (default `<out_dir>/target/`), where `select`, `inspect` and `compare` join it on
sample_id. Each part resumes where a kill left it, and a finished one is not redone. Like `demo`,
a composition of stages, so it calls their `run` directly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config import Config, ConfigError
from pipeline.layout import Layout, RunPaths
from pipeline.log import get_logger
from pipeline.outputs import OutputError, RunMetrics
from pipeline.target_scores import (
    TARGET_RUN,
    check_target_set,
    fine_tune_config,
    target_layout,
    target_scoring_config,
)
from pipeline.train_run import NOT_WEIGHTS, drop_checkpoints, finished_run, training_data
from stages import score, train


def as_made(fine_tune: Config, paths: RunPaths) -> Config:
    """The fine-tune's config with the settings that do not decide its weights (its held-out set,
    checkpoints: NOT_WEIGHTS) as a finished fine-tune had them, so that changing them for other runs
    leaves the target model as it is."""
    try:
        made = RunMetrics.read(paths.metrics).config.train
    except OutputError:  # not finished (or unreadable: finished_run says so)
        return fine_tune
    kept = {name: getattr(made, name) for name in NOT_WEIGHTS}
    return dataclasses.replace(fine_tune, train=dataclasses.replace(fine_tune.train, **kept))


def run(cfg: Config) -> Path:
    check_target_set(cfg)
    layout = Layout(cfg.out_dir)
    paths = layout.train_run(TARGET_RUN)
    fine_tune = as_made(fine_tune_config(cfg), paths)
    try:  # the run's own check, with the way out that fits here (its name is not the user's to change)
        finished_run(paths, fine_tune, layout, training_data(fine_tune, layout))
    except ConfigError:
        raise ConfigError(
            f"target: {paths.dir} holds a target model made under other settings (target.*, model.* and "
            f"the train.* settings that decide weights); delete it and {target_layout(cfg).out_dir} to "
            "make it again"
        ) from None
    trained = train.run(fine_tune)
    drop_checkpoints(layout, paths)
    get_logger().info(f"target: the fine-tuned model is in {trained}/model; scoring the corpus with it")
    if not cfg.target.out_dir:  # the default, inside out_dir: a folder of midrank's, marked
        layout.make_dir(target_layout(cfg).out_dir)
    score.run(target_scoring_config(cfg))
    scores = target_layout(cfg).scores_dir
    get_logger().info(f"target: the target model's scores -> {scores}")
    return scores
