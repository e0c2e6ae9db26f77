"""The `midrank` command line: `midrank <command> --config PRESET [section.key=value ...]`.

    midrank config --config configs/default.yaml score.batch_tokens=4096   # print the resolved config
    midrank corpus --config configs/default.yaml                          # read and check every record
    midrank score --config configs/default.yaml                           # stage one: score losses
    midrank select --config configs/default.yaml                          # stage two: keep the band(s)
    midrank inspect --config configs/default.yaml                         # histograms and a report
    midrank train --config configs/default.yaml                           # continual training + eval
    midrank target --config configs/default.yaml                          # the reducible key's target model
    midrank demo --config configs/default.yaml                            # all of the above
    midrank compare --config configs/default.yaml 'compare.seeds=[0,1,2]' # arms vs random, 95% intervals
    torchrun --nproc_per_node=8 -m stages.cli score --config ...          # one process per GPU

Each command is a stage module's `run(cfg)`, imported only when asked for (a stage pulls in torch
and transformers). Every expected failure (config, input, model, outputs, a busy out_dir, a
file that cannot be read or written) ends with one line naming the file and what to do, and exit
status 2; `--debug` shows its traceback. A traceback without `--debug` is a bug. This module lives in stages/, not in the library
(docs/development.md §3), because it dispatches to the stages and the library must not import them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from pipeline.artifacts import ProvenanceError, advice
from pipeline.config import ConfigError, dump_config, load_config
from pipeline.cpu_memory import preload_jemalloc
from pipeline.launcher import LaunchError, rank_and_world
from pipeline.layout import LayoutError
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
    "target": (
        "stages.target",
        "fine-tune the target model on target.paths, score the corpus with it -> <out_dir>/target/",
    ),
    "demo": ("stages.demo", "score, select, inspect and train, then a summary of where everything went"),
    "compare": (
        "stages.compare",
        "train every arm at equal compute; loss and tasks vs random, 95% intervals",
    ),
}
# commands that re-execute themselves under jemalloc on the CPU when it is installed
# (pipeline/cpu_memory.py; measured for scoring only)
RELAUNCHED_COMMANDS = {"score"}
# Expected failures: bad config or input, outputs that do not fit together, a busy out_dir, and
# the machine's own (a file that cannot be read or written, a full disk). Anything else is a bug.
ERRORS = (
    ConfigError,
    InputError,
    CorpusError,
    ProvenanceError,
    OutputError,
    LockedError,
    LayoutError,
    LaunchError,
    OSError,
)


def one_line(err: BaseException) -> str:
    """The error as one line, naming the file where there is one."""
    text = str(err)
    if "Original Traceback" in text:
        # re-raised from a DataLoader worker with its traceback inside: keep the worker's message
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last)
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename or 'a file'}: {err.strerror}; {advice(err)}"
    return " ".join(text.split())


def main(argv: list[str] | None = None, *, relaunch: bool = False) -> int:
    """Run one command; `relaunch` (the command line only, see `command`) lets it re-execute its
    own process, which Python callers of main() never want."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local model directories only; never wait on a hub
    parser = argparse.ArgumentParser(prog="midrank", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        # argparse %-formats help text: a literal "%" (as in "95% intervals") must be doubled
        p = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        p.add_argument("--config", default="configs/default.yaml", help="YAML preset (default: %(default)s)")
        p.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")
        p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    module = COMMANDS[args.command][0]
    try:
        rank_and_world()  # a launcher's environment that makes no sense, before any work
        cfg = load_config(args.config, args.overrides)
        if relaunch and args.command in RELAUNCHED_COMMANDS:
            preload_jemalloc(cfg.model)
        if module is None:
            print(dump_config(cfg), end="")
        else:
            importlib.import_module(module).run(cfg)
    except ERRORS as err:
        if args.debug:
            raise
        get_logger().error(f"error: {one_line(err)}")
        return 2
    return 0


def command() -> int:
    """The `midrank` script and `python -m stages.cli`: a real command line."""
    return main(relaunch=True)


if __name__ == "__main__":
    sys.exit(command())
