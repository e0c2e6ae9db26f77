"""The one codec of midrank's typed records: the config (read from YAML) and every JSON file the
stages write (pipeline/outputs.py) are frozen dataclasses, turned into plain data and back here.

    data = encode(manifest)                               # nested dicts and lists, JSON-ready
    manifest = decode(BandManifest, data, "manifest.json", OutputError)
    record = read_json(path, BandManifest, OutputError)   # a file: missing or bad JSON named too

Decoding is strict: an unknown key, a missing required field or a value of the wrong type is an
`error` naming the dotted place (`select.bands[0].keep`, `manifest.json.samples.in`), never a
KeyError deep inside a stage. Types understood: records, `X | None`, Literal, tuple (a lone
string is a 1-tuple, for `paths: a.jsonl`), list, dict[str, X], bool, int (an integral float such
as 1e6 too), float (an int too), str and Any. A field's JSON name may differ from its attribute
(`metadata={"json": "in"}`, for names that are Python keywords).

Nothing of midrank is imported here: the config stands on this module.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal


def json_name(f: dataclasses.Field) -> str:
    return f.metadata.get("json", f.name)


class Sparse:
    """A record whose optional fields (None by default) are left out of its data while None; other
    records, the config's sections among them, keep every key."""

    __slots__ = ()


def encode(value: Any) -> Any:
    """Plain data of a record (nested records, dicts, lists and tuples included)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        sparse = isinstance(value, Sparse)
        return {
            json_name(f): encode(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not (sparse and f.default is None and getattr(value, f.name) is None)
        }
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    return value


def optional_of(tp: Any) -> Any | None:
    """X for an `X | None` annotation; None for any other type."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return None


def decode(tp: Any, data: Any, where: str, error: type[ValueError]) -> Any:
    """`data` as type `tp`; `where` names the file or key for errors, raised as `error` (with
    the class's `hint`, if it has one, after an unknown or missing key)."""
    hint = getattr(error, "hint", "")

    def fail(place: str, message: str) -> typing.NoReturn:
        raise error(f"{place}: {message}")

    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            fail(where, f"expected a mapping, got {type(data).__name__} {data!r}")
        fields = {json_name(f): f for f in dataclasses.fields(tp)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            allowed = f"allowed keys in {where or 'config'}: {', '.join(fields)}"
            fail(_inside(where, unknown[0]), f"unknown key; {allowed}{hint}")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for name, f in fields.items():
            place = _inside(where, name)
            if name in data:
                kwargs[f.name] = decode(hints[f.name], data[name], place, error)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if not dataclasses.is_dataclass(hints[f.name]):
                    fail(place, f"required, missing{hint}")
                kwargs[f.name] = decode(hints[f.name], {}, place, error)  # a section of defaults
        try:
            return tp(**kwargs)
        except ValueError as err:  # a record's own check names its key; place it under this record
            raise error(_inside(where, str(err))) from None
    if (inner := optional_of(tp)) is not None:
        return None if data is None else decode(inner, data, where, error)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return data
    if origin is Literal:
        if not any(data == a and type(data) is type(a) for a in args):  # 1 is not True
            fail(where, f"{data!r} is not one of {', '.join(map(repr, args))}")
        return data
    if origin is tuple or origin is list:
        items = [data] if origin is tuple and isinstance(data, str) else data
        if not isinstance(items, list | tuple):
            fail(where, f"expected a list, got {data!r}")
        decoded = [decode(args[0], item, f"{where}[{i}]", error) for i, item in enumerate(items)]
        return tuple(decoded) if origin is tuple else decoded
    if origin is dict:
        if not isinstance(data, dict):
            fail(where, f"expected a mapping, got {type(data).__name__} {data!r}")
        return {k: decode(args[1], v, f"{where}.{k}", error) for k, v in data.items()}
    if tp is bool:
        if not isinstance(data, bool):
            fail(where, f"expected true or false, got {data!r}")
        return data
    if tp is int:
        if isinstance(data, float) and data.is_integer():  # YAML reads 1.0e6 as a float
            data = int(data)
        if not isinstance(data, int) or isinstance(data, bool):
            fail(where, f"expected an integer, got {data!r}{number_hint(data)}")
        return data
    if tp is float:
        if not isinstance(data, int | float) or isinstance(data, bool):
            fail(where, f"expected a number, got {data!r}{number_hint(data)}")
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            fail(where, f"expected a string, got {data!r}")
        return data
    raise TypeError(f"{where}: unsupported record type {tp!r}")  # a bug in a schema, not input


def number_hint(data: Any) -> str:
    """YAML 1.1 reads a number with an exponent as text unless it has a dot and a signed exponent
    (1e-4 and 1.0e9 are text, 1.0e-4 and 1.0e+9 numbers): say how to write it."""
    if not isinstance(data, str):
        return ""
    try:
        float(data)
    except ValueError:
        return ""
    mantissa, e, exponent = data.lower().partition("e")
    if not e or not exponent or not mantissa.lstrip("+-"):
        return ""
    mantissa = mantissa if "." in mantissa else f"{mantissa}.0"
    exponent = exponent if exponent[0] in "+-" else f"+{exponent}"
    number = f"{mantissa}e{exponent}"
    return "" if number == data.lower() else f" (YAML reads {data} as text; write {number})"


def _inside(where: str, name: str) -> str:
    """The dotted place of `name` in `where` (the config's top level is "")."""
    return f"{where}.{name}" if where else name


def parse_json(text: str | bytes, where: str, error: type[ValueError]) -> Any:
    """JSON text as plain data; bad JSON is an `error` naming `where`."""
    try:
        return json.loads(text)
    except ValueError as err:
        raise error(f"{where}: cannot be read as JSON ({err})") from None
    except RecursionError:
        raise error(f"{where}: cannot be read as JSON (nested too deeply)") from None


def read_json(path: Path, tp: Any, error: type[ValueError]) -> Any:
    """A JSON file as type `tp`; a missing, unreadable or malformed file is an `error` naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except (OSError, ValueError) as err:
        raise error(f"{path}: cannot be read ({err})") from None
    return decode(tp, parse_json(text, str(path), error), str(path), error)
