"""The compare experiment's analysis: each arm against the reference arm, one interval per
contrast over seeds and documents, Holm across the secondary contrasts, an equivalence test
before anything is called equal (docs/compare.md, "Statistics").

    evals = {"base": ModelEval(...), ("midranking", 0): ModelEval(...), ...}
    rows = compare_arms(evals, arms=["random", "midranking"], seeds=[0, 1, 2], reference="random",
                        primary=("midranking", "heldout loss"), margins=Margins(0.005, 0.02))
    print(metric_table(rows, "heldout loss", "random"))

A model's evaluation (`ModelEval`) holds per-document NLL, target tokens and source on the
held-out and out-of-distribution sets, and per task item the correct answer's NLL, its length in
characters, and whether it was the model's choice. Metrics:

- tested (a verdict): `heldout loss` (token-weighted), `heldout loss by source` (each source's
  loss, equally weighted: the source mix of the held-out set does not weigh in), `ood loss`, and
  `task <name> loss` (nats per character of the correct answer: continuous where accuracy moves
  by whole items);
- descriptive (an interval, no verdict): `heldout loss: <source>` and `task <name> accuracy`.

Verdicts: the pre-registered primary contrast is tested alone at 5%; every other arm x tested
metric is one family, Holm-adjusted, for difference and for equivalence alike. `better`/`worse`:
adjusted p < 0.05; else `equivalent`: the TOST p (within +-margin) adjusted < 0.05; else
`inconclusive`. With one seed an arm's run-to-run noise is unmeasured: `not assessed (1 seed)`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from pipeline.stats import ALPHA, Estimate, contrast, holm


@dataclass(frozen=True, slots=True)
class DocumentLosses:
    """Summed NLL, target tokens and source of each held-out sample, in the set's order."""

    nll: list[float]
    tokens: list[int]
    sources: list[str]


@dataclass(frozen=True, slots=True)
class TaskItems:
    """Per item of a multiple-choice task, in file order."""

    correct: list[float]
    """1.0 when the correct choice scored highest (lm-eval's acc_norm), else 0.0."""
    nll: list[float]
    """Minus the log-likelihood of the correct choice's tokens after the question."""
    chars: list[int]
    """Characters of the correct choice (its NLL's denominator)."""


@dataclass(frozen=True, slots=True)
class ModelEval:
    """One model's numbers on everything compare measures."""

    heldout: DocumentLosses
    ood: DocumentLosses | None
    tasks: dict[str, TaskItems]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelEval:
        return cls(
            heldout=DocumentLosses(**data["heldout"]),
            ood=DocumentLosses(**data["ood"]) if data["ood"] is not None else None,
            tasks={name: TaskItems(**items) for name, items in data["tasks"].items()},
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Role = Literal["tested", "descriptive"]


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    unit: Literal["nats/token", "nats/char", "points"]
    role: Role
    part: str
    """`heldout`, `ood` or `task <name>`: where its numbers are."""
    source: str | None = None
    """Only this source's documents."""
    by_source: bool = False
    """Each source's ratio, averaged with equal weights."""
    accuracy: bool = False

    @property
    def lower_is_better(self) -> bool:
        return not self.accuracy

    def data(self, evaluation: ModelEval) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(per item: numerator, denominator; per item group labels or None)."""
        if self.part.startswith("task "):
            items = evaluation.tasks[self.part.removeprefix("task ")]
            if self.accuracy:
                return np.array(items.correct), np.ones(len(items.correct)), None
            return np.array(items.nll), np.array(items.chars, dtype=np.float64), None
        docs = getattr(evaluation, self.part)
        nll, tokens, sources = (
            np.array(docs.nll),
            np.array(docs.tokens, dtype=np.float64),
            np.array(docs.sources),
        )
        if self.source is not None:
            mine = sources == self.source
            return nll[mine], tokens[mine], None
        return nll, tokens, sources if self.by_source else None


def metrics_of(evaluation: ModelEval) -> list[Metric]:
    out = [
        Metric("heldout loss", "nats/token", "tested", "heldout"),
        Metric("heldout loss by source", "nats/token", "tested", "heldout", by_source=True),
    ]
    out += [Metric("ood loss", "nats/token", "tested", "ood")] if evaluation.ood is not None else []
    out += [Metric(f"task {name} loss", "nats/char", "tested", f"task {name}") for name in evaluation.tasks]
    out += [
        Metric(f"heldout loss: {source}", "nats/token", "descriptive", "heldout", source=source)
        for source in sorted(set(evaluation.heldout.sources))
    ]
    out += [
        Metric(f"task {name} accuracy", "points", "descriptive", f"task {name}", accuracy=True)
        for name in evaluation.tasks
    ]
    return out


def value(evaluation: ModelEval, metric: Metric) -> float:
    """The metric of one model: sum(NLL) / sum(tokens), or the mean of each source's."""
    nll, tokens, groups = metric.data(evaluation)
    if groups is None:
        return float(nll.sum() / tokens.sum())
    return float(np.mean([nll[groups == g].sum() / tokens[groups == g].sum() for g in np.unique(groups)]))


@dataclass(frozen=True, slots=True)
class Margins:
    """Equivalence margins: nats per token (losses), nats per character (task losses)."""

    loss: float = 0.005
    task: float = 0.02

    def of(self, metric: Metric) -> float | None:
        if metric.role != "tested":
            return None
        return self.task if metric.unit == "nats/char" else self.loss


@dataclass(frozen=True, slots=True)
class ArmMetric:
    """One arm on one metric."""

    arm: str
    metric: str
    unit: str
    lower_is_better: bool
    role: str
    """`reference`, `primary`, `secondary` (Holm family) or `descriptive`."""
    start: float
    """The starting model's value."""
    change: float
    """Mean over seeds of (trained - start)."""
    estimate: Estimate | None
    """The arm minus the reference (None for the reference)."""
    margin: float | None = None
    p_adjusted: float | None = None
    """p of "no difference": as is for the primary, Holm-adjusted in the secondary family."""
    p_equivalent_adjusted: float | None = None
    """TOST p of "differs by margin or more", adjusted the same way."""

    def interval(self) -> tuple[float, float]:
        return self.estimate.interval() if self.estimate is not None else (math.nan, math.nan)

    def verdict(self) -> str:
        if self.role in ("reference", "descriptive"):
            return self.role if self.role == "reference" else ""
        if not self.estimate.defined:
            return "not assessed (1 seed)" if min(self.estimate.seeds) < 2 else "not assessed (1 item)"
        if self.p_adjusted < ALPHA:
            return "better" if (self.estimate.mean < 0) == self.lower_is_better else "worse"
        if self.p_equivalent_adjusted < ALPHA:
            return "equivalent"
        return "inconclusive"

    def to_json(self) -> dict[str, Any]:
        """As results.json lists it: undefined numbers are null, not NaN."""

        def finite(x: Any) -> Any:
            if isinstance(x, dict):
                return {k: finite(v) for k, v in x.items()}
            return None if isinstance(x, float) and not math.isfinite(x) else x

        low, high = self.interval()
        return finite(asdict(self) | {"low": low, "high": high, "verdict": self.verdict()})


def compare_arms(
    evals: dict[Any, ModelEval],
    *,
    arms: list[str],
    seeds: list[int],
    reference: str,
    primary: tuple[str, str] | None = None,
    margins: Margins = Margins(),
) -> list[ArmMetric]:
    """Every arm on every metric: `evals` holds "base" (the starting model) and (arm, seed) keys.
    `primary`: the pre-registered (arm, metric)."""
    base = evals["base"]
    rows = []
    for metric in metrics_of(base):
        start = value(base, metric)
        ref = [evals[(reference, s)] for s in seeds]
        for arm in arms:
            runs = [evals[(arm, s)] for s in seeds]
            change = float(np.mean([value(e, metric) - start for e in runs]))
            if arm == reference:
                role, estimate = "reference", None
            else:
                role = "descriptive" if metric.role == "descriptive" else "secondary"
                role = "primary" if primary == (arm, metric.name) else role
                _nll, tokens, groups = metric.data(base)
                estimate = contrast(
                    np.stack([metric.data(e)[0] for e in runs]),
                    np.stack([metric.data(e)[0] for e in ref]),
                    tokens,
                    groups,
                )
            rows.append(
                ArmMetric(
                    arm, metric.name, metric.unit, metric.lower_is_better, role, start, change, estimate,
                    margins.of(metric),
                )
            )  # fmt: skip
    return _adjusted(rows)


def _adjusted(rows: list[ArmMetric]) -> list[ArmMetric]:
    """The rows with their verdicts' p-values: the primary's as they are, the secondary family's
    Holm-adjusted (difference and equivalence each)."""
    from dataclasses import replace

    out = [
        replace(r, p_adjusted=r.estimate.p_value(), p_equivalent_adjusted=r.estimate.p_equivalent(r.margin))
        if r.role == "primary"
        else r
        for r in rows
    ]
    family = [i for i, r in enumerate(out) if r.role == "secondary"]
    differ = holm([out[i].estimate.p_value() for i in family])
    equal = holm([out[i].estimate.p_equivalent(out[i].margin) for i in family])
    for i, p, q in zip(family, differ, equal, strict=True):
        out[i] = replace(out[i], p_adjusted=p, p_equivalent_adjusted=q)
    return out


def _scale(unit: str) -> tuple[float, int]:
    return (100.0, 1) if unit == "points" else (1.0, 4)


def _ci(r: ArmMetric) -> str:
    if r.estimate is None:
        return "—"
    if not r.estimate.defined:
        return "n/a (1 seed)" if min(r.estimate.seeds) < 2 else "n/a (1 item)"
    scale, digits = _scale(r.unit)
    low, high = r.interval()
    mark = " *" if low > 0 or high < 0 else ""
    return f"[{low * scale:+.{digits}f}, {high * scale:+.{digits}f}]{mark}"


def _p(p: float | None) -> str:
    if p is None:
        return "—"
    return "n/a" if math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _lines(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(cells) + " |" for cells in rows),
    ]


def metric_table(rows: list[ArmMetric], metric: str, reference: str) -> str:
    """One tested metric's markdown table: per arm, change from the start, difference from the
    reference with its 95% interval, the adjusted p-values and the verdict."""
    mine = [r for r in rows if r.metric == metric]
    first = mine[0]
    scale, digits = _scale(first.unit)
    better = "lower" if first.lower_is_better else "higher"
    title = f"**{metric}** ({first.unit}; start {first.start * scale:.{digits}f}; {better} is better)"
    margin = next((r.margin for r in mine if r.margin is not None), None)
    header = ["arm", "change from start", f"vs {reference}", "95% CI (seeds + items)", "p", "equivalence p"]
    header = [*header, "verdict"] if margin is not None else header[:4]
    body = []
    for r in mine:
        diff = "—" if r.estimate is None else f"{r.estimate.mean * scale:+.{digits}f}"
        cells = [
            r.arm + (" (primary)" if r.role == "primary" else ""),
            f"{r.change * scale:+.{digits}f}",
            diff,
            _ci(r),
        ]
        if margin is not None:
            cells += [_p(r.p_adjusted), _p(r.p_equivalent_adjusted), r.verdict()]
        body.append(cells)
    note = f"equivalence margin ±{margin:g} {first.unit}" if margin is not None else "descriptive: no test"
    return "\n".join([title, "", *_lines(header, body), "", note]) + "\n"


def verdict_table(rows: list[ArmMetric], reference: str) -> str:
    """Per arm (rows) and tested metric (columns): the verdict against the reference."""
    tested = [r for r in rows if r.role in ("primary", "secondary")]
    metrics = list(dict.fromkeys(r.metric for r in tested))
    arms = list(dict.fromkeys(r.arm for r in tested))
    verdicts = {
        (r.arm, r.metric): r.verdict() + (" (primary)" if r.role == "primary" else "") for r in tested
    }
    body = [[arm, *(verdicts.get((arm, m), "") for m in metrics)] for arm in arms]
    title = (
        f"**Against {reference}** (primary: tested alone at 5%; the rest Holm-adjusted as one family; "
        "equivalent: TOST within the margin)"
    )
    return "\n".join([title, "", *_lines(["arm", *metrics], body)]) + "\n"


def descriptive_table(rows: list[ArmMetric], prefix: str, reference: str, title: str) -> str:
    """Arms (rows) x the descriptive metrics starting with `prefix` (columns): the difference
    from the reference and its 95% interval (* excludes zero; no multiplicity correction)."""
    mine = [r for r in rows if r.role == "descriptive" and r.metric.startswith(prefix)]
    if not mine:
        return ""
    metrics = list(dict.fromkeys(r.metric for r in mine))
    arms = list(dict.fromkeys(r.arm for r in mine))
    cells = {}
    for r in mine:
        scale, digits = _scale(r.unit)
        cells[r.arm, r.metric] = f"{r.estimate.mean * scale:+.{digits}f} {_ci(r)}"
    starts = {r.metric: r.start * _scale(r.unit)[0] for r in mine}
    header = [
        "arm",
        *(f"{m.removeprefix(prefix)} ({starts[m]:.{_scale(mine[0].unit)[1]}f})" for m in metrics),
    ]
    body = [[arm, *(cells[arm, m] for m in metrics)] for arm in arms]
    note = f"vs {reference}, with the 95% interval; in parentheses the starting model's value"
    return "\n".join([title, "", *_lines(header, body), "", note]) + "\n"


def training_table(training: list[dict[str, Any]]) -> str:
    """Per arm: what it trained on and the compute it took (means over seeds)."""
    header = [
        "arm", "training set", "objective", "set tokens", "steps", "trained tokens", "distinct tokens",
        "samples seen", "mean sample tokens", "positions", "attention ΣL² (M)", "effective samples / batch",
    ]  # fmt: skip

    def number(x: Any, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    body = [
        [
            t["arm"],
            t["band"],
            t["objective"],
            number(t["set_tokens"], ",.0f"),
            number(t["steps"], ",.0f"),
            number(t["trained_tokens"], ",.0f"),
            number(t["distinct_tokens"], ",.0f"),
            number(t["samples_seen"], ",.0f"),
            number(t["mean_sample_tokens"], ",.1f"),
            number(t["positions"], ",.0f"),
            number(None if t["attention"] is None else t["attention"] / 1e6, ",.2f"),
            f"{number(t['effective_samples'], '.1f')} of {number(t['batch_samples'], '.1f')}",
        ]
        for t in training
    ]
    return "\n".join(_lines(header, body)) + "\n"
