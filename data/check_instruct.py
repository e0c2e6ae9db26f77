"""Where did the deliberately broken pairs of the embedded instruction sample land?

    python -m data.check_instruct --config configs/instruct.yaml

Joins each training pair's `kind` label (ok / mismatched / truncated, from data/build_instruct.py)
with the first band's decision — dropped as too hard (the top), kept, or dropped as too easy — and
prints the counts and shares per kind. Needs `select.write_rejected: true`.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import polars as pl

from pipeline.config import load_config
from pipeline.layout import Layout, part_files


def decisions(layout: Layout, band: str) -> dict[str, str]:
    kept = pl.read_parquet(part_files(layout.band(band).dir), columns=["sample_id"])
    rejected = pl.read_parquet(part_files(layout.band(band).rejected), columns=["sample_id", "reason"])
    out = dict.fromkeys(kept["sample_id"].to_list(), "kept")
    out |= {sid: str(reason) for sid, reason in rejected.iter_rows()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/instruct.yaml")
    args = parser.parse_args()
    cfg = load_config(args.config)
    corpus = Path(cfg.corpus.paths[0])
    band = cfg.select.bands[0].resolved_name()
    placed = decisions(Layout(cfg.out_dir), band)
    counts: Counter = Counter()
    for row, line in enumerate(corpus.open(encoding="utf-8")):
        kind = json.loads(line)["kind"]
        counts[kind, placed.get(f"{corpus.name}:{row}", "not_scored")] += 1
    columns = ["too_hard", "kept", "too_easy", "not_scored"]
    print(f"band {band}: where each kind of pair went")
    print(f"  {'kind':12s} {'pairs':>6s} " + " ".join(f"{c:>16s}" for c in columns))
    for kind in ("ok", "mismatched", "truncated"):
        total = sum(counts[kind, c] for c in columns)
        cells = " ".join(f"{counts[kind, c]:6d} ({counts[kind, c] / max(total, 1):6.1%})" for c in columns)
        print(f"  {kind:12s} {total:6d} {cells}")


if __name__ == "__main__":
    main()
