"""Benchmark the selection maths against the naive approach, on synthetic score shards.

    .venv/bin/python bench/bench_select.py                 # 10M samples in 20 shards
    .venv/bin/python bench/bench_select.py --samples 1000000

(a) naive: pandas reads every score file whole, sorts by loss (ties by sample_id) and slices the
    MidRanking band by position.
(b) midrank: `pipeline.selection.select` as a lazy Polars query over the same files (the columns
    selection needs only), then the kept ids.
Each runs in its own process, so peak RSS is its own; both must keep the same set of samples.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SKIP, KEEP = 0.1, 0.5


def sample_ids(start: int, stop: int) -> pl.Series:
    index = pl.int_range(start, stop, eager=True)
    return "corpus/part-" + (index // 100_000).cast(pl.String) + ".jsonl:" + (index % 100_000).cast(pl.String)


def make_shards(directory: Path, samples: int, shards: int) -> list[Path]:
    """Score files shaped like stage one's, with tied losses (3 decimals) and 4 sources."""
    rng = np.random.default_rng(0)
    files = []
    per_shard = samples // shards
    for shard in range(shards):
        n_tokens = rng.integers(2, 512, per_shard).astype(np.int32)
        nll_sum = np.round(rng.gamma(4.0, 0.8, per_shard), 3) * n_tokens
        frame = pl.DataFrame(
            {
                "sample_id": sample_ids(shard * per_shard, (shard + 1) * per_shard),
                "shard": np.full(per_shard, shard, dtype=np.int32),
                "source": rng.choice(["web", "code", "books", "wiki"], per_shard),
                "window": np.zeros(per_shard, dtype=np.int32),
                "n_tokens": n_tokens,
                "nll_sum": nll_sum,
                "loss": nll_sum / n_tokens,
                "max_token_nll": rng.uniform(0, 20, per_shard).astype(np.float32),
                "n_chars": n_tokens * 4,
                "char_start": np.zeros(per_shard, dtype=np.int32),
                "char_end": n_tokens * 4,
                "truncated": np.zeros(per_shard, dtype=bool),
            }
        )
        path = directory / f"part-{shard:05d}.parquet"
        frame.write_parquet(path)
        files.append(path)
    return files


def run_naive(files: list[str], out: Path) -> int:
    import pandas as pd

    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    frame = frame.sort_values(["loss", "sample_id"], ascending=[False, True], kind="stable")
    n = len(frame)
    skip, keep = Fraction(str(SKIP)), Fraction(str(KEEP))
    kept = frame[["sample_id"]].iloc[math.ceil(skip * n) : math.ceil((skip + keep) * n)]
    kept.to_parquet(out)
    return len(kept)


def run_midrank(files: list[str], out: Path) -> int:
    from pipeline.selection import band_for, select

    scores = pl.scan_parquet(files).select("sample_id", "loss")  # what a samples-measured band needs
    decided = select(scores, band_for("midranking", skip=SKIP, keep=KEEP))
    kept = decided.filter(pl.col("kept")).select("sample_id").collect()
    kept.write_parquet(out)
    return kept.height


def same_ids(a: Path, b: Path) -> bool:
    ids = [pl.read_parquet(p)["sample_id"].sort() for p in (a, b)]
    return ids[0].equals(ids[1])


def child(kind: str, files: list[str], result: Path) -> None:
    started = time.perf_counter()
    kept = (run_naive if kind == "naive" else run_midrank)(files, result.with_suffix(".parquet"))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "kept": kept}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.files.split(","), Path(args.result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        files = make_shards(work, args.samples, args.shards)
        size = sum(f.stat().st_size for f in files) / 1e6
        print(
            f"# bench/bench_select.py — {args.samples:,} samples in {args.shards} shards ({size:,.0f} MB), made in {time.perf_counter() - started:.0f}s"
        )
        print(f"# MidRanking skip {SKIP:.0%}, keep {KEEP:.0%}, ranked by loss (ties by sample_id)")
        results = {}
        for kind in ("naive", "midrank"):
            result = work / f"{kind}.json"
            command = [
                sys.executable,
                __file__,
                "--child",
                kind,
                "--files",
                ",".join(map(str, files)),
                "--result",
                str(result),
            ]
            subprocess.run(command, check=True, cwd=ROOT)
            results[kind] = json.loads(result.read_text())
        naive, mine = results["naive"], results["midrank"]
        print(f"{'run':22s} {'seconds':>8s} {'peak RSS':>10s} {'kept':>11s}")
        for label, r in (("(a) naive pandas", naive), ("(b) midrank polars", mine)):
            print(f"{label:22s} {r['seconds']:8.1f} {r['peak_rss_mb']:8,.0f}MB {r['kept']:11,d}")
        same = same_ids(work / "naive.parquet", work / "midrank.parquet")
        print(
            f"speed-up {naive['seconds'] / mine['seconds']:.1f}x, peak RSS {mine['peak_rss_mb'] / naive['peak_rss_mb']:.0%} of naive, "
            f"same kept set: {same}"
        )
        if not same:
            sys.exit("bench_select: midrank kept another set of samples than the naive sort")


if __name__ == "__main__":
    main()
