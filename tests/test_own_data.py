"""README's "your own corpus and model" snippet, run as written on a corpus and a model of the test's
own, from a directory that holds nothing else (a real shell, the real `midrank` command)."""

import re
import subprocess
import sys
from pathlib import Path

import polars as pl

from tests.helpers import ROOT, make_texts, write_corpus

MARKER = "<!-- own-data -->"


def own_data_snippet() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert MARKER in readme, f"README.md lost its {MARKER} snippet"
    block = re.search(r"```bash\n(.*?)```", readme.split(MARKER, 1)[1], re.S)
    assert block, f"no ```bash block after {MARKER}"
    return block.group(1)


def test_the_own_data_snippet_runs_as_written(tmp_path, tiny_model_dir):
    snippet = own_data_snippet()
    assert "my_corpus.jsonl" in snippet and "my_model" in snippet
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_texts(60, seed=3))
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])  # the user's `.venv/bin/midrank`
    script = snippet.replace("my_corpus.jsonl", str(corpus)).replace("my_model", str(tiny_model_dir))
    # the defaults a user gets, but a short run: the snippet's last line takes overrides like any
    script = script.rstrip("\n").splitlines()
    script[-1] = script[-1].split("#")[0] + " train.max_steps=4 train.batch_size=2"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "\n".join(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "midrank demo: done" in result.stdout
    out = tmp_path / "runs" / "mine"
    scored = pl.read_parquet(out / "scores" / "part-*.parquet")
    assert scored.height == 60
    assert (out / "reports" / "main" / "index.html").exists()
    band = "runs/mine/selected/midranking-s0.1-k0.5-samples/"  # where README says the band is
    assert band in (ROOT / "README.md").read_text(encoding="utf-8")
    assert (tmp_path / band / "manifest.json").exists()
    assert any((out / "train").glob("*/model"))
