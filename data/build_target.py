"""Build the embedded target set: a small sample of the corpus's own sources, kept apart from the
corpus and from every evaluation set, for the target model of the `reducible` rank key.

    python -m data.build_target --corpus data/corpus --tasks data/tasks --out data/target

The target model is the reference model fine-tuned on this set (`midrank target`). It must not
see what the arms are evaluated on, or a band chosen by it would be chosen by the test: so its
documents are the next ones of each source in the corpus's own hash order that are in none of
train.jsonl, heldout.jsonl, ood.jsonl and the tasks (no item's document, and for the man-page and
Jargon tasks no document of any answer choice). Writes `target.jsonl` (text, source, origin) and
`manifest.json`; building twice gives the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from data.build_corpus import SOURCES, cap_chars, log, order_key, tidy, write_jsonl, write_manifest
from data.build_tasks import corpus_origins
from pipeline.codec import parse_json, read_json

PER_SOURCE = 15
NAMED_TASKS = {"man_command": "man/", "jargon_term": "jargon/"}
"""Tasks whose choices are documents' names: no document of any choice goes into the target set."""


def origin_name(origin: str) -> str:
    """The name a man page or Jargon entry is asked for by: `man/man1/ls.1.gz` -> `ls`."""
    last = origin.rsplit("/", 1)[-1]
    return last.split(".")[0] if origin.startswith("man/") else last


def task_exclusions(tasks: Path) -> tuple[set[str], set[tuple[str, str]]]:
    """(every task item's origin, every (kind, name) an answer choice names)."""
    origins, names = set(), set()
    for path in sorted(tasks.glob("*.jsonl")):
        prefix = NAMED_TASKS.get(path.stem)
        for line in path.open(encoding="utf-8"):
            item = parse_json(line, str(path), ValueError)
            origins.add(item["origin"])
            if prefix:
                names |= {(prefix, choice) for choice in item["choices"]}
    return origins, names


def excluded(origin: str, origins: set[str], names: set[tuple[str, str]]) -> bool:
    if origin in origins:
        return True
    return any(origin.startswith(prefix) and origin_name(origin) == name for prefix, name in names)


def build(corpus: Path, tasks: Path, out: Path, per_source: int = PER_SOURCE) -> dict:
    origins = corpus_origins(corpus)
    if not origins:
        raise SystemExit(f"{corpus}: no corpus to keep the target set apart from; run `make data` first")
    if not (tasks / "manifest.json").is_file():
        raise SystemExit(f"{tasks}: no tasks to keep the target set apart from; run `make tasks` first")
    task_origins, names = task_exclusions(tasks)
    manifest = read_json(corpus / "manifest.json", dict[str, Any], ValueError)
    max_chars = manifest["max_chars"]
    present = set(manifest["train"])
    rows, counts = [], {}
    for source in SOURCES:
        if source.name not in present:
            continue
        chosen = 0
        for candidate in sorted(source.candidates(), key=lambda c: order_key(c.origin)):
            if chosen == per_source:
                break
            if excluded(candidate.origin, origins | task_origins, names):
                continue
            text = candidate.load()
            text = tidy(text) if text else ""
            if text.strip():
                rows.append(
                    {"text": cap_chars(text, max_chars), "source": source.name, "origin": candidate.origin}
                )
                chosen += 1
        counts[source.name] = chosen
        log(f"{source.name:17s} {chosen:5d} target documents")
    rows.sort(key=lambda d: order_key(d["origin"]))
    assert not {r["origin"] for r in rows} & (origins | task_origins), "a target document is evaluated on"
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "target.jsonl", rows)
    result = {
        "builder": "python -m data.build_target",
        "corpus": str(corpus),
        "tasks": str(tasks),
        "per_source": per_source,
        "documents": counts,
        "bytes": (out / "target.jsonl").stat().st_size,
    }
    write_manifest(out, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    parser.add_argument("--tasks", type=Path, default=Path("data/tasks"))
    parser.add_argument("--out", type=Path, default=Path("data/target"))
    parser.add_argument(
        "--per-source", type=int, default=PER_SOURCE, help="documents per source (default %(default)s)"
    )
    args = parser.parse_args()
    manifest = build(args.corpus, args.tasks, args.out, args.per_source)
    log(
        f"wrote {args.out}/target.jsonl: {sum(manifest['documents'].values())} documents, {manifest['bytes']:,} bytes"
    )


if __name__ == "__main__":
    main()
