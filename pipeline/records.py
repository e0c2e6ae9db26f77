"""From raw rows to `Record`s: field extraction, validation and the bad-input policy.

Every row read ends in exactly one place: a `Record`, or a count under a reason in `ReadStats`
(with `corpus.on_error: skip`), or a `CorpusError` naming file, line/row and field (`raise`).
Blank JSONL lines are not records; they are counted as `blank_line` under either policy.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import CorpusConfig
from pipeline.log import format_counts, get_logger
from pipeline.readers import InputFile, RowProblem

_EXAMPLES_LOGGED = 3


class CorpusError(ValueError):
    """Bad input under `on_error: raise`; the message locates it."""


@dataclass(frozen=True, slots=True)
class Record:
    sample_id: str
    """`<input name>:<row>` (a DatasetDict split adds `/<split>`): stable across runs and machines."""
    source: str
    text: str
    """The scored text: the document (mode=text) or the response (mode=prompt_response)."""
    prompt: str | None = None
    """Context that is never a scoring target (mode=prompt_response)."""
    messages: tuple[dict[str, str], ...] | None = None
    """The conversation (mode=chat); `text` is empty until a chat template renders it."""


def record_digest(record: Record) -> int:
    """A 64-bit hash of what a record holds (text, prompt, messages), stored with its scores: a
    corpus edited after scoring is caught row by row when texts are joined back to losses."""
    content = json.dumps([record.text, record.prompt, record.messages], ensure_ascii=False).encode()
    return int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "little", signed=True)


# A record's id is `<file>:<row>` and a `split` window's `<file>:<row>#<window>`: told apart by
# their ends, since a file's name may hold any character ("lang/C#/x.jsonl:3" is a record)
WINDOW_ID = re.compile(r"(.*:\d+)#\d+", re.DOTALL)


def record_id(sample_id: str) -> str:
    """The record a sample came from."""
    window = WINDOW_ID.fullmatch(sample_id)
    return window.group(1) if window else sample_id


def sample_text(record: Record, sample_id: str, char_start: int, char_end: int) -> str:
    """The text a sample scored: the record's, or a window's character span of it."""
    return record.text[char_start:char_end] if WINDOW_ID.fullmatch(sample_id) else record.text


@dataclass(slots=True)
class ReadStats:
    rows: int = 0
    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    per_source: Counter = field(default_factory=Counter)

    def merge(self, other: ReadStats) -> None:
        self.rows += other.rows
        self.records += other.records
        self.skipped.update(other.skipped)
        self.per_source.update(other.per_source)

    def summary(self) -> str:
        return f"{self.rows} rows -> {self.records} records; skipped: {format_counts(self.skipped)}"


def sample_id_of(f: InputFile, row: int) -> str:
    name = f.name if f.split is None else f"{f.name}/{f.split}"
    return f"{name}:{row}"


def location(f: InputFile, row: int) -> str:
    place = f"line {row + 1}" if f.format == "jsonl" else f"row {row}"
    split = f" (split {f.split})" if f.split is not None else ""
    return f"{f.path}{split}, {place}"


def needed_columns(cfg: CorpusConfig) -> list[str]:
    columns = {
        "text": [cfg.text_field],
        "prompt_response": [cfg.prompt_field, cfg.response_field],
        "alpaca": [cfg.instruction_field, cfg.input_field, cfg.output_field],
        "chat": [cfg.messages_field],
    }[cfg.mode]
    return columns + ([cfg.source_field] if cfg.source_field else [])


class _Bad(Exception):
    def __init__(self, reason: str, field_name: str | None, detail: str):
        self.reason, self.field_name, self.detail = reason, field_name, detail


def to_record(
    f: InputFile, row: int, value: dict | RowProblem, cfg: CorpusConfig, stats: ReadStats
) -> Record | None:
    """Validate one row. Returns the record, or None after counting a skip; raises under `raise`."""
    stats.rows += 1
    try:
        if isinstance(value, RowProblem):
            raise _Bad(value.reason, None, value.detail)
        record = _extract(f, row, value, cfg)
    except _Bad as bad:
        if bad.reason != "blank_line" and cfg.on_error == "raise":
            field_part = f", field {bad.field_name!r}" if bad.field_name else ""
            raise CorpusError(
                f"{location(f, row)}{field_part}: {bad.detail} "
                "(set corpus.on_error=skip to count and skip such rows)"
            ) from None
        stats.skipped[bad.reason] += 1
        if bad.reason != "blank_line" and stats.skipped[bad.reason] <= _EXAMPLES_LOGGED:
            field_part = f", field {bad.field_name!r}" if bad.field_name else ""
            get_logger().warning(f"skipped ({bad.reason}) {location(f, row)}{field_part}: {bad.detail}")
        return None
    stats.records += 1
    stats.per_source[record.source] += 1
    return record


def _string_field(value: dict, name: str, *, allow_empty: bool = False) -> str:
    if name not in value:
        keys = ", ".join(sorted(map(str, value))) or "none"
        raise _Bad("missing_field", name, f"field missing (fields present: {keys})")
    text = value[name]
    if not isinstance(text, str):
        raise _Bad("wrong_type", name, f"expected a string, got {type(text).__name__}")
    if not allow_empty and not text.strip():
        raise _Bad("empty_text", name, "empty text")
    return utf8(text, name)


def utf8(text: str, name: str) -> str:
    """`text`, which JSON's \\u escapes can leave holding a lone surrogate: no UTF-8 text can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        where = f"{text[err.start]!r} at character {err.start + 1}"
        raise _Bad("not_utf8", name, f"a lone surrogate {where}, which no UTF-8 text holds") from None
    return text


def _extract(f: InputFile, row: int, value: dict, cfg: CorpusConfig) -> Record:
    source = _string_field(value, cfg.source_field) if cfg.source_field else f.default_source
    sample_id = sample_id_of(f, row)
    if cfg.mode == "text":
        # Text files have no field names: their content is the text, whatever text_field says.
        text_field = "text" if f.format == "text" else cfg.text_field
        return Record(sample_id, source, _string_field(value, text_field))
    # An empty response is not bad input: the sample builder counts it as `empty_response`.
    if cfg.mode == "prompt_response":
        prompt = _string_field(value, cfg.prompt_field, allow_empty=True)
        response = _string_field(value, cfg.response_field, allow_empty=True)
        return Record(sample_id, source, response, prompt=prompt)
    if cfg.mode == "alpaca":
        prompt = _string_field(value, cfg.instruction_field, allow_empty=True)
        extra = (
            _string_field(value, cfg.input_field, allow_empty=True)
            if value.get(cfg.input_field) is not None
            else ""
        )
        prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        return Record(
            sample_id, source, _string_field(value, cfg.output_field, allow_empty=True), prompt=prompt
        )
    return Record(sample_id, source, "", messages=_messages(value, cfg.messages_field))


def _messages(value: dict, name: str) -> tuple[dict[str, str], ...]:
    if name not in value:
        raise _Bad("missing_field", name, "field missing")
    messages: Any = value[name]
    if not isinstance(messages, list) or not messages:
        raise _Bad("wrong_type", name, "expected a non-empty list of {role, content} messages")
    out = []
    for i, message in enumerate(messages):
        ok = isinstance(message, dict) and isinstance(message.get("role"), str)
        ok = ok and isinstance(message.get("content"), str)
        if not ok:
            raise _Bad("wrong_type", f"{name}[{i}]", "expected {role: str, content: str}")
        where = f"{name}[{i}]"
        out.append({"role": utf8(message["role"], where), "content": utf8(message["content"], where)})
    return tuple(out)
