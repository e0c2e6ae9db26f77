"""The compare experiment's analysis: each arm against the reference arm, with 95% intervals.

    evals = {"base": ModelEval(...), ("midranking", 0): ModelEval(...), ...}
    rows = compare_arms(evals, arms=["random", "midranking"], seeds=[0, 1, 2], reference="random",
                        resamples=2000)
    print(results_tables(rows, training_rows))

A model's evaluation (`ModelEval`) holds per-document NLL and tokens on the in-distribution and
out-of-distribution held-out sets and per-item correctness on each task, so that differences can
be resampled by document and by item. Per metric and arm: the change from the starting model
(mean over seeds), and the difference from the reference arm — per seed, paired (same seed), with
a t-interval over seeds, and averaged over seeds per document/item, with a bootstrap interval over
documents/items. An arm "differs" from the reference on a metric when both intervals exclude zero
(with one seed there is no t-interval, and no verdict: run-to-run noise is unmeasured). There is
no correction for the number of comparisons (arms x metrics).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.stats import Interval, bootstrap_ratio, t_interval


@dataclass(frozen=True, slots=True)
class DocumentLosses:
    """Summed NLL and target tokens per held-out sample, in the set's order."""

    nll: list[float]
    tokens: list[int]

    @property
    def loss(self) -> float:
        return sum(self.nll) / sum(self.tokens) if self.tokens else math.nan


@dataclass(frozen=True, slots=True)
class ModelEval:
    """One model's numbers on everything compare measures."""

    heldout: DocumentLosses
    ood: DocumentLosses | None
    tasks: dict[str, list[float]] = field(default_factory=dict)
    """Per task, per item 1.0/0.0 (lm-eval's acc_norm)."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelEval:
        return cls(
            heldout=DocumentLosses(**data["heldout"]),
            ood=DocumentLosses(**data["ood"]) if data["ood"] is not None else None,
            tasks={name: list(items) for name, items in data["tasks"].items()},
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    """`heldout loss`, `ood loss` or `task <name>`."""
    lower_is_better: bool


def metrics_of(evaluation: ModelEval) -> list[Metric]:
    out = [Metric("heldout loss", True)]
    out += [Metric("ood loss", True)] if evaluation.ood is not None else []
    return out + [Metric(f"task {name}", False) for name in evaluation.tasks]


def value(evaluation: ModelEval, metric: Metric) -> float:
    if metric.name == "heldout loss":
        return evaluation.heldout.loss
    if metric.name == "ood loss":
        return evaluation.ood.loss
    items = evaluation.tasks[metric.name.removeprefix("task ")]
    return sum(items) / len(items)


def item_differences(
    arm: list[ModelEval], reference: list[ModelEval], metric: Metric
) -> tuple[np.ndarray, np.ndarray]:
    """(per document/item: the arm's minus the reference's NLL or correctness, averaged over the
    paired seeds; the weights it is divided by: target tokens, or 1 per item)."""
    if metric.name.endswith(" loss"):
        part = "heldout" if metric.name == "heldout loss" else "ood"
        a = np.array([getattr(e, part).nll for e in arm])
        r = np.array([getattr(e, part).nll for e in reference])
        return (a - r).mean(axis=0), np.array(getattr(arm[0], part).tokens, dtype=np.float64)
    task = metric.name.removeprefix("task ")
    a = np.array([e.tasks[task] for e in arm])
    r = np.array([e.tasks[task] for e in reference])
    return (a - r).mean(axis=0), np.ones(a.shape[1])


@dataclass(frozen=True, slots=True)
class ArmMetric:
    """One arm on one metric."""

    arm: str
    metric: str
    lower_is_better: bool
    start: float
    """The starting model's value."""
    change: float
    """Mean over seeds of (trained - start)."""
    vs_reference: Interval | None
    """Paired difference from the reference arm, t-interval over seeds (None for the reference)."""
    vs_reference_items: Interval | None
    """The same difference, bootstrap interval over documents/items."""

    def to_json(self) -> dict[str, Any]:
        """As results.json lists it: an undefined interval end (one seed) is null, not NaN."""

        def finite(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: finite(v) for k, v in value.items()}
            return None if isinstance(value, float) and math.isnan(value) else value

        return finite(asdict(self)) | {"verdict": self.verdict()}

    def verdict(self) -> str:
        """'better'/'worse' when both intervals exclude zero, else 'no difference'. With one seed the
        run-to-run noise is unmeasured (a second random sample can look 'better' than the first
        on the documents alone), so there is no verdict."""
        if self.vs_reference is None:
            return "reference"
        if math.isnan(self.vs_reference.low):
            return "not assessed (1 seed)"
        if not (self.vs_reference.excludes_zero() and self.vs_reference_items.excludes_zero()):
            return "no difference"
        return "better" if (self.vs_reference.mean < 0) == self.lower_is_better else "worse"


def compare_arms(
    evals: dict[Any, ModelEval],
    *,
    arms: list[str],
    seeds: list[int],
    reference: str,
    resamples: int,
    seed: int = 0,
) -> list[ArmMetric]:
    """Every arm on every metric: `evals` holds "base" (the starting model) and (arm, seed) keys."""
    base = evals["base"]
    rows = []
    for metric in metrics_of(base):
        start = value(base, metric)
        ref = [evals[(reference, s)] for s in seeds]
        for arm in arms:
            runs = [evals[(arm, s)] for s in seeds]
            change = float(np.mean([value(e, metric) - start for e in runs]))
            paired, by_item = None, None
            if arm != reference:
                paired = t_interval(
                    [value(a, metric) - value(r, metric) for a, r in zip(runs, ref, strict=True)]
                )
                differences, weights = item_differences(runs, ref, metric)
                by_item = bootstrap_ratio(differences, weights, resamples=resamples, seed=seed)
            rows.append(ArmMetric(arm, metric.name, metric.lower_is_better, start, change, paired, by_item))
    return rows


def _interval(i: Interval | None, scale: float, digits: int) -> str:
    if i is None:
        return "—"
    if math.isnan(i.low):
        return "n/a (1 seed)"
    mark = " *" if i.excludes_zero() else ""
    return f"[{i.low * scale:+.{digits}f}, {i.high * scale:+.{digits}f}]{mark}"


def metric_table(rows: list[ArmMetric], metric: str, reference: str) -> str:
    """One metric's markdown table: per arm, change from the start and difference from the
    reference with both intervals (* where an interval excludes zero) and the verdict."""
    mine = [r for r in rows if r.metric == metric]
    is_loss = mine[0].lower_is_better
    # losses in nats/token; accuracies in points (percent)
    scale, digits, unit = (1.0, 4, "nats/token") if is_loss else (100.0, 1, "points")
    title = (
        f"**{metric}** ({unit}; start {mine[0].start * scale:.{digits}f}; "
        f"{'lower' if is_loss else 'higher'} is better)"
    )
    header = [
        "arm",
        "change from start",
        f"vs {reference}",
        "95% CI over seeds (t)",
        "95% CI over items (bootstrap)",
        "verdict",
    ]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in mine:
        diff = "—" if r.vs_reference is None else f"{r.vs_reference.mean * scale:+.{digits}f}"
        cells = [
            r.arm,
            f"{r.change * scale:+.{digits}f}",
            diff,
            _interval(r.vs_reference, scale, digits),
            _interval(r.vs_reference_items, scale, digits),
            r.verdict(),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict_table(rows: list[ArmMetric], reference: str) -> str:
    """Per arm (rows) and metric (columns): better / worse / no difference than the reference."""
    metrics = list(dict.fromkeys(r.metric for r in rows))
    arms = list(dict.fromkeys(r.arm for r in rows if r.arm != reference))
    header = ["arm", *metrics]
    lines = [
        f"**Against {reference}** (better/worse: both 95% intervals exclude zero)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    verdicts = {(r.arm, r.metric): r.verdict() for r in rows}
    for arm in arms:
        lines.append("| " + " | ".join([arm, *(verdicts[(arm, m)] for m in metrics)]) + " |")
    return "\n".join(lines) + "\n"


def training_table(training: list[dict[str, Any]]) -> str:
    """Per arm: what it trained on and how much (means over seeds)."""
    header = [
        "arm",
        "training set",
        "objective",
        "set tokens",
        "steps",
        "trained tokens",
        "distinct tokens",
        "samples seen",
        "mean sample tokens",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for t in training:
        cells = [
            t["arm"],
            t["band"],
            t["objective"],
            f"{t['set_tokens']:,.0f}",
            f"{t['steps']:,.0f}",
            f"{t['trained_tokens']:,.0f}",
            f"{t['distinct_tokens']:,.0f}",
            f"{t['samples_seen']:,.0f}",
            f"{t['mean_sample_tokens']:,.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
