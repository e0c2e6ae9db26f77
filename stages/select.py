"""Stage two: rank every scored sample globally, keep the band(s), emit the filtered dataset(s).

    midrank select --config configs/default.yaml
    midrank select --config configs/default.yaml 'select.bands=[{strategy: midranking, skip: 0.05, keep: 0.3}, {strategy: cc_net_middle}]'

Each band ranks by its `rank_by` key (loss, bits_per_byte, length_adjusted: pipeline/rank_keys.py)
after taking the samples under its `min_tokens` out as too_short. Writes, per band,
`<out_dir>/selected/<band>/part-{shard:05d}.parquet` (the kept samples with their text, every
score column and the key's, plus `weight` when asked), optionally `rejected/` (every dropped
sample with its reason) and `data.jsonl`, and `manifest.json` last. The corpus is read once, shard
by shard, for all bands together. A band whose manifest exists with the same config is skipped; a
band directory holding a different config is refused, never overwritten.

On several ranks (torchrun, a Slurm array: pipeline/launcher.py) the ranks never talk: each
decides every band over all the scores (the same decision everywhere: one reduce, run on each
rank), writes its own shards' parts into the band's staging folders, and whichever rank finds
every part there publishes the band (its manifest, then the folders renamed into place). A rank
cut short leaves its parts; the next run of the same decision writes only the missing ones
(docs/selection.md, "On several ranks").
"""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl

from pipeline.band_decision import decide, summarize
from pipeline.band_parts import write_part
from pipeline.band_staging import (
    Pending,
    aside_of,
    decision_key,
    is_published,
    is_staged,
    publish,
    selected_before,
    staged_folders,
)
from pipeline.config import BandConfig, Config, ConfigError
from pipeline.launcher import rank_and_world, shards_of_rank
from pipeline.layout import Layout, part_files
from pipeline.locks import lock
from pipeline.log import get_logger
from pipeline.outputs import BandManifest, Provenance
from pipeline.records import ReadStats
from pipeline.scores import check_corpus_unchanged, scan_scores, score_set
from pipeline.sharding import ShardPlan, plan_shards, shard_records
from pipeline.target_scores import ScoreViews


def reference_lengths(band_cfg: BandConfig, layout: Layout, pending: dict[str, Pending]) -> pl.DataFrame:
    """How many kept samples of each length (target tokens: `n_tokens`, `samples`; and of each
    source, `source`, when the sample matches sources too) the band a length_matched band matches
    has: decided in this run, or selected before."""
    by_length = pl.len().alias("samples")
    cells = ["n_tokens", "source"] if band_cfg.by_source else ["n_tokens"]
    if band_cfg.match in pending:
        return pending[band_cfg.match].decided.filter(pl.col("kept")).group_by(cells).agg(by_length).collect()
    if layout.band(band_cfg.match).manifest.is_file():
        parts = pl.scan_parquet(part_files(layout.band(band_cfg.match).dir))
        return parts.group_by(cells).agg(by_length).collect()
    raise ConfigError(
        f"select.bands: {band_cfg.resolved_name()} matches band {band_cfg.match!r}, which is not selected; "
        "add that band to select.bands"
    )


def matched_provenance(
    band_cfg: BandConfig, layout: Layout, pending: dict[str, Pending], provenance: Provenance
) -> Provenance:
    """The provenance of the band a length_matched band matches (decided in this run, or selected
    before), so that it is selected again whenever that band is (by reducible: with another
    target model); `provenance` when there is none yet (reference_lengths then says so)."""
    if band_cfg.match in pending:
        return pending[band_cfg.match].provenance
    if layout.band(band_cfg.match).manifest.is_file():
        return BandManifest.read(layout.band(band_cfg.match).manifest).score_provenance
    return provenance


def bands_to_select(
    cfg: Config, layout: Layout, scores: pl.LazyFrame, provenance: Provenance
) -> dict[str, Pending]:
    """The bands that are not selected yet (or whose scores changed), each decided and checked; a
    name already holding another selection, or a band that keeps nothing, is an error. A band by
    the reducible key is decided on the scores joined to the target model's."""
    log = get_logger()
    pending = {}
    views = ScoreViews(cfg, scores, provenance)
    # a length-matched band after the band it matches, wherever it is listed: it is decided on
    # that band's rows, and selected again whenever that band is
    matched_last = sorted(cfg.select.bands, key=lambda b: b.strategy == "length_matched")
    for band_cfg in matched_last:
        name = band_cfg.resolved_name()
        length_matched = band_cfg.strategy == "length_matched"
        band_scores, band_provenance = views.for_band(band_cfg)
        if length_matched:  # it depends on what the band it matches was decided on
            band_provenance = matched_provenance(band_cfg, layout, pending, band_provenance)
        previous = selected_before(layout, name, band_cfg)
        if previous is not None:
            if previous.score_provenance.key == band_provenance.key:
                log.info(f"{name}: already selected, nothing to do")
                continue
            log.info(f"{name}: the scores were recomputed since this band was selected; selecting again")
        reference = reference_lengths(band_cfg, layout, pending) if length_matched else None
        decision = decide(band_scores, band_cfg, str(layout.scores_dir), reference)
        summary = summarize(decision.rows, band_cfg.rank_by)
        kept = summary.filter(pl.col("kept"))
        if kept["samples"].sum() == 0:
            raise ConfigError(f"select.bands: {name} keeps no sample; widen the band (or lower min_tokens)")
        share = kept["tokens"].sum() / max(summary["tokens"].sum(), 1)
        if share < 0.01:
            log.warning(f"{name}: keeps only {share:.2%} of the tokens")
        staging = layout.band_staging(name, decision_key(cfg, band_cfg, band_provenance, decision, summary))
        pending[name] = Pending(band_cfg, decision, summary, band_provenance, staging)
    return pending


def write_bands(
    cfg: Config,
    layout: Layout,
    plan: ShardPlan,
    pending: dict[str, Pending],
    shards: list[int],
) -> None:
    """Every band's kept (and rejected) rows of `shards` with their texts, reading the corpus once,
    shard by shard, into the bands' staging folders; the parts an earlier run of the same decision
    staged are kept. A band another rank published meanwhile (this rank started late, on parts a
    cut run left) is left alone."""
    live = dict(pending)
    stats = ReadStats()
    for shard in shards:
        for name in [n for n in live if is_published(layout, n, live[n])]:
            del live[name]
        todo = {name: band for name, band in live.items() if not is_staged(cfg, band, shard)}
        if not todo:
            continue
        with lock(layout, f"select-shard-{shard:05d}"):  # another job writing it stops here
            write_shard(cfg, layout, plan, shard, todo, live, stats)


def write_shard(
    cfg: Config,
    layout: Layout,
    plan: ShardPlan,
    shard: int,
    todo: dict[str, Pending],
    live: dict[str, Pending],
    stats: ReadStats,
) -> None:
    """One shard's parts of the bands in `todo`, their texts read from the corpus once; a band
    published under this write (its staging folder renamed away) leaves `live`."""
    records = shard_records(plan, shard, cfg.corpus, stats)
    for name, band in todo.items():
        part = band.decided.filter(pl.col("shard") == shard).collect()
        kept = part.filter(pl.col("kept")).drop("kept", "reason", "dropped_by", strict=False)
        rejected = part.filter(~pl.col("kept")).drop("kept")
        try:
            for folder in staged_folders(cfg, band):
                layout.make_dir(folder)
                rows = kept if folder == band.staging.dir else rejected
                write_part(rows, records, folder, shard, cfg.corpus.mode)
        except OSError:
            if not is_published(layout, name, band):
                raise
            del live[name]


def run(cfg: Config) -> list[Path]:
    started = time.perf_counter()
    layout = Layout(cfg.out_dir)
    rank, world_size = rank_and_world()
    with lock(layout, "select" if rank == 0 else f"select.rank-{rank}"):
        plan = plan_shards(cfg.corpus)
        files, provenance = score_set(layout)
        check_corpus_unchanged(layout, plan, provenance)
        pending = bands_to_select(cfg, layout, scan_scores(files), provenance)
        for name in pending:  # before any work: what publishing will replace must be midrank's
            for folder in (layout.band(name).dir, layout.band(name).rejected):
                layout.check_replaceable(folder)
                layout.check_replaceable(aside_of(folder, name))
        if pending:
            write_bands(cfg, layout, plan, pending, shards_of_rank(len(plan.shards), rank, world_size))
            shards = len(plan.shards)
            done = [name for name, band in pending.items() if publish(cfg, layout, name, band, shards)]
            seconds = time.perf_counter() - started
            waiting = (
                f" ({len(pending) - len(done)} left to the rank that ends last)"
                if len(done) < len(pending)
                else ""
            )
            get_logger().info(f"selected {len(pending)} band(s) in {seconds:.1f}s{waiting}")
    return [layout.band(b.resolved_name()).dir for b in cfg.select.bands]
