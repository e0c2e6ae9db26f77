"""Stage one end to end: real Parquet, resumption after SIGKILL, torchrun ranks, provenance."""

import json
import shutil
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.artifacts import ProvenanceError
from pipeline.config import load_config
from pipeline.layout import MARKER
from pipeline.scores import PROVENANCE_KEY, STATS_KEY
from stages import score
from tests.helpers import make_texts, midrank, torchrun, write_config, write_corpus


def read_scores(out: Path) -> list[dict]:
    rows = [r for p in sorted((out / "scores").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=lambda r: r["sample_id"])


def config_in(directory: Path, corpus: Path, model: Path, extra: str = "") -> Path:
    directory.mkdir()
    return write_config(directory, corpus, model, extra)


def assert_same_scores(got: list[dict], expected: list[dict]) -> None:
    assert [r["sample_id"] for r in got] == [r["sample_id"] for r in expected]  # none missing, none twice
    for a, b in zip(got, expected, strict=True):
        assert a["nll_sum"] == pytest.approx(b["nll_sum"], abs=1e-6)
        assert {k: v for k, v in a.items() if k not in ("nll_sum", "loss", "max_token_nll")} == {
            k: v for k, v in b.items() if k not in ("nll_sum", "loss", "max_token_nll")
        }


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl", make_texts(40, seed=7))


def test_scores_match_an_independent_computation(tmp_path, corpus, tiny_model_dir):
    cfg = load_config(write_config(tmp_path, corpus, tiny_model_dir))
    scores_dir = score.run(cfg)
    rows = read_scores(tmp_path / "out")
    assert [r["sample_id"] for r in rows] == sorted(f"corpus.jsonl:{i}" for i in range(40))

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [json.loads(line) for line in corpus.open()]
    for row in rows:
        doc = texts[int(row["sample_id"].split(":")[1])]
        ids = [tokenizer.bos_token_id, *tokenizer(doc["text"], add_special_tokens=False).input_ids][:64]
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        assert row["n_tokens"] == len(ids) - 1
        assert row["nll_sum"] == pytest.approx(nll, abs=1e-4 * row["n_tokens"])
        assert row["loss"] == pytest.approx(row["nll_sum"] / row["n_tokens"])
        assert row["source"] == doc["source"] and row["n_chars"] == len(doc["text"])
        assert row["truncated"] == (len(ids) == 64 and len(tokenizer(doc["text"]).input_ids) > 63)

    provenance = json.loads(pq.read_schema(scores_dir / "part-00000.parquet").metadata[PROVENANCE_KEY])
    assert provenance["key"]["max_tokens"] == 64 and provenance["key"]["dtype"] == "float32"
    assert len(provenance["key"]["weights_sha256"]) == 64
    summary = json.loads((scores_dir / "summary.json").read_text())
    assert summary["rows"] == summary["records"] == summary["samples"] == 40
    assert summary["tokens"] == sum(r["n_tokens"] for r in rows)
    assert (scores_dir / "config.yaml").is_file()
    assert [p.name for p in scores_dir.glob(".*")] == [MARKER]  # no checkpoint or temporary left


def test_rerun_does_nothing_and_changed_policy_is_refused(tmp_path, corpus, tiny_model_dir, caplog):
    config = write_config(tmp_path, corpus, tiny_model_dir)
    scores_dir = score.run(load_config(config))
    before = {p: p.stat().st_mtime_ns for p in scores_dir.glob("part-*.parquet")}
    score.run(load_config(config))
    assert before == {p: p.stat().st_mtime_ns for p in scores_dir.glob("part-*.parquet")}
    with pytest.raises(ProvenanceError, match=r"max_tokens: 64 != 32"):
        score.run(load_config(config, ["score.max_tokens=32"]))
    with pytest.raises(
        ProvenanceError, match=r"holds scores of another corpus \(corpus\.num_shards: 3 -> 5\)"
    ):
        score.run(load_config(config, ["corpus.num_shards=5"]))


def test_bad_rows_and_short_samples_are_counted(tmp_path, tiny_model_dir):
    corpus = tmp_path / "c.jsonl"
    lines = [
        '{"text": "fine text here", "source": "a"}',
        "{broken",
        '{"text": "", "source": "a"}',
        '{"text": "x", "source": "a"}',
    ]
    corpus.write_text("\n".join(lines) + "\n")
    config = write_config(tmp_path, corpus, tiny_model_dir, extra="  add_bos: false\n")
    scores_dir = score.run(load_config(config, ["corpus.on_error=skip"]))
    summary = json.loads((scores_dir / "summary.json").read_text())
    assert summary["skipped"] == {"malformed_json": 1, "empty_text": 1, "too_short": 1}
    assert summary["rows"] == 4 and summary["samples"] == 1


def test_non_finite_losses_are_reported_not_written(tmp_path, corpus, tiny_model_dir):
    broken = Path(shutil.copytree(tiny_model_dir, tmp_path / "broken"))
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][:] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    scores_dir = score.run(load_config(write_config(tmp_path, corpus, broken)))
    summary = json.loads((scores_dir / "summary.json").read_text())
    assert summary["samples"] == 0 and summary["skipped"] == {"non_finite": 40}
    assert read_scores(tmp_path / "out") == []


def test_split_long_docs_windows_in_scores(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "long.jsonl", [" ".join(["the cat sat"] * 80), "short one"])
    scores_dir = score.run(
        load_config(write_config(tmp_path, corpus, tiny_model_dir), ["score.long_docs=split"])
    )
    rows = read_scores(tmp_path / "out")
    long_rows = [r for r in rows if r["sample_id"].startswith("long.jsonl:0#")]
    assert len(long_rows) > 2 and [r["window"] for r in sorted(long_rows, key=lambda r: r["window"])] == list(
        range(len(long_rows))
    )
    key = json.loads(pq.read_schema(scores_dir / "part-00000.parquet").metadata[PROVENANCE_KEY])["key"]
    assert key["long_docs"] == "split" and key["split_context_tokens"] == 64 // 4  # the default: a quarter


def kill_when(process, scores_dir: Path, condition, timeout=120) -> str:
    deadline = time.time() + timeout
    while not condition(scores_dir):
        assert process.poll() is None, f"finished before the kill point:\n{process.stdout.read()}"
        assert time.time() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    return process.stdout.read()


def chunks(scores_dir: Path) -> int:
    return len(list(scores_dir.glob(".part-*.chunks/chunk-*.parquet")))


@pytest.mark.slow  # real processes: SIGKILL / torchrun
def test_sigkill_at_several_points_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_texts(300, seed=11))
    extra = "  window_rows: 4\n  num_workers: 1\n"
    reference_config = config_in(tmp_path / "ref", corpus, tiny_model_dir, extra)
    reference = midrank("score", "--config", str(reference_config))
    assert reference.wait() == 0, reference.stdout.read()
    expected = read_scores(tmp_path / "ref" / "out")
    assert len(expected) == 300

    config = config_in(tmp_path / "run", corpus, tiny_model_dir, extra)
    scores_dir = tmp_path / "run" / "out" / "scores"
    kill_points = [
        lambda d: chunks(d) >= 1,  # inside the first shard
        lambda d: chunks(d) >= 12,  # further into a shard, after a resume
        lambda d: (d / "part-00000.parquet").is_file() and chunks(d) >= 3,  # a later shard
    ]
    outputs = [kill_when(midrank("score", "--config", str(config)), scores_dir, c) for c in kill_points]
    final = midrank("score", "--config", str(config))
    outputs.append(final.stdout.read())
    assert final.wait() == 0, outputs[-1]
    # the later runs picked up checkpoints (which run does depends on where the kills landed)
    assert any("resuming after row" in out for out in outputs[1:])
    assert_same_scores(read_scores(tmp_path / "run" / "out"), expected)
    summary = json.loads((scores_dir / "summary.json").read_text())
    assert summary["rows"] == summary["samples"] == 300


@pytest.mark.slow  # real processes: SIGKILL / torchrun
def test_torchrun_two_ranks_equal_one_rank(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_texts(60, seed=5))
    one = config_in(tmp_path / "one", corpus, tiny_model_dir)
    two = config_in(tmp_path / "two", corpus, tiny_model_dir)
    single = midrank("score", "--config", str(one))
    assert single.wait() == 0, single.stdout.read()
    result = torchrun("score", "--config", str(two))
    assert result.returncode == 0, result.stdout + result.stderr
    parts = sorted((tmp_path / "two" / "out" / "scores").glob("part-*.parquet"))
    assert len(parts) == 3
    stats = [json.loads(pq.read_schema(p).metadata[STATS_KEY]) for p in parts]
    assert sum(s["rows"] for s in stats) == 60
    assert_same_scores(read_scores(tmp_path / "two" / "out"), read_scores(tmp_path / "one" / "out"))
