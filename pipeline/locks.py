"""One writer per resource of an out_dir at a time: exclusive lock files held while working.

    with lock(layout, "select"):                 # select, inspect-<name>, compare-<name>, train-<run>
        ...
    with lock(layout, f"score-shard-{shard:05d}"):   # score locks the shard it works on
        ...

A lock is `out_dir/.locks/<name>.lock`, held with a POSIX record lock (`lockf`): the kernel drops
it when its process ends, however it ends, and a forked child (a DataLoader worker) does not
inherit it, so a killed run never leaves a lock that blocks the next one. The file also records
who holds it (host, pid, start time, command): a second run that finds the lock taken stops with
a line saying who holds it. A holder recorded in the file but no longer holding the lock is a run
that died: that is reported (it may have left partial outputs, which the stages resume or redo)
and the lock is taken.

Locks name what is written, not who writes it: the ranks of a torchrun job or a Slurm array score
different shards, so their shard locks never meet, while a second job (or a plain run beside one)
meets the first on the same shards and stops. Stages that are not split across ranks take one
lock whatever the rank (train: rank 0 takes it for the job).
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
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import advice
from pipeline.codec import decode, encode, parse_json
from pipeline.layout import Layout
from pipeline.log import get_logger


class LockedError(RuntimeError):
    """A lock cannot be taken: another run holds it (`LockHeldError`), or its file cannot be made."""


class LockHeldError(LockedError):
    """Another run holds this lock."""


@contextmanager
def lock(layout: Layout, name: str) -> Iterator[None]:
    path = layout.lock(name)
    try:
        layout.make_dir(path.parent)
        # opened without truncating: the previous holder's record must survive until we hold the
        # lock; and never through a link, which would send the record's writes elsewhere
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise LockedError(f"{path}: a link stands where midrank keeps a lock file; remove it") from None
        if err.errno != errno.EROFS:
            raise LockedError(f"{path}: cannot take the lock ({err.strerror}); {advice(err)}") from None
        # nobody can write here, this run included: re-checking finished work needs no lock, and
        # the first write would fail with its own clear error
        get_logger().info(f"{layout.out_dir} is on a read-only disk: running without a lock")
        yield
        return
    if os.fstat(fd).st_nlink > 1:  # a hard link: the file lives elsewhere too, and would be written
        os.close(fd)
        raise LockedError(
            f"{path}: a file linked from elsewhere (a hard link) stands where midrank keeps a lock file; remove it"
        )
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise LockHeldError(
                f"{layout.out_dir}: another run holds {path} ({describe(_holder(fd))}); "
                "wait for it to finish, or use another out_dir"
            ) from None
        previous = _holder(fd)
        if previous:
            get_logger().warning(
                f"{path}: a previous run ({describe(previous)}) ended without releasing it (killed?); "
                "its unfinished work is resumed or redone"
            )
        _write(fd, Holder(socket.gethostname(), os.getpid(), time.time(), list(sys.argv)), path)
        try:
            yield
        finally:
            _write(fd, None, path)  # any end but a kill leaves an empty record
    finally:
        os.close(fd)  # closing releases the lock


def check_free(layout: Layout, names: list[str]) -> None:
    """Stop now, before any expensive start-up, if another run holds one of these locks (the
    locks are taken for real later, one at a time)."""
    for name in names:
        with lock(layout, name):
            pass


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lock, as its file records it (empty once released)."""

    host: str
    pid: int
    started: float
    argv: list[str]


UNKNOWN = Holder("?", -1, 0.0, [])
"""A record that cannot be read (a foreign or damaged file): someone held the lock."""


def _holder(fd: int) -> Holder | None:
    """The recorded holder; None when there is none."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 1 << 16)
    if not data.strip():
        return None
    try:
        return decode(Holder, parse_json(data, "lock", ValueError), "lock", ValueError)
    except ValueError:
        return UNKNOWN


def _write(fd: int, holder: Holder | None, path: Path) -> None:
    try:
        os.ftruncate(fd, 0)
        if holder is not None:
            os.pwrite(fd, json.dumps(encode(holder)).encode(), 0)
        os.fsync(fd)
    except OSError as err:  # a full disk: the error names the lock file
        raise OSError(err.errno, err.strerror, str(path)) from None


def describe(holder: Holder | None) -> str:
    if holder is None or holder is UNKNOWN:
        return "holder unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.started))
    return f"pid {holder.pid} on {holder.host}, since {started}"
