"""Inspect: loss histograms with the bands drawn on, loss against length, example texts, a report.

    midrank inspect --config configs/default.yaml
    midrank inspect --config configs/default.yaml inspect.perplexity=true inspect.bins=100

Reads `<out_dir>/scores/` and every configured band already selected under `<out_dir>/selected/`,
and writes `<out_dir>/reports/<inspect.name>/`: `index.html`, the PNGs it shows, `summary.json`
(every number on the page) and `config.yaml`. The report is rebuilt in a temporary directory and
swapped in whole. All binning happens in Polars queries; rows are read only for the examples.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.artifacts import NoScoresError, digest, write_text_atomic
from pipeline.codec import encode
from pipeline.config import Config, save_config, to_dict
from pipeline.histograms import quantiles
from pipeline.layout import Layout, ReportPaths
from pipeline.locks import lock
from pipeline.log import get_logger
from pipeline.outputs import BandExcerpt, BandManifest, OutputError, Provenance, ReportBand, ReportSummary
from pipeline.report import render_report
from pipeline.report_examples import EXAMPLE_COLUMNS, KEY_COLUMNS, examples_by_band
from pipeline.report_figures import LOSS, DrawnBand, draw_figures, load_band
from pipeline.scores import scan_scores, score_set
from pipeline.target_scores import TARGET_COLUMNS, join_target, uses_target, without_target


def source_table(scores: pl.LazyFrame, top_decile: float) -> list[dict[str, Any]]:
    """Per source: size, loss centre, and its share of the corpus's highest-loss decile."""
    tail = scores.filter(LOSS >= top_decile).select(pl.len()).collect().item()
    table = (
        scores.group_by("source")
        .agg(
            samples=pl.len(),
            tokens=pl.col("n_tokens").cast(pl.Int64).sum(),
            mean_loss=LOSS.mean(),
            median_loss=LOSS.median(),
            in_top_decile=(LOSS >= top_decile).sum(),
        )
        .with_columns(top_decile_share=pl.col("in_top_decile") / max(tail, 1))
        .sort("mean_loss", descending=True)
        .collect()
    )
    return table.to_dicts()


def terminal_summary(summary: ReportSummary) -> None:
    log = get_logger()
    qs = "  ".join(f"q{float(q) * 100:g}={v:.3f}" for q, v in summary.quantiles.items())
    log.info(f"loss over {summary.samples:,} samples, {summary.tokens:,} tokens: {qs}")
    log.info(f"  {'source':24s} {'samples':>8s} {'tokens':>11s} {'mean':>6s} {'median':>6s} {'top-10%':>8s}")
    for s in summary.sources:
        log.info(
            f"  {s['source'][:24]:24s} {s['samples']:8,d} {s['tokens']:11,d} {s['mean_loss']:6.3f} "
            f"{s['median_loss']:6.3f} {s['top_decile_share']:8.1%}"
        )
    for band in summary.bands:
        samples, tokens = band.manifest.samples, band.manifest.tokens
        interval = band.interval
        key = band.key
        where = f"{key} {interval[0]:.3f}..{interval[1]:.3f}" if interval else f"not a single {key} interval"
        log.info(
            f"  band {band.name}: {where}; kept {samples.kept:,}/{samples.total:,} samples "
            f"({samples.kept / samples.total:.1%}), {tokens.kept:,}/{tokens.total:,} "
            f"tokens ({tokens.kept / max(tokens.total, 1):.1%})"
        )


def up_to_date(paths: ReportPaths, inputs_key: str) -> ReportSummary | None:
    """The report's summary when it was made from the same inputs (else None: draw it again)."""
    try:
        previous = ReportSummary.read(paths.summary)
    except OutputError:  # none yet, or written by another version
        return None
    return previous if previous.inputs_key == inputs_key else None


def load_scores(cfg: Config, layout: Layout) -> tuple[pl.LazyFrame, Provenance]:
    """The score set (the columns the report reads) and its provenance, joined to the target
    model's when a band ranks by reducible; an empty set is an error."""
    files, provenance = score_set(layout)
    scores, columns = scan_scores(files), [*EXAMPLE_COLUMNS, *KEY_COLUMNS]
    if any(uses_target(band) for band in cfg.select.bands):
        scores, provenance = join_target(cfg, scores, provenance)
        columns += TARGET_COLUMNS
    scores = scores.select(columns)
    if scores.select(pl.len()).collect().item() == 0:
        raise NoScoresError(
            f"{layout.scores_dir} holds no scored samples (every row skipped?); nothing to inspect"
        )
    return scores, provenance


def selected_bands(cfg: Config, layout: Layout, provenance: Provenance) -> list[DrawnBand]:
    """The config's bands that are selected; a band selected from other scores than these (another
    model, or another target model) is drawn with a warning."""
    bands, log = [], get_logger()
    for name in (b.resolved_name() for b in cfg.select.bands):
        if not layout.band(name).manifest.is_file():
            log.warning(f"band {name} is not selected yet (run `midrank select`); not drawn")
            continue
        band = load_band(layout, name)
        # a length-matched control is decided on the scores of the band it matches (with the
        # target model's when that band ranks by reducible), as select decides it
        decided_on = band.manifest.parameters
        matched = layout.band(decided_on.match).manifest if decided_on.strategy == "length_matched" else None
        if matched is not None and matched.is_file():
            decided_on = BandManifest.read(matched).parameters
        made, current = band.manifest.score_provenance.key, provenance.key
        if not (uses_target(decided_on) and "target" in current):  # the target not read, or not joined
            made, current = without_target(made), without_target(current)
        if made != current:
            log.warning(f"band {name} was selected from other scores than these; run `midrank select` again")
        bands.append(band)
    return bands


def build_summary(
    cfg: Config,
    scores: pl.LazyFrame,
    provenance: Provenance,
    bands: list[DrawnBand],
    inputs_key: str,
    work: Path,
) -> ReportSummary:
    """Every number and figure of the report (figures drawn into `work`)."""
    samples, tokens = scores.select(pl.len(), pl.col("n_tokens").cast(pl.Int64).sum()).collect().row(0)
    qs = quantiles(scores, LOSS)
    sources = source_table(scores, qs[0.9])
    shown = sorted(sources, key=lambda s: -s["samples"])[: cfg.inspect.max_sources]
    shown_names = [s["source"] for s in sources if s in shown]  # keep the hardest-first order
    images = draw_figures(scores, bands, cfg.inspect, shown_names, work)
    regions_per_band = examples_by_band(cfg, scores, bands, provenance)
    return ReportSummary(
        inputs_key=inputs_key,
        out_dir=str(Path(cfg.out_dir)),
        model={"path": provenance.model_path, "dtype": provenance.key["dtype"]},
        samples=samples,
        tokens=tokens,
        quantiles={str(q): v for q, v in qs.items()},
        sources=sources,
        sources_plotted=shown_names,
        images=images,
        bands=[
            ReportBand(
                band.name,
                None if band.interval is None else list(band.interval),
                BandExcerpt.of(band.manifest),
                regions,
                band.key,
            )
            for band, regions in regions_per_band
            if band is not None
        ],
        examples=None if bands else regions_per_band[0][1],
    )


def run(cfg: Config) -> Path:
    log = get_logger()
    started = time.perf_counter()
    layout = Layout(cfg.out_dir)
    with lock(layout, f"inspect-{cfg.inspect.name}"):
        scores, provenance = load_scores(cfg, layout)
        bands = selected_bands(cfg, layout, provenance)
        paths = layout.report(cfg.inspect.name)
        layout.check_replaceable(paths.dir)  # before any work: it is replaced whole
        inputs_key = digest(
            {
                "score_key": provenance.key,
                "bands": [digest(encode(band.manifest)) for band in bands],
                "inspect": to_dict(cfg.inspect),
            }
        )
        if (previous := up_to_date(paths, inputs_key)) is not None:
            terminal_summary(previous)
            log.info(f"{paths.dir}: up to date with the scores and bands, nothing to do")
            return paths.dir
        # built in a temporary folder and swapped in whole: a report is never half old, half new
        for stale in layout.report_stagings(cfg.inspect.name):  # left by a killed run
            layout.remove(stale)
        work = layout.report_staging(cfg.inspect.name)
        if work.dir.exists():
            layout.remove(work.dir)
        layout.make_dir(work.dir)
        try:
            summary = build_summary(cfg, scores, provenance, bands, inputs_key, work.dir)
            write_text_atomic(work.index, render_report(summary))
            summary.write(work.summary)
            save_config(cfg, work.dir)
            if paths.dir.exists():
                layout.remove(paths.dir)
            os.replace(work.dir, paths.dir)
        finally:  # a failed build (a full disk) leaves nothing behind
            if work.dir.exists():
                layout.remove(work.dir)
        terminal_summary(summary)
        log.info(
            f"inspected {summary.samples:,} samples, {len(bands)} band(s): {len(summary.images)} figure(s) in "
            f"{time.perf_counter() - started:.1f}s -> {paths.index}"
        )
        return paths.dir
