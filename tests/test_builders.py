"""The embedded builders: deterministic corpus, and the tiny model the tests and tiny preset use."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data import build_corpus, build_noisy
from data.build_tiny import build_tiny_model
from data.junk import HIGH_LOSS_KINDS, KINDS, junk


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


def test_noisy_corpus_is_deterministic_and_its_labels_match_its_documents(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    real = [
        {"origin": f"doc/{i}", "source": ["man", "fortunes"][i % 2], "text": f"Document {i}. " * (1 + i % 9)}
        for i in range(85)
    ]
    (corpus / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in real))
    first = build_noisy.build(corpus, tmp_path / "a", share=0.15)
    build_noisy.build(corpus, tmp_path / "b", share=0.15)
    for name in ("train.jsonl", "labels.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").open()]
    labels = [json.loads(line) for line in (tmp_path / "a" / "labels.jsonl").open()]
    assert len(rows) == len(labels) == first["documents"] == 85 + 15  # 15 of 100 are junk
    assert all(set(row) == {"source", "text"} for row in rows)  # no label inside the corpus
    by_origin = {d["origin"]: d["text"] for d in real}
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        assert label["row"] == i and label["sample_id"] == f"train.jsonl:{i}"
        if label["kind"] == "real":
            assert row["text"] == by_origin[label["origin"]]
        else:
            assert label["kind"] in HIGH_LOSS_KINDS and label["origin"] is None
            assert row["text"] not in by_origin.values() and row["source"] in {"man", "fortunes"}
    assert sorted(label["origin"] for label in labels if label["origin"]) == sorted(by_origin)
    assert {k for k in first["kinds"] if k != "real"} <= set(HIGH_LOSS_KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_junk_kind_is_seeded_and_about_as_long_as_asked(kind):
    donor = "The quick brown fox jumps over the lazy dog near the riverbank.\n" * 30
    text = junk(kind, 600, donor, random.Random(3))
    assert text == junk(kind, 600, donor, random.Random(3)) and text.strip()
    assert 300 <= len(text) <= 1200, len(text)
