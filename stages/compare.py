"""Compare: the paper's experiment in miniature — does MidRanking beat random data on *this* corpus?

    midrank compare --config configs/default.yaml                        # one seed per arm
    midrank compare --config configs/default.yaml 'compare.seeds=[0,1,2]'  # mean ± std over seeds

From one scoring pass it selects equal-token-budget training sets (`random`, `top`, `bottom`,
`midranking`; `irdro` trains with online IR-DRO on the random set), continually trains the same
starting model on each with the same steps, learning rate and seed, and evaluates every run on the
same held-out set. Writes `<out_dir>/reports/<name>/`: `table.md` (also printed), `results.json`
(every run's numbers), `deltas.png` (held-out loss change per arm, overall and per source, with
the spread over seeds) and `config.yaml`.

Unlike the pipeline's stages this is an experiment built from them, so it calls `score`, `select`
and `train` directly (STYLE.md has stages share code only through pipeline/; a composition of
stages is the one exception, like `demo`). Reruns reuse finished selections and training runs.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from pathlib import Path
from typing import Any

from pipeline.artifacts import write_json_atomic, write_text_atomic
from pipeline.config import BandConfig, Config, ConfigError, SelectConfig, save_config
from pipeline.layout import Layout
from pipeline.locks import lock
from pipeline.log import get_logger
from pipeline.outputs import BandManifest, RunMetrics, to_json
from pipeline.plots import plot_compare
from stages import score, select, train


def arm_setup(cfg: Config, arm: str, seed: int) -> tuple[BandConfig, str]:
    """(the training set's band, the training objective) of an arm."""
    c = cfg.compare
    tokens = {"measure": "tokens", "keep": c.keep}
    bands = {
        "random": BandConfig(strategy="random", seed=seed, **tokens),
        "irdro": BandConfig(strategy="random", seed=seed, **tokens),
        "top": BandConfig(strategy="top", **tokens),
        "bottom": BandConfig(strategy="bottom", **tokens),
        "midranking": BandConfig(strategy="midranking", skip=c.skip, **tokens),
        "all": BandConfig(strategy="all", measure="tokens"),
    }
    return bands[arm], "irdro" if arm == "irdro" else "uniform"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class ArmRun:
    """One training run of the experiment and what it read and wrote."""

    arm: str
    seed: int
    band: str
    objective: str
    run_dir: Path
    selection: BandManifest
    metrics: RunMetrics

    def record(self) -> dict[str, Any]:
        """The run as results.json lists it (its metrics without the config)."""
        return {
            "arm": self.arm,
            "seed": self.seed,
            "band": self.band,
            "objective": self.objective,
            "run_dir": str(self.run_dir),
            "kept_tokens": self.selection.tokens.kept,
            "metrics": {k: v for k, v in to_json(self.metrics).items() if k != "config"},
        }


def summarize(runs: list[ArmRun], arms: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per arm: means and standard deviations over its seeds."""
    rows = []
    for arm in arms:
        arm_runs = [r for r in runs if r.arm == arm]
        sources = list(arm_runs[0].metrics.before.per_source)
        delta = {
            source: _mean_std(
                [next(t.delta for t in r.metrics.table if t.source == source) for r in arm_runs]
            )
            for source in [*sources, "overall"]
        }
        rows.append(
            {
                "arm": arm,
                # the random sample differs per seed: random-k0.5-seed*-tokens
                "band": arm_runs[0].band
                if len({r.band for r in arm_runs}) == 1
                else re.sub(r"seed\d+", "seed*", arm_runs[0].band),
                "objective": arm_runs[0].objective,
                "seeds": [r.seed for r in arm_runs],
                "kept_tokens": _mean_std([r.selection.tokens.kept for r in arm_runs])[0],
                "trained_tokens": _mean_std([r.metrics.train.trained_tokens for r in arm_runs])[0],
                "loss_before": arm_runs[0].metrics.before.overall.loss,
                "loss_after": _mean_std([r.metrics.after.overall.loss for r in arm_runs]),
                "delta": delta,
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    sources = [s for s in rows[0]["delta"] if s != "overall"]
    seeds = len(rows[0]["seeds"])
    spread = f" (mean ± std over {seeds} seeds)" if seeds > 1 else " (one seed)"

    def cell(pair: tuple[float, float]) -> str:
        return f"{pair[0]:+.4f} ± {pair[1]:.4f}" if seeds > 1 else f"{pair[0]:+.4f}"

    header = [
        "arm",
        "training set",
        "objective",
        "kept tokens",
        "trained tokens",
        "loss before",
        "loss after",
        "Δ overall",
        *(f"Δ {s}" for s in sources),
    ]
    lines = [
        f"Held-out loss (nats/token) before and after continual training; Δ = after - before, lower is better{spread}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for r in rows:
        after = f"{r['loss_after'][0]:.4f}" + (f" ± {r['loss_after'][1]:.4f}" if seeds > 1 else "")
        cells = [
            r["arm"],
            r["band"],
            r["objective"],
            f"{r['kept_tokens']:,.0f}",
            f"{r['trained_tokens']:,.0f}",
            f"{r['loss_before']:.4f}",
            after,
            cell(r["delta"]["overall"]),
            *(cell(r["delta"][s]) for s in sources),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def train_arms(cfg: Config) -> list[ArmRun]:
    """Select every arm's training set, then train each arm for each seed (finished work is kept)."""
    log = get_logger()
    c, layout = cfg.compare, Layout(cfg.out_dir)
    plan = [(arm, seed, *arm_setup(cfg, arm, seed)) for seed in c.seeds for arm in c.arms]
    unique_bands = list({band.resolved_name(): band for _, _, band, _ in plan}.values())
    select.run(dataclasses.replace(cfg, select=SelectConfig(bands=tuple(unique_bands))))
    runs = []
    for index, (arm, seed, band, objective) in enumerate(plan, start=1):
        name = f"{c.name}-{arm}-seed{seed}"
        log.info(f"compare: arm {index}/{len(plan)}: {name} ({objective} on {band.resolved_name()})")
        train_cfg = dataclasses.replace(
            cfg.train, name=name, band=band.resolved_name(), data_paths=(), objective=objective, seed=seed
        )
        # every arm starts from the same model: train evaluates it once, and the arms share that
        run_dir = train.run(dataclasses.replace(cfg, train=train_cfg))
        selection, metrics = (
            BandManifest.read(layout.train_run(name).selection),
            RunMetrics.read(layout.train_run(name).metrics),
        )
        runs.append(ArmRun(arm, seed, band.resolved_name(), objective, run_dir, selection, metrics))
    return runs


def run(cfg: Config) -> Path:
    c = cfg.compare
    if not cfg.train.eval_paths:
        raise ConfigError("train.eval_paths: compare needs a held-out set to evaluate every arm on")
    score.run(cfg)  # one scoring pass for every arm; nothing to do when finished
    with lock(Layout(cfg.out_dir), f"compare-{c.name}"):
        runs = train_arms(cfg)
        rows = summarize(runs, c.arms)
        paths = Layout(cfg.out_dir).report(c.name)
        paths.dir.mkdir(parents=True, exist_ok=True)
        table = markdown_table(rows)
        write_text_atomic(paths.table, table)
        write_json_atomic(paths.results, {"arms": rows, "runs": [r.record() for r in runs]})
        plot_compare(rows, paths.deltas)
        save_config(cfg, paths.dir)
    print(table)
    get_logger().info(f"compared {len(c.arms)} arm(s) x {len(c.seeds)} seed(s) -> {paths.dir}")
    return paths.dir
