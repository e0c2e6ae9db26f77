"""A band on its way out of `select`: staged, then published whole.

    band = Pending(band_cfg, decision, summary, layout.band_staging(name, decision_key(...)))
    is_staged(cfg, band, shard)             # this shard's parts are written (by any rank, any run)
    publish(cfg, layout, name, band, num_shards)   # once all are: manifest, rename

The ranks of a select job never talk (docs/selection.md, "On several ranks"): each stages the
parts of its own shards in `selected/.<band>.<decision>/` (and `rejected/`), and whichever finds
every part staged publishes the band. `<decision>` fingerprints what was asked and what was
decided, so parts staged under one name fit together, whichever rank or run wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.artifacts import atomic_path, digest
from pipeline.band_decision import Decision, manifest_for
from pipeline.codec import encode
from pipeline.config import BandConfig, Config, ConfigError, save_config, to_dict
from pipeline.layout import DECISION_HEX, BandPaths, Layout, part_files, part_path
from pipeline.locks import LockHeldError, lock
from pipeline.log import EVERY_RANK, get_logger
from pipeline.outputs import BandManifest, Provenance


@dataclass(frozen=True, slots=True)
class Pending:
    """A band to (re)select: its config, every sample's decision and the decision's totals, the
    provenance of the scores it was decided on (with the target model's for the reducible key),
    and the staging folder its parts are written to."""

    config: BandConfig
    decision: Decision
    summary: pl.DataFrame
    provenance: Provenance
    staging: BandPaths

    @property
    def decided(self) -> pl.LazyFrame:
        return self.decision.rows


def decision_key(
    cfg: Config, band_cfg: BandConfig, provenance: Provenance, decision: Decision, summary
) -> str:
    """A fingerprint of the band's decision and of how its parts are written: what it was asked
    (the band, the scores' key), what it decided (every count and range the manifest reports, a
    sum of hashes of the sample_ids in each cell, the length curves) and which parts it writes
    (the columns, the corpus mode, whether rejected rows are written). Ranks that stage under one
    key write parts that fit together; a rank that decided otherwise (another version of the code
    or of Polars, say) stages apart and never mixes in."""
    by = [c for c in ("source", "kept", "reason", "dropped_by") if c in summary.columns]
    decided = {
        "summary": summary.sort(by, nulls_last=True).to_dicts(),
        "curves": encode(decision.curves),
        "columns": [f"{name}: {dtype}" for name, dtype in decision.rows.collect_schema().items()],
        "rejected": cfg.select.write_rejected,
        "mode": cfg.corpus.mode,
    }
    return digest([to_dict(band_cfg), provenance.key, decided])[:DECISION_HEX]


def selected_before(layout: Layout, name: str, band_cfg: BandConfig) -> BandManifest | None:
    """The manifest of what the band's folder holds, if anything; a different selection under the
    same name is an error, never overwritten."""
    path = layout.band(name).manifest
    if not path.is_file():
        return None
    previous = BandManifest.read(path)
    if previous.parameters != band_cfg:
        raise ConfigError(
            f"select.bands: {layout.band(name).dir} holds a different selection; give this band another name"
        )
    return previous


def is_published(layout: Layout, name: str, band: Pending) -> bool:
    """Whether the band's folder holds this selection already (published by another rank)."""
    previous = selected_before(layout, name, band.config)
    return previous is not None and previous.score_provenance.key == band.provenance.key


def staged_folders(cfg: Config, band: Pending) -> list[Path]:
    return [band.staging.dir, band.staging.rejected] if cfg.select.write_rejected else [band.staging.dir]


def is_staged(cfg: Config, band: Pending, shard: int) -> bool:
    """Whether every part of the shard is staged: written by this run or an earlier run of the same
    decision (a part that exists is complete: it is written under another name and renamed)."""
    return all(part_path(folder, shard).is_file() for folder in staged_folders(cfg, band))


def publish(cfg: Config, layout: Layout, name: str, band: Pending, shards: int) -> bool:
    """Once every shard's parts are staged: the band's JSONL, config and manifest, then the staged
    folders renamed into place (rejected first, the manifest's folder last; the folders they
    replace are moved aside first and deleted last, so a kill leaves either selection whole or
    none, never a manifest over missing parts). Several ranks may find the band complete; the
    publish lock lets one do it, and what it found is checked again under the lock. Returns
    whether this rank published."""
    staged, final = band.staging, layout.band(name)
    for folder in (final.dir, final.rejected):
        layout.check_inside(folder)
    if not all(is_staged(cfg, band, shard) for shard in range(shards)):
        if is_published(layout, name, band):  # by a rank that found every part first
            for orphan in staged_folders(cfg, band):  # what this late rank staged again
                if orphan.exists():
                    layout.remove(orphan)
        return False  # else another rank has parts still to write: the last one publishes
    try:
        with lock(layout, f"select-publish-{name}"):
            if is_published(layout, name, band) or not all(
                is_staged(cfg, band, shard) for shard in range(shards)
            ):
                return False  # published meanwhile (and perhaps staged again by a late rank)
            for folder in staged_folders(cfg, band):  # the temporary files of killed writers
                for leftover in folder.glob(".*.tmp"):
                    layout.remove(leftover)
            if cfg.select.jsonl:
                frame = pl.read_parquet(part_files(staged.dir))
                with atomic_path(staged.jsonl) as tmp:  # never through a link left in the staging
                    frame.select("sample_id", "source", "loss", "text").write_ndjson(tmp)
            else:  # left by a cut run that wrote it
                staged.jsonl.unlink(missing_ok=True)
            manifest = manifest_for(cfg, band.config, band.decision, band.summary, band.provenance)
            save_config(cfg, staged.dir)
            manifest.write(staged.manifest)
            if cfg.select.write_rejected:
                replace(layout, name, staged.rejected, final.rejected)
            replace(layout, name, staged.dir, final.dir)
            for stale in layout.band_stagings(name):  # cut runs of other decisions
                layout.remove(stale)
    except LockHeldError:
        return False
    get_logger().info(
        f"{name}: kept {manifest.samples.kept} of {manifest.samples.total} samples, "
        f"{manifest.tokens.kept:,} of {manifest.tokens.total:,} tokens, "
        f"loss {manifest.loss_thresholds.min_kept:.3f}..{manifest.loss_thresholds.max_kept:.3f} -> {final.dir}",
        extra=EVERY_RANK,  # whichever rank ends last publishes
    )
    return True


def aside_of(target: Path, name: str) -> Path:
    """Where `replace` moves a band's previous folder while the new one takes its place."""
    return target.with_name(f".{name}.replaced")


def replace(layout: Layout, name: str, staged: Path, target: Path) -> None:
    """The staged folder renamed to its final path; what was there is moved aside first and
    deleted after (`.<band>.replaced`, never a staging name), so no moment shows a mix."""
    aside = aside_of(target, name)
    if aside.exists():  # left by a publish cut short
        layout.remove(aside)
    if target.exists():
        layout.check_replaceable(target)
        target.rename(aside)
    layout.check_inside(staged).rename(target)
    if aside.exists():
        layout.remove(aside)
