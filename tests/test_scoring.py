"""The scoring kernel and sample building, against an independent computation with a real model."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.batching import collate, pack_batches
from pipeline.nll import NLLScorer
from pipeline.records import Record
from pipeline.samples import Sample, bos_to_add, make_samples
from tests.helpers import make_texts


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


def samples_of(tokenizer, texts, max_tokens=64, long_docs="truncate", add_bos=True):
    out = []
    for i, text in enumerate(texts):
        made, _ = make_samples(
            Record(f"doc:{i}", "s", text), tokenizer, bos_to_add(tokenizer, add_bos), max_tokens, long_docs
        )
        out.extend(made)
    return out


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_loss_equals_sample_alone(model_and_tokenizer, padding_side):
    model, tokenizer = model_and_tokenizer
    samples = samples_of(tokenizer, make_texts(24, seed=3))
    lengths = {len(s.input_ids) for s in samples}
    assert len(lengths) > 5, "the test needs mixed lengths"
    scorer = NLLScorer(model, head_chunk_tokens=37)  # chunks that do not divide the token count
    assert scorer.fast_path
    for batch in (samples, samples[::-1][:7], samples[3:4]):  # different companions and sizes
        tensors = collate(batch, tokenizer.pad_token_id, padding_side)
        out = scorer(tensors["input_ids"], tensors["attention_mask"], tensors["target_mask"])
        for row, sample in enumerate(batch):
            nll_sum, n_tokens, max_nll, n_correct = reference(model, sample.input_ids)
            assert out.n_correct[row].item() == n_correct
            assert out.n_tokens[row].item() == n_tokens == sample.n_tokens
            assert out.nll_sum[row].item() == pytest.approx(nll_sum, abs=1e-4 * n_tokens)
            assert out.nll_sum[row].item() / n_tokens == pytest.approx(nll_sum / n_tokens, abs=1e-4)
            assert out.max_token_nll[row].item() == pytest.approx(max_nll, abs=1e-4)


def test_pad_id_equal_to_a_real_token_is_still_scored(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    eos = tokenizer.eos_token_id
    short = Sample("a", "s", 0, [tokenizer.bos_token_id, 5, eos, eos], ((1, 4),), 0, 1, 1, False)
    long = Sample("b", "s", 0, [tokenizer.bos_token_id, *range(10, 30)], ((1, 21),), 0, 1, 1, False)
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


def test_bos_policy(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    text = "the cat sat on the mat"
    plain = tokenizer(text, add_special_tokens=False).input_ids
    (with_bos,), _ = make_samples(
        Record("x:0", "s", text), tokenizer, bos_to_add(tokenizer, True), 64, "truncate"
    )
    assert with_bos.input_ids == [tokenizer.bos_token_id, *plain]
    assert with_bos.n_tokens == len(plain)  # every real token is a target, BOS is context
    (no_bos,), _ = make_samples(
        Record("x:0", "s", text), tokenizer, bos_to_add(tokenizer, False), 64, "truncate"
    )
    assert no_bos.input_ids == plain and no_bos.n_tokens == len(plain) - 1  # first token is context
    assert (with_bos.char_start, with_bos.char_end) == (0, len(text))


def test_too_short_is_a_reason_not_a_sample(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    one_token = tokenizer.convert_ids_to_tokens(20)
    text = tokenizer.convert_tokens_to_string([one_token])
    samples, reason = make_samples(Record("x:0", "s", text), tokenizer, None, 64, "truncate")
    assert samples == [] and reason == "too_short"
    samples, reason = make_samples(
        Record("x:0", "s", text), tokenizer, tokenizer.bos_token_id, 64, "truncate"
    )
    assert len(samples) == 1 and samples[0].n_tokens == 1 and reason is None


def test_truncate_and_split_long_documents(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text = " ".join(f"word{i}" for i in range(200))
    full = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]
    assert len(full) > 3 * 32
    (truncated,), _ = make_samples(
        Record("d:0", "s", text), tokenizer, tokenizer.bos_token_id, 32, "truncate"
    )
    assert truncated.truncated and truncated.input_ids == full[:32] and truncated.n_tokens == 31
    assert text.startswith(text[: truncated.char_end]) and truncated.char_end < len(text)

    windows, _ = make_samples(Record("d:0", "s", text), tokenizer, tokenizer.bos_token_id, 32, "split")
    assert [w.sample_id for w in windows] == [f"d:0#{k}" for k in range(len(windows))]
    assert all(len(w.input_ids) <= 32 for w in windows)
    # every target token of the document is scored exactly once across the windows
    assert sum(w.n_tokens for w in windows) == len(full) - 1
    rebuilt = windows[0].input_ids + [t for w in windows[1:] for t in w.input_ids[1:]]
    assert rebuilt == full
    assert windows[0].char_start == 0 and windows[-1].char_end == len(text)
    assert all(a.char_end <= b.char_end for a, b in itertools.pairwise(windows))
    # and each window scores like the same tokens scored alone
    tensors = collate(windows, tokenizer.pad_token_id)
    out = NLLScorer(model)(**tensors)
    for row, w in enumerate(windows):
        assert out.nll_sum[row].item() == pytest.approx(reference(model, w.input_ids)[0], abs=1e-3)


def test_pack_batches_respects_the_budget():
    def sample(n):
        return Sample("x", "s", 0, [1] * n, ((1, n),), 0, 0, 0, False)

    samples = sorted((sample(n) for n in [3, 50, 7, 64, 64, 20, 2, 33, 9]), key=lambda s: -len(s.input_ids))
    batches = pack_batches(samples, 128)
    assert [len(s.input_ids) for b in batches for s in b] == [len(s.input_ids) for s in samples]
    for batch in batches:
        assert len(batch) * len(batch[0].input_ids) <= 128 or len(batch) == 1
