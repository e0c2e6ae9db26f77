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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import polars as pl

from pipeline.artifacts import ProvenanceError, write_table_atomic
from pipeline.config import (
    BAND_PRESETS,
    BandConfig,
    Config,
    ConfigError,
    save_config,
    to_dict,
)
from pipeline.exchange import LOCAL, Exchange, exchange_for
from pipeline.key_columns import check_key_columns, estimate_curves, with_key
from pipeline.launcher import shards_of_rank
from pipeline.layout import Layout, part_files, part_path
from pipeline.locks import lock
from pipeline.log import get_logger
from pipeline.outputs import (
    BandManifest,
    Counts,
    DroppedTop,
    LossRange,
    Positions,
    RankKeyRange,
    SourceCount,
    SourceMix,
)
from pipeline.rank_keys import LengthCurve
from pipeline.records import ReadStats, record_digest, record_id, sample_text
from pipeline.scores import check_corpus_unchanged, common_provenance, scan_scores, score_files
from pipeline.selection import Band, Reason, band_for, irdro_weight_expr, length_matched, select, top_by_keys
from pipeline.sharding import ShardPlan, plan_shards, shard_records
from pipeline.shares import exact_share


def resolve_band(cfg: BandConfig, total_tokens: int) -> tuple[Band, str]:
    measure = "tokens" if cfg.target_tokens else cfg.measure
    keep = Fraction(cfg.target_tokens, max(total_tokens, 1)) if cfg.target_tokens else cfg.keep
    if cfg.target_tokens:
        skip = exact_share(cfg.skip) if cfg.strategy == "midranking" else 0
        if skip + keep > 1:
            after_skip = f" after skip {cfg.skip} drops {float(skip):.1%} of them" if skip else ""
            raise ConfigError(
                f"select.bands: {cfg.resolved_name()}: target_tokens {cfg.target_tokens:,} is more than the "
                f"{total_tokens:,} scored tokens leave{after_skip} ({float(skip):.1%} + "
                f"{float(keep):.1%} > 100%); lower target_tokens or skip"
            )
    if cfg.strategy in BAND_PRESETS:
        low, high = BAND_PRESETS[cfg.strategy]
        return band_for("band", low=low, high=high), measure
    return band_for(cfg.strategy, skip=cfg.skip, keep=keep, low=cfg.low, high=cfg.high), measure


@dataclass(frozen=True, slots=True)
class Decision:
    """Every sample with `kept`, `reason` (its rank key's column and `weight` when there are),
    as a lazy query, and the length curves length_adjusted was measured against."""

    rows: pl.LazyFrame
    curves: dict[str, LengthCurve] | None = None


def pooled_sum(exchange: Exchange, name: str, value: pl.LazyFrame) -> int:
    """A one-value query summed over every rank's scores."""
    return int(exchange.gather(name, value.collect()).to_series().sum())


def decide(
    scores: pl.LazyFrame,
    cfg: BandConfig,
    where: str,
    reference: pl.DataFrame | None = None,
    exchange: Exchange = LOCAL,
) -> Decision:
    """The band's ends are fixed here once, and each shard is then decided on its own. Samples
    under min_tokens are rejected as too_short before anything is ranked or sampled; the shares
    (and the length curve) count the rest. `reference`: the length counts a length_matched
    sample matches; `where`: the scores, for errors. On several ranks `scores` are this rank's
    and every total is pooled through `exchange`."""
    ranked = scores.filter(pl.col("n_tokens") >= cfg.min_tokens) if cfg.min_tokens else scores
    if cfg.min_tokens and pooled_sum(exchange, "ranked", ranked.select(pl.len())) == 0:
        raise ConfigError(
            f"select.bands: {cfg.resolved_name()}: no scored sample has min_tokens={cfg.min_tokens} tokens; lower it"
        )
    drops = cfg.drop_top.shares()
    keys = list(dict.fromkeys([cfg.rank_by, *drops]))
    for key in keys:
        check_key_columns(ranked, key, where)
    curves = None
    if "length_adjusted" in keys:
        curves = estimate_curves(ranked, by_source=cfg.adjust_by_source, exchange=exchange)
    for key in keys:
        ranked = with_key(ranked, key, curves, by_source=cfg.adjust_by_source)
    dropped = None
    if drops:  # the union of each key's top share, over every ranked sample; the band counts the rest
        measure = "tokens" if cfg.target_tokens else cfg.measure
        flagged = top_by_keys(ranked, drops, measure=measure, by_source=cfg.by_source, exchange=exchange)
        ranked = flagged.filter(pl.col("dropped_by").is_null())
        dropped = flagged.filter(pl.col("dropped_by").is_not_null()).with_columns(
            kept=pl.lit(False), reason=pl.lit("dropped_top", dtype=Reason)
        )
        if pooled_sum(exchange, "remaining", ranked.select(pl.len())) == 0:
            raise ConfigError(
                f"select.bands: {cfg.resolved_name()}: drop_top drops every sample; lower its shares"
            )
    if cfg.strategy == "length_matched":
        decided, _, short = length_matched(
            ranked, reference, cfg.seed, by_source=cfg.by_source, exchange=exchange
        )
        if short:
            get_logger().warning(
                f"{cfg.resolved_name()}: {short} samples short of {cfg.match}'s length distribution "
                "(too few samples of some lengths in the whole set)"
            )
    else:
        total_tokens = pooled_sum(exchange, "tokens", ranked.select(pl.col("n_tokens").cast(pl.Int64).sum()))
        band, measure = resolve_band(cfg, total_tokens)
        decided = select(
            ranked,
            band,
            measure=measure,
            by_source=cfg.by_source,
            seed=cfg.seed,
            key=cfg.rank_by,
            exchange=exchange,
        )
    if cfg.weights:
        weight = irdro_weight_expr(decided.filter(pl.col("kept")), cfg.kl_reg, exchange)
        decided = decided.with_columns(weight=pl.when(pl.col("kept")).then(weight))
    if dropped is not None:
        decided = pl.concat([decided, dropped], how="diagonal_relaxed")
    if cfg.min_tokens:
        too_short = scores.filter(pl.col("n_tokens") < cfg.min_tokens).with_columns(
            kept=pl.lit(False), reason=pl.lit("too_short", dtype=Reason)
        )
        decided = pl.concat([decided, too_short], how="diagonal_relaxed")
    return Decision(decided, curves)


def summarize(decided: pl.LazyFrame, key: str, exchange: Exchange = LOCAL) -> pl.DataFrame:
    """Samples, tokens, loss and key range per (source, kept, reason), over every rank: what the
    manifest reports."""
    by = ["source", "kept", "reason"] + (["dropped_by"] if "dropped_by" in decided.collect_schema() else [])
    mine = (
        decided.group_by(by)
        .agg(
            samples=pl.len(),
            tokens=pl.col("n_tokens").cast(pl.Int64).sum(),
            min_loss=pl.col("loss").min(),
            max_loss=pl.col("loss").max(),
            min_key=pl.col(key).cast(pl.Float64).min(),
            max_key=pl.col(key).cast(pl.Float64).max(),
        )
        .collect()
    )
    return (
        exchange.gather("summary", mine)
        .group_by(by)
        .agg(
            pl.col("samples", "tokens").sum(),
            pl.col("min_loss", "min_key").min(),
            pl.col("max_loss", "max_key").max(),
        )
    )


def source_mix(summary: pl.DataFrame) -> dict[str, SourceCount]:
    grouped = summary.group_by("source").agg(pl.col("samples").sum(), pl.col("tokens").sum()).sort("source")
    return {row["source"]: SourceCount(row["samples"], row["tokens"]) for row in grouped.to_dicts()}


def dropped_top_counts(band_cfg: BandConfig, summary: pl.DataFrame) -> DroppedTop | None:
    """What drop_top dropped: per key, the samples in its top share (alone, or with other keys)."""
    shares = band_cfg.drop_top.shares()
    if not shares:
        return None
    dropped = (
        summary.filter(pl.col("reason") == "dropped_top")
        .group_by("dropped_by")
        .agg(pl.col("samples", "tokens").sum())
    )
    combos = {row["dropped_by"]: row["samples"] for row in dropped.to_dicts()}
    return DroppedTop(
        shares=shares,
        by_key={key: sum(n for combo, n in combos.items() if key in combo.split("+")) for key in shares},
        alone={key: combos.get(key, 0) for key in shares},
        together=sum(n for combo, n in combos.items() if "+" in combo),
        samples=int(dropped["samples"].sum()),
        tokens=int(dropped["tokens"].sum()),
    )


def manifest_for(cfg: Config, band: Pending, provenance: dict) -> BandManifest:
    band_cfg, summary = band.config, band.summary
    kept = summary.filter(pl.col("kept"))
    rejected = summary.filter(~pl.col("kept")).group_by("reason").agg(pl.col("samples").sum())
    if band_cfg.strategy == "length_matched":  # not a band of the ranking: a sample of it, by lengths
        share = int(kept["samples"].sum()) / max(int(summary["samples"].sum()), 1)
        positions = Positions(0.0, share, "random", "samples")
    else:
        ranked = summary.filter(~pl.col("reason").is_in(["too_short", "dropped_top"]).fill_null(False))
        ranked_tokens = int(ranked["tokens"].sum())
        band_range, measure = resolve_band(band_cfg, ranked_tokens)
        ranked_by = band_cfg.rank_by if band_range.order == "rank_key" else "random"
        positions = Positions(float(band_range.start), float(band_range.stop), ranked_by, measure)
    return BandManifest(
        band=band_cfg.resolved_name(),
        strategy=band_cfg.strategy,
        parameters=to_dict(band_cfg),
        positions=positions,
        loss_thresholds=LossRange(min_kept=kept["min_loss"].min(), max_kept=kept["max_loss"].max()),
        samples=Counts(int(summary["samples"].sum()), int(kept["samples"].sum())),
        tokens=Counts(int(summary["tokens"].sum()), int(kept["tokens"].sum())),
        rejected={str(r["reason"]): int(r["samples"]) for r in rejected.sort("reason").to_dicts()},
        per_source=SourceMix(before=source_mix(summary), after=source_mix(kept)),
        rank_key=RankKeyRange(band_cfg.rank_by, kept["min_key"].min(), kept["max_key"].max()),
        length_curves=band.decision.curves,
        dropped_top=dropped_top_counts(band_cfg, summary),
        score_provenance=provenance,
        config=to_dict(cfg),
    )


MESSAGES = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))


def write_part(rows: pl.DataFrame, records: dict, where: Path, shard: int, mode: str) -> None:
    """One shard's rows of a band with their text (and prompt or messages) joined back from the
    corpus records. The columns follow the corpus mode, not the rows, so every part of a band
    (an empty one too) has the same schema."""
    texts, prompts, messages = [], [], []
    columns = ("sample_id", "char_start", "char_end", "record_hash")
    for sample_id, char_start, char_end, record_hash in rows.select(columns).iter_rows():
        record = records.get(record_id(sample_id))
        if record is None or record_digest(record) != record_hash:  # not the record that was scored
            found = "missing" if record is None else "not the one that was scored"
            raise ProvenanceError(
                f"{sample_id}: the corpus record is {found}; the corpus changed since it was scored "
                "(restore it, or score it again into another out_dir)"
            )
        texts.append(sample_text(record, sample_id, char_start, char_end))
        prompts.append(record.prompt)
        messages.append(list(record.messages) if record.messages is not None else None)
    table = rows.with_columns(text=pl.Series(texts, dtype=pl.String))
    if mode in ("prompt_response", "alpaca"):
        table = table.with_columns(prompt=pl.Series(prompts, dtype=pl.String))
    if mode == "chat":
        table = table.with_columns(messages=pl.Series(messages, dtype=MESSAGES))
    write_table_atomic(table.to_arrow(), part_path(where, shard), {})


@dataclass(frozen=True, slots=True)
class Pending:
    """A band to (re)select: its config, every sample's decision and the decision's totals."""

    config: BandConfig
    decision: Decision
    summary: pl.DataFrame

    @property
    def decided(self) -> pl.LazyFrame:
        return self.decision.rows


def reference_lengths(
    band_cfg: BandConfig, layout: Layout, pending: dict[str, Pending], exchange: Exchange
) -> pl.DataFrame:
    """How many kept samples of each length (target tokens: `n_tokens`, `samples`; and of each
    source, `source`, when the sample matches sources too) the band a length_matched band matches
    has: decided in this run (pooled over the ranks), or selected before."""
    by_length = pl.len().alias("samples")
    cells = ["n_tokens", "source"] if band_cfg.by_source else ["n_tokens"]
    if band_cfg.match in pending:
        kept = pending[band_cfg.match].decided.filter(pl.col("kept")).group_by(cells).agg(by_length)
        return exchange.gather("reference", kept.collect()).group_by(cells).agg(pl.col("samples").sum())
    if layout.band(band_cfg.match).manifest.is_file():
        parts = pl.scan_parquet(part_files(layout.band(band_cfg.match).dir))
        return parts.group_by(cells).agg(by_length).collect()
    else:
        raise ConfigError(
            f"select.bands: {band_cfg.resolved_name()} matches band {band_cfg.match!r}, which is not selected; "
            "list that band before it"
        )


def same_parameters(previous: dict, band_cfg: BandConfig) -> bool:
    """Whether a selected band's recorded parameters are this config's."""
    return previous == to_dict(band_cfg)


def bands_to_select(
    cfg: Config, layout: Layout, scores: pl.LazyFrame, provenance: dict, exchange: Exchange = LOCAL
) -> dict[str, Pending]:
    """The bands that are not selected yet (or whose scores changed), each decided and checked; a
    name already holding another selection, or a band that keeps nothing, is an error."""
    log = get_logger()
    pending = {}
    for band_cfg in cfg.select.bands:
        name = band_cfg.resolved_name()
        if layout.band(name).manifest.is_file():
            previous = BandManifest.read(layout.band(name).manifest)
            if not same_parameters(previous.parameters, band_cfg):
                raise ConfigError(
                    f"select.bands: {layout.band(name).dir} holds a different selection; give this band another name"
                )
            if previous.score_provenance["key"] == provenance["key"]:
                log.info(f"{name}: already selected, nothing to do")
                continue
            log.info(f"{name}: the scores were recomputed since this band was selected; selecting again")
        reference = (
            reference_lengths(band_cfg, layout, pending, exchange)
            if band_cfg.strategy == "length_matched"
            else None
        )
        decision = decide(scores, band_cfg, str(layout.scores_dir), reference, exchange)
        summary = summarize(decision.rows, band_cfg.rank_by, exchange)
        kept = summary.filter(pl.col("kept"))
        if kept["samples"].sum() == 0:
            raise ConfigError(f"select.bands: {name} keeps no sample; widen the band (or lower min_tokens)")
        share = kept["tokens"].sum() / max(summary["tokens"].sum(), 1)
        if share < 0.01:
            log.warning(f"{name}: keeps only {share:.2%} of the tokens")
        pending[name] = Pending(band_cfg, decision, summary)
    return pending


def write_bands(
    cfg: Config, layout: Layout, plan: ShardPlan, pending: dict[str, Pending], exchange: Exchange = LOCAL
) -> None:
    """Every band's kept (and rejected) rows with their texts, reading the corpus once, shard by
    shard: on several ranks, each rank its own shards, into the folders rank 0 made."""
    if exchange.rank == 0:
        for name in pending:  # every band was checked first: a bad one touched nothing
            paths = layout.band(name)
            for stale in (paths.dir, paths.rejected):  # a run cut short before its manifest
                if stale.exists():
                    layout.remove(stale)
            paths.dir.mkdir(parents=True)
            if cfg.select.write_rejected:
                paths.rejected.mkdir(parents=True)
    exchange.gather("folders-made", pl.DataFrame({"rank": [exchange.rank]}))
    stats = ReadStats()
    for shard in shards_of_rank(len(plan.shards), exchange.rank, exchange.world_size):
        records = shard_records(plan, shard, cfg.corpus, stats)
        for name, band in pending.items():
            paths = layout.band(name)
            part = band.decided.filter(pl.col("shard") == shard).collect()
            write_part(
                part.filter(pl.col("kept")).drop("kept", "reason", "dropped_by", strict=False),
                records,
                paths.dir,
                shard,
                cfg.corpus.mode,
            )
            if cfg.select.write_rejected:
                write_part(
                    part.filter(~pl.col("kept")).drop("kept"), records, paths.rejected, shard, cfg.corpus.mode
                )


def finish_band(cfg: Config, layout: Layout, name: str, band: Pending, provenance: dict) -> None:
    """The band's optional JSONL, its config and, last, its manifest."""
    paths = layout.band(name)
    if cfg.select.jsonl:
        frame = pl.read_parquet(part_files(paths.dir))
        frame.select("sample_id", "source", "loss", "text").write_ndjson(paths.jsonl)
    manifest = manifest_for(cfg, band, provenance)
    save_config(cfg, paths.dir)
    manifest.write(paths.manifest)
    get_logger().info(
        f"{name}: kept {manifest.samples.kept} of {manifest.samples.total} samples, "
        f"{manifest.tokens.kept:,} of {manifest.tokens.total:,} tokens, "
        f"loss {manifest.loss_thresholds.min_kept:.3f}..{manifest.loss_thresholds.max_kept:.3f} -> {paths.dir}"
    )


def run(cfg: Config) -> list[Path]:
    """On several ranks (torchrun, a Slurm array: pipeline/launcher.py) each rank reads the scores of
    its own shards and the band's ends are found from their pooled histograms
    (pipeline/exchange.py); each rank writes its shards' parts, rank 0 the manifests."""
    started = time.perf_counter()
    layout = Layout(cfg.out_dir)
    exchange = exchange_for(layout.exchange())
    try:
        with lock(layout, "select" if exchange.rank == 0 else f"select.rank-{exchange.rank}"):
            plan = plan_shards(cfg.corpus)
            files = score_files(layout)
            provenance = common_provenance(files)
            check_corpus_unchanged(layout, plan, provenance)
            mine = [files[shard] for shard in shards_of_rank(len(files), exchange.rank, exchange.world_size)]
            pending = bands_to_select(cfg, layout, scan_scores(mine), provenance, exchange)
            if pending:
                write_bands(cfg, layout, plan, pending, exchange)
                exchange.gather("parts-written", pl.DataFrame({"rank": [exchange.rank]}))
                if exchange.rank == 0:
                    for name, band in pending.items():
                        finish_band(cfg, layout, name, band, provenance)
                seconds = time.perf_counter() - started
                get_logger().info(f"selected {len(pending)} band(s) in {seconds:.1f}s")
            exchange.close()
    except BaseException as error:  # the other ranks would wait for this one's histograms
        exchange.abort(error)
        raise
    return [layout.band(b.resolved_name()).dir for b in cfg.select.bands]
