"""The compare experiment on the tiny model: equal budgets, one run per arm and seed, a table."""

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import load_config
from stages import compare
from tests.helpers import make_texts, write_config, write_corpus


def heldout_loss(model_dir: Path, heldout: Path) -> float:
    """Token-weighted mean NLL of the held-out texts (BOS + text), one plain forward per text."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total, count = 0.0, 0
    for line in heldout.open():
        ids = [
            tokenizer.bos_token_id,
            *tokenizer(json.loads(line)["text"], add_special_tokens=False).input_ids,
        ]
        with torch.inference_mode():
            logits = model(torch.tensor([ids[:512]])).logits[0, :-1]
        total += F.cross_entropy(logits, torch.tensor(ids[1:512]), reduction="sum").item()
        count += len(ids[1:512])
    return total / count


def test_compare_trains_every_arm_and_seed_and_reports_mean_and_std(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_texts(60, seed=31))
    heldout = write_corpus(tmp_path / "heldout.jsonl", make_texts(12, seed=32))
    config = write_config(tmp_path, corpus, tiny_model_dir)
    cfg = load_config(
        config,
        [
            f"train.eval_paths=[{heldout}]",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.max_tokens=32",
            "train.learning_rate=0.001",
            "train.precision=fp32",
            "compare.arms=[random, midranking, irdro]",
            "compare.seeds=[0, 1]",
        ],
    )
    report = compare.run(cfg)
    base_loss = heldout_loss(tiny_model_dir, heldout)
    results = json.loads((report / "results.json").read_text())
    assert len(results["runs"]) == 6
    by_arm = {row["arm"]: row for row in results["arms"]}
    for arm, row in by_arm.items():
        runs = [r for r in results["runs"] if r["arm"] == arm]
        deltas = [
            r["metrics"]["after"]["overall"]["loss"] - r["metrics"]["before"]["overall"]["loss"] for r in runs
        ]
        assert row["delta"]["overall"][0] == pytest.approx(statistics.fmean(deltas))
        assert row["delta"]["overall"][1] == pytest.approx(np.std(deltas, ddof=1))
        # "before" is the starting model's held-out loss and "after" the trained model's, each
        # checked against a plain forward pass over the held-out texts
        for r in runs:
            assert r["metrics"]["before"]["overall"]["loss"] == pytest.approx(base_loss, abs=1e-4)
            after = heldout_loss(Path(r["run_dir"]) / "model", heldout)
            assert r["metrics"]["after"]["overall"]["loss"] == pytest.approx(after, abs=1e-4)
            assert after != pytest.approx(base_loss, abs=1e-3)  # it did train
    random_runs = [r for r in results["runs"] if r["arm"] == "random"]
    assert random_runs[0]["band"] != random_runs[1]["band"]  # the random sample changes with the seed
    assert by_arm["random"]["band"] == "random-k0.5-seed*-tokens"
    assert by_arm["irdro"]["objective"] == "irdro" and by_arm["midranking"]["objective"] == "uniform"
    total = json.loads(
        (tmp_path / "out" / "selected" / "midranking-s0.1-k0.5-tokens" / "manifest.json").read_text()
    )["tokens"]["in"]
    for r in results["runs"]:  # equal token budgets, within one sample
        assert abs(r["kept_tokens"] - total / 2) <= 64
    table = (report / "table.md").read_text()
    assert "| midranking |" in table and "±" in table
    assert (report / "deltas.png").read_bytes()[:4] == b"\x89PNG"
