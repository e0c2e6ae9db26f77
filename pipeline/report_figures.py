"""The report's figures: each selected band as the report draws it (`DrawnBand`), the loss and key
histograms with the band's kept counts and cut-offs over the corpus's, and loss against length.

    band = load_band(layout, "midranking-s0.1-k0.5-samples")
    images = draw_figures(scores, [band], cfg.inspect, sources, work_dir)   # {file: caption}

All binning is done by Polars queries (pipeline/histograms.py); pipeline/plots.py renders.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.artifacts import readable_parquet
from pipeline.histograms import histogram, histogram_2d, uniform_edges, value_range
from pipeline.key_columns import estimate_curves, with_key
from pipeline.layout import Layout, part_files
from pipeline.outputs import BandManifest, OutputError
from pipeline.plots import Panel, plot_histograms, plot_loss_vs_length, plot_paired_losses
from pipeline.rank_keys import ALL_SOURCES
from pipeline.selection import top_by_keys

LOSS = pl.col("loss")


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
        ranked = scores.filter(pl.col("n_tokens") >= self.manifest.parameters.min_tokens)
        if self.key == "loss":
            return ranked
        by_source = self.manifest.parameters.adjust_by_source
        return with_key(ranked, self.key, self.manifest.length_curves, by_source=by_source)

    def dropped(self, scores: pl.LazyFrame) -> pl.LazyFrame | None:
        """The samples the band's drop_top dropped, each with `dropped_by` (the keys whose top
        it fell in), found again the way select found them; None without drop_top."""
        top = self.manifest.dropped_top
        if top is None:
            return None
        params = self.manifest.parameters
        ranked = scores.filter(pl.col("n_tokens") >= params.min_tokens)
        for key in dict.fromkeys([self.key, *top.shares]):
            ranked = with_key(ranked, key, self.manifest.length_curves, by_source=params.adjust_by_source)
        measure = "tokens" if params.target_tokens else params.measure
        flagged = top_by_keys(ranked, params.drop_top.shares(), measure=measure, by_source=params.by_source)
        return flagged.filter(pl.col("dropped_by").is_not_null())


def load_band(layout: Layout, name: str) -> DrawnBand:
    paths = layout.band(name)
    manifest = BandManifest.read(paths.manifest)
    remedy = f"delete {paths.dir} and run `midrank select` to make it again"
    kept = pl.scan_parquet(readable_parquet(part_files(paths.dir), OutputError, remedy))
    key = manifest.rank_key.key
    ranks = manifest.positions.ranked_by != "random"  # not a random sample
    per_source = (
        kept.group_by("source").agg(low=pl.col(key).min(), high=pl.col(key).max()).collect()
        if ranks
        else pl.DataFrame({"source": [], "low": [], "high": []})
    )
    kept_range = manifest.rank_key
    interval = (kept_range.min_kept, kept_range.max_kept)
    return DrawnBand(
        manifest,
        kept,
        key,
        interval if ranks and not manifest.parameters.by_source else None,
        {r["source"]: (r["low"], r["high"]) for r in per_source.to_dicts()}
        if manifest.parameters.by_source
        else dict.fromkeys(per_source["source"].to_list(), interval),
    )


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


KEY_UNITS = {
    "bits_per_byte": "bits/byte",
    "length_adjusted": "nats/token above the expected loss",
    "tokens_per_byte": "tokens/byte",
    "markup_share": "share of the bytes in markup tags",
    "mojibake": "wrong-charset sequences per byte",
    "ifd": "loss with the prompt / loss without it",
    "reducible": "nats/token, reference minus target model",
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
    if scores.select(pl.col("nll_sum_uncond").is_not_null().any()).collect().item() is True:
        images |= draw_paired_losses(scores, bands, icfg, work, WITHOUT_PROMPT)
    if "loss_target" in scores.collect_schema().names():
        images |= draw_paired_losses(scores, bands, icfg, work, REFERENCE_AND_TARGET)
    for band in bands:
        if band.key == "loss":
            continue
        kept = histogram_2d(band.kept, length, length_edges, LOSS, edges)
        by_source = band.manifest.parameters.adjust_by_source
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


def draw_paired_losses(
    scores: pl.LazyFrame, bands: list[DrawnBand], icfg, work: Path, pair: PairedLosses
) -> dict:
    """Each sample's loss against another loss of its (`pair`), for the whole set and with each
    band's kept samples drawn over it."""
    scored = scores.filter(pair.x.is_not_null())
    (low_y, high_y), (low_x, high_x) = value_range(scored, LOSS), value_range(scored, pair.x)
    edges = uniform_edges(min(low_y, low_x), max(high_y, high_x), icfg.bins)
    counts = histogram_2d(scored, pair.x, edges, LOSS, edges)
    images = {}
    for band in bands or [None]:
        kept = None
        if band is not None:  # the band's samples found in the scores: its parts may lack pair.x
            mine = scored.join(band.kept.select("sample_id"), on="sample_id", how="semi")
            kept = histogram_2d(mine, pair.x, edges, LOSS, edges)
        name = f"{pair.name}-{band.name}.png" if band else f"{pair.name}.png"
        title = f"band {band.name}" if band else pair.title
        axes = (pair.x_label, pair.y_label)
        plot_paired_losses(
            counts, edges, work / name, kept=kept, title=title, axes=axes, diagonal=pair.diagonal
        )
        images[name] = f"{pair.caption}, {title}"
    return images


@dataclasses.dataclass(frozen=True, slots=True)
class PairedLosses:
    """A second loss of every sample, drawn against its loss."""

    name: str
    x: pl.Expr
    x_label: str
    y_label: str
    diagonal: str
    title: str
    caption: str


WITHOUT_PROMPT = PairedLosses(
    "with_without_prompt",
    pl.col("nll_sum_uncond") / pl.col("n_tokens"),
    "loss without the prompt (nats/token)",
    "loss with the prompt (nats/token)",
    "ifd = 1 (the prompt does not help)",
    "loss with and without the prompt",
    "Each response's loss with its prompt against without it",
)
"""Instruction data scored with score.unconditional: below the diagonal the prompt helps; on it,
the answer does not depend on the question (a wrong one)."""

REFERENCE_AND_TARGET = PairedLosses(
    "reference_target",
    pl.col("loss_target"),
    "loss under the target model (nats/token)",
    "loss under the reference model (nats/token)",
    "reducible = 0 (the fine-tune did not help)",
    "the reference model's loss against the target model's",
    "Each sample's loss under the reference model against under the target model",
)
"""With the target model's scores (the reducible key): above the diagonal the fine-tune made the
sample easier (reducible > 0, what the key ranks first); on it, noise and what the reference knew
already."""


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
