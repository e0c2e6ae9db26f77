"""The embedded builders: deterministic corpus, and the tiny model the tests and tiny preset use."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data import build_corpus
from data.build_tiny import build_tiny_model


def sources(*names):
    return tuple(s for s in build_corpus.SOURCES if s.name in names and s.present())


def test_corpus_build_is_deterministic_and_split(tmp_path):
    chosen = sources("python-code", "fortunes", "jargon")
    assert chosen, "the Python standard library is always there"
    a = build_corpus.build(tmp_path / "a", 20, 3000, chosen, install=False)
    build_corpus.build(tmp_path / "b", 20, 3000, chosen, install=False)
    for name in ("train.jsonl", "heldout.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").open()]
    heldout = [json.loads(line) for line in (tmp_path / "a" / "heldout.jsonl").open()]
    assert {d["origin"] for d in train}.isdisjoint(d["origin"] for d in heldout)
    for source in chosen:
        assert a["train"][source.name]["documents"] == 18 and a["heldout"][source.name]["documents"] == 2
    assert all(d["text"].strip() and len(d["text"]) <= 3000 for d in train)


def test_a_source_that_cannot_be_built_stops_the_build_unless_allowed(tmp_path):
    ghost = build_corpus.Source("ghost", ("ghost-doc",), lambda: False, lambda: iter(()))
    chosen = (*sources("python-code"), ghost)
    with pytest.raises(
        build_corpus.MissingSources, match=r"ghost: needs Debian package\(s\) ghost-doc"
    ) as err:
        build_corpus.build(tmp_path / "strict", 5, 3000, chosen, install=False)
    assert "apt-get install ghost-doc" in str(err.value) and not (tmp_path / "strict").exists()
    manifest = build_corpus.build(tmp_path / "lenient", 5, 3000, chosen, install=False, allow_missing=True)
    assert list(manifest["missing_sources"]) == ["ghost"]
    assert "ghost-doc" in manifest["missing_sources"]["ghost"] and set(manifest["train"]) == {"python-code"}


def test_tiny_model_builds_and_scores(tmp_path):
    texts = ["the cat sat on the mat. " * 20, "def f(x):\n    return x + 1\n" * 10]
    out = build_tiny_model(texts, tmp_path / "tiny", vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and tokenizer.bos_token_id is not None
    ids = torch.tensor([tokenizer("the cat sat on the mat.").input_ids])
    with torch.inference_mode():
        logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    # a random model is near-uniform over its vocabulary
    assert loss == pytest.approx(math.log(len(tokenizer)), abs=1.0)
    assert tokenizer.decode(tokenizer("héllo wörld").input_ids) == "héllo wörld"  # byte-level: lossless


def test_instruction_sample_is_labelled_chat_data(tmp_path):
    from data import build_instruct

    if len(sources("python-docs", "man")) < 2:  # .ci/run installs them and allows no skip
        pytest.skip("needs Debian's python3-doc, manpages and groff-base")
    build_instruct.build(tmp_path / "a", 30, install=False)
    build_instruct.build(tmp_path / "b", 30, install=False)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    train = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").open()]
    heldout = [json.loads(line) for line in (tmp_path / "a" / "heldout.jsonl").open()]
    assert {r["kind"] for r in train} <= {"ok", "mismatched", "truncated"} and {
        r["kind"] for r in heldout
    } == {"ok"}
    assert {r["origin"] for r in train}.isdisjoint(r["origin"] for r in heldout)
    for record in train:
        user, assistant = record["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant" and assistant["content"].strip()
        if record["kind"] == "truncated":
            assert 3 <= len(assistant["content"].split()) <= 6
