"""Nothing lost, nothing escapes: names that cannot leave out_dir, deletes confined to it, one run
of a stage per out_dir at a time."""

import errno
import json
import os
import time

import polars as pl
import pytest

from pipeline.artifacts import ProvenanceError
from pipeline.config import ConfigError, load_config
from pipeline.layout import Layout
from pipeline.locks import LockedError, stage_lock
from stages import score, select
from tests.helpers import make_texts, midrank, write_config, write_corpus

HOSTILE = ["..", ".", "../../X", "a/b", ".hidden", "", "x" * 129, "band name", "é"]


@pytest.fixture
def config(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_texts(40, seed=5))
    return write_config(tmp_path, corpus, tiny_model_dir)


NAMED = [
    ("select.bands=[{{name: '{}'}}]", r"select\.bands\[0\]\.name"),
    ("train.name='{}'", r"train\.name"),
    ("train.band='{}'", r"train\.band"),
    ("inspect.name='{}'", r"inspect\.name"),
    ("compare.name='{}'", r"compare\.name"),
]
# an empty band or run name means: derive it from the parameters
CASES = [(o, k, n) for o, k in NAMED for n in HOSTILE if n or not o.startswith(("train", "select"))]


@pytest.mark.parametrize(("override", "key", "name"), CASES)
def test_a_name_that_could_leave_out_dir_is_refused(config, override, key, name):
    with pytest.raises(ConfigError, match=rf"{key}: must be a plain name"):
        load_config(config, [override.format(name)])


def test_deletes_stay_strictly_inside_out_dir(tmp_path):
    out = tmp_path / "out"
    (out / "selected" / "band").mkdir(parents=True)
    outside = tmp_path / "precious"
    outside.mkdir()
    (out / "selected" / "link").symlink_to(outside)
    layout = Layout(out)
    for path in (
        out,
        tmp_path,
        outside,
        out / "..",
        out / "selected" / ".." / "..",
        out / "selected" / "link",
    ):
        with pytest.raises(ValueError, match="refusing to delete"):
            layout.remove(path)
    assert outside.is_dir() and out.is_dir()
    layout.remove(out / "selected" / "band")
    assert not (out / "selected" / "band").exists()
    with pytest.raises(ValueError, match="not a plain name"):
        layout.band("..")


def test_a_second_run_of_a_stage_stops_naming_the_holder(config, tmp_path):
    layout = Layout(tmp_path / "out")
    with stage_lock(layout, "score"):
        process = midrank("score", "--config", str(config))
        output = process.stdout.read()
        assert process.wait() == 2, output
        assert f"another `score` run holds {layout.lock('score')} (pid {os.getpid()} on" in output
        assert output.strip().count("\n") == 0, output  # one line
        with pytest.raises(LockedError):  # in-process too
            score.run(load_config(config))
    assert not layout.score_shard(0).exists()  # the second run did nothing


def test_two_concurrent_score_runs_lose_nothing(config, tmp_path):
    """The issue's failure: two scorers on one out_dir. The second stops at once; the first scores
    every row."""
    layout = Layout(tmp_path / "out")
    first = midrank("score", "--config", str(config), "score.window_rows=2")
    deadline = time.time() + 60
    while not (layout.lock("score").is_file() and layout.lock("score").read_text().strip()):
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline
        time.sleep(0.01)
    second = midrank("score", "--config", str(config), "score.window_rows=2")
    second_output = second.stdout.read()
    assert second.wait() == 2 and "another `score` run holds" in second_output, second_output
    assert first.wait() == 0, first.stdout.read()
    scores = pl.read_parquet(layout.scores_dir / "part-*.parquet")
    assert scores.height == 40 and scores["sample_id"].n_unique() == 40


def test_a_lock_left_by_a_killed_run_is_reported_and_taken(config, tmp_path, caplog):
    layout = Layout(tmp_path / "out")
    layout.lock("score").parent.mkdir(parents=True)
    dead = {"host": "elsewhere", "pid": 999999, "started": 0, "argv": ["midrank", "score"]}
    layout.lock("score").write_text(json.dumps(dead))  # recorded, but nobody holds the flock
    with caplog.at_level("WARNING", logger="midrank"):
        score.run(load_config(config))
    assert "pid 999999 on elsewhere" in caplog.text and "ended without releasing its lock" in caplog.text
    assert layout.lock("score").read_text() == ""  # a clean end leaves an empty record
    assert pl.read_parquet(layout.scores_dir / "part-*.parquet").height == 40


@pytest.fixture
def scored(config, tmp_path):
    score.run(load_config(config))
    return config, tmp_path / "corpus.jsonl"


def edit_texts(corpus, change):
    rows = [json.loads(line) for line in corpus.open()]
    corpus.write_text("".join(json.dumps(change(i, r)) + "\n" for i, r in enumerate(rows)))


def test_a_corpus_edited_after_scoring_is_refused(scored):
    config, corpus = scored
    edit_texts(corpus, lambda i, r: r | {"text": r["text"][::-1]} if i == 4 else r)  # same rows, same size
    with pytest.raises(
        ProvenanceError,
        match=r"the corpus changed since it was scored \(.*corpus\.jsonl: fingerprint changed\)",
    ):
        select.run(load_config(config))
    process = midrank("select", "--config", str(config))
    output = process.stdout.read()
    assert process.wait() == 2 and output.count("\n") == 1 and "corpus changed" in output, output


def test_rows_appended_after_scoring_are_refused_not_a_key_error(scored):
    config, corpus = scored
    with corpus.open("a") as fh:
        fh.write(json.dumps({"text": "a new document", "source": "prose"}) + "\n")
    with pytest.raises(ProvenanceError, match=r"corpus\.jsonl: num_rows and fingerprint changed"):
        select.run(load_config(config))


def test_an_edit_the_fingerprint_misses_is_caught_row_by_row(scored, monkeypatch):
    """An edit outside the fingerprint's samples keeps the plan; the stored n_chars still catch it."""
    config, corpus = scored
    plan_files = {"fingerprints": None}

    def same_fingerprint(f):
        return plan_files["fingerprints"]

    edit_texts(corpus, lambda i, r: r | {"text": r["text"] + "!"} if i == 7 else r)
    import pipeline.sharding

    monkeypatch.setattr(pipeline.sharding, "fingerprint", same_fingerprint)
    cfg = load_config(config, ["select.bands=[{strategy: all}]"])
    # the scores were made with the real fingerprint: make the check pass by matching the saved plan
    saved = json.loads(Layout(cfg.out_dir).score_plan.read_text())
    plan_files["fingerprints"] = saved["files"][0]["fingerprint"]
    with pytest.raises(
        ProvenanceError, match=r"corpus\.jsonl:7: the corpus record is .* characters, scored with"
    ):
        select.run(cfg)


def test_rechecking_a_finished_score_set_writes_nothing(scored, tmp_path, monkeypatch):
    """So a finished score set on a read-only disk can be re-checked: the rerun changes no file,
    and where the lock cannot be created (a read-only disk), it runs without one."""
    config, _ = scored
    out = tmp_path / "out"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and ".locks" not in p.parts}
    score.run(load_config(config))
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and ".locks" not in p.parts}
    assert after == before

    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    score.run(load_config(config))  # no lock, no write, no error
