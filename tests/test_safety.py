"""Nothing lost, nothing escapes: names that cannot leave out_dir, deletes confined to it, one run
of a stage per out_dir at a time."""

import contextlib
import errno
import json
import os
import signal
import time
from pathlib import Path

import polars as pl
import psutil
import pytest

from pipeline.artifacts import ProvenanceError
from pipeline.config import ConfigError, load_config
from pipeline.layout import MARKER, Layout
from pipeline.locks import lock
from stages import score, select
from tests.helpers import make_texts, midrank, torchrun_process, write_config, write_corpus

HOSTILE = ["..", ".", "../../X", "a/b", ".hidden", "", "x" * 129, "band name", "é"]


@pytest.fixture
def config(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_texts(40, seed=5))
    return write_config(tmp_path, corpus, tiny_model_dir)


@pytest.fixture
def slow_config(tmp_path, tiny_model_dir):
    """Enough rows, checkpointed one by one, that a run is still scoring when the next starts."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_texts(600, seed=5))
    config = write_config(tmp_path, corpus, tiny_model_dir)
    config.write_text(config.read_text().replace("window_rows: 8", "window_rows: 1"))
    return config


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
    with pytest.raises(ValueError, match="midrank did not make it"):  # no marker: not midrank's
        layout.remove(out / "selected" / "band")
    (out / "selected" / "band" / MARKER).write_text("")
    layout.remove(out / "selected" / "band")
    assert not (out / "selected" / "band").exists()
    with pytest.raises(ValueError, match="not a plain name"):
        layout.band("..")


def test_a_second_run_stops_naming_the_holder(config, tmp_path):
    layout = Layout(tmp_path / "out")
    with lock(layout, "score-shard-00001"):
        process = midrank("score", "--config", str(config))
        output = process.stdout.read()
        assert process.wait() == 2, output
        assert f"another run holds {layout.lock('score-shard-00001')} (pid {os.getpid()} on" in output
        assert output.strip().count("\n") == 0, output  # one line, before the model loaded
    assert not layout.score_shard(0).exists()  # the second run did nothing


def wait_until_a_shard_is_locked(
    layout: Layout, process, scoring: bool = False, timeout: float = 120
) -> None:
    """Until a shard's lock records a holder; `scoring`: and a checkpoint is written under it. A
    record alone may be score's brief check of every lock at its start (check_free), let go
    again while the model loads."""
    deadline = time.time() + timeout
    while not (
        any(p.read_text().strip() for p in layout.out_dir.glob(".locks/score-shard-*.lock"))
        and (not scoring or any(layout.out_dir.glob("scores/.part-*.chunks/chunk-*.parquet")))
    ):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline
        time.sleep(0.01)


def stop_while_scoring_a_shard(layout: Layout, running) -> list[psutil.Process]:
    """Stops `running` and its children at a moment one of them holds the lock of a shard it has
    not finished: not between two shards, nor once a shard's file is in place but its lock's record
    not yet emptied (a rerun would not lock a finished shard again). Returns the stopped processes."""
    while True:
        wait_until_a_shard_is_locked(layout, running, scoring=True)
        stopped = stop_tree(running.pid)
        try:
            pids = {process.pid for process in stopped}
            for record in layout.out_dir.glob(".locks/score-shard-*.lock"):
                shard = int(record.stem.rsplit("-", 1)[1])
                text = record.read_text().strip()
                if text and json.loads(text)["pid"] in pids and not layout.score_shard(shard).exists():
                    return stopped
        except BaseException:
            signal_all(stopped, signal.SIGCONT)
            raise
        signal_all(stopped, signal.SIGCONT)


def stop_tree(pid: int, timeout: float = 30) -> list[psutil.Process]:
    """SIGSTOP to a process, then to its descendants, each waited for until it has stopped (a
    signal is not instant, and a child stopped in the middle of a fork leaves a new one), until no
    new one appears."""
    stopped = [psutil.Process(pid)]
    new = list(stopped)
    deadline = time.time() + timeout
    try:
        while new:
            for process in new:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.suspend()
            for process in new:
                with contextlib.suppress(psutil.NoSuchProcess):
                    while process.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
                        assert time.time() < deadline, f"pid {process.pid} did not stop"
                        time.sleep(0.001)
            known = {process.pid for process in stopped}
            with contextlib.suppress(psutil.NoSuchProcess):
                new = [c for c in stopped[0].children(recursive=True) if c.pid not in known]
            stopped += new
    except BaseException:
        signal_all(stopped, signal.SIGCONT)
        raise
    return stopped


def signal_all(processes: list[psutil.Process], sig: int) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(sig)


@pytest.mark.slow  # real processes racing each other
@pytest.mark.parametrize("first", ["plain run", "torchrun job of 2 ranks"])
def test_a_second_score_run_stops_and_the_first_loses_nothing(slow_config, tmp_path, first):
    """The issue's failure: two scorers on one out_dir. The ranks of one job score different
    shards, so their shard locks never meet; a second run needs every shard, meets one of the
    first's and stops at once, and the first scores every row."""
    layout = Layout(tmp_path / "out")
    if first == "plain run":
        running = midrank("score", "--config", str(slow_config))
    else:
        running = torchrun_process("score", "--config", str(slow_config), nproc=2)
    # the first run (torchrun and its workers, each in a session of its own) is paused while the
    # second starts, so that it cannot finish first on a busy machine: its locks stay held
    first = stop_while_scoring_a_shard(layout, running)
    try:
        second = midrank("score", "--config", str(slow_config), "model.cpu_allocator=system")
        second_output = second.stdout.read()
    finally:
        signal_all(first, signal.SIGCONT)
    assert second.wait() == 2 and "another run holds" in second_output, second_output
    assert running.wait() == 0, running.stdout.read()
    scores = pl.read_parquet(layout.scores_dir / "part-*.parquet")
    assert scores.height == 600 and scores["sample_id"].n_unique() == 600


def test_a_lock_left_by_a_killed_run_is_reported_and_taken(config, tmp_path):
    layout = Layout(tmp_path / "out")
    layout.lock("score-shard-00000").parent.mkdir(parents=True)
    dead = {"host": "elsewhere", "pid": 999999, "started": 0, "argv": ["midrank", "score"]}
    layout.lock("score-shard-00000").write_text(json.dumps(dead))  # recorded, but nobody holds it
    process = midrank("score", "--config", str(config))
    output = process.stdout.read()
    assert process.wait() == 0, output
    assert "pid 999999 on elsewhere" in output and "ended without releasing it" in output
    assert layout.lock("score-shard-00000").read_text() == ""  # a clean end leaves an empty record
    assert pl.read_parquet(layout.scores_dir / "part-*.parquet").height == 40


@pytest.mark.slow  # real processes racing each other
def test_a_killed_runs_dataloader_worker_does_not_hold_its_lock(config, tmp_path):
    """lockf is not inherited by forked children: the DataLoader worker of a killed run, still
    alive, holds nothing."""
    layout = Layout(tmp_path / "out")
    process = midrank("score", "--config", str(config), "score.num_workers=1", "score.window_rows=2")
    stopped = stop_while_scoring_a_shard(layout, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    workers = stopped[1:]  # kept stopped, so alive through the whole rerun
    try:
        rerun = midrank("score", "--config", str(config))
        output = rerun.stdout.read()
        assert rerun.wait() == 0 and "ended without releasing it" in output, output
        assert workers and all(worker.is_running() for worker in workers)
    finally:
        signal_all(workers, signal.SIGKILL)
        psutil.wait_procs(workers, timeout=30)


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
    """A same-length edit outside the fingerprint's samples (here: a fingerprint that sees nothing)
    keeps the plan; the record hash stored with each score still catches it."""
    config, corpus = scored
    plan_files = {"fingerprints": None}

    def same_fingerprint(f):
        return plan_files["fingerprints"]

    edit_texts(corpus, lambda i, r: r | {"text": r["text"][::-1]} if i == 7 else r)  # same length
    import pipeline.sharding

    monkeypatch.setattr(pipeline.sharding, "fingerprint", same_fingerprint)
    cfg = load_config(config, ["select.bands=[{strategy: all}]"])
    # the scores were made with the real fingerprint: make the check pass by matching the saved plan
    saved = json.loads(Layout(cfg.out_dir).score_plan.read_text())
    plan_files["fingerprints"] = saved["files"][0]["fingerprint"]
    with pytest.raises(
        ProvenanceError, match=r"corpus\.jsonl:7: the corpus record is not the one that was scored"
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


def test_a_write_that_fails_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """A full disk fails inside write(), where the OSError carries no file name."""
    from pipeline.artifacts import write_json_atomic

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left on device") as err:
        write_json_atomic(tmp_path / "summary.json", {"a": 1})
    assert err.value.filename == str(tmp_path / "summary.json") and list(tmp_path.iterdir()) == []


def test_a_symlink_that_leads_outside_out_dir_is_refused(config, tmp_path):
    out = tmp_path / "out"
    (out / "scores").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.tmp").write_text("precious")
    (out / "scores" / ".part-00000.chunks").symlink_to(elsewhere)
    process = midrank("score", "--config", str(config))
    output = process.stdout.read()
    errors = [line for line in output.splitlines() if line.startswith("[midrank] error:")]
    assert process.wait() == 2 and len(errors) == 1 and "leads outside" in errors[0], output
    assert "Traceback" not in output
    assert (elsewhere / "keep.tmp").read_text() == "precious"
