"""Build the embedded instruction sample: question/answer chats from real documentation on this
machine, with some pairs deliberately broken and labelled.

    python -m data.build_instruct --out data/instruct

Pairs: man pages' NAME and DESCRIPTION become "What does the command `X` do?" -> the description;
Python library pages become "What is the Python module `X` for?" -> the page's opening prose.
Every tenth pair (by a hash of its origin) is held out, clean, for evaluation. Of the rest, a
tenth get a *mismatched* answer (another pair's) and a tenth a *truncated* one (its first few words),
labelled in the `kind` column (ok / mismatched / truncated) so one can check where the broken pairs
land in the loss ranking. Records are chat `messages` (user, assistant) with `source` and `origin`.
Building twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

from data import build_corpus as corpus

MAX_ANSWER_CHARS = 700
RFC = re.compile(r":rfc:`(\d+)`")
ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]+?)(?:\s*<[^>]*>)?`")  # :class:`~a.b` -> a.b


def paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def clip(text: str, limit: int = MAX_ANSWER_CHARS) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[: cut + 1] if cut > limit // 3 else text[:limit]


def man_sections(rendered: str) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in rendered.splitlines():
        if line and not line[0].isspace() and line.strip().isupper():
            current = line.strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def man_pairs(limit: int) -> list[dict]:
    # the corpus builder's man pages (a few per family, so gcloud_* does not crowd out the rest), section 1
    candidates = [c for c in corpus.man_candidates() if c.origin.startswith("man/man1/")]
    pairs = []
    for candidate in sorted(candidates, key=lambda c: corpus.order_key(c.origin)):
        rendered = candidate.load()
        if not rendered:
            continue
        sections = man_sections(rendered)
        name, description = sections.get("NAME", ""), sections.get("DESCRIPTION", "")
        if " - " not in name or not description.strip():
            continue
        command, summary = (" ".join(part.split()) for part in name.split(" - ", 1))
        body = paragraphs(description)
        if not body or len(body[0]) < 40:
            continue
        answer = clip(f"`{command}` is used to {summary[0].lower()}{summary[1:].rstrip('.')}. {body[0]}")
        question = f"What does the command `{command.split(',')[0].strip()}` do?"
        pairs.append({"question": question, "answer": answer, "source": "man", "origin": candidate.origin})
        if len(pairs) == limit:
            break
    return pairs


def python_doc_pairs(limit: int) -> list[dict]:
    root = corpus._first_dir("/usr/share/doc/python3.*/html/_sources/library")
    pages = sorted(root.glob("*.rst.txt"), key=lambda p: corpus.order_key(p.name))
    pairs = []
    for path in pages:
        text = corpus.read_text(path)
        title = re.match(r":mod:`([^`]+)` -+ (.+)\n", text)
        if not title:
            continue
        # top-level prose only: indented paragraphs belong to directives (function docs, notes)
        raw = [p for p in re.split(r"\n\s*\n", text[title.end() :]) if p.strip() and not p[0].isspace()]
        prose = [
            ROLE.sub(r"\1", RFC.sub(r"RFC \1", p)).replace("``", "`").replace("**", "")
            for p in (" ".join(r.split()) for r in raw)
            if not p.startswith(("..", "**Source", "---", ":", "=")) and len(p) > 60
        ]
        if not prose:
            continue
        module = title.group(1)
        answer = clip(" ".join(prose[:2]))
        question = f"What is the Python module `{module}` for?"
        origin = f"python-docs/library/{path.name}"
        pairs.append({"question": question, "answer": answer, "source": "python-docs", "origin": origin})
        if len(pairs) == limit:
            break
    return pairs


def break_some(pairs: list[dict]) -> list[dict]:
    """Label every pair; turn a tenth into mismatched and a tenth into truncated ones."""
    out = []
    for i, pair in enumerate(pairs):
        bucket = int(corpus.order_key("kind:" + pair["origin"]), 16) % 10
        kind = {0: "mismatched", 1: "truncated"}.get(bucket, "ok")
        answer = pair["answer"]
        if kind == "mismatched":  # a real answer, to another question of the other source
            other = pairs[(i + len(pairs) // 2) % len(pairs)]
            answer = other["answer"]
        elif kind == "truncated":  # the answer stops after a few words
            answer = " ".join(answer.split()[: 3 + int(corpus.order_key(pair["origin"]), 16) % 4])
        out.append({**pair, "answer": answer, "kind": kind})
    return out


def as_chat(pair: dict) -> dict:
    messages = [
        {"role": "user", "content": pair["question"]},
        {"role": "assistant", "content": pair["answer"]},
    ]
    return {"messages": messages, "source": pair["source"], "kind": pair["kind"], "origin": pair["origin"]}


def build(out: Path, per_source: int, install: bool = True) -> dict:
    # the two sources the pairs come from; without either the sample would silently change
    needed = tuple(s for s in corpus.SOURCES if s.name in ("man", "python-docs"))
    corpus.available_sources(needed, install=install, allow_missing=False)
    pairs = man_pairs(per_source) + python_doc_pairs(per_source)
    pairs.sort(key=lambda p: corpus.order_key(p["origin"]))
    heldout = [p | {"kind": "ok"} for i, p in enumerate(pairs) if i % 10 == 9]
    train = break_some([p for i, p in enumerate(pairs) if i % 10 != 9])
    out.mkdir(parents=True, exist_ok=True)
    corpus.write_jsonl(out / "train.jsonl", [as_chat(p) for p in train])
    corpus.write_jsonl(out / "heldout.jsonl", [as_chat(p) for p in heldout])
    manifest = {
        "train": {
            f"{s}/{k}": n for (s, k), n in sorted(Counter((p["source"], p["kind"]) for p in train).items())
        },
        "heldout": dict(sorted(Counter(p["source"] for p in heldout).items())),
    }
    corpus.write_manifest(out, manifest)
    for key, count in manifest["train"].items():
        corpus.log(f"train {key:24s} {count:5d}")
    corpus.log(f"held out: {len(heldout)} clean pairs -> {out}")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/instruct"))
    parser.add_argument("--per-source", type=int, default=250)
    parser.add_argument("--no-install", action="store_true", help="never call apt-get")
    args = parser.parse_args()
    try:
        build(args.out, args.per_source, install=not args.no_install)
    except corpus.MissingSources as err:
        sys.exit(f"[build_instruct] error: {err}")


if __name__ == "__main__":
    main()
