"""Build the embedded corpus from real text this machine has (or can install from Debian).

    python -m data.build_corpus --out data/corpus                 # the default: 150 docs per source
    python -m data.build_corpus --out data/big --per-source 5000  # a bigger one on request

One document per natural unit: a fortune, a Jargon File entry, a Python documentation page, a
Debian Reference section, a Linux kernel documentation page, a rendered man page, a Python standard
library source file. Together they mix clean prose, code, markup and noise (ASCII art, tables), so
the loss distribution has real structure. Each source is capped (`--per-source`) so that none
dominates: man pages are most of the bytes on the machine, fortunes most of the documents.

Writes `train.jsonl` and `heldout.jsonl` (fields: text, source, origin), `ood.jsonl` (held-out
text of a kind no training source holds: Debian package changelogs) and `manifest.json`.
Choices are made by hashing each document's origin, never by randomness or file timestamps, so
building twice gives the same bytes. Missing Debian packages are installed with apt-get when this
runs as root and apt-get works; a source that stays unavailable stops the build with the packages
to install, unless `--allow-missing`, which builds without it and lists it, with the reason, under
`missing_sources` in the manifest.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HELDOUT_EVERY = 10  # every 10th chosen document of each source is held out


@dataclass(frozen=True)
class Candidate:
    origin: str  # stable, machine-independent id, e.g. "man/man1/ls.1.gz"
    load: Callable[[], str | None]  # None: not a usable document (e.g. a man page that is a link)


@dataclass(frozen=True)
class Source:
    name: str
    packages: tuple[str, ...]  # Debian packages that provide it
    present: Callable[[], bool]
    candidates: Callable[[], Iterator[Candidate]]


def log(message: str) -> None:
    print(f"[build_corpus] {message}", file=sys.stderr, flush=True)


def read_text(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # old fortune files predate UTF-8


def tidy(text: str) -> str:
    """Strip trailing spaces and collapse runs of blank lines; keep everything else as it is."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


# ------------------------------------------------------------------------------------------------
# Sources

FORTUNES = Path("/usr/share/games/fortunes")


def fortune_candidates() -> Iterator[Candidate]:
    for path in sorted(FORTUNES.iterdir()):
        if path.is_dir() or path.suffix in (".dat", ".u8") or path.is_symlink():
            continue
        for index, chunk in enumerate(re.split(r"\n%\n", read_text(path))):
            text = chunk.strip("%\n")
            yield Candidate(f"fortunes/{path.name}#{index}", lambda text=text: text)


JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")


def jargon_candidates() -> Iterator[Candidate]:
    entries = re.split(r"\n(?=   :[^\n:]+:)", read_text(JARGON))
    for entry in entries[1:]:  # entries[0] is the front matter
        term = entry.strip().split(":")[1]
        yield Candidate(f"jargon/{term}", lambda entry=entry: "\n".join(x[3:] for x in entry.split("\n")))


def _first_dir(pattern: str) -> Path | None:
    matches = sorted(Path("/").glob(pattern.lstrip("/")))
    return matches[-1] if matches else None


def python_docs_candidates() -> Iterator[Candidate]:
    root = _first_dir("/usr/share/doc/python3.*/html/_sources")
    for path in sorted(root.rglob("*.rst.txt")):
        yield Candidate(f"python-docs/{path.relative_to(root)}", lambda path=path: read_text(path))


class _SectionSplitter(html.parser.HTMLParser):
    """Plain text of an HTML page, cut into sections at h1–h3 headings."""

    BLOCKS = frozenset({"p", "div", "pre", "li", "tr", "br", "h1", "h2", "h3", "h4", "table", "dt", "dd"})

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[list[str]] = [[]]
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style", "head"):
            self.skip += 1
        elif tag in ("h1", "h2", "h3"):
            self.sections.append([])
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCKS:
            self.sections[-1].append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head"):
            self.skip -= 1
        if tag == "pre":
            self.pre -= 1
        if tag in self.BLOCKS:
            self.sections[-1].append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.sections[-1].append(data if self.pre else re.sub(r"\s+", " ", data))


DEBIAN_REFERENCE = Path("/usr/share/debian-reference")


def debian_reference_candidates() -> Iterator[Candidate]:
    for path in sorted(DEBIAN_REFERENCE.glob("*.en.html")):
        splitter = _SectionSplitter()
        splitter.feed(read_text(path))
        for index, parts in enumerate(splitter.sections):
            text = "\n".join(line.strip(" ") for line in "".join(parts).split("\n"))
            yield Candidate(f"debian-reference/{path.name}#{index}", lambda text=text: text)


def linux_doc_candidates() -> Iterator[Candidate]:
    root = _first_dir("/usr/share/doc/linux-doc-*/Documentation")
    for path in sorted(root.rglob("*.rst.gz")):
        yield Candidate(f"linux-doc/{path.relative_to(root)}", lambda path=path: read_text(path))


MAN = Path("/usr/share/man")


def render_man(path: Path) -> str | None:
    source = read_text(path)
    if source.lstrip().startswith(".so "):  # a link to another page
        return None
    result = subprocess.run(
        ["groff", "-man", "-Tutf8", "-P-cbou", "-rLL=80n"],
        input=source.encode("utf-8"),
        capture_output=True,
        env={**os.environ, "LC_ALL": "C.UTF-8", "GROFF_NO_SGR": "1"},
        check=False,
    )
    return result.stdout.decode("utf-8", errors="replace") if result.returncode == 0 else None


MAN_PAGES_PER_FAMILY = 3


def man_candidates() -> Iterator[Candidate]:
    # Some tools generate thousands of near-identical pages (gcloud_alpha_..., 16k of them here):
    # keep a few per family (the name up to the first '_') so they do not crowd out the rest.
    families: dict[str, list[Path]] = {}
    for section in range(1, 9):
        for path in sorted((MAN / f"man{section}").glob("*.gz")):
            if not path.is_symlink():
                families.setdefault(path.name.split("_")[0].split(".")[0], []).append(path)
    for _, paths in sorted(families.items()):
        paths.sort(key=lambda p: order_key(p.name))
        for path in paths[:MAN_PAGES_PER_FAMILY]:
            yield Candidate(f"man/{path.parent.name}/{path.name}", lambda path=path: render_man(path))


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_code_candidates() -> Iterator[Candidate]:
    root = stdlib_root()
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.isdisjoint(rel.parts):
            yield Candidate(f"python-code/{rel}", lambda path=path: path.read_text("utf-8"))


SOURCES = (
    # fortunes-min alone has one file of them; the full package is what the corpus is built from
    Source("fortunes", ("fortunes",), (FORTUNES / "computers").is_file, fortune_candidates),
    Source("jargon", ("jargon-text",), JARGON.is_file, jargon_candidates),
    Source(
        "python-docs",
        ("python3-doc",),
        lambda: _first_dir("/usr/share/doc/python3.*/html/_sources") is not None,
        python_docs_candidates,
    ),
    Source(
        "debian-reference", ("debian-reference-en",), DEBIAN_REFERENCE.is_dir, debian_reference_candidates
    ),
    Source(
        "linux-doc",
        ("linux-doc",),
        lambda: _first_dir("/usr/share/doc/linux-doc-*/Documentation") is not None,
        linux_doc_candidates,
    ),
    Source(
        "man",
        ("manpages", "groff-base"),
        lambda: (MAN / "man1").is_dir() and bool(shutil.which("groff")),
        man_candidates,
    ),
    Source("python-code", (), lambda: stdlib_root().is_dir(), python_code_candidates),
)


def changelog_candidates() -> Iterator[Candidate]:
    for path in sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz")):
        yield Candidate(f"debian-changelog/{path.parent.name}", lambda path=path: read_text(path))


# Out-of-distribution text for evaluation: a kind of document no training source holds (Debian
# package changelogs, on every Debian system). Written to ood.jsonl only, never to train.jsonl.
OOD_SOURCES = (
    Source(
        "debian-changelog",
        (),
        lambda: any(Path("/usr/share/doc").glob("*/changelog.Debian.gz")),
        changelog_candidates,
    ),
)


# ------------------------------------------------------------------------------------------------
# Building


def install_missing(sources: tuple[Source, ...]) -> str | None:
    """Install the Debian packages of the sources that are not present. None when there was
    nothing to do or apt-get succeeded; otherwise why the packages could not be installed."""
    missing = sorted({p for s in sources if not s.present() for p in s.packages})
    if not missing:
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root, or no apt-get: cannot install them"
    log(f"installing Debian packages: {', '.join(missing)}")
    command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(command, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            return f"apt-get install failed: {result.stderr.strip()[-300:]}"
    return None


class MissingSources(RuntimeError):
    """Sources that could not be built, each with the reason; the message names the packages."""

    def __init__(self, missing: dict[str, str], packages: list[str]):
        self.missing = missing
        lines = "\n".join(f"  {name}: {why}" for name, why in missing.items())
        super().__init__(
            f"{len(missing)} source(s) unavailable:\n{lines}\n"
            f"install them with `apt-get install {' '.join(packages)}` (as root), or build without them "
            "with --allow-missing (`make data ALLOW_MISSING=1`)"
        )


def available_sources(
    sources: tuple[Source, ...], *, install: bool, allow_missing: bool
) -> tuple[list[Source], dict[str, str]]:
    """(the sources present, after installing what is missing when `install`; each source that is
    not, with why). Missing sources are an error unless `allow_missing`: a corpus silently short
    of a source would change every result built on it."""
    why = install_missing(sources) if install else "not installed, and installing was not asked for"
    missing = {
        s.name: f"needs Debian package(s) {', '.join(s.packages)}: {why or 'still absent after installing'}"
        for s in sources
        if not s.present()
    }
    if missing and not allow_missing:
        packages = sorted({p for s in sources if s.name in missing for p in s.packages})
        raise MissingSources(missing, packages)
    for name, reason in missing.items():
        log(f"{name:17s} left out: {reason}")
    return [s for s in sources if s.name not in missing], missing


def order_key(origin: str) -> str:
    return hashlib.sha1(origin.encode("utf-8")).hexdigest()


def cap_chars(text: str, max_chars: int) -> str:
    """Cut an over-long document at the last line break before max_chars."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut if cut > max_chars // 2 else max_chars]


def choose(source: Source, per_source: int, max_chars: int) -> list[dict]:
    """The first `per_source` usable documents of a source in hash order of their origin."""
    candidates = sorted(source.candidates(), key=lambda c: order_key(c.origin))
    chosen = []
    for candidate in candidates:
        text = candidate.load()
        text = tidy(text) if text else ""
        if text.strip():
            chosen.append(
                {"text": cap_chars(text, max_chars), "source": source.name, "origin": candidate.origin}
            )
        if len(chosen) == per_source:
            break
    log(f"{source.name:17s} {len(chosen):5d} documents (of {len(candidates)} candidates)")
    return chosen


def package_versions(sources: tuple[Source, ...]) -> dict[str, str]:
    versions = {}
    for package in sorted({p for s in sources for p in s.packages}):
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False
        )
        versions[package] = result.stdout if result.returncode == 0 else "not installed"
    return versions


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)


def write_manifest(out: Path, manifest: dict) -> None:
    """`out/manifest.json`: what a builder made, keys sorted so a rebuild gives the same bytes."""
    (out / "manifest.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def build(
    out: Path,
    per_source: int,
    max_chars: int,
    sources: tuple[Source, ...],
    install: bool,
    allow_missing: bool = False,
    ood_per_source: int = 100,
) -> dict:
    available, missing = available_sources(sources, install=install, allow_missing=allow_missing)
    train, heldout = [], []
    for source in available:
        docs = choose(source, per_source, max_chars)
        for index, doc in enumerate(docs):
            (heldout if index % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train).append(doc)
    ood = [
        doc for source in OOD_SOURCES if source.present() for doc in choose(source, ood_per_source, max_chars)
    ]
    # Shuffle by hash so that every shard of the file mixes the sources, as a web crawl would.
    for rows in (train, heldout, ood):
        rows.sort(key=lambda d: order_key(d["origin"]))
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    write_jsonl(out / "ood.jsonl", ood)

    def counts(rows: list[dict]) -> dict:
        per: dict[str, dict[str, int]] = {}
        for row in rows:
            entry = per.setdefault(row["source"], {"documents": 0, "chars": 0, "bytes": 0})
            entry["documents"] += 1
            entry["chars"] += len(row["text"])
            entry["bytes"] += len(row["text"].encode("utf-8"))
        return dict(sorted(per.items()))

    manifest = {
        "builder": "python -m data.build_corpus",
        "per_source": per_source,
        "max_chars": max_chars,
        "heldout_every": HELDOUT_EVERY,
        "python": sys.version.split()[0],
        "packages": package_versions(sources),
        "missing_sources": missing,
        "files": {
            "train.jsonl": {"documents": len(train), "bytes": (out / "train.jsonl").stat().st_size},
            "heldout.jsonl": {"documents": len(heldout), "bytes": (out / "heldout.jsonl").stat().st_size},
            "ood.jsonl": {"documents": len(ood), "bytes": (out / "ood.jsonl").stat().st_size},
        },
        "train": counts(train),
        "heldout": counts(heldout),
        "ood": counts(ood),
    }
    write_manifest(out, manifest)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/corpus"))
    parser.add_argument(
        "--per-source", type=int, default=150, help="documents per source (default %(default)s)"
    )
    parser.add_argument(
        "--max-chars", type=int, default=12000, help="cap on one document (default %(default)s)"
    )
    parser.add_argument("--sources", default=",".join(s.name for s in SOURCES), help="comma-separated subset")
    parser.add_argument("--no-install", action="store_true", help="never call apt-get")
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="build from the sources that are available (the manifest lists the others and why)",
    )
    args = parser.parse_args()
    wanted = args.sources.split(",")
    unknown = sorted(set(wanted) - {s.name for s in SOURCES})
    if unknown:
        parser.error(f"unknown source(s) {', '.join(unknown)}; known: {', '.join(s.name for s in SOURCES)}")
    sources = tuple(s for s in SOURCES if s.name in wanted)
    try:
        manifest = build(
            args.out,
            args.per_source,
            args.max_chars,
            sources,
            install=not args.no_install,
            allow_missing=args.allow_missing,
        )
    except MissingSources as err:
        sys.exit(f"[build_corpus] error: {err}")
    files = manifest["files"]
    total_mb = sum(f["bytes"] for f in files.values()) / 1e6
    log(
        f"wrote {args.out}: {files['train.jsonl']['documents']} train + "
        f"{files['heldout.jsonl']['documents']} held-out documents, {total_mb:.1f} MB"
    )


if __name__ == "__main__":
    main()
