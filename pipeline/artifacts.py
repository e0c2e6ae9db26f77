"""Writing artifacts safely, and telling whether two were made under the same conditions.

Every file is written to a temporary name and renamed, so a file that exists is complete.
Provenance is a dict whose `key` holds everything that decides the numbers; two artifacts with
different keys are never mixed (`check_same_key`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import pipeline
from pipeline.codec import parse_json


class ProvenanceError(ValueError):
    """Scores are incomplete, or made under different conditions and would be mixed."""


class NoScoresError(ProvenanceError):
    """The score set holds no sample: nothing to rank or plot."""


SPACE = "free some space, or use another out_dir"
PERMISSION = "check the permissions, or use another out_dir"
ADVICE = {
    errno.ENOSPC: SPACE,
    errno.EDQUOT: SPACE,
    errno.EACCES: PERMISSION,
    errno.EPERM: PERMISSION,
    errno.EROFS: "the disk is read-only: use another out_dir",
    errno.ENOTDIR: "a file stands where a folder should be",
    errno.EISDIR: "a folder stands where a file should be",
    errno.ELOOP: "a symlink loops",
}


def advice(err: OSError) -> str:
    """What to do about a failed read or write, by its cause."""
    return ADVICE.get(err.errno, "check the path")


def code_version() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(pipeline.__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"{pipeline.__version__}+{commit}"


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed to `path` when the block ends well, and
    removed when it does not. An error writing it (a full or read-only disk) names `path`.

    Whatever stands at the temporary name (a killed run's leftover, or a link planted there) is
    unlinked first, so the writer creates a new file instead of writing through a link."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # ranks share disks
    try:
        tmp.unlink(missing_ok=True)
        yield tmp
        os.replace(tmp, path)
    except (OSError, pa.ArrowException) as err:
        tmp.unlink(missing_ok=True)
        code = getattr(err, "errno", None) or (errno.ENOSPC if "No space left" in str(err) else errno.EIO)
        raise OSError(code, os.strerror(code), str(path)) from err


def readable_parquet(paths: list[Path], error: type[ValueError], remedy: str) -> list[Path]:
    """`paths`, once each is a whole Parquet file (its footer read): a damaged one is an `error`
    naming it, before a reader deep in a library fails on it without saying which."""
    for path in paths:
        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowException) as err:
            raise error(f"{path}: damaged ({' '.join(str(err).split())}); {remedy}") from None
    return paths


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_table_atomic(table: pa.Table, path: Path, metadata: dict[bytes, bytes]) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(metadata), tmp, compression="zstd")


def read_json_metadata(path: Path, key: bytes) -> Any:
    """The JSON value a Parquet file holds under `key` in its metadata, as plain data."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as err:
        raise ProvenanceError(f"{path}: damaged ({err}); delete it, and score again to redo it") from None
    if key not in metadata:
        raise ProvenanceError(f"{path}: no {key.decode()} metadata; not a midrank score file")
    return parse_json(metadata[key], f"{path}: {key.decode()} metadata", ProvenanceError)


def check_same_key(found: dict, expected: dict, where: str) -> None:
    if found != expected:
        diffs = [
            f"{k}: {found.get(k)!r} != {expected.get(k)!r}"
            for k in sorted(set(found) | set(expected))
            if found.get(k) != expected.get(k)
        ]
        raise ProvenanceError(
            f"{where} was scored under different conditions ({'; '.join(diffs)}); refusing to mix. "
            "Use another out_dir, or delete the old scores to rescore."
        )
