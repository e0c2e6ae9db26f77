"""The scoring kernel and sample building, against an independent computation with a real model."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.batching import ShardBatches, batch_length, batch_rows, collate, pack_batches
from pipeline.config import load_config
from pipeline.nll import NLLScorer
from pipeline.records import Record
from pipeline.samples import Sample, SamplePolicy, make_samples, split_windows
from pipeline.sharding import plan_shards
from tests.helpers import make_texts, write_config, write_corpus


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def reference(model, ids: list[int], n_context: int = 1) -> tuple[float, int, float, int]:
    """nll_sum, n_tokens, max token nll and argmax hits of one unpadded sequence: plain forward,
    log_softmax, gather."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()[n_context - 1 : -1]
    targets = torch.tensor(ids[n_context:])
    token_nll = -F.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    correct = int((logits.argmax(-1) == targets).sum())
    return token_nll.sum().item(), token_nll.numel(), token_nll.max().item(), correct


def policy(max_tokens, bos_id, long_docs="truncate", context=1):
    return SamplePolicy(max_tokens, bos_id, long_docs, split_context_tokens=context)


def samples_of(tokenizer, texts, max_tokens=64):
    out = []
    for i, text in enumerate(texts):
        made, _ = make_samples(
            Record(f"doc:{i}", "s", text), tokenizer, policy(max_tokens, tokenizer.bos_token_id)
        )
        out.extend(made)
    return out


@pytest.mark.parametrize("unpadded", [True, False], ids=["unpadded", "padded"])
@pytest.mark.parametrize("count_correct", [True, False])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_loss_equals_sample_alone(model_and_tokenizer, padding_side, count_correct, unpadded):
    model, tokenizer = model_and_tokenizer
    samples = samples_of(tokenizer, make_texts(24, seed=3))
    lengths = {len(s.input_ids) for s in samples}
    assert len(lengths) > 5, "the test needs mixed lengths"
    # chunks that do not divide the token count; without count_correct (the score stage), the
    # top logit comes from amax() rather than max()
    scorer = NLLScorer(model, head_chunk_tokens=37, count_correct=count_correct)
    assert scorer.fast_path and scorer.causal_only and scorer.unpadded
    scorer.unpadded = unpadded  # padded: right-padded batches go in with no mask
    # different companions and sizes, and empty rows after the samples (a window's last batch)
    for batch, rows in ((samples, 0), (samples[::-1][:7], 10), (samples[3:4], 3)):
        tensors = collate(batch, tokenizer.pad_token_id, padding_side, rows=rows)
        assert tensors["input_ids"].shape[0] == max(rows, len(batch))
        out = scorer(tensors["input_ids"], tensors["attention_mask"], tensors["target_mask"])
        assert out.n_tokens[len(batch) :].eq(0).all() and out.nll_sum[len(batch) :].eq(0).all()
        for row, sample in enumerate(batch):
            nll_sum, n_tokens, max_nll, n_correct = reference(model, sample.input_ids)
            assert (out.n_correct[row].item() if count_correct else out.n_correct) == (
                n_correct if count_correct else None
            )
            assert out.n_tokens[row].item() == n_tokens == sample.n_tokens
            assert out.nll_sum[row].item() == pytest.approx(nll_sum, abs=1e-4 * n_tokens)
            assert out.nll_sum[row].item() / n_tokens == pytest.approx(nll_sum / n_tokens, abs=1e-4)
            assert out.max_token_nll[row].item() == pytest.approx(max_nll, abs=1e-4)


def test_pad_id_equal_to_a_real_token_is_still_scored(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    eos = tokenizer.eos_token_id
    short = Sample(
        "a",
        "s",
        0,
        [tokenizer.bos_token_id, 5, eos, eos],
        ((1, 4),),
        0,
        1,
        1,
        1,
        False,
        n_markup_bytes=0,
        n_mojibake=0,
    )
    long = Sample(
        "b",
        "s",
        0,
        [tokenizer.bos_token_id, *range(10, 30)],
        ((1, 21),),
        0,
        1,
        1,
        1,
        False,
        n_markup_bytes=0,
        n_mojibake=0,
    )
    tensors = collate([long, short], pad_id=eos)  # the short row is padded with the very token it ends in
    out = NLLScorer(model)(tensors["input_ids"], tensors["attention_mask"], tensors["target_mask"])
    nll_sum, n_tokens, _, _ = reference(model, short.input_ids)
    assert out.n_tokens[1].item() == n_tokens == 3
    assert out.nll_sum[1].item() == pytest.approx(nll_sum, abs=1e-4)


def test_full_forward_fallback_matches_fast_path(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    samples = samples_of(tokenizer, make_texts(8, seed=4))
    tensors = collate(samples, tokenizer.pad_token_id)
    fast = NLLScorer(model)(**tensors)
    slow_scorer = NLLScorer(model)
    slow_scorer.fast_path = False
    slow = slow_scorer(**tensors)
    torch.testing.assert_close(fast.nll_sum, slow.nll_sum, atol=1e-4, rtol=0)


def test_a_model_that_differs_without_a_mask_keeps_getting_one(model_and_tokenizer):
    """Right-padded batches go in with no attention mask only where the model was seen to give the
    real tokens the same outputs that way; one that does not (here: a body that shifts its output
    when no mask comes) is always given the mask, and scores as the plain model does."""
    model, tokenizer = model_and_tokenizer
    tensors = collate(samples_of(tokenizer, make_texts(8, seed=6)), tokenizer.pad_token_id, "right")
    assert not tensors["attention_mask"].all(), "the test needs padding"
    odd, masks_seen = copy.deepcopy(model), []
    forward = odd.model.forward

    def shifted_without_a_mask(*args, **kwargs):
        out = forward(*args, **kwargs)
        masks_seen.append(kwargs.get("attention_mask") is not None)
        if kwargs.get("attention_mask") is None:
            out.last_hidden_state = out.last_hidden_state + 1.0
        return out

    odd.model.forward = shifted_without_a_mask
    plain, with_mask = NLLScorer(model), NLLScorer(model)
    with_mask.causal_only = False
    guarded = NLLScorer(odd)
    assert plain.causal_only and not guarded.causal_only
    for scorer in (plain, with_mask, guarded):  # the padded path: architectures not unpadded
        scorer.unpadded = False
    masks_seen.clear()
    expected = with_mask(**tensors)
    for out in (plain(**tensors), guarded(**tensors)):
        torch.testing.assert_close(out.nll_sum, expected.nll_sum, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.max_token_nll, expected.max_token_nll, atol=1e-5, rtol=0)
    assert masks_seen == [True]


def test_only_right_padded_rows_within_the_position_limit_go_in_without_a_mask(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    spied, masks_seen = copy.deepcopy(model), []
    forward = spied.model.forward

    def recording(*args, **kwargs):
        masks_seen.append(kwargs.get("attention_mask") is not None)
        return forward(*args, **kwargs)

    spied.model.forward = recording
    scorer = NLLScorer(spied)
    scorer.unpadded = False  # the padded path: architectures not unpadded (tests/test_unpadded.py)
    samples = samples_of(tokenizer, make_texts(8, seed=7))
    right = collate(samples, tokenizer.pad_token_id, "right")
    left = collate(samples, tokenizer.pad_token_id, "left")
    masks_seen.clear()
    scorer(**right)
    scorer(**left)
    scorer.unmasked_length = right["input_ids"].shape[1] - 1  # as if past a learned position table
    scorer(**right)
    assert masks_seen == [False, True, True]


def test_unmasked_length_follows_the_position_table_and_the_rotary_scaling():
    from types import SimpleNamespace

    from pipeline.nll import unmasked_length

    assert unmasked_length(SimpleNamespace(max_position_embeddings=2048)) == 2048
    assert unmasked_length(SimpleNamespace(n_positions=1024)) == 1024  # GPT-2
    assert unmasked_length(SimpleNamespace()) == float("inf")
    dynamic = {"rope_type": "dynamic", "factor": 2.0}
    assert unmasked_length(SimpleNamespace(rope_parameters=dynamic, max_position_embeddings=8)) == 0
    assert unmasked_length(SimpleNamespace(rope_scaling={"type": "dynamic"}, max_position_embeddings=8)) == 0
    per_layer_kind = {"full_attention": {"rope_type": "default"}, "sliding_attention": dynamic}
    assert unmasked_length(SimpleNamespace(rope_parameters=per_layer_kind, max_position_embeddings=8)) == 0
    default = {"rope_type": "default", "rope_theta": 1e4}
    assert unmasked_length(SimpleNamespace(rope_parameters=default, max_position_embeddings=8)) == 8


@pytest.mark.parametrize("compiled", [False, True])
def test_the_head_log_softmax_the_score_stage_compiles(compiled, tmp_path, monkeypatch):
    """token_nll_of (compiled by NLLScorer.compile without argmax, where the head is not tiled)
    against log_softmax, on bf16 logits, at row counts that differ from call to call."""
    from pipeline.nll import token_nll_of

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    function = torch.compile(token_nll_of, dynamic=True) if compiled else token_nll_of
    generator = torch.Generator().manual_seed(0)
    for rows in (128, 37, 256):
        logits = (torch.randn(rows, 1000, generator=generator) * 8).bfloat16()
        targets = torch.randint(0, 1000, (rows,), generator=generator)
        expected = -F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
        torch.testing.assert_close(function(logits, targets), expected, atol=1e-5, rtol=0)


def test_the_compiled_head_folds_vocabulary_tiles_as_the_whole_log_softmax(
    model_and_tokenizer, tmp_path, monkeypatch
):
    """Compiled on CPU without argmax (the score stage), the head goes through the vocabulary a tile
    at a time (NLLScorer._tiled_nll): each sample against its plain forward and log_softmax alone,
    with tiles that leave a narrower last one (600 = 2 x 256 + 88) and chunks that do not divide
    the token count."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model, tokenizer = model_and_tokenizer
    samples = samples_of(tokenizer, make_texts(12, seed=4))
    scorer = NLLScorer(copy.deepcopy(model), head_chunk_tokens=37, count_correct=False)
    scorer.compile()
    assert scorer.fast_path and scorer._tile_update is not None and scorer._fused_nll is None
    widths = []
    folded = scorer._tile_update

    def recorded(tile, *state):
        widths.append(tile.shape[1])
        return folded(tile, *state)

    scorer._tile_update = recorded
    scorer.vocab_tile = 256
    assert model.config.vocab_size == 600  # the tiny model's
    for batch in (samples, samples[2:5]):
        tensors = collate(batch, tokenizer.pad_token_id)
        out = scorer(tensors["input_ids"], tensors["attention_mask"], tensors["target_mask"])
        for row, sample in enumerate(batch):
            nll_sum, n_tokens, max_nll, _ = reference(model, sample.input_ids)
            assert out.n_tokens[row].item() == n_tokens
            assert out.nll_sum[row].item() / n_tokens == pytest.approx(nll_sum / n_tokens, abs=1e-4)
            assert out.max_token_nll[row].item() == pytest.approx(max_nll, abs=1e-4)
    assert set(widths) == {256, 88}
    for wrong in (600, -1):
        with pytest.raises(ValueError, match="a token id is outside the model's vocabulary of 600"):
            scorer._tiled_nll(torch.zeros(3, model.config.hidden_size), torch.tensor([0, wrong, 1]))


def test_the_tiled_head_in_bf16_matches_the_whole_chunk_head(model_and_tokenizer, tmp_path, monkeypatch):
    """The stage's case: bf16 tiles of the head's matmul folded, against the whole-chunk head of the
    same compiled scorer (the same hidden states), per sample."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model, tokenizer = model_and_tokenizer
    tensors = collate(samples_of(tokenizer, make_texts(12, seed=6)), tokenizer.pad_token_id)
    scorer = NLLScorer(copy.deepcopy(model).to(torch.bfloat16), head_chunk_tokens=37, count_correct=False)
    scorer.compile()
    scorer.vocab_tile = 256
    tiled = scorer(**tensors)
    scorer._tile_update = None  # the eager whole-chunk loop
    whole = scorer(**tensors)
    assert torch.equal(tiled.n_tokens, whole.n_tokens)
    per_token = (tiled.nll_sum - whole.nll_sum).abs() / tiled.n_tokens.clamp(min=1)
    assert per_token.max() <= 1e-3, per_token.max()
    torch.testing.assert_close(tiled.max_token_nll, whole.max_token_nll, atol=1e-2, rtol=0)


@pytest.mark.parametrize("compiled", [False, True])
def test_fold_tile_across_tiles_is_the_log_softmax(compiled, tmp_path, monkeypatch):
    """fold_tile over tiles of bf16 logits, 256 columns then a narrower one, against log_softmax of
    the whole row, with targets on each side of every tile's edges."""
    from pipeline.nll import fold_tile

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    function = torch.compile(fold_tile, dynamic=True) if compiled else fold_tile
    generator = torch.Generator().manual_seed(1)
    targets = torch.tensor([0, 255, 256, 511, 512, 599, 300, 7])
    logits = (torch.randn(targets.numel(), 600, generator=generator) * 8).bfloat16()
    top = torch.full((targets.numel(),), -math.inf)
    total, target_logit = torch.zeros(targets.numel()), torch.zeros(targets.numel())
    for first in range(0, 600, 256):
        top, total, target_logit = function(
            logits[:, first : first + 256], top, total, target_logit, targets - first
        )
    expected = -F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(top + total.log() - target_logit, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_score_stage_head_without_argmax_gives_the_same_numbers(model_and_tokenizer, dtype):
    """count_correct=False (the score stage) takes the top logit with amax instead of max: the
    losses must be bit for bit those with the argmax, on the fast path and the full forward."""
    model, tokenizer = model_and_tokenizer
    model = copy.deepcopy(model).to(dtype)
    tensors = collate(samples_of(tokenizer, make_texts(8, seed=5)), tokenizer.pad_token_id)
    for fast_path in (True, False):
        with_argmax, without = NLLScorer(model), NLLScorer(model, count_correct=False)
        with_argmax.fast_path = without.fast_path = fast_path
        a, b = with_argmax(**tensors), without(**tensors)
        assert torch.equal(a.nll_sum, b.nll_sum) and torch.equal(a.max_token_nll, b.max_token_nll)
        assert torch.equal(a.n_tokens, b.n_tokens)
        assert a.n_correct is not None and b.n_correct is None


def test_bos_policy(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    text = "the cat sat on the mat"
    plain = tokenizer(text, add_special_tokens=False).input_ids
    (with_bos,), _ = make_samples(Record("x:0", "s", text), tokenizer, policy(64, tokenizer.bos_token_id))
    assert with_bos.input_ids == [tokenizer.bos_token_id, *plain]
    assert with_bos.n_tokens == len(plain)  # every real token is a target, BOS is context
    (no_bos,), _ = make_samples(Record("x:0", "s", text), tokenizer, policy(64, None))
    assert no_bos.input_ids == plain and no_bos.n_tokens == len(plain) - 1  # first token is context
    assert (with_bos.char_start, with_bos.char_end) == (0, len(text))


def test_too_short_is_a_reason_not_a_sample(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    one_token = tokenizer.convert_ids_to_tokens(20)
    text = tokenizer.convert_tokens_to_string([one_token])
    samples, reason = make_samples(Record("x:0", "s", text), tokenizer, policy(64, None))
    assert samples == [] and reason == "too_short"
    samples, reason = make_samples(Record("x:0", "s", text), tokenizer, policy(64, tokenizer.bos_token_id))
    assert len(samples) == 1 and samples[0].n_tokens == 1 and reason is None


def test_truncate_and_split_long_documents(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text = " ".join(f"word{i}" for i in range(200))
    full = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]
    assert len(full) > 3 * 32
    (truncated,), _ = make_samples(Record("d:0", "s", text), tokenizer, policy(32, tokenizer.bos_token_id))
    assert truncated.truncated and truncated.input_ids == full[:32] and truncated.n_tokens == 31
    assert text.startswith(text[: truncated.char_end]) and truncated.char_end < len(text)

    windows, _ = make_samples(
        Record("d:0", "s", text), tokenizer, policy(32, tokenizer.bos_token_id, "split", context=8)
    )
    assert [w.sample_id for w in windows] == [f"d:0#{k}" for k in range(len(windows))]
    assert all(len(w.input_ids) <= 32 for w in windows)
    # every target token of the document is scored exactly once across the windows, evenly shared
    targets = [t for w in windows for a, b in w.targets for t in w.input_ids[a:b]]
    assert targets == full[1:]
    assert max(w.n_tokens for w in windows) - min(w.n_tokens for w in windows) <= 1
    # each later window holds the 8 tokens before its targets as context
    for w in windows[1:]:
        ((first, _),) = w.targets
        assert first == 8 and not w.truncated
    assert windows[0].char_start == 0 and windows[-1].char_end == len(text)
    assert all(a.char_end <= b.char_start + 1 for a, b in itertools.pairwise(windows))
    # and each window scores like the same tokens scored alone
    tensors = collate(windows, tokenizer.pad_token_id)
    out = NLLScorer(model)(**tensors)
    for row, w in enumerate(windows):
        ((first, _),) = w.targets
        assert out.nll_sum[row].item() == pytest.approx(reference(model, w.input_ids, first)[0], abs=1e-3)


def test_split_windows_whose_context_reaches_the_start_score_as_the_whole_document(model_and_tokenizer):
    """A window holds at most max_tokens tokens, so the windows whose targets start within
    `split_context_tokens` of the document's start see its whole prefix (BOS included): their
    nll_sums equal the unsplit document's over the same targets. With one token of context (the
    old layout) a later window's loss is not the document's."""
    model, tokenizer = model_and_tokenizer
    record = Record("d:0", "s", " ".join(f"word{i % 17} and{i % 5}" for i in range(30)))
    (whole,), _ = make_samples(record, tokenizer, policy(4096, tokenizer.bos_token_id))
    ids = whole.input_ids
    assert len(ids) > 2 * 32
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    token_nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").tolist()  # [j-1]: token j
    scorer = NLLScorer(model)

    def scored_windows(context):
        windows, _ = make_samples(record, tokenizer, policy(32, tokenizer.bos_token_id, "split", context))
        layout = split_windows(len(ids), 32, context)
        assert [w.input_ids for w in windows] == [ids[start:end] for start, _, end in layout]
        out = scorer(**collate(windows, tokenizer.pad_token_id))
        assert sum(out.n_tokens.tolist()) == len(ids) - 1  # every token of the document, once
        return layout, out.nll_sum.tolist()

    layout, sums = scored_windows(24)
    whole_prefix = [
        (first, end, s) for (start, first, end), s in zip(layout, sums, strict=True) if start == 0
    ]
    assert len(whole_prefix) >= 3
    for first, end, nll_sum in whole_prefix:
        assert nll_sum == pytest.approx(sum(token_nll[first - 1 : end - 1]), abs=1e-4)
    narrow_layout, narrow_sums = scored_windows(1)
    start, first, end = narrow_layout[1]
    assert start > 0 and abs(narrow_sums[1] - sum(token_nll[first - 1 : end - 1])) > 1e-3


@pytest.mark.parametrize("length", [2, 3, 10, 33, 100, 513])
@pytest.mark.parametrize(("max_tokens", "context"), [(2, 1), (8, 1), (8, 7), (32, 8), (512, 128)])
def test_split_windows_cover_every_target_once_within_max_tokens(length, max_tokens, context):
    windows = split_windows(length, max_tokens, context)
    covered = [t for _, first, end in windows for t in range(first, end)]
    assert covered == list(range(1, length))
    for start, first, end in windows:
        assert end - start <= max_tokens and first - start == min(context, first) and first < end
    sizes = [end - first for _, first, end in windows]
    assert max(sizes) - min(sizes) <= 1 and len(windows) == -(-(length - 1) // (max_tokens - context))


def test_pack_batches_respects_the_budget():
    def sample(n):
        return Sample("x", "s", 0, [1] * n, ((1, n),), 0, 0, 0, 0, False, n_markup_bytes=0, n_mojibake=0)

    samples = sorted((sample(n) for n in [3, 50, 7, 64, 64, 20, 2, 33, 9]), key=lambda s: -len(s.input_ids))
    batches = pack_batches(samples, 128)
    assert [len(s.input_ids) for b in batches for s in b] == [len(s.input_ids) for s in samples]
    for batch in batches:
        assert len(batch) * batch_length(len(batch[0].input_ids)) <= 128 or len(batch) == 1
    assert [len(b) for b in batches] == [2, 2, 4, 1]  # 64 64 | 50 33 (to 64) | 20 9 7 3 (to 32) | 2


def test_shard_batches_take_one_of_a_few_shapes(tmp_path, tiny_model_dir, model_and_tokenizer):
    """Every batch is batch_length(its longest sample) long and batch_rows of it tall, the rows
    after the samples empty; every sample is in one batch."""
    _, tokenizer = model_and_tokenizer
    corpus = write_corpus(tmp_path / "c.jsonl", make_texts(40, seed=5))
    cfg = load_config(write_config(tmp_path, corpus, tiny_model_dir), [])
    plan = plan_shards(cfg.corpus)
    seen, padded = [], 0
    for shard in range(len(plan.shards)):
        for item in ShardBatches(plan, shard, cfg.corpus, cfg.score, tokenizer):
            if item["batch"] is None:
                continue
            tensors, real = item["batch"], len(item["batch"]["meta"]["sample_id"])
            rows, length = tensors["input_ids"].shape
            longest = int(tensors["attention_mask"][:real].sum(1).max())
            assert (rows, length) == (batch_rows(length, cfg.score.batch_tokens), batch_length(longest))
            assert not tensors["target_mask"][real:].any()
            assert tensors["attention_mask"][real:].sum() == rows - real  # one position each
            seen += tensors["meta"]["sample_id"]
            padded += rows - real
    assert len(seen) == len(set(seen)) == 40 and padded > 0


def test_batch_length_is_the_next_of_a_few_lengths():
    """Multiples of 16 up to 128, then eight evenly spaced lengths per doubling, listed apart."""
    allowed = set(range(16, 129, 16))
    for low in (128, 256, 512, 1024, 2048):
        allowed |= {low + k * low // 8 for k in range(1, 9)}
    for longest in range(1, 4097):
        assert batch_length(longest) == min(a for a in allowed if a >= longest), longest
    assert len({batch_length(n) for n in range(1, 513)}) == 24


def test_truncation_tokenizes_only_the_start_of_a_long_document(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    texts = make_texts(40, seed=11)
    huge = " ".join(texts) * 100  # ~0.7 MB
    seen = []

    class Spy:
        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return tokenizer(text, **kwargs)

    for text in [*texts, " ".join(texts), huge]:
        for bos in (tokenizer.bos_token_id, None):
            record = Record("d:0", "s", text)
            got, _ = make_samples(record, Spy(), policy(64, bos))
            full = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ([bos] if bos is not None else []) + full
            if len(ids) < 2:
                continue
            (sample,) = got
            assert sample.input_ids == ids[:64] and sample.truncated == (len(ids) > 64)
    assert len(huge) > 500_000 and max(seen) < 20_000
