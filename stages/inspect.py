"""Inspect: loss histograms with the bands drawn on, loss against length, example texts, a report.

    midrank inspect --config configs/default.yaml
    midrank inspect --config configs/default.yaml inspect.perplexity=true inspect.bins=100

Reads `<out_dir>/scores/` and every configured band already selected under `<out_dir>/selected/`,
and writes `<out_dir>/reports/<inspect.name>/`: `index.html`, the PNGs it shows, `summary.json`
(every number on the page) and `config.yaml`. The report is rebuilt in a temporary directory and
swapped in whole. All binning happens in Polars queries; rows are read only for the examples.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.artifacts import NoScoresError, ProvenanceError, digest, write_text_atomic
from pipeline.config import Config, DropTop, save_config, to_dict
from pipeline.histograms import histogram, histogram_2d, quantiles, uniform_edges, value_range
from pipeline.key_columns import estimate_curves, with_key
from pipeline.layout import Layout, ReportPaths, part_files
from pipeline.locks import lock
from pipeline.log import get_logger
from pipeline.outputs import BandExcerpt, BandManifest, OutputError, ReportBand, ReportSummary, to_json
from pipeline.plots import Panel, plot_histograms, plot_loss_vs_length, plot_with_and_without_prompt
from pipeline.rank_keys import ALL_SOURCES
from pipeline.readers import InputError
from pipeline.records import CorpusError, ReadStats, record_id, sample_text
from pipeline.report import render_report
from pipeline.scores import check_corpus_unchanged, common_provenance, scan_scores, score_files
from pipeline.selection import top_by_keys
from pipeline.sharding import plan_shards, shard_records

LOSS = pl.col("loss")
EXAMPLE_COLUMNS = ("sample_id", "shard", "source", "loss", "n_tokens", "char_start", "char_end")
# what the rank keys are derived from
KEY_COLUMNS = ("nll_sum", "n_bytes", "n_markup_bytes", "n_mojibake", "nll_sum_uncond")


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


@dataclasses.dataclass(frozen=True, slots=True)
class DrawnBand:
    """A selected band as the report draws it."""

    manifest: BandManifest
    kept: pl.LazyFrame
    key: str
    """The column the band ranked by (a rank key of pipeline/rank_keys.py)."""
    interval: tuple[float, float] | None
    """The band's interval of its key when it is one (a global band by rank), else None."""
    source_intervals: dict[str, tuple[float, float]]

    @property
    def name(self) -> str:
        return self.manifest.band

    @property
    def value(self) -> pl.Expr:
        return pl.col(self.key)

    def ranked(self, scores: pl.LazyFrame) -> pl.LazyFrame:
        """The samples the band ranked (min_tokens and over), with its key's column: the key is
        recomputed from the curves its manifest records."""
        ranked = scores.filter(pl.col("n_tokens") >= self.manifest.parameters.get("min_tokens", 0))
        if self.key == "loss":
            return ranked
        by_source = bool(self.manifest.parameters.get("adjust_by_source", False))
        return with_key(ranked, self.key, self.manifest.length_curves, by_source=by_source)

    def dropped(self, scores: pl.LazyFrame) -> pl.LazyFrame | None:
        """The samples the band's drop_top dropped, each with `dropped_by` (the keys whose top
        it fell in), found again the way select found them; None without drop_top."""
        top = self.manifest.dropped_top
        if top is None:
            return None
        params = self.manifest.parameters
        ranked = scores.filter(pl.col("n_tokens") >= params.get("min_tokens", 0))
        for key in dict.fromkeys([self.key, *top.shares]):
            ranked = with_key(
                ranked,
                key,
                self.manifest.length_curves,
                by_source=bool(params.get("adjust_by_source", False)),
            )
        measure = "tokens" if params.get("target_tokens") else params.get("measure", "samples")
        shares = DropTop(**top.shares).shares()  # in select's key order, whatever the JSON's
        flagged = top_by_keys(ranked, shares, measure=measure, by_source=self.manifest.by_source)
        return flagged.filter(pl.col("dropped_by").is_not_null())


def load_band(layout: Layout, name: str) -> DrawnBand:
    manifest = BandManifest.read(layout.band(name).manifest)
    kept = pl.scan_parquet(part_files(layout.band(name).dir))
    key = manifest.rank_key.key if manifest.rank_key else "loss"
    ranks = manifest.positions.ranked_by != "random"  # not a random sample
    per_source = (
        kept.group_by("source").agg(low=pl.col(key).min(), high=pl.col(key).max()).collect()
        if ranks
        else pl.DataFrame({"source": [], "low": [], "high": []})
    )
    kept_range = manifest.rank_key or manifest.loss_thresholds
    interval = (kept_range.min_kept, kept_range.max_kept)
    return DrawnBand(
        manifest,
        kept,
        key,
        interval if ranks and not manifest.by_source else None,
        {r["source"]: (r["low"], r["high"]) for r in per_source.to_dicts()}
        if manifest.by_source
        else dict.fromkeys(per_source["source"].to_list(), interval),
    )


def example_regions(scores: pl.LazyFrame, band: DrawnBand | None, k: int) -> dict[str, pl.LazyFrame]:
    """The rows to show, by region, lowest first (by the band's key, else loss): the bottom is
    boilerplate, the top noise."""
    if band is None:
        lowest = scores.bottom_k(k, by=["loss", "sample_id"])
        highest = scores.top_k(k, by=["loss", "sample_id"])
        median = scores.select(LOSS.median()).collect().item()
        return {
            "lowest loss": lowest,
            "median": scores.filter(LOSS >= median).bottom_k(k, by="loss"),
            "highest loss": highest,
        }
    key, value = band.key, band.value
    ranked = band.ranked(scores)
    lowest = ranked.bottom_k(k, by=[key, "sample_id"])
    highest = ranked.top_k(k, by=[key, "sample_id"])
    median = band.kept.select(value.median()).collect().item()
    present = band.kept.collect_schema().names()  # a band selected by an older midrank lacks some
    columns = list(dict.fromkeys([*EXAMPLE_COLUMNS, key, *(c for c in KEY_COLUMNS if c in present)]))
    inside = band.kept.filter(value >= median).bottom_k(k, by=key).select(columns)
    dropped = band.dropped(scores)
    if dropped is not None:  # drop_top: its rows are not the band's to rank; show them per key set
        ranked = ranked.join(dropped.select("sample_id"), on="sample_id", how="anti")
        highest = ranked.top_k(k, by=[key, "sample_id"])
    if band.interval is None:
        regions = {f"lowest {key}": lowest, "kept (around its median)": inside, f"highest {key}": highest}
    else:
        low, high = band.interval
        regions = {
            f"lowest {key}": lowest,
            "just below the band": ranked.filter(value < low).top_k(k, by=key),
            "inside the band (around its median)": inside,
            "just above the band": ranked.filter(value > high).bottom_k(k, by=key),
            f"highest {key}": highest,
        }
    return regions | dropped_regions(dropped, k)


def dropped_regions(dropped: pl.LazyFrame | None, k: int) -> dict[str, pl.LazyFrame]:
    """drop_top's dropped samples by the set of keys that dropped them (a key alone shows what
    only it catches), `k` of each drawn by sample-id hash, so not only the extreme ones."""
    if dropped is None:
        return {}
    counts = (
        dropped.group_by("dropped_by").len().sort("len", "dropped_by", descending=[True, False]).collect()
    )
    return {
        f"dropped by {row['dropped_by']} ({row['len']:,} samples)": dropped.filter(
            pl.col("dropped_by") == row["dropped_by"]
        ).bottom_k(k, by=pl.col("sample_id").hash(0))
        for row in counts.to_dicts()
    }


def attach_texts(cfg: Config, provenance: dict, rows: list[dict[str, Any]]) -> None:
    """Join each example row with the first `inspect.example_chars` of its text, reading only its
    shards (and only from the corpus that was scored)."""
    max_chars = cfg.inspect.example_chars
    wanted: dict[int, set[str]] = defaultdict(set)
    for row in rows:
        wanted[row["shard"]].add(record_id(row["sample_id"]))
    records = {}
    try:
        plan = plan_shards(cfg.corpus)
        check_corpus_unchanged(Layout(cfg.out_dir), plan, provenance)
        for shard, ids in sorted(wanted.items()):
            records |= shard_records(plan, shard, cfg.corpus, ReadStats(), ids)
    except (InputError, CorpusError, ProvenanceError, OSError) as err:
        get_logger().warning(f"example texts left out: {err}")
    for row in rows:
        record = records.get(record_id(row["sample_id"]))
        if record is None:
            row["text"], row["text_cut"] = None, False
            continue
        # instruction data: the question shows why an answer scores as it does
        if record.messages is not None:
            text = "\n".join(f"[{m['role']}] {m['content']}" for m in record.messages)
        elif record.prompt is not None:
            text = f"[prompt] {record.prompt}\n[response] {record.text}"
        else:
            text = sample_text(record, row["sample_id"], row["char_start"], row["char_end"])
        row["text"], row["text_cut"] = text[:max_chars], len(text) > max_chars


def panels_for(
    corpus: tuple[np.ndarray, dict[str, np.ndarray]],
    edges: np.ndarray,
    band: DrawnBand | None,
    sources: list[str],
    value: pl.Expr = LOSS,
) -> list[Panel]:
    """The corpus's counts of `value` (overall, per source) with a band's kept counts drawn over
    them, and its cut-offs when it is an interval of `value`."""
    everything, by_source = corpus
    kept_all = kept_by_source = None
    if band is not None:
        kept_all = histogram(band.kept, value, edges)
        kept_by_source = histogram(band.kept, value, edges, by="source")
    cuts = band is not None and band.key == value.meta.output_name()
    zeros = np.zeros(len(edges) - 1, dtype=np.int64)
    panels = [Panel("all sources", everything, kept_all, band.interval if cuts else None)]
    for source in sources:
        interval = band.source_intervals.get(source) if cuts else None
        kept = kept_by_source.get(source, zeros) if kept_by_source is not None else None
        panels.append(Panel(source, by_source.get(source, zeros), kept, interval))
    return panels


def in_perplexity(panel: Panel) -> Panel:
    band = None if panel.band is None else (float(np.exp(panel.band[0])), float(np.exp(panel.band[1])))
    return dataclasses.replace(panel, band=band)


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


def load_scores(cfg: Config, layout: Layout) -> tuple[pl.LazyFrame, dict[str, Any]]:
    """The score set (the columns the report reads) and its provenance; an empty set is an error."""
    files = score_files(layout)
    scores = scan_scores(files).select(*EXAMPLE_COLUMNS, *KEY_COLUMNS)
    if scores.select(pl.len()).collect().item() == 0:
        raise NoScoresError(
            f"{layout.scores_dir} holds no scored samples (every row skipped?); nothing to inspect"
        )
    return scores, common_provenance(files)


def selected_bands(cfg: Config, layout: Layout) -> list[DrawnBand]:
    bands = []
    for name in (b.resolved_name() for b in cfg.select.bands):
        if layout.band(name).manifest.is_file():
            bands.append(load_band(layout, name))
        else:
            get_logger().warning(f"band {name} is not selected yet (run `midrank select`); not drawn")
    return bands


KEY_UNITS = {
    "bits_per_byte": "bits/byte",
    "length_adjusted": "nats/token above the expected loss",
    "tokens_per_byte": "tokens/byte",
    "markup_share": "share of the bytes in markup tags",
    "mojibake": "wrong-charset sequences per byte",
    "ifd": "loss with the prompt / loss without it",
}


def draw_figures(scores: pl.LazyFrame, bands: list[DrawnBand], icfg, sources: list[str], work: Path) -> dict:
    """The loss (and perplexity) histograms per band, the key histogram of a band ranked by
    another key, and loss against length -> {file: caption}."""
    edges = uniform_edges(*value_range(scores, LOSS), icfg.bins)
    corpus_counts = (histogram(scores, LOSS, edges), histogram(scores, LOSS, edges, by="source"))
    images: dict[str, str] = {}
    for band in bands or [None]:
        suffix = f"-{band.name}" if band else ""
        title = f"band {band.name}" if band else "no band selected yet"
        panels = panels_for(corpus_counts, edges, band, sources)
        name = f"loss_hist{suffix}.png"
        plot_histograms(panels, edges, work / name, xlabel="loss (nats/token)", title=title)
        images[name] = f"Loss per sample, {title}"
        if icfg.perplexity:
            # log(perplexity) = loss: the loss counts are the perplexity counts in log-spaced bins.
            name = f"ppl_hist{suffix}.png"
            ppl_panels = [in_perplexity(p) for p in panels]
            plot_histograms(
                ppl_panels, np.exp(edges), work / name, xlabel="perplexity", title=title, log_x=True
            )
            images[name] = f"Perplexity per sample (log axis), {title}"
        if band is not None and band.key != "loss":
            images |= draw_key_histogram(scores, band, icfg, sources, work)
    length = pl.col("n_tokens").cast(pl.Float64).log10()
    length_edges = uniform_edges(*value_range(scores, length), icfg.bins)
    counts = histogram_2d(scores, length, length_edges, LOSS, edges)
    grid = (10**length_edges, edges)
    curve = estimate_curves(scores, by_source=False)[ALL_SOURCES]
    xs = np.geomspace(grid[0][0], grid[0][-1], 200)
    drawn_curve = (xs, curve.at(xs))
    intervals = {b.name: b.interval for b in bands if b.interval is not None and b.key == "loss"}
    plot_loss_vs_length(counts, *grid, work / "loss_vs_length.png", bands=intervals, curve=drawn_curve)
    images["loss_vs_length.png"] = (
        "Loss against length (scored tokens), with the median loss at each length (rank_by=length_adjusted "
        "subtracts it) and the bands ranked by loss"
    )
    images |= draw_with_and_without_prompt(scores, bands, icfg, work)
    for band in bands:
        if band.key == "loss":
            continue
        kept = histogram_2d(band.kept, length, length_edges, LOSS, edges)
        by_source = band.manifest.parameters.get("adjust_by_source", False)
        own = None if by_source else (band.manifest.length_curves or {}).get(ALL_SOURCES)
        name = f"loss_vs_length-{band.name}.png"
        plot_loss_vs_length(
            counts,
            *grid,
            work / name,
            bands={},
            curve=(xs, own.at(xs)) if own else drawn_curve,
            kept=kept,
            adjusted_band=band.interval if own and band.key == "length_adjusted" else None,
            title=f"loss against length, band {band.name}",
        )
        images[name] = f"Where band {band.name} (ranked by {band.key}) falls in (length, loss)"
    return images


def draw_with_and_without_prompt(scores: pl.LazyFrame, bands: list[DrawnBand], icfg, work: Path) -> dict:
    """Instruction data scored with score.unconditional: loss with the prompt against without it,
    for the whole set and with each band's kept samples drawn over it."""
    if scores.select(pl.col("nll_sum_uncond").is_not_null().any()).collect().item() is not True:
        return {}
    scored = scores.filter(pl.col("nll_sum_uncond").is_not_null())
    without = (pl.col("nll_sum_uncond") / pl.col("n_tokens")).alias("loss_without_prompt")
    (low_with, high_with), (low_without, high_without) = (
        value_range(scored, LOSS),
        value_range(scored, without),
    )
    edges = uniform_edges(min(low_with, low_without), max(high_with, high_without), icfg.bins)
    counts = histogram_2d(scored, without, edges, LOSS, edges)
    images = {}
    for band in bands or [None]:
        kept = histogram_2d(band.kept, without, edges, LOSS, edges) if band else None
        name = f"with_without_prompt-{band.name}.png" if band else "with_without_prompt.png"
        title = f"band {band.name}" if band else "loss with and without the prompt"
        plot_with_and_without_prompt(counts, edges, work / name, kept=kept, title=title)
        images[name] = f"Each response's loss with its prompt against without it, {title}"
    return images


def draw_key_histogram(scores: pl.LazyFrame, band: DrawnBand, icfg, sources: list[str], work: Path) -> dict:
    """The band's key over the samples it ranked, with what it kept and its cut-offs."""
    ranked = band.ranked(scores)
    edges = uniform_edges(*value_range(ranked, band.value), icfg.bins)
    counts = (histogram(ranked, band.value, edges), histogram(ranked, band.value, edges, by="source"))
    name = f"key_hist-{band.name}.png"
    xlabel = f"{band.key} ({KEY_UNITS[band.key]})"
    title = f"band {band.name}: ranked by {band.key}"
    plot_histograms(
        panels_for(counts, edges, band, sources, band.value), edges, work / name, xlabel=xlabel, title=title
    )
    return {name: f"{band.key} per ranked sample, {title}"}


def with_ifd(rows: pl.LazyFrame) -> pl.LazyFrame:
    """The plain ratio nll_sum / nll_sum_uncond beside each example, where the scores have both."""
    if not {"nll_sum", "nll_sum_uncond"} <= set(rows.collect_schema().names()):
        return rows
    return with_key(rows, "ifd")


def examples_by_band(
    cfg: Config, scores: pl.LazyFrame, bands: list[DrawnBand], provenance: dict
) -> list[tuple]:
    """(band, its example regions with texts) per band, or (None, regions) with no band."""
    regions_per_band = [
        (
            band,
            [
                {
                    "region": r,
                    "rows": with_ifd(f)
                    .drop(KEY_COLUMNS, strict=False)
                    .sort(band.key if band else "loss", "sample_id")
                    .collect()
                    .to_dicts(),
                }
                for r, f in example_regions(scores, band, cfg.inspect.examples).items()
            ],
        )
        for band in bands or [None]
    ]
    rows = [row for _, regions in regions_per_band for r in regions for row in r["rows"]]
    attach_texts(cfg, provenance, rows)
    return regions_per_band


def build_summary(
    cfg: Config, scores: pl.LazyFrame, provenance: dict, bands: list[DrawnBand], inputs_key: str, work: Path
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
        model={"path": provenance["model_path"], "dtype": provenance["key"]["dtype"]},
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
        bands = selected_bands(cfg, layout)
        paths = layout.report(cfg.inspect.name)
        inputs_key = digest(
            {
                "score_key": provenance["key"],
                "bands": [digest(to_json(band.manifest)) for band in bands],
                "inspect": to_dict(cfg.inspect),
            }
        )
        if (previous := up_to_date(paths, inputs_key)) is not None:
            terminal_summary(previous)
            log.info(f"{paths.dir}: up to date with the scores and bands, nothing to do")
            return paths.dir
        # built in a temporary folder and swapped in whole: a report is never half old, half new
        for stale in layout.reports_dir.glob(f".{cfg.inspect.name}.*.tmp"):  # left by a killed run
            layout.remove(stale)
        work = layout.report_staging(cfg.inspect.name)
        if work.dir.exists():
            layout.remove(work.dir)
        work.dir.mkdir(parents=True)
        summary = build_summary(cfg, scores, provenance, bands, inputs_key, work.dir)
        write_text_atomic(work.index, render_report(summary))
        summary.write(work.summary)
        save_config(cfg, work.dir)
        if paths.dir.exists():
            layout.remove(paths.dir)
        os.replace(work.dir, paths.dir)
        terminal_summary(summary)
        log.info(
            f"inspected {summary.samples:,} samples, {len(bands)} band(s): {len(summary.images)} figure(s) in "
            f"{time.perf_counter() - started:.1f}s -> {paths.index}"
        )
        return paths.dir
