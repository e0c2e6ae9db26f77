"""Training objectives against closed forms and brute force; masking of padding and packing."""

import math
import random
from collections import Counter
from fractions import Fraction

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import ConfigError, load_config
from pipeline.objectives import irdro_weights, midranking_mask, objective_loss, per_sample_losses, token_nll
from pipeline.train_data import TrainCollator
from tests.helpers import make_texts


@pytest.fixture(scope="module")
def model_and_features(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [t for t in make_texts(40, seed=4) if len(t) > 10][:8]
    ids = [[tokenizer.bos_token_id, *tokenizer(t)["input_ids"][:40]] for t in texts]
    features = [{"input_ids": i, "targets": [[1, len(i)]]} for i in ids]
    return model, features


def losses_of(model, features, pad_id=0, pack=False, max_tokens=128):
    batch = TrainCollator(pad_id, max_tokens, pack)(features)
    nll, segment = token_nll(model, batch)
    return per_sample_losses(nll, segment, len(features)), nll


def test_irdro_weights_and_loss_equal_the_closed_form():
    losses = torch.tensor([1.0, 2.0, 3.5, 0.25], dtype=torch.float64, requires_grad=True)
    for kl_reg in (0.5, 1.0, 4.0):
        expected = [math.exp(x / kl_reg) for x in losses.tolist()]
        expected = torch.tensor([e / sum(expected) for e in expected])
        w = irdro_weights(losses, kl_reg)
        assert w.dtype == torch.float32 and not w.requires_grad
        torch.testing.assert_close(w, expected.float())
        loss, trained = objective_loss(
            "irdro", losses, torch.ones(4, dtype=torch.long), losses, kl_reg=kl_reg
        )
        assert trained.all()
        assert loss.item() == pytest.approx(float((expected * losses.detach()).sum()), rel=1e-6)
    extreme = torch.tensor([1e4, 1e4 - 1.0, 0.0, -50.0])
    w = irdro_weights(extreme, 1.0)
    assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(1.0)
    assert w[0].item() == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-6) and w[2].item() == 0.0
    w = irdro_weights(torch.tensor([1.0, 5.0]), 1e-6)  # lambda -> 0: the hardest sample only
    assert w.tolist() == [0.0, 1.0]


def test_irdro_gradient_tends_to_the_uniform_per_sample_mean(model_and_features):
    model, features = model_and_features

    def grads(objective_fn):
        model.zero_grad()
        (losses, counts), nll = losses_of(model, features)
        objective_fn(losses, counts, nll).backward()
        return [p.grad.clone() for p in model.parameters()]

    uniform = grads(lambda losses, counts, nll: losses.mean())
    irdro = grads(lambda losses, counts, nll: objective_loss("irdro", losses, counts, nll, kl_reg=1e9)[0])
    for a, b in zip(uniform, irdro, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    sharp = grads(lambda losses, counts, nll: objective_loss("irdro", losses, counts, nll, kl_reg=0.05)[0])
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(uniform, sharp, strict=True))


@pytest.mark.parametrize(
    ("n", "skip", "keep"),
    # 0.29 x 50 = 14.5 rounds half up to 15; in floats it is 14.499999999999998
    [(8, 0.1, 0.5), (10, 0.2, 0.3), (7, 0.0, 1.0), (5, 0.4, 0.2), (50, 0.29, 0.57)],
)
def test_midranking_online_trains_only_on_the_intended_ranks(n, skip, keep):
    generator = torch.Generator().manual_seed(n)
    values = torch.randint(0, 4, (n,), generator=generator).double()  # ties on purpose
    losses = values.clone().requires_grad_(True)
    loss, marked = objective_loss(
        "midranking_online", losses, torch.ones(n, dtype=torch.long), losses, skip=skip, keep=keep
    )
    loss.backward()
    ranked = sorted(
        range(n), key=lambda i: (-values[i].item(), i)
    )  # brute force: hardest first, ties by position
    n_skip, n_keep = (math.floor(Fraction(str(x)) * n + Fraction(1, 2)) for x in (skip, keep))  # half up
    intended = set(ranked[n_skip : n_skip + n_keep])
    trained = {i for i in range(n) if losses.grad[i] != 0}
    assert trained == intended == set(marked.nonzero().flatten().tolist())
    assert torch.allclose(losses.grad[list(intended)], torch.full((n_keep,), 1 / n_keep, dtype=torch.float64))
    assert loss.item() == pytest.approx(sum(values[i].item() for i in intended) / n_keep)


def test_an_empty_online_band_is_an_error_not_nan(tmp_path):
    with pytest.raises(ValueError, match="keeps no sample"):
        midranking_mask(torch.tensor([1.0, 2.0, 3.0]), skip=0.1, keep=0.1)
    config = tmp_path / "c.yaml"
    config.write_text("corpus: {paths: [x.jsonl]}\nmodel: {path: m}\n")
    with pytest.raises(ConfigError, match=r"train\.keep: a batch of 4 skips 0 and keeps 0"):
        load_config(config, ["train.objective=midranking_online", "train.batch_size=4", "train.keep=0.1"])


def test_weighted_objective_is_the_weighted_sample_mean():
    losses = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    weights = torch.tensor([0.5, 1.0, 1.5])
    loss, trained = objective_loss(
        "weighted", losses, torch.ones(3, dtype=torch.long), losses, weights=weights
    )
    assert trained.all()
    assert loss.item() == pytest.approx((0.5 + 2.0 + 6.0) / 3)
    with pytest.raises(ValueError, match="weight"):
        objective_loss("weighted", losses, torch.ones(3, dtype=torch.long), losses)


def test_padding_never_contributes(model_and_features):
    model, features = model_and_features
    with torch.no_grad():
        (batched, counts), nll = losses_of(model, features, pad_id=0)
        (other_pad, _), _ = losses_of(model, features, pad_id=7)  # a pad id that is a real token
        alone = [losses_of(model, [f])[0][0].item() for f in features]
    assert counts.tolist() == [len(f["input_ids"]) - 1 for f in features]
    assert nll.numel() == sum(counts.tolist())
    torch.testing.assert_close(batched, torch.tensor(alone), atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, other_pad, atol=1e-6, rtol=0)
    uniform, trained = objective_loss("uniform", batched, counts, nll)
    assert trained.all()
    assert uniform.item() == pytest.approx(nll.sum().item() / sum(counts.tolist()))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_every_packed_sample_has_the_loss_it_has_alone(model_and_features, tiny_model_dir, attention):
    _, features = model_and_features
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=attention
    ).eval()
    batch = TrainCollator(0, 128, pack=True)(features)
    rows = batch["input_ids"].shape[0]
    assert rows < len(features) - 2  # several samples share rows, most not in first place
    assert batch["input_ids"].shape[1] <= 128
    segment = batch["segment"]
    for index, f in enumerate(features):  # every sample's targets, and only those, are marked
        assert int((segment == index).sum()) == len(f["input_ids"]) - 1
    starts = (batch["input_ids"] == features[0]["input_ids"][0]) & (batch["position_ids"] == 0)
    assert (segment[starts] == -1).all()  # a sample's BOS is context, never a target
    with torch.no_grad():
        nll, seg = token_nll(model, batch)
        packed, counts = per_sample_losses(nll, seg, len(features))
        alone = torch.tensor([losses_of(model, [f])[0][0].item() for f in features])
    assert counts.tolist() == [len(f["input_ids"]) - 1 for f in features]
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=0)


def test_a_model_that_lets_packed_samples_attend_to_each_other_is_caught(
    model_and_features, tiny_model_dir, monkeypatch
):
    from transformers import masking_utils

    from pipeline.objectives import packing_isolates

    _, features = model_and_features
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    collator = TrainCollator(0, 128, pack=True)
    assert packing_isolates(model, features[:3], collator)
    # a model whose attention ignores the restarting positions: plain causal attention over the row
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert not packing_isolates(model, features[:3], collator)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_budget_batches_hold_exactly_their_budget_and_a_pass_trains_every_token_once(seed):
    from pipeline.train_data import plan_token_batches

    counts = [random.Random(seed + i).choice([0, 1, 3, 7, 40, 200]) for i in range(30)]
    batches = plan_token_batches(counts, 64, 25, seed)
    assert len(batches) == 25
    for batch in batches:
        assert sum(stop - start for _, start, stop in batch) == 64
        assert all(0 <= start < stop <= counts[i] for i, start, stop in batch)
    # every (sample, target) pair, in training order: the first sum(counts) of them are all the
    # target tokens of the set, each exactly once (a cut sample's rest opens the next batch)
    order = [(i, t) for batch in batches for i, start, stop in batch for t in range(start, stop)]
    one_pass = order[: sum(counts)]
    assert sorted(one_pass) == sorted((i, t) for i, c in enumerate(counts) for t in range(c))
    assert plan_token_batches(counts, 64, 25, seed) == batches  # seeded


def test_a_sample_is_cut_to_a_range_of_its_targets():
    from pipeline.train_data import cut_to_targets

    feature = {"input_ids": list(range(20)), "targets": [[3, 6], [10, 15]], "weight": 2.0}
    assert cut_to_targets(feature, 0, 2) == {"input_ids": list(range(5)), "targets": [[3, 5]], "weight": 2.0}
    cut = cut_to_targets(feature, 0, 5)
    assert cut["targets"] == [[3, 6], [10, 12]] and cut["input_ids"] == list(range(12))
    whole = cut_to_targets(feature, 0, 8)  # every target: only tokens after the last one are left out
    assert whole["targets"] == feature["targets"] and whole["input_ids"] == list(range(15))
    # the rest of a cut sample: its earlier tokens stay as context, not targets
    rest = cut_to_targets(feature, 2, 8)
    assert rest["targets"] == [[5, 6], [10, 15]] and rest["input_ids"] == list(range(15))
    assert cut_to_targets(feature, 4, 6)["targets"] == [[11, 13]]


@pytest.mark.parametrize("pack", [False, True])
def test_chunked_head_gives_the_full_logits_loss_and_gradients(model_and_features, tiny_model_dir, pack):
    """The chunked, checkpointed LM head (no full-vocabulary logits) against the model's own
    forward: the same token NLLs and the same gradient on every parameter, padded or packed, with
    chunks that split samples and a last chunk shorter than the others."""
    from pipeline.objectives import head_is_plain

    _, features = model_and_features
    batch = TrainCollator(0, 128, pack)(features)
    grads = []
    for chunk in (0, 7):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        nll, segment = token_nll(model, batch, head_chunk_tokens=chunk)
        losses, _ = per_sample_losses(nll, segment, len(features))
        (losses * torch.arange(1.0, len(features) + 1)).sum().backward()  # a weighted objective
        grads.append((nll.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert grads[0][0].numel() % 7 and grads[0][0].numel() > 7
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=0)
    for name, full in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], full, atol=1e-5, rtol=1e-4, msg=name)
    assert head_is_plain(model)


def test_a_head_that_is_not_plain_is_detected(tiny_model_dir):
    """A model that scales its logits after the head (as Cohere, Gemma's soft-capping do) is not
    run through the chunked head."""
    from pipeline.objectives import head_is_plain

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    assert not head_is_plain(model)


def test_each_objective_returns_every_samples_weight_in_it():
    losses = torch.tensor([1.0, 3.0, 2.0, 0.5])
    counts = torch.tensor([4, 2, 6, 1])
    nll = torch.ones(int(counts.sum()))
    _, uniform = objective_loss("uniform", losses, counts, nll)
    assert uniform.tolist() == [4.0, 2.0, 6.0, 1.0]  # a token-mean weighs a sample by its tokens
    _, irdro = objective_loss("irdro", losses, counts, nll, kl_reg=2.0)
    expected = [math.exp(x / 2.0) for x in losses.tolist()]
    assert irdro.tolist() == pytest.approx([e / sum(expected) for e in expected], rel=1e-6)
    _, weighted = objective_loss("weighted", losses, counts, nll, weights=torch.tensor([0.5, 1.0, 0.0, 2.5]))
    assert weighted.tolist() == [0.5, 1.0, 0.0, 2.5]
    _, online = objective_loss("midranking_online", losses, counts, nll, skip=0.25, keep=0.5)
    assert online.tolist() == [1.0, 0.0, 1.0, 0.0]  # 3.0 skipped; 2.0 and 1.0 kept; 0.5 too easy


def test_effective_samples_is_kishs_formula():
    from pipeline.trainer import EffectiveSamples

    effective = EffectiveSamples()
    for weights in ([1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [2.0, 1.0, 1.0]):
        effective.add(torch.tensor(weights))
    mean, held = effective.means()
    # (sum w)^2 / sum w^2: 16/4 = 4, 1/1 = 1, 16/6
    assert mean == pytest.approx((4 + 1 + 16 / 6) / 3) and held == pytest.approx(11 / 3)
    assert EffectiveSamples().means() == (None, None)


def test_positions_and_attention_of_a_token_budget_plan():
    import datasets

    from pipeline.train_data import TrainingSet

    # two samples: 10 and 6 tokens, targets from position 1 on (9 and 5 targets)
    rows = {"input_ids": [list(range(10)), list(range(6))], "targets": [[[1, 10]], [[1, 6]]]}
    dataset = datasets.Dataset.from_dict(rows)
    # step 1: sample 0's first 4 targets (positions 0..4: 5 tokens) and sample 1 whole (6 tokens);
    # step 2: sample 0's last 5 targets, with its first 5 tokens as context (10 tokens)
    plan = [[[0, 0, 4], [1, 0, 5]], [[0, 4, 9]]]
    seen = TrainingSet(dataset, Counter(), plan, [9, 5]).seen()
    assert (seen.samples, seen.distinct_tokens, seen.mean_sample_tokens) == (2, 14, 7.0)
    assert seen.positions == 5 + 6 + 10
    assert seen.attention == 5 * 5 + 6 * 6 + 10 * 10
