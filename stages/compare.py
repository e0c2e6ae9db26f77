"""Compare: the paper's experiment in miniature — does the MidRanking band beat random data on
*this* corpus, on held-out text, on text of another kind, and on downstream tasks?

    midrank compare --config configs/default.yaml                            # one seed per arm
    midrank compare --config configs/default.yaml 'compare.seeds=[0,1,2,3,4]'  # intervals, verdicts

From one scoring pass it selects each arm's training set (pipeline/compare_arms.py; compare.arms: random, a second random
draw (A/A), random samples matched to MidRanking's lengths or sources x lengths, top, bottom,
MidRanking, IR-DRO online or offline, peers' bands; every random draw its own hash stream per arm
and seed), and trains the same starting model on each with the same compute: exactly
`token_budget` target tokens (default: one pass over the smallest set) in steps of
`tokens_per_step`, on whole samples as they were scored (train.max_tokens = score.max_tokens),
same learning-rate schedule. Then every trained model and the starting model (once) are
evaluated the same way, loaded in compare.eval_dtype: per-document loss on the held-out set
(train.eval_paths) and on out-of-distribution text (compare.ood_paths), and per item the correct
answer's log-likelihood and accuracy on the tasks (compare.tasks, compare.hub_tasks) with
lm-evaluation-harness (pipeline/compare_evaluation.py). pipeline/comparison.py compares each arm with the reference arm: one
interval over seeds and documents, the pre-registered primary contrast alone, Holm across the
rest, TOST for equivalence.

Writes `<out_dir>/reports/<name>/`: `table.md` (also printed), `results.json` (every number,
every run, the time of each part), `deltas.png` (each arm's difference from the reference per
tested metric, with its interval), `evals/` (each model's per-document and per-item numbers) and
`config.yaml`. Reruns reuse finished selections, training runs and evaluations.

Unlike the pipeline's stages this is an experiment built from them, so it calls `score`, `select`
and `train` directly (docs/development.md §4: stages share code only through pipeline/; a composition of
stages is the one exception, like `demo`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from pipeline.artifacts import write_text_atomic
from pipeline.compare_arms import Arm, midranking_band, plan_arms, token_budget, train_config
from pipeline.compare_evaluation import cached_evaluation
from pipeline.compare_report import report
from pipeline.config import Config, ConfigError, SelectConfig, save_config
from pipeline.layout import Layout
from pipeline.locks import lock
from pipeline.log import get_logger, inert
from pipeline.outputs import BandManifest, RunMetrics
from pipeline.plots import plot_compare
from pipeline.target_scores import has_target_scores, uses_target
from pipeline.train_run import drop_checkpoints
from stages import score, select, target, train


class Timer:
    """Seconds spent per part of the experiment, printed and saved at the end."""

    def __init__(self):
        self.parts: dict[str, float] = {}

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + seconds

    def timed(self, part: str, fn, *args):
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.add(part, time.perf_counter() - started)


def select_sets(cfg: Config, arms: list[Arm]) -> dict[str, BandManifest]:
    """Select every arm's training set (the MidRanking bands first: length-matched samples match them)."""
    matched = [
        midranking_band(cfg, a.arm.partition(".")[2]) for a in arms if a.band.strategy == "length_matched"
    ]
    bands = {b.resolved_name(): b for b in matched} | {a.band.resolved_name(): a.band for a in arms}
    select.run(dataclasses.replace(cfg, select=SelectConfig(bands=tuple(bands.values()))))
    layout = Layout(cfg.out_dir)
    return {name: BandManifest.read(layout.band(name).manifest) for name in bands}


def run(cfg: Config) -> Path:
    c, log, timer = cfg.compare, get_logger(), Timer()
    if not cfg.train.eval_paths:
        raise ConfigError("train.eval_paths: compare needs a held-out set to evaluate every arm on")
    timer.timed("score", score.run, cfg)  # one scoring pass for every arm; nothing to do when finished
    arms = plan_arms(cfg)
    # A target model made here is brought in line with target.* on every run (nothing to do when
    # finished, refused when its recipe changed); scores made elsewhere are taken as they are.
    make_target = not cfg.target.out_dir or not has_target_scores(cfg)
    if make_target and any(uses_target(a.band, a.arm) for a in arms):
        timer.timed("target", target.run, cfg)  # the reducible key's fine-tune and second scoring pass
    layout = Layout(cfg.out_dir)
    with lock(layout, f"compare-{c.name}"):
        # before any work: the report's files (and its cached evaluations) are replaced
        layout.check_replaceable(layout.report(c.name).dir)
        for folder in (layout.report(c.name).dir, layout.evals_before_dir):
            if folder.exists():
                layout.check_all_inside(folder)
        missing = [task for task in c.tasks if not Path(task).is_file()]
        if missing:
            raise ConfigError(
                f"compare.tasks: {', '.join(missing)} not found (`make tasks` builds the embedded ones)"
            )
        sets = timer.timed("select", select_sets, cfg, arms)
        budget = token_budget(cfg, sets, arms)
        steps = budget // c.tokens_per_step
        log.info(
            f"compare: every arm trains {budget:,} target tokens in {steps} steps of {c.tokens_per_step:,}"
        )
        runs = {}
        for index, arm in enumerate(arms, start=1):
            arm_cfg = train_config(cfg, arm, steps)
            log.info(
                f"compare: run {index}/{len(arms)}: {arm_cfg.train.name} ({arm.objective} on {arm.band.resolved_name()})"
            )
            timer.timed("train", train.run, arm_cfg)
            run_paths = layout.train_run(arm_cfg.train.name)
            drop_checkpoints(layout, run_paths)
            runs[arm.key()] = RunMetrics.read(run_paths.metrics)
        evals = {"base": cached_evaluation(cfg, Path(cfg.model.path), "base", timer.timed)}
        for arm in arms:
            model_dir = layout.train_run(arm.run_name(c.name)).model
            evals[arm.key()] = cached_evaluation(cfg, model_dir, f"{arm.arm}-seed{arm.seed}", timer.timed)
        rows, table, results = timer.timed("analysis", report, cfg, arms, sets, runs, evals, budget)
        paths = layout.report(c.name)
        layout.make_dir(paths.dir)
        write_text_atomic(paths.table, table)
        plot_compare(rows, c.reference, paths.deltas)
        save_config(cfg, paths.dir)
        dataclasses.replace(results, seconds=timer.parts).write(paths.results)
    print(inert(table))  # source names from the data
    log.info(
        "compare: time per part: "
        + ", ".join(f"{part} {seconds / 60:.1f} min" for part, seconds in timer.parts.items())
    )
    log.info(f"compared {len(c.arms)} arm(s) x {len(c.seeds)} seed(s) -> {paths.dir}")
    return paths.dir
