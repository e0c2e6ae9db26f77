"""Where every stage reads and writes under `out_dir`: the one place that names the run's files.

    layout = Layout(cfg.out_dir)
    layout.score_shard(3)              # out/scores/part-00003.parquet
    layout.band("mid").manifest        # out/selected/mid/manifest.json
    layout.train_run("uniform-mid").metrics  # out/train/uniform-mid/metrics.json

    out_dir/
      scores/        part-{shard:05d}.parquet, .part-{shard:05d}.chunks/, plan.json, summary.json, config.yaml
      selected/<band>/   part-{shard:05d}.parquet, data.jsonl, manifest.json, config.yaml
      rejected/<band>/   part-{shard:05d}.parquet: every dropped row with its reason (select.write_rejected)
      reports/<name>/    index.html, *.png, summary.json, config.yaml (compare: table.md, results.json, deltas.png)
      train/<run>/       model/, checkpoints/, metrics.json, selection_manifest.json, config.yaml
      train/.eval-before/<hash>.json   the starting model's held-out evaluation, shared by runs
      selected/.<band>.<decision>/, rejected/.<band>.<decision>/   a band being written, published whole

Stages ask the layout for paths and never join names under `out_dir` themselves, so renaming a
file or a folder is a change here and nowhere else. Every folder a stage makes goes through
`make_dir`, which marks it with a `.midrank` file and refuses a path that a symlink leads out of
`out_dir`; `remove` and the replacing of a band or report refuse a folder without the mark.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import is_safe_name

DECISION_HEX = 16
"""Hex digits of the decision digest that names a band's staging folder."""
MARKER = ".midrank"
"""The file in every folder midrank makes under out_dir: it deletes or replaces no folder without it."""
MARKER_TEXT = "midrank made this folder; it deletes or replaces only folders that hold this file.\n"


class LayoutError(ValueError):
    """A path under out_dir that would reach outside it (a hostile name, or a symlink)."""


def part_path(directory: Path, shard: int) -> Path:
    """The file of one shard in a folder of shards (scores, a band, its rejected rows)."""
    return directory / f"part-{shard:05d}.parquet"


def part_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet"))


@dataclass(frozen=True, slots=True)
class BandPaths:
    """A selected band: `dir` holds its kept rows with their text (`part-{shard:05d}.parquet`);
    `manifest` (a `BandManifest`) is written last, so a band without one is unfinished;
    `rejected` (beside `selected/`, not in it) holds every dropped row with its reason, `jsonl`
    the kept rows as JSONL."""

    dir: Path
    manifest: Path
    rejected: Path
    jsonl: Path


@dataclass(frozen=True, slots=True)
class RunPaths:
    """A training run: `metrics` (a `RunMetrics`) is written last, so a run with it is finished;
    `selection` is the manifest of the band it trained on, copied beside its results; `model` the
    trained model and tokenizer (save_pretrained); `checkpoints` the Trainer's checkpoint-N
    folders, resumed from after a kill; `config` the resolved config; `started` what decides the
    weights, recorded when the run starts, so a resume under other settings is caught."""

    dir: Path
    metrics: Path
    selection: Path
    model: Path
    checkpoints: Path
    config: Path
    started: Path


@dataclass(frozen=True, slots=True)
class ReportPaths:
    """A report folder: inspect writes `index` (HTML, the figures beside it) and `summary` (a
    `ReportSummary`); compare writes `table` (markdown), `results` (JSON), `deltas` (a chart) and
    each model's evaluation under `evals`. Both write the resolved config.yaml."""

    dir: Path
    index: Path
    summary: Path
    table: Path
    results: Path
    deltas: Path
    evals: Path

    @classmethod
    def at(cls, folder: Path) -> ReportPaths:
        names = ("index.html", "summary.json", "table.md", "results.json", "deltas.png", "evals")
        return cls(folder, *(folder / name for name in names))

    def evaluation(self, label: str) -> Path:
        """compare's cached evaluation of one model (`base`, `<arm>-seed<s>`)."""
        return self.evals / f"{label}.json"


@dataclass(frozen=True, slots=True)
class Layout:
    out_dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))

    def _named(self, parent: Path, name: str) -> Path:
        # the config checks names already; a name that could leave its folder is a bug here
        if not is_safe_name(name):
            raise LayoutError(f"{name!r} is not a plain name; it would not stay inside {parent}")
        return parent / name

    def remove(self, path: Path) -> None:
        """Delete a folder midrank made (`MARKER`) or a file inside out_dir, never out_dir itself or
        anything outside it (checked on the resolved paths, so neither '..' nor a symlink can widen
        a delete)."""
        if not self.holds(path):
            raise LayoutError(f"refusing to delete {path}: it is not inside {self.out_dir} (a symlink?)")
        if path.is_dir() and not path.is_symlink():
            self.check_replaceable(path)
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def make_dir(self, path: Path) -> Path:
        """`path` and its missing parents made, each folder made here marked as midrank's (`MARKER`);
        refused when it leads outside out_dir (a symlink on the way)."""
        path = self.check_inside(Path(path))
        missing = [p for p in (path, *path.parents) if self.holds(p) and not p.exists()]
        blocking = [p for p in (path, *path.parents) if self.holds(p) and p.exists() and not p.is_dir()]
        if blocking:
            raise LayoutError(f"{blocking[0]}: a file stands where midrank makes a folder; move it away")
        path.mkdir(parents=True, exist_ok=True)
        for folder in reversed(missing):
            self.mark(folder)
        return path

    def check_replaceable(self, path: Path) -> Path:
        """`path` (a folder midrank replaces whole), after checking it stays inside out_dir and,
        if it exists, that it is a folder midrank made (`MARKER` in it and in every folder below):
        no other folder or file is deleted or replaced."""
        self.check_inside(path)
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise LayoutError(
                f"refusing to delete or replace {path}: midrank makes a folder there, and a "
                f"{'link' if path.is_symlink() else 'file'} stands in its place; move it away"
            )
        if path.is_dir():
            for folder in (path, *sorted(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink())):
                if not (folder / MARKER).is_file():
                    raise LayoutError(
                        f"refusing to delete or replace {path}: midrank did not make "
                        f"{'it' if folder == path else folder} (no "
                        f"{MARKER} file in it); move it away or use another out_dir (made by a midrank "
                        f"before the marker: `touch {folder / MARKER}`)"
                    )
        return path

    def mark(self, folder: Path) -> None:
        """Claim a folder made for midrank by another library (the Trainer's checkpoint-N)."""
        (self.check_inside(folder) / MARKER).write_text(MARKER_TEXT)

    def check_all_inside(self, folder: Path) -> Path:
        """`folder`, after checking that it and everything below it stays inside out_dir: a link
        planted anywhere in a folder a library later writes into is refused before the write."""
        for path in (folder, *folder.rglob("*")):  # rglob lists a link but does not follow it
            self.check_inside(path)
        return folder

    def check_inside(self, path: Path) -> Path:
        """`path`, after checking it stays inside out_dir once symlinks are followed."""
        if not self.holds(path):
            raise LayoutError(f"{path} leads outside {self.out_dir} (a symlink?); refusing to write there")
        return path

    def holds(self, path: Path) -> bool:
        """Whether `path` lies strictly inside out_dir."""
        root, target = self.out_dir.resolve(), Path(path).resolve()
        return target != root and target.is_relative_to(root)

    # stage one: scores
    @property
    def scores_dir(self) -> Path:
        return self.out_dir / "scores"

    def score_shard(self, shard: int) -> Path:
        """A finished shard's scores (`SCORE_SCHEMA` rows; provenance and stats in its metadata)."""
        return part_path(self.scores_dir, shard)

    def score_chunks(self, shard: int) -> Path:
        """Checkpoints of a shard being scored; gone once the shard is finished."""
        return self.scores_dir / f".part-{shard:05d}.chunks"

    def score_chunk(self, shard: int, index: int) -> Path:
        """One checkpoint: the rows of one window, with how far into the shard it reaches."""
        return self.score_chunks(shard) / f"chunk-{index:06d}.parquet"

    def score_chunk_files(self, shard: int) -> list[Path]:
        return sorted(self.score_chunks(shard).glob("chunk-*.parquet"))

    def score_chunk_provenance(self, shard: int) -> Path:
        """The provenance the checkpoints were made under: resuming under another is refused."""
        return self.score_chunks(shard) / "provenance.json"

    @property
    def score_plan(self) -> Path:
        """How the corpus was cut into shards: every later run must cut it the same way."""
        return self.scores_dir / "plan.json"

    @property
    def scores_summary(self) -> Path:
        """`ScoresSummary`: totals over every shard, written once all are finished."""
        return self.scores_dir / "summary.json"

    # stage two: selected bands
    def band(self, name: str) -> BandPaths:
        folder = self._named(self.out_dir / "selected", name)
        # rejected rows sit outside the band's folder: `load_dataset(band_dir)` reads every Parquet
        # file below it, and the rejected ones carry a `reason` column the kept ones do not
        rejected = self._named(self.out_dir / "rejected", name)
        return BandPaths(folder, folder / "manifest.json", rejected, folder / "data.jsonl")

    def band_staging(self, name: str, decision: str) -> BandPaths:
        """Where the ranks of a select job write a band before it is published whole (renamed to
        `band(name)`). `decision` (hex) names what decided the rows, so the parts a cut run left
        are reused only by a run that would write the same bytes."""
        final = self.band(name)
        hidden = f".{name}.{decision}"  # a band name never starts with '.'
        folder = final.dir.with_name(hidden)
        return BandPaths(
            folder, folder / "manifest.json", final.rejected.with_name(hidden), folder / "data.jsonl"
        )

    def band_stagings(self, name: str) -> list[Path]:
        """Every staging folder of the band, of any decision (left by cut runs)."""
        final = self.band(name)
        pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{{DECISION_HEX}}}")
        return sorted(
            p
            for parent in (final.dir.parent, final.rejected.parent)
            if parent.is_dir()
            for p in parent.iterdir()
            if pattern.fullmatch(p.name)
        )

    # reports (inspect, compare)
    @property
    def reports_dir(self) -> Path:
        return self.out_dir / "reports"

    def report(self, name: str) -> ReportPaths:
        return ReportPaths.at(self._named(self.reports_dir, name))

    def report_staging(self, name: str) -> ReportPaths:
        """Where a report is built before it is swapped in whole (one per process)."""
        return ReportPaths.at(self.reports_dir / f".{name}.{os.getpid()}.tmp")

    def report_stagings(self, name: str) -> list[Path]:
        """Every staging folder of report `name` (not of `name.x`, whose own lock guards it)."""
        pattern = re.compile(rf"\.{re.escape(name)}\.\d+\.tmp")
        return sorted(p for p in self.reports_dir.glob(f".{name}.*.tmp") if pattern.fullmatch(p.name))

    # training runs
    def train_run(self, name: str) -> RunPaths:
        folder = self._named(self.out_dir / "train", name)
        return RunPaths(
            folder,
            folder / "metrics.json",
            folder / "selection_manifest.json",
            folder / "model",
            folder / "checkpoints",
            folder / "config.yaml",
            folder / "started.json",
        )

    def lock(self, name: str) -> Path:
        """The lock a stage holds while it runs (pipeline/locks.py)."""
        return self.out_dir / ".locks" / f"{name}.lock"

    @property
    def evals_before_dir(self) -> Path:
        """The starting models' held-out evaluations. Run names may not start with '.', so this
        folder is never a run."""
        return self.out_dir / "train" / ".eval-before"

    def eval_before(self, key: str) -> Path:
        """The starting model's held-out evaluation; `key` hashes everything it depends on."""
        return self.evals_before_dir / f"{key}.json"
