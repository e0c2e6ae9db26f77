"""What compare reports: per arm its training (set size, steps, tokens, compute) and each metric
against the reference arm, as the markdown tables and results.json's content.

    rows, table, results = report(cfg, arms, sets, runs, evals, budget)
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.compare_arms import Arm
from pipeline.comparison import (
    ArmMetric,
    Margins,
    compare_arms,
    descriptive_table,
    metric_table,
    training_table,
    verdict_table,
)
from pipeline.config import Config
from pipeline.layout import Layout
from pipeline.outputs import BandManifest, JsonRecord, RunMetrics, ScoresSummary
from pipeline.target_scores import TARGET_RUN, target_layout, uses_target

BACKWARD = 2
"""A trained token costs a forward pass and a backward pass of about twice its compute."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CompareRun:
    arm: str
    seed: int
    band: str
    objective: str
    run_dir: str
    train: dict[str, Any]
    """The run's TrainSummary."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CompareResults(JsonRecord):
    """reports/<compare>/results.json: every number of the experiment."""

    token_budget: int
    tokens_per_step: int
    reference: str
    primary: dict[str, str] | None
    seeds: list[int]
    eval_dtype: str
    training: list[dict[str, Any]]
    """Per arm, its training and compute, means over seeds (`training_rows`)."""
    metrics: list[dict[str, Any]]
    """Per arm and metric, against the reference (ArmMetric.to_json)."""
    runs: list[CompareRun]
    seconds: dict[str, float] = field(default_factory=dict)
    """Time per part: score, select, train, evaluate, analysis."""


def selection_cost(cfg: Config, arm: Arm) -> int | None:
    """The compute spent choosing an arm's training set, outside the equal training budget, in
    target tokens of forward passes: nothing for a random draw or the whole corpus; the reference
    model's scoring pass for an arm that ranks, drops, matches or weights by the scores; for the
    reducible key also the target model's fine-tune (1 + BACKWARD passes per trained token; its
    held-out evaluation not counted) and its scoring pass. None where the fine-tune is unknown
    (target scores made elsewhere)."""
    band = arm.band
    if band.strategy == "all":
        return 0
    if band.strategy == "random" and not (band.drop_top.shares() or band.min_tokens or band.weights):
        return 0
    layout = Layout(cfg.out_dir)
    cost = ScoresSummary.read(layout.scores_summary).tokens
    if uses_target(band, arm.arm):
        fine_tune = layout.train_run(TARGET_RUN)
        target = ScoresSummary.read(target_layout(cfg).scores_summary)
        if target.provenance.model_path != str(fine_tune.model) or not fine_tune.metrics.is_file():
            return None
        trained = RunMetrics.read(fine_tune.metrics).train.trained_tokens
        cost += target.tokens + (1 + BACKWARD) * trained
    return cost


def training_rows(
    cfg: Config, arms: list[Arm], runs: dict[tuple[str, int], RunMetrics], sets: dict[str, BandManifest]
) -> list[dict]:
    """Per arm, means over its seeds: set size, steps, trained tokens, samples seen, their length,
    the compute: positions processed, attention's sum of squared lengths, effective samples; and
    the compute spent choosing the set (`selection_cost`)."""
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
                "selection_tokens": selection_cost(cfg, mine[0]),
            }
        )
    base = total_compute(next(row for row in rows if row["arm"] == cfg.compare.reference))
    for row in rows:
        mine = total_compute(row)
        row["compute_ratio"] = None if mine is None or not base else mine / base
    return rows


def total_compute(row: dict) -> float | None:
    """Forward-pass tokens an arm spent in all: its training's and its selection's (None: unknown)."""
    if row["selection_tokens"] is None or row["trained_tokens"] is None:
        return None
    return (1 + BACKWARD) * row["trained_tokens"] + row["selection_tokens"]


def report(
    cfg: Config, arms: list[Arm], sets, runs, evals, budget: int
) -> tuple[list[ArmMetric], str, CompareResults]:
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
    training = training_rows(cfg, arms, runs, sets)
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
        "Selection cost: forward-pass tokens spent choosing the set, not part of the equal training "
        f"budget (training costs {1 + BACKWARD}x its trained tokens): the reference model's scoring "
        "pass; for the reducible key also the target model's fine-tune and scoring pass. Compute in "
        "all: training and selection together, as a multiple of the reference arm's (the arms are "
        "equal in training compute only). "
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
    results = CompareResults(
        token_budget=budget,
        tokens_per_step=c.tokens_per_step,
        reference=c.reference,
        primary={"arm": c.primary, "metric": c.primary_metric} if c.primary else None,
        seeds=list(c.seeds),
        eval_dtype=c.eval_dtype,
        training=training,
        metrics=[r.to_json() for r in rows],
        runs=[
            CompareRun(
                arm=a.arm,
                seed=a.seed,
                band=a.band.resolved_name(),
                objective=a.objective,
                run_dir=str(Layout(cfg.out_dir).train_run(a.run_name(c.name)).dir),
                train=dataclasses.asdict(runs[a.key()].train),  # every field, null when not measured
            )
            for a in arms
        ],
    )
    return rows, table, results
