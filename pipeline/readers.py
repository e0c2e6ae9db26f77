"""Corpus inputs: find the files behind `corpus.paths`, count their rows, read row ranges.

Formats: JSONL (plain, .gz, .zst), Parquet, a `datasets.save_to_disk` directory (a Dataset or a
DatasetDict, one input per split) and a directory of text files (one document per file).

A row is read as `(row_index, value)` where value is a dict, or a `RowProblem` when the bytes could
not be turned into one (malformed JSON, non-UTF-8 bytes, a JSON value that is not an object); the
policy about problems lives in `pipeline.records`. Row indices are 0-based positions in the file
(for JSONL, line number - 1), so `name:row` locates every record.

Reading a range never loads a whole file: JSONL streams lines (skipping to the range start by
reading, which costs far less than scoring the rows), Parquet reads only the row groups that
overlap, and Arrow datasets are memory-mapped.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.codec import parse_json

UTF8_BOM = b"\xef\xbb\xbf"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


class InputError(ValueError):
    """An input path that cannot be read as a corpus."""


@dataclass(frozen=True, slots=True)
class InputFile:
    path: str
    """Where to open it (absolute)."""
    name: str
    """Stable name used in sample_ids: the path below the configured entry (a file: its name)."""
    format: str
    """jsonl | parquet | hf_disk | text"""
    default_source: str
    """Source label when the record carries none."""
    split: str | None = None
    """DatasetDict split, for hf_disk inputs."""


@dataclass(frozen=True, slots=True)
class RowProblem:
    reason: str
    """malformed_json | not_utf8 | not_an_object | blank_line"""
    detail: str


# ------------------------------------------------------------------------------------------------
# Discovery


def stem(name: str) -> str:
    base = os.path.basename(name.rstrip("/"))
    for suffix in (*JSONL_SUFFIXES, *PARQUET_SUFFIXES, ".json", ".txt", ".md", ".gz", ".zst"):
        if base.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def discover_inputs(
    paths: tuple[str, ...], format: str = "auto", text_glob: str = "**/*.txt"
) -> list[InputFile]:
    """Expand the configured entries into input files, in a fixed order (entries as given, files
    sorted within a directory). Fails naming the entry when one yields nothing."""
    found: list[InputFile] = []
    for entry in paths:
        matches = sorted(glob.glob(entry, recursive=True)) if glob.has_magic(entry) else [entry]
        if not matches:
            raise InputError(f"corpus.paths: {entry!r} matches no file")
        before = len(found)
        for match in matches:
            found.extend(_inputs_of(Path(match), format, text_glob, glob_entry=glob.has_magic(entry)))
        if len(found) == before:
            raise InputError(f"corpus.paths: {entry!r} holds no readable input (format={format})")
    names = [(f.name, f.split) for f in found]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        name, _ = sorted(duplicates, key=str)[0]
        raise InputError(
            f"corpus.paths: two inputs are both named {name!r}, so their sample_ids would collide; "
            "give them distinct file names or list their common parent directory instead"
        )
    return found


def _format_of(path: Path, format: str) -> str | None:
    if format != "auto":
        return format
    name = path.name
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith((".txt", ".md")):
        return "text"
    return None


def _is_hf_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _inputs_of(path: Path, format: str, text_glob: str, glob_entry: bool) -> list[InputFile]:
    if not path.exists():
        raise InputError(f"corpus.paths: {str(path)!r} does not exist")
    absolute = str(path.resolve())
    if path.is_file():
        fmt = _format_of(path, format)
        if fmt is None or fmt == "hf_disk":
            if glob_entry:
                return []
            raise InputError(
                f"{path}: cannot tell its format from the name; set corpus.format to jsonl, parquet or text"
            )
        # A file given by glob keeps the directories the glob walked through in its name.
        return [InputFile(absolute, path.name, fmt, stem(path.name))]
    if format in ("auto", "hf_disk") and _is_hf_disk(path):
        return _hf_inputs(path)
    if format == "hf_disk":
        raise InputError(
            f"{path}: not a datasets.save_to_disk directory (no state.json or dataset_dict.json)"
        )
    if format in ("auto", "jsonl", "parquet"):
        files = [
            p
            for p in sorted(path.rglob("*"))
            if p.is_file() and _format_of(p, "auto") in ("jsonl", "parquet")
        ]
        if format != "auto":
            files = [p for p in files if _format_of(p, "auto") == format]
        if files:
            return [
                InputFile(
                    str(p.resolve()), p.relative_to(path).as_posix(), _format_of(p, "auto"), stem(p.name)
                )
                for p in files
            ]
        if format != "auto":
            return []
    # A directory of text documents: one record per file.
    files = [p for p in sorted(path.glob(text_glob)) if p.is_file()]
    inputs = []
    for p in files:
        rel = p.relative_to(path)
        source = rel.parts[0] if len(rel.parts) > 1 else path.resolve().name
        inputs.append(InputFile(str(p.resolve()), rel.as_posix(), "text", source))
    return inputs


def _hf_inputs(path: Path) -> list[InputFile]:
    name = path.resolve().name
    if (path / "dataset_dict.json").is_file():
        try:
            splits = parse_json((path / "dataset_dict.json").read_bytes(), "dataset_dict.json", InputError)[
                "splits"
            ]
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(
                f"{path / 'dataset_dict.json'}: damaged ({err}); save the dataset again"
            ) from None
        return [InputFile(str(path.resolve()), name, "hf_disk", name, split=s) for s in splits]
    return [InputFile(str(path.resolve()), name, "hf_disk", name)]


# ------------------------------------------------------------------------------------------------
# Counting and reading rows


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # raises EOFError on a file cut short
    if path.endswith(".zst"):
        import zstandard

        check_zstd_frames(path)  # zstandard's reader stops quietly where a file is cut short
        raw = open(path, "rb")  # noqa: SIM115 -- closed through the returned reader
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb")


ZSTD_MAGIC, SKIPPABLE_MAGIC = 0xFD2FB528, 0x184D2A50


def check_zstd_frames(path: str) -> None:
    """Walk the frames and blocks of a .zst file, reading only their headers, and raise EOFError
    when it ends inside one (a file cut short). The content is not decompressed here."""
    import zstandard

    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        at = 0
        while at < size:
            fh.seek(at)
            head = fh.read(18)  # the longest frame header
            if len(head) < 8:
                raise EOFError(f"a zstd frame header is cut short at byte {at}")
            magic = int.from_bytes(head[:4], "little")
            if magic & 0xFFFFFFF0 == SKIPPABLE_MAGIC:
                at += 8 + int.from_bytes(head[4:8], "little")
                continue
            if magic != ZSTD_MAGIC:
                raise zstandard.ZstdError(f"not a zstd frame at byte {at}")
            checksum = 4 if head[4] & 0x04 else 0
            at += zstandard.frame_header_size(head)
            while True:  # blocks: a 3-byte header (last flag, type, size), then its content
                fh.seek(at)
                block = fh.read(3)
                if len(block) < 3:
                    raise EOFError(f"the file ends inside a zstd frame, at byte {at}")
                header = int.from_bytes(block, "little")
                at += 3 + (1 if (header >> 1) & 3 == 1 else header >> 3)  # an RLE block holds one byte
                if header & 1:
                    break
            at += checksum
        if at > size:
            raise EOFError("the file ends inside a zstd frame")


def _unreadable(f: InputFile, err: Exception) -> InputError:
    what = "is cut short" if isinstance(err, EOFError) else "cannot be read"
    return InputError(
        f"{f.path}: {what} ({type(err).__name__}: {err}); restore the file, or leave it out of corpus.paths"
    )


def _damaged(err: Exception) -> bool:
    """Whether `err` is what a damaged input raises while it is read: a compressed stream cut short
    or corrupt (EOFError, zlib, zstandard), a Parquet file that is not Parquet, a file that cannot
    be opened."""
    return isinstance(
        err, EOFError | OSError | zlib.error | pa.ArrowException | json.JSONDecodeError
    ) or type(err).__module__.startswith("zstandard")


SAMPLE_BYTES = 1 << 20


def fingerprint(f: InputFile) -> str:
    """The input's size and a hash of five 1 MiB samples of it (start, quarters, end): cheap on
    any corpus, and changed by almost any edit. An edit outside the samples that keeps the size is
    caught row by row instead, by the record hash stored with each score."""
    files = _hf_data_files(f) if f.format == "hf_disk" else [Path(f.path)]
    digest = hashlib.blake2b(digest_size=16)
    total = 0
    for path in files:
        size = path.stat().st_size
        total += size
        digest.update(f"{path.name}:{size};".encode())
        with path.open("rb") as fh:
            for offset in sorted({0, size // 4, size // 2, 3 * size // 4, max(0, size - SAMPLE_BYTES)}):
                fh.seek(offset)
                digest.update(fh.read(SAMPLE_BYTES))
    return f"{total}:{digest.hexdigest()}"


def _hf_data_files(f: InputFile) -> list[Path]:
    """The files a saved dataset (split) is made of, from its state.json: cache files that
    `datasets` writes beside them do not change the data."""
    folder = Path(f.path) / f.split if f.split is not None else Path(f.path)
    state = parse_json((folder / "state.json").read_bytes(), str(folder / "state.json"), InputError)
    return [folder / "state.json", *(folder / entry["filename"] for entry in state["_data_files"])]


def count_rows(f: InputFile) -> int:
    """The rows of one input, read to its end (a damaged file fails here, naming it)."""
    try:
        return _count_rows(f)
    except Exception as err:
        if _damaged(err):
            raise _unreadable(f, err) from None
        raise


def _count_rows(f: InputFile) -> int:
    if f.format == "jsonl":
        return _count_lines(f.path)
    if f.format == "parquet":
        return pq.ParquetFile(f.path).metadata.num_rows
    if f.format == "hf_disk":
        return _load_hf(f).num_rows
    if f.format == "text":
        return 1
    raise InputError(f"{f.path}: unknown format {f.format!r}")


def _count_lines(path: str) -> int:
    lines, last = 0, b"\n"
    with _open_binary(path) as fh:
        while block := fh.read(1 << 22):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")  # a last line without its newline still counts


def read_rows(
    f: InputFile, start: int, stop: int, columns: list[str]
) -> Iterator[tuple[int, dict | RowProblem]]:
    """Rows [start, stop) of one input. `columns` are the fields that will be used (a hint: Parquet
    and Arrow read only those). A damaged file raises an InputError naming it."""
    try:
        yield from _read_rows(f, start, stop, columns)
    except Exception as err:
        if _damaged(err):
            raise _unreadable(f, err) from None
        raise


def _read_rows(
    f: InputFile, start: int, stop: int, columns: list[str]
) -> Iterator[tuple[int, dict | RowProblem]]:
    if f.format == "jsonl":
        yield from _jsonl_rows(f.path, start, stop)
    elif f.format == "parquet":
        yield from _parquet_rows(f.path, start, stop, columns)
    elif f.format == "hf_disk":
        yield from _hf_rows(f, start, stop, columns)
    elif f.format == "text":
        if start == 0 < stop:
            yield 0, _text_row(f.path)
    else:
        raise InputError(f"{f.path}: unknown format {f.format!r}")


def _jsonl_rows(path: str, start: int, stop: int) -> Iterator[tuple[int, dict | RowProblem]]:
    with _open_binary(path) as fh:
        for index, line in enumerate(fh):
            if index < start:
                continue
            if index >= stop:
                break
            if index == 0 and line.startswith(UTF8_BOM):  # written by some Windows tools
                line = line[len(UTF8_BOM) :]
            yield index, _parse_json_line(line)


def _parse_json_line(line: bytes) -> dict | RowProblem:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return RowProblem("not_utf8", f"invalid UTF-8 byte at column {err.start + 1}")
    text = text.rstrip("\r\n")  # the line ending is not part of the row (nor of its errors)
    if not text.strip():
        return RowProblem("blank_line", "blank line")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        # some of json's messages end in " at" already ("Invalid control character at")
        return RowProblem(
            "malformed_json", f"malformed JSON: {err.msg.removesuffix(' at')} at column {err.colno}"
        )
    except RecursionError:
        return RowProblem("malformed_json", "JSON nested too deeply to read (about 1,000 levels)")
    except ValueError as err:  # a number Python will not read, e.g. an integer of over 4,300 digits
        return RowProblem("malformed_json", f"malformed JSON: {' '.join(str(err).split())[:120]}")
    if not isinstance(value, dict):
        return RowProblem("not_an_object", f"a JSON {type(value).__name__}, not an object")
    return value


def _parquet_rows(path: str, start: int, stop: int, columns: list[str]) -> Iterator[tuple[int, dict]]:
    pf = pq.ParquetFile(path)
    present = [c for c in columns if c in pf.schema_arrow.names]
    offset = 0
    for group in range(pf.metadata.num_row_groups):
        size = pf.metadata.row_group(group).num_rows
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            for batch in pf.iter_batches(batch_size=1024, row_groups=[group], columns=present):
                # iter_batches has no row offset: skip batches before lo, slice the edges
                b_lo, b_hi = offset, offset + batch.num_rows
                offset = b_hi
                if b_hi <= lo or b_lo >= hi:
                    continue
                rows = batch.slice(max(lo - b_lo, 0), min(hi, b_hi) - max(lo, b_lo)).to_pylist()
                yield from enumerate(rows, start=max(lo, b_lo))
        else:
            offset += size
        if offset >= stop:
            break


def _load_hf(f: InputFile) -> Any:
    import datasets

    ds = datasets.load_from_disk(f.path)
    return ds[f.split] if f.split is not None else ds


def _hf_rows(f: InputFile, start: int, stop: int, columns: list[str]) -> Iterator[tuple[int, dict]]:
    ds = _load_hf(f)
    ds = ds.select_columns([c for c in columns if c in ds.column_names])
    for lo in range(start, stop, 1024):
        hi = min(stop, lo + 1024)
        batch = ds[lo:hi]
        keys = list(batch)
        for i in range(hi - lo):
            yield lo + i, {k: batch[k][i] for k in keys}


def _text_row(path: str) -> dict | RowProblem:
    data = Path(path).read_bytes()
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return RowProblem("not_utf8", f"invalid UTF-8 byte at line {line}")
