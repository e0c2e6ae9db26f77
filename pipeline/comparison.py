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
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np

from pipeline.outputs import JsonRecord
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


@dataclass(frozen=True, slots=True, kw_only=True)
class CachedEvaluation(JsonRecord):
    """reports/<compare>/evals/<label>.json: a model's evaluation and the key of what it was made
    of (the weights and every evaluation input); a file of another key is evaluated again."""

    key: str
    evaluation: ModelEval


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
        """(per item: numerator, denominator; per item stratum — its source — or None)."""
        if self.part.startswith("task "):
            items = evaluation.tasks[self.part.removeprefix("task ")]
            if self.accuracy:
                return np.array(items.correct), np.ones(len(items.correct)), None
            return np.array(items.nll), np.array(items.chars, dtype=np.float64), None
        docs = getattr(evaluation, self.part)
        nll, tokens = np.array(docs.nll), np.array(docs.tokens, dtype=np.float64)
        sources = np.array(docs.sources)
        if self.source is not None:
            mine = sources == self.source
            return nll[mine], tokens[mine], None
        return nll, tokens, sources


def metrics_of(evaluation: ModelEval) -> list[Metric]:
    sources = sorted(set(evaluation.heldout.sources))
    out = [Metric("heldout loss", "nats/token", "tested", "heldout")]
    if len(sources) > 1:  # with one source it is the same number
        out += [Metric("heldout loss by source", "nats/token", "tested", "heldout", by_source=True)]
    out += [Metric("ood loss", "nats/token", "tested", "ood")] if evaluation.ood is not None else []
    out += [
        Metric(f"task {name} loss", "nats/char", "tested", f"task {name}")
        for name, items in evaluation.tasks.items()
        if items.nll  # tasks whose correct answer lm-eval does not name by index have none
    ]
    out += [
        Metric(f"heldout loss: {source}", "nats/token", "descriptive", "heldout", source=source)
        for source in sources
    ]
    out += [
        Metric(f"task {name} accuracy", "points", "descriptive", f"task {name}", accuracy=True)
        for name in evaluation.tasks
    ]
    return out


def value(evaluation: ModelEval, metric: Metric) -> float:
    """The metric of one model: sum(NLL) / sum(tokens), or the mean of each source's."""
    nll, tokens, sources = metric.data(evaluation)
    if not metric.by_source:
        return float(nll.sum() / tokens.sum())
    return float(np.mean([nll[sources == g].sum() / tokens[sources == g].sum() for g in np.unique(sources)]))


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
    """`reference`, `primary`, `secondary` (the Holm family), `calibration` (the A/A contrast: a
    check of the analysis, tested alone, not a hypothesis) or `descriptive`."""
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
    versus: str = ""
    """The arm it is compared with: the reference, or for a band's matched control, the control."""

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
        extra = {"low": low, "high": high, "verdict": self.verdict()}
        if self.estimate is not None:
            extra |= {
                "p": self.estimate.p_value(),
                "equivalence_bound": self.estimate.equivalence_bound(),
                "detectable_80": self.estimate.detectable(),
            }
        return finite(asdict(self) | extra)


MATCHED_CONTROLS = ("random_matched", "random_length_matched")
"""Random samples matched to a MidRanking band: that band is also compared with each of them."""

CALIBRATION_ARMS = ("random_replicate",)
"""Arms that differ from the reference by nothing but the draw (A/A)."""


def contrasts_of(arms: list[str], reference: str) -> list[tuple[str, str]]:
    """(arm, compared with): every arm against the reference, and each MidRanking band against
    the random samples matched to it (`random_matched.<key>` to `midranking.<key>`) — the contrast
    that leaves only the loss."""
    pairs = [(arm, reference) for arm in arms if arm != reference]
    for control in arms:
        name, dot, key = control.partition(".")
        band = f"midranking{dot}{key}"
        if name in MATCHED_CONTROLS and band in arms and control != reference and band != reference:
            pairs.append((band, control))
    return pairs


def compare_arms(
    evals: dict[Any, ModelEval],
    *,
    arms: list[str],
    seeds: list[int],
    reference: str,
    primary: tuple[str, str] | None = None,
    margins: Margins = Margins(),
) -> list[ArmMetric]:
    """Every contrast on every metric: `evals` holds "base" (the starting model) and (arm, seed)
    keys. `primary`: the pre-registered (arm, metric), against the reference."""
    base = evals["base"]
    rows = []
    for metric in metrics_of(base):
        start = value(base, metric)

        def change(arm: str, metric: Metric = metric, start: float = start) -> float:
            return float(np.mean([value(evals[(arm, s)], metric) - start for s in seeds]))

        _, tokens, strata = metric.data(base)
        rows.append(
            ArmMetric(
                reference,
                metric.name,
                metric.unit,
                metric.lower_is_better,
                "reference",
                start,
                change(reference),
                None,
            )
        )
        for arm, versus in contrasts_of(arms, reference):
            estimate = contrast(
                np.stack([metric.data(evals[(arm, s)])[0] for s in seeds]),
                np.stack([metric.data(evals[(versus, s)])[0] for s in seeds]),
                tokens,
                strata,
                equal_strata=metric.by_source,
            )
            if metric.role == "descriptive":
                role = "descriptive"
            elif primary == (arm, metric.name) and versus == reference:
                role = "primary"
            elif arm in CALIBRATION_ARMS and versus == reference:
                role = "calibration"
            else:
                role = "secondary"
            rows.append(
                ArmMetric(
                    arm, metric.name, metric.unit, metric.lower_is_better, role, start, change(arm),
                    estimate, margins.of(metric), versus=versus,
                )
            )  # fmt: skip
    if primary is not None and not any(r.role == "primary" for r in rows):
        raise ValueError(
            f"the primary contrast {primary[0]} vs {reference} on {primary[1]!r} is not among the "
            f"metrics measured ({', '.join(m.name for m in metrics_of(base))})"
        )
    return _adjusted(rows)


def _adjusted(rows: list[ArmMetric]) -> list[ArmMetric]:
    """The rows with their verdicts' p-values: the primary's and the calibration's as they are,
    the secondary family's Holm-adjusted (difference and equivalence each)."""
    out = [
        replace(r, p_adjusted=r.estimate.p_value(), p_equivalent_adjusted=r.estimate.p_equivalent(r.margin))
        if r.role in ("primary", "calibration")
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


def contrast_label(r: ArmMetric, reference: str) -> str:
    """The contrast as the tables name it: the arm (against the reference), or `<arm> vs <control>`."""
    label = r.arm if r.role == "reference" or r.versus == reference else f"{r.arm} vs {r.versus}"
    return label + {"primary": " (primary)", "calibration": " (A/A)"}.get(r.role, "")


def metric_table(rows: list[ArmMetric], metric: str, reference: str) -> str:
    """One tested metric's markdown table: per contrast, the arm's change from the start, the
    difference with its 95% interval, the p-values, the verdict, and what the design could see:
    the smallest margin TOST would accept and the difference it detects with 80% power."""
    mine = [r for r in rows if r.metric == metric]
    first = mine[0]
    scale, digits = _scale(first.unit)
    better = "lower" if first.lower_is_better else "higher"
    title = f"**{metric}** ({first.unit}; start {first.start * scale:.{digits}f}; {better} is better)"
    margin = next((r.margin for r in mine if r.margin is not None), None)
    header = ["contrast", "change from start", "difference", "95% CI (seeds + items)"]
    tested = margin is not None
    if tested:
        header += ["p", "equivalence p", "verdict", "equivalent within", "detectable (80%)"]
    body = []
    for r in mine:
        defined = r.estimate is not None and r.estimate.defined
        cells = [
            contrast_label(r, reference),
            f"{r.change * scale:+.{digits}f}",
            "—" if r.estimate is None else f"{r.estimate.mean * scale:+.{digits}f}",
            _ci(r),
        ]
        if tested:
            cells += [_p(r.p_adjusted), _p(r.p_equivalent_adjusted), r.verdict()]
            cells += [
                f"±{r.estimate.equivalence_bound() * scale:.{digits}f}" if defined else "—",
                f"{r.estimate.detectable() * scale:.{digits}f}" if defined else "—",
            ]
        body.append(cells)
    note = (
        f"equivalence margin ±{margin:g} {first.unit}; p: Holm-adjusted in the secondary family, "
        "as is for the primary and the A/A contrast"
        if tested
        else "descriptive: no test"
    )
    return "\n".join([title, "", *_lines(header, body), "", note]) + "\n"


def verdict_table(rows: list[ArmMetric], reference: str) -> str:
    """Per contrast (rows) and tested metric (columns): the verdict."""
    tested = [r for r in rows if r.role in ("primary", "secondary", "calibration")]
    metrics = list(dict.fromkeys(r.metric for r in tested))
    labels = list(dict.fromkeys(contrast_label(r, reference).removesuffix(" (primary)") for r in tested))
    verdicts = {
        (contrast_label(r, reference).removesuffix(" (primary)"), r.metric): r.verdict()
        + (" (primary)" if r.role == "primary" else "")
        for r in tested
    }
    body = [[label, *(verdicts.get((label, m), "") for m in metrics)] for label in labels]
    title = (
        f"**Verdicts** (against {reference} unless named; primary and A/A: tested alone at 5%; the "
        "rest Holm-adjusted as one family; equivalent: TOST within the margin)"
    )
    return "\n".join([title, "", *_lines(["contrast", *metrics], body)]) + "\n"


def descriptive_table(rows: list[ArmMetric], prefix: str, reference: str, title: str) -> str:
    """Contrasts (rows) x the descriptive metrics starting with `prefix` (columns): the difference
    and its 95% interval (* excludes zero; no multiplicity correction)."""
    mine = [r for r in rows if r.role == "descriptive" and r.metric.startswith(prefix)]
    if not mine:
        return ""
    metrics = list(dict.fromkeys(r.metric for r in mine))
    labels = list(dict.fromkeys(contrast_label(r, reference) for r in mine))
    cells = {}
    for r in mine:
        scale, digits = _scale(r.unit)
        cells[contrast_label(r, reference), r.metric] = f"{r.estimate.mean * scale:+.{digits}f} {_ci(r)}"
    starts = {r.metric: r.start * _scale(r.unit)[0] for r in mine}
    digits = _scale(mine[0].unit)[1]
    header = ["contrast", *(f"{m.removeprefix(prefix)} ({starts[m]:.{digits}f})" for m in metrics)]
    body = [[label, *(cells[label, m] for m in metrics)] for label in labels]
    note = "the difference with its 95% interval; in parentheses the starting model's value"
    return "\n".join([title, "", *_lines(header, body), "", note]) + "\n"


def training_table(training: list[dict[str, Any]]) -> str:
    """Per arm: what it trained on and the compute it took (means over seeds)."""
    header = [
        "arm", "training set", "objective", "set tokens", "steps", "trained tokens", "distinct tokens",
        "samples seen", "mean sample tokens", "positions", "attention ΣL² (M)", "effective samples / batch",
        "selection cost (forward tokens)", "compute in all (x reference)",
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
            number(t.get("selection_tokens"), ",.0f"),
            number(t.get("compute_ratio"), ".2f"),
        ]
        for t in training
    ]
    return "\n".join(_lines(header, body)) + "\n"
