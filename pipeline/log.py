"""The one logger, `midrank`, with a prefix; on multi-rank runs only rank 0 logs below WARNING.

from pipeline.log import get_logger
log = get_logger()
"""

from __future__ import annotations

import logging
import os
import sys

_NAME = "midrank"


def rank_from_env() -> int:
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def get_logger() -> logging.Logger:
    log = logging.getLogger(_NAME)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        rank = rank_from_env()
        prefix = f"[midrank r{rank}]" if "WORLD_SIZE" in os.environ else "[midrank]"
        handler.setFormatter(logging.Formatter(f"{prefix} %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        log.propagate = False
    return log
