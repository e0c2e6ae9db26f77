"""The `midrank` command, run as a user would (a real subprocess)."""

import ctypes.util
import errno
import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from stages.cli import COMMANDS, one_line
from tests.helpers import ROOT, make_texts, write_config, write_corpus


def midrank(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "stages.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)], ids=lambda c: " ".join(c) or "top")
def test_help_runs_for_every_command(command):
    result = midrank(*command, "--help")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith("usage: midrank"), result.stdout


def test_config_prints_the_resolved_preset():
    result = midrank("config", "--config", "configs/tiny.yaml", "score.batch_tokens=4096")
    assert result.returncode == 0, result.stderr
    assert "batch_tokens: 4096" in result.stdout


def test_bad_override_exits_2_naming_the_key():
    result = midrank("config", "--config", "configs/tiny.yaml", "score.batch_tokn=4")
    assert result.returncode == 2
    assert "score.batch_tokn: unknown key" in result.stderr and "Traceback" not in result.stderr


def test_corpus_check_reports_counts_and_bad_rows(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n{oops\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"corpus:\n  paths: [{path}]\nmodel:\n  path: unused\n")
    result = midrank("corpus", "--config", str(config))
    assert result.returncode == 2 and "c.jsonl, line 2: malformed JSON" in result.stderr
    result = midrank("corpus", "--config", str(config), "corpus.on_error=skip")
    assert result.returncode == 0, result.stderr
    assert "2 rows -> 1 records; skipped: malformed_json=1" in result.stderr


def one_error_line(result) -> str:
    """The run failed as an expected error: exit 2, one line on stderr, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("[midrank] error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_texts(12, seed=3))
    return write_config(tmp_path, corpus, tiny_model_dir), tiny_model_dir


def test_yaml_errors_are_one_line(tmp_path, setup):
    config, _ = setup
    broken = tmp_path / "broken.yaml"
    broken.write_text("corpus:\n  paths: [a\nmodel: {path: m}\n")
    assert "broken.yaml: not valid YAML" in one_error_line(midrank("config", "--config", str(broken)))
    line = one_error_line(midrank("config", "--config", str(config), "score.batch_tokens=[1"))
    assert "score.batch_tokens: the value '[1' is not valid YAML" in line
    line = one_error_line(midrank("config", "--config", str(config), "corpus.paths=['']"))
    assert "corpus.paths: an entry is empty" in line


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer"),
        (lambda d: (d / "config.json").unlink(), "has no config.json"),
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
            "cannot be loaded",
        ),
    ],
)
def test_a_damaged_model_directory_is_one_line(tmp_path, setup, damage, message):
    config, model = setup
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    damage(broken)
    line = one_error_line(midrank("score", "--config", str(config), f"model.path={broken}"))
    assert f"model.path: '{broken}'" in line and message in line


def test_an_error_in_a_dataloader_worker_is_one_line(tmp_path, setup):
    config, _ = setup
    (tmp_path / "corpus.jsonl").open("a").write("{not json\n")
    line = one_error_line(midrank("score", "--config", str(config), "score.num_workers=1"))
    assert "corpus.jsonl, line 13: malformed JSON" in line and "Original Traceback" not in line


def test_an_unwritable_out_dir_and_an_empty_corpus_are_one_line(tmp_path, setup):
    config, _ = setup
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = one_error_line(midrank("score", "--config", str(config), f"out_dir={blocker}/out"))
    assert str(blocker) in line and "Not a directory" in line
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = one_error_line(midrank("score", "--config", str(config), f"corpus.paths=[{empty}]"))
    assert "hold no rows; nothing to score" in line
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/scores/part-00000.parquet")
    assert (
        one_line(full)
        == "/data/out/scores/part-00000.parquet: No space left on device; free some space, or use another out_dir"
    )


def test_debug_shows_the_traceback(setup):
    config, _ = setup
    result = midrank("score", "--debug", "--config", str(config), "model.path=/nonexistent")
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_score_on_the_cpu_reexecutes_itself_under_jemalloc(tmp_path, setup):
    """pipeline/cpu_memory.py: same scores under either malloc; `system` keeps glibc's."""
    config, _ = setup
    if not ctypes.util.find_library("jemalloc"):  # CI installs it, and fails on a skipped test
        pytest.skip("jemalloc is not installed: apt-get install libjemalloc2")
    runs = {}
    for allocator, expected in (("auto", "jemalloc"), ("system", "glibc")):
        out = tmp_path / allocator
        result = midrank(
            "score", "--config", str(config), f"out_dir={out}", f"model.cpu_allocator={allocator}"
        )
        assert result.returncode == 0, result.stderr
        assert f"malloc: {expected} (model.cpu_allocator={allocator})" in result.stderr
        parts = sorted((out / "scores").glob("part-*.parquet"))
        runs[allocator] = [n for part in parts for n in pq.read_table(part).column("nll_sum").to_pylist()]
    assert runs["auto"] == runs["system"] and len(runs["auto"]) == 12


def test_a_preload_that_did_not_load_is_a_warning(setup):
    """The loader only prints a message when it cannot use a preloaded library: score says which
    malloc it runs on, and warns when jemalloc was asked for in LD_PRELOAD and is not it."""
    config, _ = setup
    env = {**os.environ, "LD_PRELOAD": "libjemalloc-that-is-not-there.so"}
    result = midrank("score", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert "malloc: glibc" in result.stderr
    assert "jemalloc is in LD_PRELOAD but did not load: running on glibc's malloc" in result.stderr
