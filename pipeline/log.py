"""The one logger, `midrank`, with a prefix; on multi-rank runs only rank 0 logs below WARNING.

from pipeline.log import get_logger
log = get_logger()
"""

from __future__ import annotations

import logging
import sys

from pipeline.ranks import rank_and_world

_NAME = "midrank"


def get_logger() -> logging.Logger:
    log = logging.getLogger(_NAME)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        rank, world_size = rank_and_world()
        prefix = f"[midrank r{rank}]" if world_size > 1 else "[midrank]"
        handler.setFormatter(logging.Formatter(f"{prefix} %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        log.propagate = False
    return log
