"""Compare: the paper's experiment in miniature — does the MidRanking band beat random data on
*this* corpus, on held-out text, on text of another kind, and on downstream tasks?

    midrank compare --config configs/default.yaml                            # one seed per arm
    midrank compare --config configs/default.yaml 'compare.seeds=[0,1,2,3,4]'  # intervals, verdicts

From one scoring pass it selects each arm's training set (compare.arms: random, a second random
draw (A/A), random samples matched to MidRanking's lengths or sources x lengths, top, bottom,
MidRanking, IR-DRO online or offline, peers' bands; every random draw its own hash stream per arm
and seed), and trains the same starting model on each with the same compute: exactly
`token_budget` target tokens (default: one pass over the smallest set) in steps of
`tokens_per_step`, on whole samples as they were scored (train.max_tokens = score.max_tokens),
same learning-rate schedule. Then every trained model and the starting model (once) are
evaluated the same way, loaded in compare.eval_dtype: per-document loss on the held-out set
(train.eval_paths) and on out-of-distribution text (compare.ood_paths), and per item the correct
answer's log-likelihood and accuracy on the tasks (compare.tasks, compare.hub_tasks) with
lm-evaluation-harness. pipeline/comparison.py compares each arm with the reference arm: one
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
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

from pipeline.artifacts import digest, write_json_atomic, write_text_atomic
from pipeline.comparison import (
    ArmMetric,
    DocumentLosses,
    Margins,
    ModelEval,
    TaskItems,
    compare_arms,
    descriptive_table,
    metric_table,
    training_table,
    verdict_table,
)
from pipeline.config import BandConfig, Config, ConfigError, SelectConfig, save_config, to_dict
from pipeline.downstream import evaluate_tasks
from pipeline.evaluation import held_out_records, sample_losses
from pipeline.layout import Layout
from pipeline.locks import lock
from pipeline.log import get_logger
from pipeline.model import fingerprint, hash_files, load_model
from pipeline.outputs import BandManifest, RunMetrics
from pipeline.plots import plot_compare
from pipeline.samples import SamplePolicy
from stages import score, select, train


def arm_setup(cfg: Config, arm: str, seed: int) -> tuple[BandConfig, str]:
    """(the training set's band, the training objective) of an arm: `<arm>` or `<arm>.<rank key>`.
    Every random draw has its own hash stream (`stream`): two arms' samples are independent draws,
    and overlap only as much as chance makes them."""
    c = cfg.compare
    name, _, key = arm.partition(".")
    by_key = {"rank_by": key} if key else {}
    tokens = {"measure": "tokens", "keep": c.keep, "by_source": c.by_source}
    drop = {"drop_top": c.drop_top, "min_tokens": c.min_tokens}  # the dropped arms' rule
    draw = stream(arm, seed)
    if name in ("random", "random_replicate", "irdro"):
        return BandConfig(strategy="random", seed=draw, **tokens), "irdro" if name == "irdro" else "uniform"
    if name == "random_dropped":  # the drop rule alone: what removing the junk is worth, with no ranking
        return BandConfig(strategy="random", seed=draw, **tokens, **drop), "uniform"
    if name == "weighted":  # offline IR-DRO: weights over a random sample, from its scored losses
        band = BandConfig(strategy="random", seed=draw, weights=True, kl_reg=cfg.train.kl_reg, **tokens)
        return band, "weighted"
    if name in ("top", "bottom"):
        return BandConfig(strategy=name, **tokens, **by_key), "uniform"
    if name == "midranking":
        return midranking_band(cfg, key), "uniform"
    if name == "midranking_dropped":
        return BandConfig(strategy="midranking", skip=0, rank_by=key or "loss", **tokens, **drop), "uniform"
    if name in ("random_length_matched", "random_matched"):
        match = midranking_band(cfg, key).resolved_name()
        by_source = name == "random_matched"
        return BandConfig(strategy="length_matched", match=match, seed=draw, by_source=by_source), "uniform"
    if name == "all":
        return BandConfig(strategy="all", measure="tokens"), "uniform"
    return BandConfig(strategy=name, **by_key), "uniform"  # a peer's preset band


def stream(arm: str, seed: int) -> int:
    """The hash seed of an arm's random draw at a seed: 32 bits of sha256("<arm>/<seed>"), so
    `random` and its controls at seed s are independent samples, not one sample twice."""
    return int.from_bytes(hashlib.sha256(f"{arm}/{seed}".encode()).digest()[:4], "big")


def midranking_band(cfg: Config, key: str = "") -> BandConfig:
    c = cfg.compare
    return BandConfig(
        strategy="midranking",
        skip=c.skip,
        keep=c.keep,
        measure="tokens",
        rank_by=key or "loss",
        by_source=c.by_source,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Arm:
    """One training run of the experiment."""

    arm: str
    seed: int
    band: BandConfig
    objective: str

    def key(self) -> tuple[str, int]:
        return (self.arm, self.seed)

    def run_name(self, experiment: str) -> str:
        """Its training run's name: <compare.name>-<arm>-seed<s>."""
        return f"{experiment}-{self.arm}-seed{self.seed}"


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


def plan_arms(cfg: Config) -> list[Arm]:
    c = cfg.compare
    return [Arm(arm, seed, *arm_setup(cfg, arm, seed)) for seed in c.seeds for arm in c.arms]


def select_sets(cfg: Config, arms: list[Arm]) -> dict[str, BandManifest]:
    """Select every arm's training set (the MidRanking bands first: length-matched samples match them)."""
    matched = [
        midranking_band(cfg, a.arm.partition(".")[2]) for a in arms if a.band.strategy == "length_matched"
    ]
    bands = {b.resolved_name(): b for b in matched} | {a.band.resolved_name(): a.band for a in arms}
    select.run(dataclasses.replace(cfg, select=SelectConfig(bands=tuple(bands.values()))))
    layout = Layout(cfg.out_dir)
    return {name: BandManifest.read(layout.band(name).manifest) for name in bands}


def token_budget(cfg: Config, sets: dict[str, BandManifest], arms: list[Arm]) -> int:
    """The target tokens every arm trains on: compare.token_budget, or one pass over the smallest
    set, in whole steps."""
    c = cfg.compare
    smallest = min(sets[a.band.resolved_name()].tokens.kept for a in arms)
    budget = c.token_budget or smallest
    if budget < c.tokens_per_step:
        raise ConfigError(
            f"compare.token_budget: {budget:,} target tokens (the smallest arm's set) is less than one "
            f"step of compare.tokens_per_step={c.tokens_per_step:,}; lower tokens_per_step or raise keep"
        )
    return budget // c.tokens_per_step * c.tokens_per_step


def train_config(cfg: Config, arm: Arm, steps: int) -> Config:
    """The arm's training run: same everything but its set, objective and seed (its data order:
    the arm's own stream at this seed, like its sample, so no two runs share an order); exactly
    `steps` steps of compare.tokens_per_step target tokens, packed; no evaluation (compare
    evaluates every model the same way afterwards)."""
    c = cfg.compare
    tcfg = dataclasses.replace(
        cfg.train,
        name=arm.run_name(c.name),
        band=arm.band.resolved_name(),
        data_paths=(),
        objective=arm.objective,
        seed=stream(arm.arm, arm.seed),
        max_steps=steps,
        target_tokens_per_batch=c.tokens_per_step,
        grad_accum=1,
        pack=True,  # samples packed into rows, no padding computed; isolated: the same numbers as padded
        max_tokens=cfg.score.max_tokens,
        eval_paths=(),
    )
    return dataclasses.replace(cfg, train=tcfg)


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


def cached_evaluation(cfg: Config, model_dir: Path, label: str, timer: Timer) -> ModelEval:
    """The model's evaluation, read from `evals/<label>.json` when it was made of the same weights
    and inputs, else computed and written there."""
    path = Layout(cfg.out_dir).report(cfg.compare.name).evaluation(label)
    weights = fingerprint(dataclasses.replace(cfg.model, path=str(model_dir)))["weights_sha256"]
    key = digest({"weights": weights, "inputs": evaluation_inputs(cfg)})
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored["key"] == key:
            return ModelEval.from_json(stored["evaluation"])
    except (OSError, ValueError, KeyError, TypeError):  # not there, damaged, or of an older midrank
        pass
    started = time.perf_counter()
    evaluation = timer.timed("evaluate", evaluate_model, cfg, model_dir, label)
    get_logger().info(f"compare: evaluated {label} in {time.perf_counter() - started:.0f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"key": key, "evaluation": evaluation.to_json()})
    return evaluation


def training_rows(
    arms: list[Arm], runs: dict[tuple[str, int], RunMetrics], sets: dict[str, BandManifest]
) -> list[dict]:
    """Per arm, means over its seeds: set size, steps, trained tokens, samples seen, their length,
    and the compute: positions processed, attention's sum of squared lengths, effective samples."""
    rows = []
    for name in dict.fromkeys(a.arm for a in arms):
        mine = [a for a in arms if a.arm == name]
        trained = [runs[a.key()].train for a in mine]

        def mean(field: str, of=trained) -> float | None:
            values = [getattr(t, field) for t in of]
            return None if any(v is None for v in values) else sum(values) / len(values)

        band = mine[0].band.resolved_name()
        rows.append(
            {
                "arm": name,
                # each seed draws its own random sample: random-k0.5-seed*-tokens
                "band": band
                if len({a.band.resolved_name() for a in mine}) == 1
                else re.sub(r"seed\d+", "seed*", band),
                "objective": mine[0].objective,
                "set_tokens": sum(sets[a.band.resolved_name()].tokens.kept for a in mine) / len(mine),
                **{
                    field: mean(field)
                    for field in (
                        "steps",
                        "trained_tokens",
                        "samples_seen",
                        "mean_sample_tokens",
                        "distinct_tokens",
                        "positions",
                        "attention",
                        "effective_samples",
                        "batch_samples",
                    )
                },
                "per_seed_trained_tokens": [t.trained_tokens for t in trained],
            }
        )
    return rows


def report(cfg: Config, arms: list[Arm], sets, runs, evals, budget: int) -> tuple[list[ArmMetric], str, dict]:
    """(each arm on each metric, the markdown tables, results.json's content)."""
    c = cfg.compare
    rows = compare_arms(
        evals,
        arms=list(c.arms),
        seeds=list(c.seeds),
        reference=c.reference,
        primary=(c.primary, c.primary_metric) if c.primary else None,
        margins=Margins(c.equivalence_margin, c.task_equivalence_margin),
    )
    training = training_rows(arms, runs, sets)
    seeds = f"{len(c.seeds)} seed{'s' if len(c.seeds) > 1 else ''} ({', '.join(map(str, c.seeds))})"
    tested = list(dict.fromkeys(r.metric for r in rows if r.role in ("primary", "secondary")))
    primary = (
        f"Primary contrast (pre-registered): `{c.primary}` vs `{c.reference}` on {c.primary_metric}."
        if c.primary
        else "No primary contrast: every contrast is in the Holm family."
    )
    parts = [
        f"Every arm trained on exactly {budget:,} target tokens ({budget // c.tokens_per_step} steps of "
        f"{c.tokens_per_step:,}), {seeds} per arm, each run its own draw; evaluated in {c.eval_dtype}. "
        + primary,
        "",
        training_table(training),
        verdict_table(rows, c.reference),
        *(metric_table(rows, m, c.reference) for m in tested),
        descriptive_table(rows, "heldout loss: ", c.reference, "**heldout loss per source** (nats/token)"),
        descriptive_table(rows, "task ", c.reference, "**task accuracy** (points)"),
        "Change from start: the arm's trained models minus the starting model, mean over seeds. "
        "Difference: the arm's mean over its seeds minus the other arm's (each run an independent "
        "draw). 95% CI: Student-t with Satterthwaite's df over both the run-to-run and the "
        "document/item noise (documents within each source); * marks an interval that excludes zero "
        "(unadjusted). p: as is for the primary and the A/A contrast, Holm-adjusted in the secondary "
        "family. equivalent: the TOST p (difference within +-margin), adjusted the same way, is < "
        "0.05; a contrast neither better, worse nor equivalent is inconclusive. Equivalent within: the "
        "smallest margin TOST at 5% would have accepted; detectable: the difference a test at 5% "
        "finds with 80% power — both unadjusted, so a Holm-adjusted contrast can be inconclusive "
        "with its bound inside the margin.",
    ]
    table = "\n".join(parts) + "\n"
    results = {
        "token_budget": budget,
        "tokens_per_step": c.tokens_per_step,
        "reference": c.reference,
        "primary": {"arm": c.primary, "metric": c.primary_metric} if c.primary else None,
        "seeds": list(c.seeds),
        "eval_dtype": c.eval_dtype,
        "training": training,
        "metrics": [r.to_json() for r in rows],
        "runs": [
            {
                "arm": a.arm,
                "seed": a.seed,
                "band": a.band.resolved_name(),
                "objective": a.objective,
                "run_dir": str(Layout(cfg.out_dir).train_run(a.run_name(c.name)).dir),
                "train": dataclasses.asdict(runs[a.key()].train),
            }
            for a in arms
        ],
    }
    return rows, table, results


def run(cfg: Config) -> Path:
    c, log, timer = cfg.compare, get_logger(), Timer()
    if not cfg.train.eval_paths:
        raise ConfigError("train.eval_paths: compare needs a held-out set to evaluate every arm on")
    timer.timed("score", score.run, cfg)  # one scoring pass for every arm; nothing to do when finished
    layout = Layout(cfg.out_dir)
    with lock(layout, f"compare-{c.name}"):
        arms = plan_arms(cfg)
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
            runs[arm.key()] = RunMetrics.read(layout.train_run(arm_cfg.train.name).metrics)
        evals = {"base": cached_evaluation(cfg, Path(cfg.model.path), "base", timer)}
        for arm in arms:
            model_dir = layout.train_run(arm.run_name(c.name)).model
            evals[arm.key()] = cached_evaluation(cfg, model_dir, f"{arm.arm}-seed{arm.seed}", timer)
        rows, table, results = timer.timed("analysis", report, cfg, arms, sets, runs, evals, budget)
        paths = layout.report(c.name)
        paths.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(paths.table, table)
        plot_compare(rows, c.reference, paths.deltas)
        save_config(cfg, paths.dir)
        results["seconds"] = timer.parts
        write_json_atomic(paths.results, results)
    print(table)
    log.info(
        "compare: time per part: "
        + ", ".join(f"{part} {seconds / 60:.1f} min" for part, seconds in timer.parts.items())
    )
    log.info(f"compared {len(c.arms)} arm(s) x {len(c.seeds)} seed(s) -> {paths.dir}")
    return paths.dir
