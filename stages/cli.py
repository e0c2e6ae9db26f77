"""The `midrank` command line: `midrank <command> --config PRESET [section.key=value ...]`.

    midrank config --config configs/default.yaml score.batch_tokens=4096   # print the resolved config
    midrank corpus --config configs/default.yaml                          # read and check every record
    midrank score --config configs/default.yaml                           # stage one: score losses
    midrank select --config configs/default.yaml                          # stage two: keep the band(s)
    midrank inspect --config configs/default.yaml                         # histograms and a report
    midrank train --config configs/default.yaml                           # continual training + eval
    midrank demo --config configs/default.yaml                            # all of the above
    midrank compare --config configs/default.yaml 'compare.seeds=[0,1,2]' # strategies side by side
    torchrun --nproc_per_node=8 -m stages.cli score --config ...          # one process per GPU

Each command is a stage module's `run(cfg)`, imported only when asked for (a stage pulls in torch
and transformers). Configuration errors and bad input end with one clear line and exit status 2,
not a traceback. This module lives in stages/, not beside the library as STYLE.md's layout has
it, because it dispatches to the stages and the library must not import them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pipeline.artifacts import ProvenanceError
from pipeline.config import ConfigError, dump_config, load_config
from pipeline.locks import LockedError
from pipeline.log import get_logger
from pipeline.outputs import OutputError
from pipeline.readers import InputError
from pipeline.records import CorpusError

# command -> (the stage module whose run(cfg) it calls, or None for `config`; what it does)
COMMANDS = {
    "config": (None, "print the resolved configuration"),
    "corpus": ("stages.corpus", "read every record and report counts and skipped rows by reason"),
    "score": ("stages.score", "score every sample's loss -> <out_dir>/scores/part-*.parquet"),
    "select": ("stages.select", "rank the scores, keep the band(s) -> <out_dir>/selected/<band>/"),
    "inspect": ("stages.inspect", "loss histograms, bands, examples -> <out_dir>/reports/<name>/index.html"),
    "train": ("stages.train", "continual training on a selected band -> <out_dir>/train/<run>/"),
    "demo": ("stages.demo", "score, select, inspect and train, then a summary of where everything went"),
    "compare": ("stages.compare", "train on random/top/bottom/MidRanking/IR-DRO sets, compare held-out loss"),
}
ERRORS = (ConfigError, InputError, CorpusError, ProvenanceError, OutputError, LockedError)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local model directories only; never wait on a hub
    parser = argparse.ArgumentParser(prog="midrank", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default="configs/default.yaml", help="YAML preset (default: %(default)s)")
        p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    module = COMMANDS[args.command][0]
    try:
        cfg = load_config(args.config, args.overrides)
        if module is None:
            print(dump_config(cfg), end="")
        else:
            importlib.import_module(module).run(cfg)
    except ERRORS as err:
        get_logger().error(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
