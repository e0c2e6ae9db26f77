"""The README and docs/ stay a short manual whose every link, citation and path resolves.

    .venv/bin/python -m pytest -q tests/test_docs.py

Reads files only: no network, no model, well under a second.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKDOWN = [README, *sorted(DOCS.rglob("*.md"))]

# the two notes the docs replaced, spelt so that this file does not name them itself
RETIRED = ("DESIGN" + ".md", "STYLE" + ".md")
# what a repository path in backticks starts with
REPO_PATHS = ("pipeline/", "stages/", "bench/", "data/build", "configs/", "tests/", "docs/")

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`+([^`]+)`+")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
DOCS_CITATION = re.compile(r"(docs/[\w./-]+?\.md)(?:[,:]?\s*§\s*(\d+))?")


def repository_files() -> list[Path]:
    """Every file of the repository's own: tracked, or new and not ignored (so not the built data,
    environments and caches that .gitignore names)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def text_of(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation dropped, spaces to
    hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (outside code blocks), duplicates numbered."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", text_of(path)).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("page", MARKDOWN, ids=rel)
def test_relative_links_resolve(page: Path):
    broken = []
    for target in LINK.findall(FENCE.sub("", text_of(page))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor in {rel(linked)}")
    assert not broken, f"{rel(page)}: " + "; ".join(broken)


def test_cited_docs_pages_and_sections_exist():
    cited = [
        path
        for path in repository_files()
        if path.suffix in (".py", ".yaml", ".md") or path.name == "Makefile" or rel(path) == ".ci/run"
    ]
    problems = []
    for path in cited:
        for page, section in DOCS_CITATION.findall(text_of(path)):
            target = ROOT / page
            if not target.is_file():
                problems.append(f"{rel(path)} cites {page}, which does not exist")
            elif section and not re.search(rf"^#+\s+{section}\.\s", text_of(target), re.MULTILINE):
                problems.append(f"{rel(path)} cites {page} §{section}, which has no heading '{section}.'")
    assert not problems, "\n".join(problems)


def test_no_file_cites_the_retired_notes():
    mentions = [
        f"{rel(path)}: {name}" for path in repository_files() for name in RETIRED if name in text_of(path)
    ]
    assert not mentions, "cite a docs/ page instead:\n" + "\n".join(mentions)


@pytest.mark.parametrize("page", MARKDOWN, ids=rel)
def test_repository_paths_named_in_code_exist(page: Path):
    text = text_of(page)
    spans = CODE_SPAN.findall(FENCE.sub("", text)) + FENCE.findall(text)
    missing = set()
    for span in spans:
        for token in re.split(r"[\s=,;'\"()\[\]]+", span):
            token = token.rstrip(".:")
            if not token.startswith(REPO_PATHS) or any(c in token for c in "<*{"):
                continue
            if not (ROOT / token).exists():
                missing.add(token)
    assert not missing, f"{rel(page)} names paths that do not exist: {sorted(missing)}"
