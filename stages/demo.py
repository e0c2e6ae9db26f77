"""Demo: the whole pipeline in order — score, select, inspect, train — then where everything went.

    midrank demo --config configs/default.yaml       # make demo: builds the embedded inputs first

Each stage skips what is already done, so a rerun only prints the summary. Like `compare`, this is
a composition of stages, so it calls their `run` directly (the one exception to stages sharing
code only through pipeline/).
"""

from __future__ import annotations

import time

from pipeline.config import Config
from pipeline.layout import Layout
from pipeline.log import inert
from pipeline.outputs import BandManifest, RunMetrics, ScoresSummary
from stages import inspect, score, select, train


def run(cfg: Config) -> None:
    started = time.perf_counter()
    layout = Layout(cfg.out_dir)
    score.run(cfg)
    select.run(cfg)
    inspect.run(cfg)
    run = layout.train_run(train.run(cfg).name)  # the run's name is derived inside train
    scored = ScoresSummary.read(layout.scores_summary)
    band_paths = layout.band(cfg.train.band or cfg.select.bands[0].resolved_name())  # the band trained on
    band = BandManifest.read(band_paths.manifest)
    metrics = RunMetrics.read(run.metrics)
    t = metrics.train
    lines = [
        f"midrank demo: done in {time.perf_counter() - started:.0f}s (stages only; reruns skip finished work)",
        f"  scored    {scored.samples:,} samples, {scored.tokens:,} tokens -> {layout.scores_dir}/",
        f"  band      {band.band}: loss {band.loss_thresholds.min_kept:.3f}..{band.loss_thresholds.max_kept:.3f}, "
        f"kept {band.samples.kept:,}/{band.samples.total:,} samples, "
        f"{band.tokens.kept:,}/{band.tokens.total:,} tokens -> {band_paths.dir}/",
        f"  report    {layout.report(cfg.inspect.name).index}",
        f"  trained   {t.steps} steps ({t.objective}), {t.trained_tokens:,} target tokens trained on, "
        f"{t.tokens_per_second:,.0f} tok/s -> {run.model}/",
    ]
    if metrics.after is not None:
        b, a = metrics.before.overall, metrics.after.overall
        lines.append(
            f"  held-out  loss {b.loss:.4f} -> {a.loss:.4f} ({a.loss - b.loss:+.4f} nats/token), "
            f"next-token accuracy {b.accuracy:.2%} -> {a.accuracy:.2%}"
        )
    print(inert("\n".join(lines)))  # paths and names from the data
