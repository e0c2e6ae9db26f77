"""The `midrank` command, run as a user would (a real subprocess)."""

import json
import subprocess
import sys


def midrank(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "stages.cli", *args], capture_output=True, text=True, cwd=cwd, check=False
    )


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
