"""Two out_dirs compared file by file: what a refactor changed in the outputs.

    .venv/bin/python bench/diff_outputs.py runs/before runs/after

Every file under both is compared by its bytes, with each folder's own path replaced by a
placeholder (outputs record where they were written). Files that differ are explained: JSON by
the dotted path of every differing value, Parquet by its table and by the dotted path of every
differing value in its JSON metadata, anything else as bytes. Prints one line per differing path
(with the number of files and an example) and the count of identical files; `.locks/` is skipped.
Exit status 0 whatever it finds: reading the differences is the reader's job.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.codec import parse_json  # noqa: E402


def files_under(root: Path) -> dict[Path, Path]:
    return {p.relative_to(root): p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts}


def differences(x: Any, y: Any, path: str, found: list[tuple[str, str, str]]) -> None:
    """Append (dotted path, x, y) for every value that differs between two JSON values."""
    if isinstance(x, dict) and isinstance(y, dict):
        for key in sorted(set(x) | set(y)):
            differences(x.get(key, "<missing>"), y.get(key, "<missing>"), f"{path}.{key}", found)
    elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            differences(u, v, f"{path}[{i}]", found)
    elif x != y:
        found.append((path, str(x)[:60], str(y)[:60]))


def metadata(path: Path, root: Path) -> dict[str, Any]:
    raw = pq.read_schema(path).metadata or {}
    text = {k.decode(): v.decode().replace(str(root), "<out_dir>") for k, v in raw.items()}
    return {k: parse_json(v, f"{path}: {k}", ValueError) for k, v in text.items() if k != "ARROW:schema"}


def explain(name: Path, a: Path, b: Path, roots: tuple[Path, Path]) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []
    if name.suffix == ".json":
        x, y = (p.read_text().replace(str(r), "<out_dir>") for p, r in ((a, roots[0]), (b, roots[1])))
        differences(parse_json(x, str(a), ValueError), parse_json(y, str(b), ValueError), "", found)
    elif name.suffix == ".parquet":
        if pq.read_table(a).replace_schema_metadata() != pq.read_table(b).replace_schema_metadata():
            found.append(("<table>", "", ""))
        differences(metadata(a, roots[0]), metadata(b, roots[1]), "metadata", found)
    return found or [("<bytes>", "", "")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    a, b = files_under(args.before), files_under(args.after)
    print("only in before:", sorted(map(str, a.keys() - b.keys())))
    print("only in after:", sorted(map(str, b.keys() - a.keys())))
    by_path: dict[str, list[tuple[str, str, str]]] = {}
    same = 0
    for name in sorted(a.keys() & b.keys()):
        x = a[name].read_bytes().replace(str(args.before).encode(), b"<out_dir>")
        y = b[name].read_bytes().replace(str(args.after).encode(), b"<out_dir>")
        if x == y:
            same += 1
            continue
        for path, u, v in explain(name, a[name], b[name], (args.before, args.after)):
            by_path.setdefault(path, []).append((str(name), u, v))
    for path, where in sorted(by_path.items()):
        file, u, v = where[0]
        print(f"{path}: {len(where)} file(s), e.g. {file}: {u!r} -> {v!r}")
    print(f"{same} identical file(s)")


if __name__ == "__main__":
    main()
