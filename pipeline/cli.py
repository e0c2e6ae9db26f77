"""The `midrank` command line: `midrank <command> --config PRESET [section.key=value ...]`.

    midrank config --config configs/default.yaml score.batch_tokens=4096   # print the resolved config
    midrank corpus --config configs/default.yaml                          # read and check every record
    midrank score --config configs/default.yaml                           # stage one: score losses
    midrank select --config configs/default.yaml                          # stage two: keep the band(s)
    midrank inspect --config configs/default.yaml                         # histograms and a report
    midrank train --config configs/default.yaml                           # continual training + eval
    midrank demo --config configs/default.yaml                            # all of the above
    midrank compare --config configs/default.yaml 'compare.seeds=[0,1,2]' # strategies side by side

Configuration errors and bad input end with one clear line and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from pipeline.artifacts import ProvenanceError
from pipeline.config import Config, ConfigError, dump_config, load_config
from pipeline.log import get_logger
from pipeline.readers import InputError
from pipeline.records import CorpusError, ReadStats


def check_corpus(cfg: Config) -> ReadStats:
    """Read every record of the corpus through the shard plan; report counts and skips per reason."""
    from tqdm import tqdm

    from pipeline.sharding import iter_shard, plan_shards

    log = get_logger()
    started = time.perf_counter()
    plan = plan_shards(cfg.corpus)
    log.info(f"{len(plan.files)} input(s), {plan.total_rows} rows, {len(plan.shards)} shards")
    stats = ReadStats()
    with tqdm(total=plan.total_rows, unit="row", desc="reading", disable=None) as bar:
        for shard in range(len(plan.shards)):
            shard_stats = ReadStats()
            for _ in iter_shard(plan, shard, cfg.corpus, shard_stats):
                pass
            stats.merge(shard_stats)
            bar.update(shard_stats.rows)
    for source, count in sorted(stats.per_source.items()):
        log.info(f"  {source:24s} {count:>10d} records")
    log.info(f"corpus: {stats.summary()} in {time.perf_counter() - started:.1f}s")
    return stats


def score(cfg: Config) -> None:
    from stages import score

    score.run(cfg)


def select(cfg: Config) -> None:
    from stages import select

    select.run(cfg)


def inspect(cfg: Config) -> None:
    from stages import inspect

    inspect.run(cfg)


def train(cfg: Config) -> None:
    from stages import train

    train.run(cfg)


def compare(cfg: Config) -> None:
    from stages import compare

    compare.run(cfg)


def demo(cfg: Config) -> None:
    """score -> select -> inspect -> train, each skipping what is done, then where everything went."""
    from stages import inspect, score, select, train

    started = time.perf_counter()
    scores_dir = score.run(cfg)
    band_dir = select.run(cfg)[0]
    report_dir = inspect.run(cfg)
    run_dir = train.run(cfg)
    scored = json.loads((scores_dir / "summary.json").read_text())
    band = json.loads((band_dir / "manifest.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    t = metrics["train"]
    lines = [
        f"midrank demo: done in {time.perf_counter() - started:.0f}s (stages only; reruns skip finished work)",
        f"  scored    {scored['samples']:,} samples, {scored['tokens']:,} tokens -> {scores_dir}/",
        f"  band      {band['band']}: loss {band['loss_thresholds']['min_kept']:.3f}..{band['loss_thresholds']['max_kept']:.3f}, "
        f"kept {band['samples']['kept']:,}/{band['samples']['in']:,} samples, "
        f"{band['tokens']['kept']:,}/{band['tokens']['in']:,} tokens -> {band_dir}/",
        f"  report    {report_dir / 'index.html'}",
        f"  trained   {t['steps']} steps ({t['objective']}), {t['trained_tokens']:,} target tokens trained on, "
        f"{t['tokens_per_second']:,.0f} tok/s -> {run_dir / 'model'}/",
    ]
    if "after" in metrics:
        b, a = metrics["before"]["overall"], metrics["after"]["overall"]
        lines.append(
            f"  held-out  loss {b['loss']:.4f} -> {a['loss']:.4f} ({a['loss'] - b['loss']:+.4f} nats/token), "
            f"next-token accuracy {b['accuracy']:.2%} -> {a['accuracy']:.2%}"
        )
    print("\n".join(lines))


COMMANDS = {
    "config": ("print the resolved configuration", lambda cfg: print(dump_config(cfg), end="")),
    "corpus": ("read every record and report counts and skipped rows by reason", check_corpus),
    "score": ("score every sample's loss -> <out_dir>/scores/part-*.parquet", score),
    "select": ("rank the scores, keep the band(s) -> <out_dir>/selected/<band>/", select),
    "inspect": ("loss histograms, bands, examples -> <out_dir>/reports/<name>/index.html", inspect),
    "train": ("continual training on a selected band -> <out_dir>/train/<run>/", train),
    "demo": ("score, select, inspect and train, then a summary of where everything went", demo),
    "compare": ("train on random/top/bottom/MidRanking/IR-DRO sets, compare held-out loss", compare),
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local model directories only; never wait on a hub
    parser = argparse.ArgumentParser(prog="midrank", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default="configs/default.yaml", help="YAML preset (default: %(default)s)")
        p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    log = get_logger()
    try:
        cfg = load_config(args.config, args.overrides)
        COMMANDS[args.command][1](cfg)
    except (ConfigError, InputError, CorpusError, ProvenanceError) as err:
        log.error(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
