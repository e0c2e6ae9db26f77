"""Instruction data: formats, response-only targets against an independent computation, multi-turn
chats, empty responses, a missing chat template, and score -> select -> train on chats."""

import json
import shutil

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import train_data
from pipeline.batching import collate
from pipeline.config import ConfigError, load_config
from pipeline.nll import NLLScorer
from pipeline.records import Record
from pipeline.samples import SamplePolicy, make_samples
from stages import inspect, score, select, train
from tests.helpers import write_config
from tests.test_readers import read_all

# A ChatML template like SmolLM2's, without its default system prompt.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with ChatML special tokens and a chat template."""
    directory = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_model_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def chat_model(chat_model_dir):
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(chat_model_dir)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_each_instruction_format_reads_into_prompt_and_response(tmp_path):
    alpaca = jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Say bye.", "output": "bye"},
        ],
    )
    records, _ = read_all(paths=(str(alpaca),), mode="alpaca")
    assert [(r.prompt, r.text) for r in records] == [
        ("Add the numbers.\n\n2 and 3", "5"),
        ("Say hi.", "hi"),
        ("Say bye.", "bye"),
    ]
    pairs = jsonl(tmp_path / "pairs.jsonl", [{"q": "What is 2+2?", "a": "4"}])
    records, _ = read_all(paths=(str(pairs),), mode="prompt_response", prompt_field="q", response_field="a")
    assert (records[0].prompt, records[0].text) == ("What is 2+2?", "4")


def nll_restricted(model, ids: list[int], positions: list[int]) -> float:
    """Plain forward of the whole sequence, per-token NLL, summed over the given target positions."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    token_nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    return float(sum(token_nll[p - 1] for p in positions))


def scored(model, sample) -> tuple[float, int]:
    out = NLLScorer(model)(**collate([sample], 0))
    return out.nll_sum[0].item(), out.n_tokens[0].item()


def test_plain_prompt_response_scores_only_the_response(chat_model):
    model, tokenizer = chat_model
    record = Record("p:0", "s", "the cat sat on the mat", prompt="Where did the cat sit?")
    (sample,), _ = make_samples(
        record, tokenizer, SamplePolicy(64, tokenizer.bos_token_id, prompt_format="plain")
    )
    prompt_ids = [
        tokenizer.bos_token_id,
        *tokenizer("Where did the cat sit?\n\n", add_special_tokens=False)["input_ids"],
    ]
    response_ids = tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    assert sample.input_ids == prompt_ids + response_ids
    positions = list(range(len(prompt_ids), len(prompt_ids) + len(response_ids)))
    nll_sum, n_tokens = scored(model, sample)
    assert n_tokens == len(response_ids)
    assert nll_sum == pytest.approx(nll_restricted(model, sample.input_ids, positions), abs=1e-4)
    (whole,), _ = make_samples(
        record, tokenizer, SamplePolicy(64, tokenizer.bos_token_id, prompt_format="plain", score_prompt=True)
    )
    assert whole.n_tokens == len(sample.input_ids) - 1


def test_multi_turn_chat_scores_every_assistant_turn_and_only_those(chat_model):
    model, tokenizer = chat_model
    messages = (
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what sat on the mat"},
        {"role": "assistant", "content": "the cat"},
        {"role": "user", "content": "and then"},
        {"role": "assistant", "content": "it slept at night"},
    )
    (sample,), _ = make_samples(Record("c:0", "s", "", messages=messages), tokenizer, SamplePolicy(128, None))
    # independently: tokenize the rendered text piece by piece; assistant content + its <|im_end|>
    # are targets, everything else (roles, markers, user and system text) is context
    pieces = [
        ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat sat on the mat<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("the cat<|im_end|>\n", True),
        ("<|im_start|>user\nand then<|im_end|>\n<|im_start|>assistant\n", False),
        ("it slept at night<|im_end|>\n", True),
    ]
    ids, positions = [], []
    for text, is_target in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        positions += list(range(len(ids), len(ids) + len(piece))) if is_target else []
        ids += piece
    assert sample.input_ids == ids
    assert [p for start, end in sample.targets for p in range(start, end)] == positions
    assert len(sample.targets) == 2
    nll_sum, n_tokens = scored(model, sample)
    assert n_tokens == len(positions)
    assert nll_sum == pytest.approx(nll_restricted(model, ids, positions), abs=1e-4)


def test_empty_response_and_no_assistant_turn_are_skipped_with_a_reason(chat_model):
    _, tokenizer = chat_model
    empty = Record("e:0", "s", "   ", prompt="hello?")
    assert make_samples(empty, tokenizer, SamplePolicy(64, None)) == ([], "empty_response")
    no_turn = Record("e:1", "s", "", messages=({"role": "user", "content": "hi"},))
    assert make_samples(no_turn, tokenizer, SamplePolicy(64, None)) == ([], "empty_response")
    long_prompt = Record("e:2", "s", "yes", prompt="word " * 200)
    assert make_samples(long_prompt, tokenizer, SamplePolicy(32, None)) == ([], "response_truncated")


def test_a_missing_chat_template_is_a_clear_error(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    record = Record(
        "m:0", "s", "", messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"})
    )
    with pytest.raises(ConfigError, match="has no chat template"):
        make_samples(record, tokenizer, SamplePolicy(64, None))
    pair = Record("m:1", "s", "yo", prompt="hi")  # plain rendering needs no template
    (sample,), _ = make_samples(
        pair, tokenizer, SamplePolicy(64, tokenizer.bos_token_id, prompt_format="plain")
    )
    assert sample.n_tokens == len(tokenizer("yo", add_special_tokens=False)["input_ids"])


def test_chats_score_select_and_train_with_responses_only(tmp_path, chat_model_dir):
    rows = []
    for i in range(24):
        answer = "" if i == 5 else " ".join(["the cat sat on the mat"] * (1 + i % 4))
        messages = [
            {"role": "user", "content": f"question {i} about cats"},
            {"role": "assistant", "content": answer},
        ]
        rows.append({"messages": messages, "source": "odd" if i % 2 else "even"})
    corpus = jsonl(tmp_path / "chat.jsonl", rows)
    config = write_config(tmp_path, corpus, chat_model_dir)
    overrides = [
        "corpus.mode=chat",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.max_tokens=64",
        "train.precision=fp32",
        "train.objective=midranking_online",
        "train.skip=0.25",
    ]
    cfg = load_config(config, overrides)
    scores_dir = score.run(cfg)
    summary = json.loads((scores_dir / "summary.json").read_text())
    assert summary["samples"] == 23 and summary["skipped"] == {"empty_response": 1}
    (band_dir,) = select.run(cfg)
    kept = pl.read_parquet(band_dir / "part-*.parquet")
    assert kept["messages"].list.len().to_list() == [2] * kept.height
    run_dir = train.run(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and metrics["train"]["dropped"] == {}


@pytest.mark.parametrize("score_prompt", [False, True])
def test_training_targets_are_the_scored_targets(tmp_path, chat_model_dir, score_prompt):
    """Score chats, select them all, build the training set: every sample is trained on as many
    target tokens as were scored, with score.score_prompt off (responses) and on (every token)."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i} about " + "cats " * (i % 5)},
                {"role": "assistant", "content": "the cat sat " * (1 + i % 3)},
            ],
            "source": "chat",
        }
        for i in range(12)
    ]
    config = write_config(tmp_path, jsonl(tmp_path / "chat.jsonl", rows), chat_model_dir)
    cfg = load_config(
        config,
        [
            "corpus.mode=chat",
            f"score.score_prompt={str(score_prompt).lower()}",
            "select.bands=[{strategy: all}]",
        ],
    )
    score.run(cfg)
    (band_dir,) = select.run(cfg)
    files = sorted(band_dir.glob("part-*.parquet"))
    scored = pl.read_parquet(files)["n_tokens"].to_list()
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    train_set = train_data.training_set(cfg, files, tokenizer, world_size=1)
    dataset, dropped = train_set.dataset, train_set.dropped
    trained = [sum(end - start for start, end in spans) for spans in dataset["targets"]]
    assert dropped == {} and trained == scored
    prompt_tokens = [len(ids) - 1 for ids in dataset["input_ids"]]  # every token after the first
    assert (trained == prompt_tokens) is score_prompt


def unconditional_nll(model, bos: int, pieces: list[str], tokenizer) -> float:
    """Each response piece after BOS alone, by a plain forward; NLLs summed."""
    total = 0.0
    for text in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [bos, *piece]
        total += nll_restricted(model, ids, list(range(1, len(ids))))
    return total


def test_unconditional_loss_and_ifd_equal_plain_forwards(tmp_path, chat_model_dir, chat_model):
    model, tokenizer = chat_model
    chats = [
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what sat on the mat"},
            {"role": "assistant", "content": "the cat"},
            {"role": "user", "content": "and then"},
            {"role": "assistant", "content": "it slept at night"},
        ],
        [
            {"role": "user", "content": "where do data flow"},
            {"role": "assistant", "content": "through pipes"},
        ],
    ]
    corpus = jsonl(tmp_path / "chat.jsonl", [{"messages": m, "source": "s"} for m in chats])
    config = write_config(tmp_path, corpus, chat_model_dir)
    overrides = [
        "score.max_tokens=256",  # nothing truncated
        "score.batch_tokens=1024",
        "corpus.mode=chat",
        "score.unconditional=true",
        "select.bands=[{strategy: all, measure: tokens}]",
    ]
    cfg = load_config(config, overrides)
    score.run(cfg)
    scores = pl.read_parquet(tmp_path / "out" / "scores" / "part-*.parquet").sort("sample_id")
    bos = tokenizer.bos_token_id
    # each assistant turn's targets: its content and <|im_end|>\n (test_multi_turn_chat_... checks them)
    expected = [
        unconditional_nll(model, bos, ["the cat<|im_end|>\n", "it slept at night<|im_end|>\n"], tokenizer),
        unconditional_nll(model, bos, ["through pipes<|im_end|>\n"], tokenizer),
    ]
    assert scores["nll_sum_uncond"].to_list() == pytest.approx(expected, abs=1e-4)
    provenance_key = json.loads((tmp_path / "out" / "scores" / "summary.json").read_text())["provenance"][
        "key"
    ]
    assert provenance_key["unconditional_prefix"] == ""
    # plain prompt/response pairs: the response after BOS alone
    pairs = jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": "where is the cat", "response": "on the mat", "source": "s"}]
    )
    plain = (
        write_config(tmp_path / "plain", pairs, chat_model_dir)
        if (tmp_path / "plain").mkdir() is None
        else None
    )
    plain_cfg = load_config(
        plain, ["corpus.mode=prompt_response", "score.prompt_format=plain", "score.unconditional=true"]
    )
    score.run(plain_cfg)
    (row,) = pl.read_parquet(tmp_path / "plain" / "out" / "scores" / "part-*.parquet").iter_rows(named=True)
    assert row["nll_sum_uncond"] == pytest.approx(
        unconditional_nll(model, bos, ["on the mat"], tokenizer), abs=1e-4
    )
    # ifd: the conditional NLL over the unconditional one, as selected
    cfg = load_config(config, [*overrides[:4], "select.bands=[{strategy: top, keep: 1.0, rank_by: ifd}]"])
    (band,) = select.run(cfg)
    kept = pl.read_parquet(band / "part-*.parquet").sort("sample_id")
    conditional = [nll_restricted(model, *ids_and_targets(tokenizer, m)) for m in chats]
    assert kept["ifd"].to_list() == pytest.approx(
        [c / u for c, u in zip(conditional, expected, strict=True)], rel=1e-4
    )
    report = inspect.run(cfg)
    assert (report / f"with_without_prompt-{band.name}.png").stat().st_size > 5000
    assert json.loads((report / "summary.json").read_text())["bands"][0]["key"] == "ifd"


def ids_and_targets(tokenizer, messages) -> tuple[list[int], list[int]]:
    """The rendered chat's ids and the positions of the assistant turns' tokens, piece by piece."""
    ids, positions = [], []
    for message in messages:
        header = f"<|im_start|>{message['role']}\n"
        body = f"{message['content']}<|im_end|>\n"
        ids += tokenizer(header, add_special_tokens=False)["input_ids"]
        piece = tokenizer(body, add_special_tokens=False)["input_ids"]
        if message["role"] == "assistant":
            positions += range(len(ids), len(ids) + len(piece))
        ids += piece
    return ids, positions


def test_unconditional_needs_instruction_data_and_a_context(tmp_path, tiny_model_dir):
    corpus = jsonl(tmp_path / "t.jsonl", [{"text": "the cat", "source": "s"}])
    with pytest.raises(ConfigError, match=r"corpus\.mode=text has no prompts"):
        load_config(write_config(tmp_path, corpus, tiny_model_dir), ["score.unconditional=true"])
    with pytest.raises(ConfigError, match="cannot go with score_prompt"):
        load_config(
            write_config(tmp_path, corpus, tiny_model_dir),
            ["score.unconditional=true", "score.score_prompt=true"],
        )


def test_a_prefix_is_the_whole_unconditional_context_and_scores_do_not_move(
    tmp_path, chat_model_dir, chat_model
):
    model, tokenizer = chat_model
    rows = [
        {"prompt": f"where is cat {i}", "response": "on the mat " * (1 + i % 3), "source": "s"}
        for i in range(6)
    ]
    pairs = jsonl(tmp_path / "pairs.jsonl", rows)
    config = write_config(tmp_path, pairs, chat_model_dir)
    base = ["corpus.mode=prompt_response", "score.prompt_format=plain"]
    with_prefix = [*base, "score.unconditional=true", 'score.unconditional_prefix="<|im_start|>assistant\\n"']
    score.run(load_config(config, [*with_prefix, f"out_dir={tmp_path / 'with'}"]))
    score.run(load_config(config, [*base, f"out_dir={tmp_path / 'without'}"]))
    scored = pl.read_parquet(tmp_path / "with" / "scores" / "part-*.parquet").sort("sample_id")
    plain = pl.read_parquet(tmp_path / "without" / "scores" / "part-*.parquet").sort("sample_id")
    assert scored["nll_sum"].to_list() == plain["nll_sum"].to_list()  # the extra pass changes nothing
    context = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row, record in zip(scored.iter_rows(named=True), rows, strict=True):
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
        ids = [*context, *response]  # no BOS before the prefix
        expected = nll_restricted(model, ids, list(range(len(context), len(ids))))
        assert row["nll_sum_uncond"] == pytest.approx(expected, abs=1e-4)


# A Gemma-like template: its turn markers are special tokens that look like tags
GEMMA_LIKE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
)


def test_a_chat_templates_special_tokens_are_not_counted_as_markup(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = GEMMA_LIKE
    policy = SamplePolicy(max_tokens=256, bos_id=None)
    turns = ({"role": "user", "content": "Say it"}, {"role": "assistant", "content": "It is <b>bold</b>."})
    (sample,), _ = make_samples(Record("r:0", "s", "", messages=turns), tokenizer, policy)
    assert sample.n_markup_bytes == len("<b>") + len("</b>")  # the response's own tags, not <end_of_turn>
    clean = ({"role": "user", "content": "Say it"}, {"role": "assistant", "content": "It is plain."})
    (sample,), _ = make_samples(Record("r:1", "s", "", messages=clean), tokenizer, policy)
    assert (sample.n_markup_bytes, sample.n_mojibake) == (0, 0)
