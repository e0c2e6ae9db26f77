"""Build the embedded downstream tasks: zero-shot multiple choice from documentation on this
machine that the training corpus does not hold, for lm-evaluation-harness.

    python -m data.build_tasks --corpus data/corpus --out data/tasks

Three tasks of 4-way multiple choice (one JSONL file each; fields question, choices, label,
origin):
- `man_command`: a man page's summary and first description sentence -> which command;
- `fortune_ending`: a fortune without its last six words -> which ending is its own;
- `jargon_term`: a Jargon File definition -> which headword.
The answer's own name is masked in the text (as a whole word, in its spellings, and every word
that starts with a stem of it), and an item whose question still names it (or a word of it) is
left out. Distractors are other items' answers, drawn by a
hash of the item, so building twice gives the same bytes. Every document behind an item is one
the corpus (train, held-out and out-of-distribution files) does not contain: the corpus files are
read and their origins left out (checked again at the end, and by the tests).
"""

from __future__ import annotations

import argparse
import math
import random
import re
from collections.abc import Iterator
from pathlib import Path

from data.build_corpus import (
    JARGON,
    fortune_candidates,
    log,
    man_candidates,
    order_key,
    read_text,
    write_jsonl,
    write_manifest,
)
from data.build_instruct import man_sections, paragraphs
from pipeline.codec import parse_json

ITEMS = 320
QUESTION_CHARS = 300


def corpus_origins(corpus: Path) -> set[str]:
    origins = set()
    for name in ("train.jsonl", "heldout.jsonl", "ood.jsonl"):
        path = corpus / name
        if path.is_file():
            origins |= {
                parse_json(line, str(path), ValueError)["origin"] for line in path.open(encoding="utf-8")
            }
    return origins


def spellings(name: str) -> set[str]:
    """The ways a name is written in running text: as is, and with its - _ . as spaces or removed."""
    return {name, re.sub(r"[-_.]", " ", name), re.sub(r"[-_.]", "", name)}


def stems(name: str) -> set[str]:
    """The stems of the answer's words of four letters or more: each word's first 60% of letters,
    at least four (`grou` of groups, `Itan` of Itanic), so that `group memberships` and `Itanium`
    do not give away `groups` and `Itanic`."""
    words = [w for w in re.split(r"[-_. ]", name) if len(w) >= 4]
    return {w[: max(4, math.ceil(0.6 * len(w)))] for w in words}


def masked(text: str, name: str) -> str:
    """The text with the answer's name replaced, as a whole word in any of its spellings, and every
    word starting with one of its stems, so the question does not give it away (and `cat` is not
    masked inside `concatenate`)."""
    for spelling in sorted(spellings(name), key=len, reverse=True):
        text = re.sub(rf"(?<![\w-]){re.escape(spelling)}(?![\w-])", "___", text, flags=re.IGNORECASE)
    for stem in sorted(stems(name), key=len, reverse=True):
        text = re.sub(rf"(?<![\w-]){re.escape(stem)}[\w-]*", "___", text, flags=re.IGNORECASE)
    return " ".join(text.split())


def leaks(question: str, answer: str) -> bool:
    """True when the question still gives the answer away: a spelling of it, or a word sharing
    its first four letters with a word of the answer of four letters or more, either way round
    (`merge` of git-merge-base, `hack` of hackishness, `temporary` of tempfile)."""
    if any(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", question, re.IGNORECASE) for w in spellings(answer)):
        return True
    prefixes = {w[:4].lower() for w in re.split(r"[-_. ]", answer) if len(w) >= 4}
    return any(w[:4].lower() in prefixes for w in re.findall(r"\w{4,}", question))


def clip(text: str) -> str:
    return text if len(text) <= QUESTION_CHARS else text[: text.rfind(" ", 0, QUESTION_CHARS)] + " ..."


def man_items(excluded: set[str]) -> Iterator[dict]:
    for candidate in sorted(man_candidates(), key=lambda c: order_key(c.origin)):
        if not candidate.origin.startswith("man/man1/") or candidate.origin in excluded:
            continue
        rendered = candidate.load()
        sections = man_sections(rendered) if rendered else {}
        name, description = sections.get("NAME", ""), sections.get("DESCRIPTION", "")
        if " - " not in name or not description.strip():
            continue
        command = " ".join(name.split(" - ", 1)[0].split()).split(",")[0].strip()
        summary = " ".join(name.split(" - ", 1)[1].split())
        body = paragraphs(description)
        if not re.fullmatch(r"[\w.+-]{2,30}", command) or not body:
            continue
        text = masked(f"{summary}. {body[0]}", command)
        if leaks(text, command):
            continue
        yield {
            "question": f"Which command does this describe? {clip(text)}",
            "answer": command,
            "origin": candidate.origin,
        }


def fortune_items(excluded: set[str]) -> Iterator[dict]:
    """A fortune without its last words -> which ending is its own."""
    for candidate in sorted(fortune_candidates(), key=lambda c: order_key(c.origin)):
        words = " ".join(candidate.load().split()).split(" ")
        if candidate.origin in excluded or not 14 <= len(words) <= 45:
            continue
        start, ending = " ".join(words[:-ENDING_WORDS]), " ".join(words[-ENDING_WORDS:])
        yield {"question": f"How does this end? {clip(start)}", "answer": ending, "origin": candidate.origin}


def jargon_items(excluded: set[str]) -> Iterator[dict]:
    entries = re.split(r"\n(?=   :[^\n:]+:)", read_text(JARGON))[1:]
    for entry in sorted(entries, key=lambda e: order_key(e)):
        term = entry.strip().split(":")[1]
        origin = f"jargon/{term}"
        definition = " ".join(entry.split("\n", 1)[1].split()) if "\n" in entry else ""
        definition = re.sub(r"[{}]", "", definition)
        if origin in excluded or len(definition) < 60 or not re.fullmatch(r"[\w .'-]{2,30}", term):
            continue
        if leaks(masked(definition, term), term):
            continue
        yield {
            "question": f"Which term does this define? {clip(masked(definition, term))}",
            "answer": term,
            "origin": origin,
        }


TASKS = {"man_command": man_items, "fortune_ending": fortune_items, "jargon_term": jargon_items}
ENDING_WORDS = 6


def with_choices(items: list[dict]) -> list[dict]:
    """Four choices per item: its answer and three others', in an order drawn by a hash of it."""
    answers = sorted({item["answer"] for item in items})
    out = []
    for item in items:
        rng = random.Random(order_key(item["origin"]))
        distractors = rng.sample([a for a in answers if a.lower() != item["answer"].lower()], 3)
        choices = [item["answer"], *distractors]
        rng.shuffle(choices)
        out.append(
            {
                "question": item["question"],
                "choices": choices,
                "label": choices.index(item["answer"]),
                "origin": item["origin"],
            }
        )
    return out


def build(corpus: Path, out: Path, items: int = ITEMS) -> dict:
    excluded = corpus_origins(corpus)
    if not excluded:
        raise SystemExit(f"{corpus}: no corpus to keep the tasks apart from; run `make data` first")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"builder": "python -m data.build_tasks", "corpus": str(corpus), "tasks": {}}
    for name, make in TASKS.items():
        rows, answers = [], set()
        for item in make(excluded):
            if item["answer"].lower() in answers:  # one item per answer
                continue
            answers.add(item["answer"].lower())
            rows.append(item)
            if len(rows) == items:
                break
        rows = with_choices(rows)
        assert not excluded & {r["origin"] for r in rows}, "a task document is in the corpus"
        write_jsonl(out / f"{name}.jsonl", rows)
        manifest["tasks"][name] = {"items": len(rows), "choices": 4}
        log(f"task {name:14s} {len(rows)} items")
    write_manifest(out, manifest)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    parser.add_argument("--out", type=Path, default=Path("data/tasks"))
    parser.add_argument("--items", type=int, default=ITEMS, help="items per task (default %(default)s)")
    args = parser.parse_args()
    build(args.corpus, args.out, args.items)


if __name__ == "__main__":
    main()
