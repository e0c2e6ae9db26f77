"""One rank of a selection job (run by tests/test_selection.py under torchrun): selects from
the score files of its shards, pooling the band's ends with the other ranks through files, and
writes the ids it keeps.

    torchrun --standalone --nproc_per_node=2 tests/select_ranks_job.py SCORES_DIR OUT_DIR
"""

import json
import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.exchange import exchange_for
from pipeline.launcher import rank_and_world, shards_of_rank
from pipeline.selection import band_for, select

CASES = [
    ("midranking", {"skip": 0.1, "keep": 0.3}, "samples", False),
    ("midranking", {"skip": 0.1, "keep": 0.3}, "tokens", True),
    ("band", {"low": 0.35, "high": 0.65}, "tokens", False),
    ("top", {"keep": 0.5}, "samples", True),
    ("random", {"keep": 0.25}, "samples", False),
]


def main() -> None:
    scores_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    rank, world_size = rank_and_world()
    files = sorted(scores_dir.glob("part-*.parquet"))
    mine = [files[i] for i in shards_of_rank(len(files), rank, world_size)]
    exchange = exchange_for(out / ".exchange")
    for case, (strategy, params, measure, by_source) in enumerate(CASES):
        for budget in ({"buckets": 3, "max_rows": 2}, {}):
            band = band_for(strategy, **params)
            decided = select(
                pl.scan_parquet(mine),
                band,
                measure=measure,
                by_source=by_source,
                exchange=exchange,
                seed=7,
                **budget,
            )
            kept = decided.filter(pl.col("kept")).select("sample_id").collect()
            kept.write_parquet(out / f"case{case}-{'tight' if budget else 'default'}-rank{rank}.parquet")
    exchange.close()
    (out / f"rank{rank}.json").write_text(json.dumps({"world_size": world_size, "files": len(mine)}))


if __name__ == "__main__":
    main()
