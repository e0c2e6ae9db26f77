"""One run of a stage per out_dir at a time: an exclusive lock file held for the stage's duration.

    with stage_lock(layout, "score"):      # or "train-<run>", "inspect-<report>", ...
        ...

The lock is `out_dir/.locks/<stage>[.rank<r>].lock`, held with `flock`: the kernel releases it
when its process ends, however it ends, so a killed run never leaves a lock that blocks the next
one. The file also holds who took it (host, pid, start time, command); a second run finds the lock
taken and stops with a line saying who holds it. A holder recorded in the file but no longer
holding the lock is a run that died without cleaning up: that is reported (it may have left
partial outputs, which the stages resume or redo) and the lock is taken. Under torchrun or a Slurm
array each rank takes its own lock, so ranks of one job never block each other.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.layout import Layout
from pipeline.log import get_logger
from pipeline.ranks import rank_and_world


class LockedError(RuntimeError):
    """Another run holds this stage's lock on this out_dir."""


@contextmanager
def stage_lock(layout: Layout, stage: str) -> Iterator[None]:
    rank, world_size = rank_and_world()
    path = layout.lock(stage if world_size == 1 else f"{stage}.rank{rank}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # opened without truncating: the previous holder's record must survive until we hold the lock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES):
            raise
        # nobody can write here, this run included: re-checking finished work needs no lock, and
        # the first write will fail with its own clear error
        get_logger().info(f"{layout.out_dir} is not writable ({err.strerror}): running without a lock")
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(
                f"{layout.out_dir}: another `{stage}` run holds {path} ({_describe(_holder(fd))}); "
                "wait for it to finish, or use another out_dir"
            ) from None
        previous = _holder(fd)
        if previous:
            get_logger().warning(
                f"{path}: a previous `{stage}` run ({_describe(previous)}) ended without releasing its lock "
                "(killed?); its unfinished work is resumed or redone"
            )
        _write(
            fd, {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "argv": sys.argv}
        )
        try:
            yield
        finally:
            _write(fd, None)  # any end but a kill leaves an empty record
    finally:
        os.close(fd)  # closing releases the flock


def _holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 1 << 16)
    try:
        return json.loads(data) if data.strip() else None
    except ValueError:
        return {"unreadable": data[:80].decode(errors="replace")}


def _write(fd: int, holder: dict | None) -> None:
    os.ftruncate(fd, 0)
    if holder is not None:
        os.pwrite(fd, json.dumps(holder).encode(), 0)
    os.fsync(fd)


def _describe(holder: dict | None) -> str:
    if not holder or "pid" not in holder:
        return "holder unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder['pid']} on {holder.get('host', '?')}, since {started}"
