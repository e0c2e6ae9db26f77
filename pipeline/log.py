"""The one logger, `midrank`, with a prefix; on multi-rank runs only rank 0 logs below WARNING,
unless a record says it is news from whichever rank did the work (`EVERY_RANK`).

from pipeline.log import get_logger
log = get_logger()
log.info("mid: published", extra=EVERY_RANK)   # shown on any rank
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping

from tqdm import tqdm

from pipeline.launcher import LaunchError, rank_and_world

_NAME = "midrank"
EVERY_RANK = {"every_rank": True}


def _shown_off_rank_0(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or getattr(record, "every_rank", False)


# what a terminal would act on rather than show: C0/C1 controls but the line breaks and tabs, and
# the bidirectional overrides that reorder what follows them
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def inert(text: str) -> str:
    """Text from the data (a source label, a path) as it may reach a terminal: controls escaped."""
    return CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class InertFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return inert(super().format(record))


def get_logger() -> logging.Logger:
    log = logging.getLogger(_NAME)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        try:
            rank, world_size = rank_and_world()
        except LaunchError:  # reported by the command itself; the report needs a logger
            rank, world_size = 0, 1
        prefix = f"[midrank r{rank}]" if world_size > 1 else "[midrank]"
        handler.setFormatter(InertFormatter(f"{prefix} %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        if rank != 0:
            handler.addFilter(_shown_off_rank_0)
        log.propagate = False
    return log


def format_counts(counts: Mapping[str, int]) -> str:
    """`reason=n, ...` sorted by name, or `none`: how skipped rows are reported everywhere."""
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


class RowProgress:
    """A progress bar over rows (rate and ETA), with this run's tokens/s beside it when tokens are
    counted."""

    def __init__(self, total_rows: int, desc: str, disable: bool | None = False):
        self.bar = tqdm(total=total_rows, unit="row", desc=desc, disable=disable, dynamic_ncols=True)
        self.tokens = 0

    def advance(self, rows: int, tokens: int | None = None) -> None:
        self.bar.update(rows)
        if tokens is not None:
            self.tokens += tokens
            self.bar.set_postfix_str(f"{self.tokens / max(self.bar.format_dict['elapsed'], 1e-9):,.0f} tok/s")

    def __enter__(self) -> RowProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
