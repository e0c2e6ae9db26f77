"""The compare experiment on the tiny model: every arm trains exactly the same target tokens, the
length-matched control has MidRanking's lengths, every number in results.json is what an
independent computation from the saved models gives, and reruns reuse what is finished."""

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import compare_arms
from pipeline.config import load_config
from stages import compare
from tests.helpers import make_texts, write_config, write_corpus

ARMS = ["random", "random_length_matched", "random_matched", "midranking", "irdro"]


def document_nll(model_dir: Path, path: Path, max_tokens: int) -> list[tuple[float, int]]:
    """Per text of a JSONL file: summed NLL of (BOS + text)[:max_tokens], one plain forward pass."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for line in path.open():
        ids = [
            tokenizer.bos_token_id,
            *tokenizer(json.loads(line)["text"], add_special_tokens=False).input_ids,
        ]
        ids = ids[:max_tokens]
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        out.append((F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item(), len(ids) - 1))
    return out


def write_task(path: Path, n: int) -> Path:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    with path.open("w") as fh:
        for i in range(n):
            choices = [words[(i + k) % 8] for k in range(4)]
            fh.write(
                json.dumps(
                    {
                        "question": f"Item {i}: the word is {choices[i % 4]}.",
                        "choices": choices,
                        "label": i % 4,
                    }
                )
                + "\n"
            )
    return path


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("compare")
    corpus = write_corpus(tmp / "corpus.jsonl", make_texts(120, seed=31))
    heldout = write_corpus(tmp / "heldout.jsonl", make_texts(12, seed=32))
    ood = write_corpus(tmp / "ood.jsonl", make_texts(8, seed=33))
    task = write_task(tmp / "words.jsonl", 10)
    cfg = load_config(
        write_config(tmp, corpus, tiny_model_dir),
        [
            f"train.eval_paths=[{heldout}]",
            "train.eval_max_tokens=48",
            "train.learning_rate=0.001",
            "train.warmup_steps=0",
            "train.precision=fp32",
            f"compare.arms=[{', '.join(ARMS)}]",
            "compare.seeds=[0, 1]",
            "compare.keep=0.3",
            "compare.tokens_per_step=128",
            f"compare.ood_paths=[{ood}]",
            f"compare.tasks=[{task}]",
            "compare.eval_dtype=float32",
            "compare.primary=midranking",
        ],
    )
    report = compare.run(cfg)
    return cfg, report, json.loads((report / "results.json").read_text()), (heldout, ood)


def test_every_arm_trains_exactly_the_same_target_tokens_and_steps(compared):
    _cfg, _, results, _ = compared
    budget = results["token_budget"]
    smallest = min(row["set_tokens"] for row in results["training"])
    # one pass over the smallest set, in whole steps of 128
    assert budget == math.floor(smallest / 128) * 128 and budget > 0
    assert len(results["runs"]) == len(ARMS) * 2
    for run in results["runs"]:
        assert run["train"]["trained_tokens"] == budget, run["arm"]
        assert run["train"]["steps"] == budget // 128, run["arm"]
        # one pass at most: no target token trained twice, in any arm
        assert run["train"]["distinct_tokens"] == budget, run["arm"]
    # and the sets differ: the arms did not train on the same samples (irdro: a draw of its own)
    # every run of a random-type arm is its own draw; midranking's band is one for both seeds
    assert len({run["band"] for run in results["runs"]}) == (len(ARMS) - 1) * 2 + 1
    for row in results["training"]:
        assert row["positions"] >= row["trained_tokens"] and row["attention"] >= row["positions"]
        assert 0 < row["effective_samples"] <= row["batch_samples"]


def kept_lengths(out_dir: Path, band: str) -> np.ndarray:
    kept = pl.read_parquet(out_dir / "selected" / band / "*.parquet")
    scores = pl.read_parquet(out_dir / "scores" / "*.parquet")
    return scores.join(kept.select("sample_id"), on="sample_id")["n_tokens"].to_numpy()


def test_length_matched_arm_has_midrankings_length_histogram(compared):
    cfg, _, results, _ = compared
    runs = {(r["arm"], r["seed"]): r for r in results["runs"]}
    out = Path(cfg.out_dir)
    mid = np.sort(kept_lengths(out, runs[("midranking", 0)]["band"]))
    for seed in (0, 1):
        matched = np.sort(kept_lengths(out, runs[("random_length_matched", seed)]["band"]))
        assert len(matched) == len(mid)
        # histograms on bins of the test's own (every 8 tokens): equal within one sample per bin
        # where the selection's log-spaced bins are wider
        bins = np.arange(0, 72, 8)
        assert np.abs(np.histogram(matched, bins)[0] - np.histogram(mid, bins)[0]).sum() <= len(mid) * 0.25
        assert abs(matched.sum() - mid.sum()) <= 0.1 * mid.sum()
    random = np.sort(kept_lengths(out, runs[("random", 0)]["band"]))
    assert not np.array_equal(random, mid)


def test_results_equal_a_direct_evaluation_of_the_saved_models(compared, tiny_model_dir):
    _cfg, _, results, (heldout, ood) = compared
    metrics = {(m["arm"], m["versus"], m["metric"]): m for m in results["metrics"]}
    runs = {(r["arm"], r["seed"]): Path(r["run_dir"]) / "model" for r in results["runs"]}

    def loss(model_dir, path):
        rows = document_nll(model_dir, path, 48)
        return sum(n for n, _ in rows) / sum(t for _, t in rows), rows

    for path, metric in ((heldout, "heldout loss"), (ood, "ood loss")):
        base, _ = loss(tiny_model_dir, path)
        mid = [loss(runs[("midranking", s)], path) for s in (0, 1)]
        ref = [loss(runs[("random", s)], path) for s in (0, 1)]
        row = metrics[("midranking", "random", metric)]
        assert row["start"] == pytest.approx(base, abs=1e-5)
        assert row["change"] == pytest.approx((mid[0][0] + mid[1][0]) / 2 - base, abs=1e-5)
        assert row["estimate"]["mean"] == pytest.approx(
            np.mean([m[0] for m in mid]) - np.mean([r[0] for r in ref]), abs=1e-5
        )
        assert row["estimate"]["items"] == len(ref[0][1]) and row["estimate"]["seeds"] == [2, 2]
        assert row["low"] < row["estimate"]["mean"] < row["high"]
    assert metrics[("midranking", "random", "heldout loss")]["role"] == "primary"
    assert metrics[("random", "", "heldout loss")]["estimate"] is None
    # MidRanking against each control matched to it, as well as against random
    assert ("midranking", "random_matched", "heldout loss") in metrics
    assert ("midranking", "random_length_matched", "heldout loss") in metrics
    tested = {m["metric"] for m in results["metrics"] if m["role"] == "secondary"}
    assert tested == {"heldout loss", "heldout loss by source", "ood loss", "task words loss"}
    assert results["eval_dtype"] == "float32"


def test_random_type_arms_are_independent_draws():
    """At one seed, random and its controls draw their samples independently: two 20% samples
    share ~20% of their samples, as chance gives, not the same sample twice."""
    from pipeline.selection import band_for, length_matched, select

    rng = np.random.default_rng(0)
    n = 20000
    scores = pl.LazyFrame(
        {
            "sample_id": [f"corpus.jsonl:{i}" for i in range(n)],
            "n_tokens": rng.integers(5, 300, size=n).astype(np.int32),
            "loss": rng.normal(3, 1, size=n),
            "source": rng.choice(["a", "b", "c"], size=n),
        }
    )
    cfg = load_config(Path(__file__).parents[1] / "configs/tiny.yaml", ["compare.keep=0.2"])

    def kept(frame) -> set[str]:
        return set(frame.filter(pl.col("kept")).collect()["sample_id"].to_list())

    def random_draw(arm: str) -> set[str]:
        band, _ = compare_arms.arm_setup(cfg, arm, 0)
        return kept(select(scores, band_for("random", keep=0.2), seed=band.seed))

    draws = {arm: random_draw(arm) for arm in ("random", "random_replicate", "irdro")}
    # the matched controls, matched here to random's own sample: the case where one stream would
    # give back random's sample itself
    reference = scores.filter(pl.col("sample_id").is_in(list(draws["random"]))).collect()
    for arm in ("random_length_matched", "random_matched"):
        band, _ = compare_arms.arm_setup(cfg, arm, 0)
        cells = ["n_tokens", "source"] if band.by_source else ["n_tokens"]
        counts = reference.group_by(cells).agg(samples=pl.len())
        draws[arm] = kept(length_matched(scores, counts, band.seed, by_source=band.by_source)[0])
    for arm, sample in draws.items():
        if arm != "random":
            share = len(sample & draws["random"]) / len(sample)
            assert abs(share - 0.2) < 0.03, (arm, share)  # sd of the share: 0.006


def test_report_files_and_a_rerun_reuses_everything(compared):
    cfg, report, _, _ = compared
    table = (report / "table.md").read_text()
    for arm in ARMS:
        assert f"| {arm} |" in table
    assert "95% CI (seeds + items)" in table and "task words loss" in table and "(primary)" in table
    assert (report / "deltas.png").read_bytes()[:4] == b"\x89PNG"
    evals = sorted((report / "evals").glob("*.json"))
    assert len(evals) == 1 + len(ARMS) * 2  # the starting model once
    stamps = [p.stat().st_mtime_ns for p in evals]
    models = sorted(Path(cfg.out_dir).glob("train/*/model/model.safetensors"))
    model_stamps = [p.stat().st_mtime_ns for p in models]
    compare.run(cfg)
    assert [p.stat().st_mtime_ns for p in evals] == stamps
    assert [p.stat().st_mtime_ns for p in models] == model_stamps


def test_offline_irdro_and_peer_bands_are_arms_too(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_texts(80, seed=41))
    heldout = write_corpus(tmp_path / "heldout.jsonl", make_texts(6, seed=42))
    cfg = load_config(
        write_config(tmp_path, corpus, tiny_model_dir),
        [
            f"train.eval_paths=[{heldout}]",
            "train.precision=fp32",
            "compare.arms=[random, weighted, marion_middle, top, bottom]",
            "compare.keep=0.2",
            "compare.tokens_per_step=128",
        ],
    )
    text = (compare.run(cfg) / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))  # strict JSON
    runs = {r["arm"]: r for r in results["runs"]}
    assert runs["weighted"]["objective"] == "weighted" and runs["weighted"]["band"].endswith("-irdro1")
    assert runs["marion_middle"]["band"] == "marion_middle-samples"
    assert {r["train"]["trained_tokens"] for r in runs.values()} == {results["token_budget"]}
    # one seed: the run-to-run noise is unmeasured, so no interval and no verdict
    table = (Path(cfg.out_dir) / "reports" / "compare" / "table.md").read_text()
    assert "n/a (1 seed)" in table and "| better |" not in table and "| worse |" not in table
    assert "not assessed (1 seed)" in table
