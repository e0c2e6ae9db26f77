"""What a band keeps: every scored sample decided once (its ends found over all the scores), the
decision's totals, and the manifest that reports them (docs/selection.md).

    decision = decide(scores, band_cfg, where)         # rows: every sample with kept and reason
    summary = summarize(decision.rows, band_cfg.rank_by)
    manifest = manifest_for(cfg, band_cfg, decision, summary, provenance)
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import polars as pl

from pipeline.config import BAND_PRESETS, BandConfig, Config, ConfigError
from pipeline.key_columns import check_key_columns, estimate_curves, with_key
from pipeline.log import get_logger
from pipeline.outputs import (
    BandManifest,
    Counts,
    DroppedTop,
    LossRange,
    Positions,
    Provenance,
    RankKeyRange,
    SourceCount,
    SourceMix,
)
from pipeline.rank_keys import LengthCurve
from pipeline.selection import Band, Reason, band_for, irdro_weight_expr, length_matched, select, top_by_keys
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


def count(rows: pl.LazyFrame) -> int:
    return rows.select(pl.len()).collect().item()


def decide(
    scores: pl.LazyFrame,
    cfg: BandConfig,
    where: str,
    reference: pl.DataFrame | None = None,
) -> Decision:
    """The band's ends are fixed here once, and each shard is then decided on its own. Samples
    under min_tokens are rejected as too_short before anything is ranked or sampled; the shares
    (and the length curve) count the rest. `reference`: the length counts a length_matched
    sample matches; `where`: the scores, for errors."""
    ranked = scores.filter(pl.col("n_tokens") >= cfg.min_tokens) if cfg.min_tokens else scores
    if cfg.min_tokens and count(ranked) == 0:
        raise ConfigError(
            f"select.bands: {cfg.resolved_name()}: no scored sample has min_tokens={cfg.min_tokens} tokens; lower it"
        )
    drops = cfg.drop_top.shares()
    keys = list(dict.fromkeys([cfg.rank_by, *drops]))
    for key in keys:
        check_key_columns(ranked, key, where)
    curves = None
    if "length_adjusted" in keys:
        curves = estimate_curves(ranked, by_source=cfg.adjust_by_source)
    for key in keys:
        ranked = with_key(ranked, key, curves, by_source=cfg.adjust_by_source)
    dropped = None
    if drops:  # the union of each key's top share, over every ranked sample; the band counts the rest
        measure = "tokens" if cfg.target_tokens else cfg.measure
        flagged = top_by_keys(ranked, drops, measure=measure, by_source=cfg.by_source)
        ranked = flagged.filter(pl.col("dropped_by").is_null())
        dropped = flagged.filter(pl.col("dropped_by").is_not_null()).with_columns(
            kept=pl.lit(False), reason=pl.lit("dropped_top", dtype=Reason)
        )
        if count(ranked) == 0:
            raise ConfigError(
                f"select.bands: {cfg.resolved_name()}: drop_top drops every sample; lower its shares"
            )
    if cfg.strategy == "length_matched":
        decided, _, short = length_matched(ranked, reference, cfg.seed, by_source=cfg.by_source)
        if short:
            get_logger().warning(
                f"{cfg.resolved_name()}: {short} samples short of {cfg.match}'s length distribution "
                "(too few samples of some lengths in the whole set)"
            )
    else:
        total_tokens = ranked.select(pl.col("n_tokens").cast(pl.Int64).sum()).collect().item()
        band, measure = resolve_band(cfg, total_tokens)
        decided = select(
            ranked,
            band,
            measure=measure,
            by_source=cfg.by_source,
            seed=cfg.seed,
            key=cfg.rank_by,
        )
    if cfg.weights:
        weight = irdro_weight_expr(decided.filter(pl.col("kept")), cfg.kl_reg)
        decided = decided.with_columns(weight=pl.when(pl.col("kept")).then(weight))
    if dropped is not None:
        decided = pl.concat([decided, dropped], how="diagonal_relaxed")
    if cfg.min_tokens:
        too_short = scores.filter(pl.col("n_tokens") < cfg.min_tokens).with_columns(
            kept=pl.lit(False), reason=pl.lit("too_short", dtype=Reason)
        )
        decided = pl.concat([decided, too_short], how="diagonal_relaxed")
    return Decision(decided, curves)


def summarize(decided: pl.LazyFrame, key: str) -> pl.DataFrame:
    """Samples, tokens, loss and key range per (source, kept, reason): what the manifest reports."""
    by = ["source", "kept", "reason"] + (["dropped_by"] if "dropped_by" in decided.collect_schema() else [])
    return (
        decided.group_by(by)
        .agg(
            samples=pl.len(),
            tokens=pl.col("n_tokens").cast(pl.Int64).sum(),
            min_loss=pl.col("loss").min(),
            max_loss=pl.col("loss").max(),
            min_key=pl.col(key).cast(pl.Float64).min(),
            max_key=pl.col(key).cast(pl.Float64).max(),
            ids=(pl.col("sample_id").hash(7) // (1 << 32)).sum(),  # which samples: for the staging digest
        )
        .collect()
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


def manifest_for(
    cfg: Config, band_cfg: BandConfig, decision: Decision, summary: pl.DataFrame, provenance: Provenance
) -> BandManifest:
    """The band's manifest from its decision's totals (`summarize`)."""
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
        parameters=band_cfg,
        positions=positions,
        loss_thresholds=LossRange(min_kept=kept["min_loss"].min(), max_kept=kept["max_loss"].max()),
        samples=Counts(int(summary["samples"].sum()), int(kept["samples"].sum())),
        tokens=Counts(int(summary["tokens"].sum()), int(kept["tokens"].sum())),
        rejected={str(r["reason"]): int(r["samples"]) for r in rejected.sort("reason").to_dicts()},
        per_source=SourceMix(before=source_mix(summary), after=source_mix(kept)),
        rank_key=RankKeyRange(
            key=band_cfg.rank_by, min_kept=kept["min_key"].min(), max_kept=kept["max_key"].max()
        ),
        length_curves=decision.curves,
        dropped_top=dropped_top_counts(band_cfg, summary),
        score_provenance=provenance,
        config=cfg,
    )
