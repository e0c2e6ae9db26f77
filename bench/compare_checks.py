"""Checks of a finished `midrank compare` run that its report does not print: are the arms'
training sets independent draws, which sources do they hold, does the interval hold its level on
this run's own numbers, and (on the noisy preset, given its labels) how much junk each arm's set holds?

    .venv/bin/python bench/compare_checks.py                                  # the embedded default
    .venv/bin/python bench/compare_checks.py --config configs/tiny.yaml \\
        --arms random,random_replicate                                        # after the tiny compare

Overlap: per seed, the share of each arm's set tokens that the reference arm's set of the same
seed also holds, against chance (the reference set's share of all scored tokens).

Sources: each arm's set tokens by source, its seeds' sets pooled, beside the corpus's.

Re-randomization: the runs of the reference and the A/A arm (`random_replicate`) are draws of one
distribution, so every split of them into two groups of the seeds' size is an A/A experiment.
Each split is analysed with the report's own contrast (pipeline/stats.contrast, documents within
sources for held-out loss) on the saved per-document numbers (`reports/<name>/evals/`); the share
of splits whose 95% interval excludes zero should be near 5% (the splits overlap, so this share
is itself uncertain by several points).

Junk (`--labels data/corpus-noisy/labels.jsonl`, the noisy preset's side file): per arm and seed,
the share of the training set's tokens that are generated junk, and for the arms whose band drops
a top (`drop_top`), how many documents of each kind the drop caught out of the corpus's.

    .venv/bin/python bench/compare_checks.py --config configs/noisy.yaml --labels data/corpus-noisy/labels.jsonl \
        --arms random_replicate,random_matched,midranking,midranking_dropped "compare.seeds=[0,1,2]"
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.band_decision import decide  # noqa: E402
from pipeline.compare_arms import arm_setup  # noqa: E402
from pipeline.comparison import CachedEvaluation  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.layout import Layout, part_files  # noqa: E402
from pipeline.scores import scan_scores, score_files  # noqa: E402
from pipeline.stats import contrast  # noqa: E402


def overlap(cfg, arms: list[str], seeds: list[int]) -> None:
    layout = Layout(cfg.out_dir)
    total = scan_scores(score_files(layout)).select(pl.col("n_tokens").cast(pl.Int64).sum()).collect().item()

    def tokens(arm: str, seed: int) -> pl.DataFrame:
        band, _ = arm_setup(cfg, arm, seed)
        return pl.read_parquet(
            part_files(layout.band(band.resolved_name()).dir), columns=["sample_id", "n_tokens"]
        )

    reference = cfg.compare.reference
    print(f"share of each arm's set tokens also in `{reference}`'s set of the same seed")
    print("| seed | " + " | ".join(arms) + " | chance |\n|---|" + "---|" * (len(arms) + 1))
    for seed in seeds:
        ref = tokens(reference, seed)
        cells = []
        for arm in arms:
            mine = tokens(arm, seed)
            shared = mine.join(ref.select("sample_id"), on="sample_id")["n_tokens"].sum()
            cells.append(f"{shared / mine['n_tokens'].sum():.1%}")
        print(f"| {seed} | " + " | ".join(cells) + f" | {ref['n_tokens'].sum() / total:.1%} |")


def source_mix(cfg, arms: list[str], seeds: list[int]) -> None:
    layout = Layout(cfg.out_dir)
    columns = ["source", "n_tokens"]
    shares = {}
    for arm in [cfg.compare.reference, *arms]:
        bands = {arm_setup(cfg, arm, seed)[0].resolved_name() for seed in seeds}  # one, if not drawn
        sets = pl.concat([pl.read_parquet(part_files(layout.band(b).dir), columns=columns) for b in bands])
        shares[arm] = sets.group_by("source").agg(pl.col("n_tokens").sum() / sets["n_tokens"].sum())
    corpus = scan_scores(score_files(layout)).select(columns).collect()
    shares["the corpus"] = corpus.group_by("source").agg(pl.col("n_tokens").sum() / corpus["n_tokens"].sum())
    sources = sorted(corpus["source"].unique())
    print("\nshare of each arm's set tokens by source (its seeds' sets pooled; the corpus last)")
    print("| arm | " + " | ".join(sources) + " |\n|---|" + "---|" * len(sources))
    for arm, share in shares.items():
        of = dict(share.iter_rows())
        print(f"| {arm} | " + " | ".join(f"{of.get(source, 0):.0%}" for source in sources) + " |")


def junk_dose(cfg, arms: list[str], seeds: list[int], labels: Path) -> None:
    layout = Layout(cfg.out_dir)
    kinds = pl.read_ndjson(labels).select("sample_id", "kind")
    arms = [cfg.compare.reference, *arms]
    print("\nshare of each arm's set tokens that are generated junk (the corpus's share last)")
    scores = scan_scores(score_files(layout)).collect().join(kinds, on="sample_id", how="left")
    unlabelled = scores["kind"].null_count()
    if unlabelled:
        raise SystemExit(
            f"{labels}: {unlabelled:,} of {scores.height:,} scored samples have no label; wrong corpus?"
        )
    corpus = scores.filter(pl.col("kind") != "real")["n_tokens"].sum() / scores["n_tokens"].sum()
    print("| seed | " + " | ".join(arms) + " | corpus |\n|---|" + "---|" * (len(arms) + 1))
    for seed in seeds:
        cells = []
        for arm in arms:
            band, _ = arm_setup(cfg, arm, seed)
            kept = pl.read_parquet(
                part_files(layout.band(band.resolved_name()).dir), columns=["sample_id", "n_tokens"]
            ).join(kinds, on="sample_id", how="left")
            cells.append(
                f"{kept.filter(pl.col('kind') != 'real')['n_tokens'].sum() / kept['n_tokens'].sum():.1%}"
            )
        print(f"| {seed} | " + " | ".join(cells) + f" | {corpus:.1%} |")
    for arm in arms:
        band, _ = arm_setup(cfg, arm, seeds[0])
        if not band.drop_top.shares():
            continue
        decided = decide(scores.lazy(), band, arm).rows.collect().join(kinds, on="sample_id", how="left")
        caught = decided.group_by("kind").agg(
            pl.len().alias("documents"),
            (pl.col("reason") == "dropped_top").sum().alias("dropped"),
            (pl.col("reason") == "too_short").sum().alias("short"),
        )
        print(
            f"\n`{arm}`'s drop_top ({band.drop_top.shares()}) and min_tokens {band.min_tokens}: "
            "documents of each kind it drops"
        )
        print("| kind | in a key's top | too short | of | share |\n|---|---|---|---|---|")
        for kind, documents, dropped, short in caught.sort("kind").iter_rows():
            print(f"| {kind} | {dropped} | {short} | {documents} | {(dropped + short) / documents:.0%} |")


def rerandomize(cfg, seeds: list[int]) -> None:
    report = Layout(cfg.out_dir).report(cfg.compare.name)
    reference = cfg.compare.reference
    models = [
        CachedEvaluation.read(report.evaluation(f"{arm}-seed{s}")).evaluation
        for arm in (reference, "random_replicate")
        for s in seeds
    ]
    n, k = len(models), len(seeds)
    splits = [c for c in itertools.combinations(range(n), k) if 0 in c]  # each split once, not twice
    print(
        f"\nre-randomization: {n} runs of {reference} and random_replicate, {len(splits)} splits of {k} + {k}"
    )
    for part in ("heldout", "ood"):
        docs = [getattr(m, part) for m in models]
        if docs[0] is None:
            continue
        nll = np.array([d.nll for d in docs])
        tokens = np.array(docs[0].tokens, dtype=np.float64)
        strata = np.array(docs[0].sources) if part == "heldout" else None
        rejected, widths = 0, []
        for split in splits:
            mine = np.zeros(n, dtype=bool)
            mine[list(split)] = True
            low, high = contrast(nll[mine], nll[~mine], tokens, strata).interval()
            rejected += low > 0 or high < 0
            widths.append(high - low)
        print(
            f"{part} loss: the 95% interval excludes zero in {rejected}/{len(splits)} splits "
            f"({rejected / len(splits):.1%}); median width {np.median(widths):.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument(
        "--arms", default="random_replicate,random_matched,midranking", help="arms to overlap"
    )
    parser.add_argument("--labels", type=Path, help="the noisy corpus's labels: show each arm's junk")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, as for midrank (e.g. compare.seeds=[0,1])"
    )
    args = parser.parse_args()
    cfg = load_config(Path(args.config), args.overrides)
    seeds = list(cfg.compare.seeds)
    overlap(cfg, args.arms.split(","), seeds)
    source_mix(cfg, args.arms.split(","), seeds)
    if args.labels:
        junk_dose(cfg, args.arms.split(","), seeds, args.labels)
    if len(seeds) >= 2 and "random_replicate" in cfg.compare.arms:
        rerandomize(cfg, seeds)


if __name__ == "__main__":
    main()
