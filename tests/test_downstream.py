"""Downstream tasks: lm-evaluation-harness on a local task gives the accuracy a plain forward pass
gives; the embedded task builder keeps its documents out of the training corpus."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data import build_tasks
from pipeline.downstream import evaluate_tasks


def write_task(path, items):
    with path.open("w") as fh:
        for question, choices, label in items:
            fh.write(json.dumps({"question": question, "choices": choices, "label": label}) + "\n")
    return path


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context): the two encoded apart and joined, one forward pass."""
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    cont = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logprobs[len(ctx) - 1 + i, token].item() for i, token in enumerate(cont))


def test_lm_eval_accuracy_equals_an_independent_log_likelihood_computation(tmp_path, tiny_model_dir):
    items = [
        ("The sum of two and two", ["four", "a purple elephant", "x", "seventeen thousand"], 0),
        ("Which command lists files?", ["ls", "grep -r pattern", "cat", "rm -rf"], 0),
        ("A fortune ends with", ["a smile.", "tomorrow, maybe never", "?", "the end of all things"], 2),
        ("def f(x): return", ["x + 1", "None", "import os", "while True: pass"], 1),
        ("The Jargon File defines hacker as", ["a person", "someone who enjoys", "a b", "cd"], 3),
        ("Debian is", ["an operating system", "a fish", "blue", "the letter q"], 0),
    ]
    task = write_task(tmp_path / "tiny_task.jsonl", items)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    scores = evaluate_tasks(model, tokenizer, local=[task], batch_size=4)

    expected = []
    for question, choices, label in items:
        # lm-eval's acc_norm: the choice with the highest log-likelihood per character wins
        per_char = [
            continuation_logprob(model, tokenizer, f"{question}\nAnswer:", f" {c}") / len(c) for c in choices
        ]
        expected.append(float(max(range(len(choices)), key=per_char.__getitem__) == label))
    assert scores["tiny_task"].items == expected
    assert scores["tiny_task"].accuracy == sum(expected) / len(expected)
    # the continuous measure: the correct choice's NLL, and its length in characters
    nll = [-continuation_logprob(model, tokenizer, f"{q}\nAnswer:", f" {c[label]}") for q, c, label in items]
    assert scores["tiny_task"].nll == pytest.approx(nll, abs=1e-4)
    assert scores["tiny_task"].chars == [len(c[label]) for _, c, label in items]


def corpus_with(folder, origins_by_file):
    folder.mkdir(parents=True, exist_ok=True)
    for name, origins in origins_by_file.items():
        with (folder / name).open("w") as fh:
            for origin in origins:
                fh.write(json.dumps({"text": "x", "source": origin.split("/")[0], "origin": origin}) + "\n")
    return folder


def test_task_documents_are_never_in_the_training_corpus(tmp_path):
    # what the builder picks with almost nothing excluded
    first = build_tasks.build(
        corpus_with(tmp_path / "c1", {"train.jsonl": ["none/0"]}), tmp_path / "t1", items=12
    )
    picked = {
        json.loads(line)["origin"]
        for name in first["tasks"]
        for line in (tmp_path / "t1" / f"{name}.jsonl").open()
    }
    assert len(picked) == 36
    # a corpus that holds those very documents, spread over its train, held-out and OOD files
    picked_list = sorted(picked)
    corpus = corpus_with(
        tmp_path / "c2",
        {"train.jsonl": picked_list[::3], "heldout.jsonl": picked_list[1::3], "ood.jsonl": picked_list[2::3]},
    )
    second = build_tasks.build(corpus, tmp_path / "t2", items=12)
    rebuilt = {
        json.loads(line)["origin"]
        for name in second["tasks"]
        for line in (tmp_path / "t2" / f"{name}.jsonl").open()
    }
    assert len(rebuilt) == 36 and not rebuilt & picked
    for name in second["tasks"]:
        rows = [json.loads(line) for line in (tmp_path / "t2" / f"{name}.jsonl").open()]
        assert all(len(r["choices"]) == 4 and r["choices"][r["label"]] for r in rows)


def test_task_questions_do_not_name_their_answers(tmp_path):
    manifest = build_tasks.build(
        corpus_with(tmp_path / "c", {"train.jsonl": ["none/0"]}), tmp_path / "t", items=60
    )
    for name in ("man_command", "jargon_term"):
        assert name in manifest["tasks"]
        for line in (tmp_path / "t" / f"{name}.jsonl").open():
            row = json.loads(line)
            answer = row["choices"][row["label"]].lower()
            words = set(re.findall(r"[a-z0-9]+", row["question"].lower()))
            parts = [p for p in re.findall(r"[a-z0-9]+", answer) if len(p) >= 4]
            assert not words & {*parts, re.sub(r"[^a-z0-9]", "", answer)}, (name, answer, row["question"])
            # nor a word sharing its first four letters with a word of the answer (the text after
            # the task's own prompt)
            text = row["question"].split("? ", 1)[1].lower()
            prefixes = {p[:4] for p in re.split(r"[-_. ]", answer) if len(p) >= 4}
            assert not any(w[:4] in prefixes for w in re.findall(r"\w{4,}", text)), (answer, text)


def test_masking_hides_the_answers_stem_not_only_the_whole_word():
    question = build_tasks.masked("Print the group memberships of a user; see also groupadd.", "groups")
    assert "group" not in question.lower() and question.count("___") == 2
    assert "Itan" not in build_tasks.masked("The Itanium was late.", "Itanic")
    # a short answer is masked as a whole word only: `cat` stays inside `concatenate`
    assert build_tasks.masked("cat: concatenate files", "cat") == "___: concatenate files"
    assert build_tasks.leaks("members of groupings", "groups") and not build_tasks.leaks(
        "a ___ list", "groups"
    )
    # a shorter word sharing the answer's first four letters, either way round, leaks too
    assert build_tasks.leaks("a hack; see also hackitude", "hackishness")
    assert build_tasks.leaks("create a temporary file", "tempfile")
    assert not build_tasks.leaks("create a file", "tempfile")
