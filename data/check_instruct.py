"""Where did the deliberately broken pairs of the embedded instruction sample land, under each rank key?

    python -m data.check_instruct --config configs/instruct.yaml

Joins each training pair's `kind` label (ok / mismatched / truncated, from data/build_instruct.py)
with the first band's decision as selected (dropped as too hard — the top —, kept, or dropped as
too easy), then ranks the same scores by each key with that band's parameters and counts, per
kind, the pairs in the dropped top band: by `loss`, by `ifd` (when the scores hold the
unconditional loss, score.unconditional), and by both together (a pair dropped when it is in
either top band, or in either top band of half the size: about as many dropped as by one key).
Needs `select.write_rejected: true`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter
from pathlib import Path

import polars as pl

from pipeline.band_decision import decide
from pipeline.codec import parse_json
from pipeline.config import BandConfig, load_config
from pipeline.layout import Layout, part_files
from pipeline.scores import scan_scores, score_files

KINDS = ("ok", "mismatched", "truncated")


def decisions(layout: Layout, band: str) -> dict[str, str]:
    kept = pl.read_parquet(part_files(layout.band(band).dir), columns=["sample_id"])
    rejected = pl.read_parquet(part_files(layout.band(band).rejected), columns=["sample_id", "reason"])
    out = dict.fromkeys(kept["sample_id"].to_list(), "kept")
    out |= {sid: str(reason) for sid, reason in rejected.iter_rows()}
    return out


def top_band(scores: pl.LazyFrame, band: BandConfig, key: str, skip: float, where: str) -> set[str]:
    """The samples the band drops from the top when ranked by `key` with this skip."""
    decided = decide(scores, dataclasses.replace(band, rank_by=key, skip=skip), where).rows
    return set(decided.filter(pl.col("reason") == "too_hard").select("sample_id").collect()["sample_id"])


def top_bands(cfg, layout: Layout) -> dict[str, set[str]]:
    """The samples each key's top band drops (the first band's parameters, ranked by that key),
    and two combinations: either top band (dropping up to twice as many), and either top band of
    half the size (about as many dropped as by one key)."""
    scores = scan_scores(score_files(layout))
    band, where = cfg.select.bands[0], str(layout.scores_dir)
    tops = {"loss": top_band(scores, band, "loss", band.skip, where)}
    if not scores.select(pl.col("nll_sum_uncond").is_not_null().all()).collect().item():
        return tops
    tops["ifd"] = top_band(scores, band, "ifd", band.skip, where)
    tops["loss or ifd"] = tops["loss"] | tops["ifd"]
    half = band.skip / 2
    tops["either, half"] = top_band(scores, band, "loss", half, where) | top_band(
        scores, band, "ifd", half, where
    )
    return tops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/instruct.yaml")
    args = parser.parse_args()
    cfg = load_config(args.config)
    layout = Layout(cfg.out_dir)
    corpus = Path(cfg.corpus.paths[0])
    band = cfg.select.bands[0].resolved_name()
    placed = decisions(layout, band)
    kinds = {
        f"{corpus.name}:{row}": parse_json(line, corpus.name, ValueError)["kind"]
        for row, line in enumerate(corpus.open(encoding="utf-8"))
    }
    counts: Counter = Counter((kind, placed.get(sid, "not_scored")) for sid, kind in kinds.items())
    columns = ["too_hard", "kept", "too_easy", "too_short", "not_scored"]
    print(f"band {band}: where each kind of pair went")
    print(f"  {'kind':12s} {'pairs':>6s} " + " ".join(f"{c:>16s}" for c in columns))
    for kind in KINDS:
        total = sum(counts[kind, c] for c in columns)
        cells = " ".join(f"{counts[kind, c]:6d} ({counts[kind, c] / max(total, 1):6.1%})" for c in columns)
        print(f"  {kind:12s} {total:6d} {cells}")
    totals = Counter(kinds.values())
    print(
        f"\nthe top band each key drops (the band's skip={cfg.select.bands[0].skip}): pairs of each kind in it"
    )
    print(f"  {'ranked by':12s} {'dropped':>8s} " + " ".join(f"{k:>18s}" for k in KINDS))
    for key, dropped in top_bands(cfg, layout).items():
        caught = Counter(kinds[sid] for sid in dropped if sid in kinds)
        cells = " ".join(
            f"{caught[k]:5d}/{totals[k]:<4d} ({caught[k] / max(totals[k], 1):5.1%})" for k in KINDS
        )
        print(f"  {key:12s} {len(dropped):8d} {cells}")


if __name__ == "__main__":
    main()
