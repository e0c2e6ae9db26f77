"""Benchmark selection at scale against the tools a user would otherwise pick, on synthetic scores.

    .venv/bin/python bench/bench_select.py                          # 10M samples
    .venv/bin/python bench/bench_select.py --samples 10M,100M,1B --data /big/disk/bench-select

Each size's score shards (sample_id, source, n_tokens, loss with three decimals, so many ties;
1M rows a shard, the columns selection reads) are generated once under --data and reused. The
task: the MidRanking band (skip 10%, keep 50%, by samples, ranked by loss descending, ties by
sample_id ascending) written as the kept sample_ids to Parquet. Each arm runs in its own process,
so its peak RSS is its own:

(a) pandas: read every file, sort, slice by position (only up to --in-memory-max samples: it holds
    everything, ~260 bytes a sample).
(b) DuckDB: `ORDER BY loss DESC, sample_id LIMIT keep OFFSET skip` over read_parquet, COPY to
    Parquet, with its default settings (memory limit 80% of RAM, spilling to disk beyond).
(c) DuckDB with memory_limit --duckdb-limit: held to midrank's memory target.
(d) Polars: a lazy sort and slice, sunk to Parquet (its streaming engine sorts in memory).
(e) midrank: pipeline.selection.select (histogram passes, then a streaming filter), sunk to Parquet.

The kept sets must be identical: compared whole up to 10M samples, above that by count and two
order-independent 64-bit fingerprints (sums of seeded hashes of the kept sample_ids).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.codec import parse_json  # noqa: E402

SKIP, KEEP = "0.1", "0.5"
ROWS_PER_SHARD = 1_000_000
SOURCES = ["web", "code", "books", "wiki"]


def count(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}
    return int(float(text[:-1]) * scale[text[-1].upper()]) if text[-1].upper() in scale else int(text)


def shard_frame(shard: int, rows: int) -> pl.DataFrame:
    rng = np.random.default_rng(shard)
    n_tokens = rng.integers(2, 512, rows).astype(np.int32)
    index = pl.int_range(0, rows, eager=True)
    return pl.DataFrame(
        {
            "sample_id": f"corpus/part-{shard:05d}.jsonl:" + index.cast(pl.String),
            "source": rng.choice(SOURCES, rows),
            "n_tokens": n_tokens,
            "loss": np.round(rng.gamma(4.0, 0.8, rows), 3),
        }
    )


def make_shards(directory: Path, samples: int) -> list[Path]:
    """The size's shards, generated unless a finished set is there (a `done` marker written last)."""
    done = directory / "done"
    shards = math.ceil(samples / ROWS_PER_SHARD)
    files = [directory / f"part-{shard:05d}.parquet" for shard in range(shards)]
    if done.is_file() and done.read_text() == str(samples):
        return files
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    started = time.perf_counter()
    for shard, path in enumerate(files):
        rows = min(ROWS_PER_SHARD, samples - shard * ROWS_PER_SHARD)
        shard_frame(shard, rows).write_parquet(path)
        if shard % 50 == 49:
            rate = (shard + 1) / (time.perf_counter() - started)
            print(
                f"  generated {shard + 1}/{shards} shards, {(shards - shard - 1) / rate:.0f}s left",
                flush=True,
            )
    done.write_text(str(samples))
    return files


def band_rows(n: int) -> tuple[int, int]:
    """[first, last) positions of the band, in exact rationals of the decimals as written."""
    skip, keep = Fraction(SKIP), Fraction(KEEP)
    return math.ceil(skip * n), math.ceil((skip + keep) * n)


def run_pandas(pattern: str, n: int, out: Path) -> None:
    import pandas as pd

    files = sorted(Path(pattern).parent.glob(Path(pattern).name))
    frame = pd.concat([pd.read_parquet(f, columns=["sample_id", "loss"]) for f in files], ignore_index=True)
    frame = frame.sort_values(["loss", "sample_id"], ascending=[False, True], kind="stable")
    first, last = band_rows(n)
    frame[["sample_id"]].iloc[first:last].to_parquet(out)


def run_duckdb(pattern: str, n: int, out: Path, limit: str | None) -> None:
    import duckdb

    connection = duckdb.connect(config={"temp_directory": str(out.parent / "duckdb.tmp")})
    if limit:
        connection.execute(f"SET memory_limit = '{limit}'")
    connection.execute("SET preserve_insertion_order = false")
    first, last = band_rows(n)
    connection.execute(
        f"COPY (SELECT sample_id FROM read_parquet('{pattern}') ORDER BY loss DESC, sample_id "
        f"LIMIT {last - first} OFFSET {first}) TO '{out}' (FORMAT parquet)"
    )


def run_polars(pattern: str, n: int, out: Path) -> None:
    first, last = band_rows(n)
    ordered = pl.scan_parquet(pattern).sort(["loss", "sample_id"], descending=[True, False])
    ordered.slice(first, last - first).select("sample_id").sink_parquet(out)


def run_midrank(pattern: str, n: int, out: Path) -> None:
    from pipeline.selection import band_for, select

    scores = pl.scan_parquet(pattern).select("sample_id", "loss")  # what a band by samples reads
    decided = select(scores, band_for("midranking", skip=float(SKIP), keep=float(KEEP)))
    decided.filter(pl.col("kept")).select("sample_id").sink_parquet(out)


def child(arm: str, pattern: str, n: int, out: Path, limit: str | None) -> None:
    started = time.perf_counter()
    if arm == "pandas":
        run_pandas(pattern, n, out)
    elif arm.startswith("duckdb"):
        run_duckdb(pattern, n, out, limit if arm == "duckdb-limited" else None)
    elif arm == "polars-sort":
        run_polars(pattern, n, out)
    else:
        run_midrank(pattern, n, out)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.with_suffix(".json").write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))


def fingerprint(path: Path) -> tuple[int, int, int]:
    """Count and two order-independent fingerprints of a set of sample_ids, streamed."""
    ids = pl.scan_parquet(path).select("sample_id")
    low = [
        (pl.col("sample_id").hash(seed) & 0xFFFFFFFF).cast(pl.Int64).sum().alias(f"h{seed}")
        for seed in (1, 2)
    ]
    return ids.select(pl.len(), *low).collect().row(0)


def same_set(a: Path, b: Path, n: int) -> bool:
    if n <= 10_000_000:
        ids = [pl.read_parquet(p)["sample_id"].sort() for p in (a, b)]
        return ids[0].equals(ids[1])
    return fingerprint(a) == fingerprint(b)


def bench_size(data: Path, n: int, args: argparse.Namespace) -> None:
    directory = data / f"{n}"
    started = time.perf_counter()
    files = make_shards(directory, n)
    made = time.perf_counter() - started
    size = sum(f.stat().st_size for f in files) / 1e9
    print(
        f"\n## {n:,} samples: {len(files)} shards, {size:.2f} GB on disk (ready in {made:.0f}s)", flush=True
    )
    arms = [a for a in args.arms.split(",") if a not in ("pandas", "polars-sort") or n <= args.in_memory_max]
    work = data / "out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = {}
    for arm in arms:
        out = work / f"{arm}.parquet"
        command = [sys.executable, __file__, "--child", arm, "--pattern", str(directory / "*.parquet")]
        command += ["--n", str(n), "--out", str(out), "--duckdb-limit", args.duckdb_limit]
        finished = subprocess.run(command, cwd=ROOT)
        if finished.returncode:
            print(f"{arm:16s} failed (exit {finished.returncode})", flush=True)
            continue
        results[arm] = parse_json(out.with_suffix(".json").read_text(), str(out), ValueError)
        r = results[arm]
        print(f"{arm:16s} {r['seconds']:9.1f}s {r['peak_rss_mb']:10,.0f} MB peak RSS", flush=True)
    if "midrank" not in results:
        sys.exit("bench_select: the midrank arm did not finish")
    mine = results["midrank"]
    kept = band_rows(n)[1] - band_rows(n)[0]
    for arm, r in results.items():
        if arm == "midrank":
            continue
        same = same_set(work / "midrank.parquet", work / f"{arm}.parquet", n)
        print(
            f"midrank vs {arm}: {arm} takes {r['seconds'] / mine['seconds']:.2f}x midrank's time, midrank's peak RSS "
            f"{mine['peak_rss_mb'] / r['peak_rss_mb']:.0%} of it, same kept set: {same}"
        )
        if not same:
            sys.exit(f"bench_select: midrank kept another set of samples than {arm}")
    got = fingerprint(work / "midrank.parquet")[0]
    if got != kept:
        sys.exit(f"bench_select: midrank kept {got:,} samples, the band holds {kept:,}")
    shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", default="10M", help="sizes, comma-separated: 20000,10M,100M,1B")
    parser.add_argument(
        "--data", type=Path, default=ROOT / "runs" / "bench-select", help="where the shards are kept"
    )
    parser.add_argument("--arms", default="pandas,polars-sort,duckdb,duckdb-limited,midrank")
    parser.add_argument(
        "--in-memory-max",
        type=count,
        default=10_000_000,
        help="largest size the in-memory arms (pandas, Polars) run on",
    )
    parser.add_argument("--duckdb-limit", default="2GB", help="memory_limit of the duckdb-limited arm")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--pattern", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.pattern, args.n, args.out, args.duckdb_limit)
        return
    print(
        f"# bench/bench_select.py — MidRanking skip {float(SKIP):.0%}, keep {float(KEEP):.0%} by samples, "
        "ranked by loss (ties by sample_id); time and peak RSS of each arm in its own process"
    )
    for n in map(count, args.samples.split(",")):
        bench_size(args.data, n, args)


if __name__ == "__main__":
    main()
