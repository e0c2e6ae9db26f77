"""Scoring without computing the padding (pipeline/unpadded.py): each sample's loss against the
model's plain forward on that sample alone, for each architecture it is used on, and kept off
where the attention does something it does not."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from pipeline.nll import UNPADDED_MODEL_TYPES, NLLScorer
from pipeline.unpadded import PACKED_STEP

SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SMALL, use_sliding_window=False),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=16),
    "gpt_neox": lambda: GPTNeoXConfig(
        **{k: v for k, v in SMALL.items() if k != "num_key_value_heads"}, bos_token_id=0, eos_token_id=0
    ),
    "olmo2": lambda: Olmo2Config(**SMALL),
    "phi3": lambda: Phi3Config(**SMALL, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gemma": lambda: GemmaConfig(**SMALL, head_dim=16),
}


def tiny(config) -> torch.nn.Module:
    torch.manual_seed(0)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def batch(lengths: list[int], side: str, empty_rows: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of random tokens padded on `side` (pad id 0, a real token too), the first token of
    each the context; `empty_rows` rows of padding only after them, as a window's last batch has."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths) + empty_rows, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = torch.randint(0, 256, (n,), generator=generator)
        mask[row, cols] = 1
    target = mask.bool().clone()
    target[torch.arange(len(lengths)), mask[: len(lengths)].argmax(1)] = False  # the context token
    return {"input_ids": ids, "attention_mask": mask, "target_mask": target}


def alone(model, ids: torch.Tensor) -> tuple[float, float]:
    """nll_sum and max token nll of one unpadded row: the model's own forward, log_softmax, gather."""
    with torch.inference_mode():
        logits = model(ids[None]).logits[0, :-1].float()
    token_nll = -F.log_softmax(logits, dim=-1).gather(1, ids[1:, None])[:, 0]
    return token_nll.sum().item(), token_nll.max().item()


def body_inputs(model) -> list[tuple[int, int]]:
    """The shape of the input ids of each call of the model's body from now on, appended as it runs."""
    seen = []
    forward = model.model.forward

    def recording(*args, **kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    model.model.forward = recording
    return seen


def assert_each_row_as_alone(model, scorer: NLLScorer, tensors: dict[str, torch.Tensor]) -> None:
    out = scorer(**tensors)
    for row in range(tensors["input_ids"].shape[0]):
        real = tensors["attention_mask"][row].bool()
        if not real.any():
            assert out.n_tokens[row] == 0 and out.nll_sum[row] == 0
            continue
        nll_sum, max_nll = alone(model, tensors["input_ids"][row][real])
        assert out.n_tokens[row].item() == int(real.sum()) - 1
        assert out.nll_sum[row].item() == pytest.approx(nll_sum, abs=1e-4)
        assert out.max_token_nll[row].item() == pytest.approx(max_nll, abs=1e-5)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_each_architecture_scores_unpadded_as_each_sample_alone(model_type, side):
    assert set(CONFIGS) == UNPADDED_MODEL_TYPES  # every one used is tested here
    model = tiny(CONFIGS[model_type]())
    for count_correct in (True, False):
        scorer = NLLScorer(model, head_chunk_tokens=13, count_correct=count_correct)
        assert scorer.unpadded, model_type
        assert_each_row_as_alone(model, scorer, batch([17, 3, 40, 9, 40, 2], side, empty_rows=2))


def test_the_body_sees_the_real_tokens_and_filler_to_a_round_length_only():
    """Packed, the row is the real tokens and filler up to a multiple of PACKED_STEP (never past
    the padded batch's size); the filler changes no loss, and the model keeps its attention."""
    model = tiny(LlamaConfig(**SMALL | {"max_position_embeddings": 512}))
    scorer = NLLScorer(model)
    seen = body_inputs(model)
    large, small = batch([200, 250, 10], "right", empty_rows=1), batch([12, 30, 5], "left")
    scorer(**large)
    scorer(**small)
    assert PACKED_STEP == 256 and [width for _, width in seen] == [
        512,
        3 * 30,
    ]  # 460 real tokens of 4 x 250; 47 of 3 x 30
    assert model.config._attn_implementation == "sdpa"  # set for the call only
    assert_each_row_as_alone(model, scorer, large)


def test_the_attention_is_restored_after_an_error():
    model = tiny(LlamaConfig(**SMALL))
    scorer = NLLScorer(model)
    tensors = batch([12, 30], "right")
    tensors["input_ids"][0, 3] = 10_000  # past the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        scorer(**tensors)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(lambda: MistralConfig(**SMALL, sliding_window=4), id="mistral sliding window"),
        pytest.param(
            lambda: Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=0),
            id="qwen2 sliding window",
        ),
        pytest.param(
            lambda: GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128),
            id="gpt2 not listed",
        ),
    ],
)
def test_an_attention_it_does_not_do_keeps_the_padding(config):
    """A sliding window is not applied by `unpadded_sdpa`; an architecture not on the list may mix
    positions outside its attention. Either keeps the padded path, and still scores correctly."""
    model = tiny(config())
    scorer = NLLScorer(model)
    assert scorer.fast_path and not scorer.unpadded
    assert_each_row_as_alone(model, scorer, batch([17, 3, 40, 9], "right", empty_rows=1))


def test_rows_within_a_sliding_window_go_unpadded_and_longer_ones_padded():
    """A window at least as long as the rows changes nothing (released Phi-3 and Mistral configs
    set one): those batches are packed, longer ones keep the padding and the window."""
    model = tiny(Phi3Config(**SMALL, bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=24))
    scorer = NLLScorer(model)
    assert scorer.unpadded
    assert_each_row_as_alone(model, scorer, batch([20, 3, 24], "right"))
    assert_each_row_as_alone(model, scorer, batch([20, 3, 40], "left"))
    seen = body_inputs(model)
    scorer(**batch([20, 3, 24], "right"))
    scorer(**batch([20, 3, 40], "right"))
    assert seen == [(1, 3 * 24), (3, 40)]  # packed (47 tokens, filler to 3 x 24), then the rows padded


def test_an_attention_that_gets_the_packed_rows_wrong_is_caught_by_the_check():
    """The start-up check compares losses, not only whether the attention runs: an attention that
    scrambles which keys belong to which token is rejected, and the scorer keeps the padding."""
    from transformers import AttentionInterface

    from pipeline.unpadded import UNPADDED, unpadded_sdpa

    def scrambled(module, query, key, value, *args, **kwargs):
        return unpadded_sdpa(module, query, key.roll(1, dims=2), value, *args, **kwargs)

    AttentionInterface.register(UNPADDED, scrambled)
    try:
        assert not NLLScorer(tiny(LlamaConfig(**SMALL))).unpadded
    finally:
        AttentionInterface.register(UNPADDED, unpadded_sdpa)
    assert NLLScorer(tiny(LlamaConfig(**SMALL))).unpadded


def test_a_layer_that_attends_by_other_means_is_caught_by_the_check():
    """A layer whose attention does not go through `unpadded_sdpa` would attend across the packed
    samples: here the first layer keeps plain SDPA through a config of its own."""
    import copy

    model = tiny(LlamaConfig(**SMALL))
    model.model.layers[0].self_attn.config = copy.deepcopy(model.config)
    scorer = NLLScorer(model)
    assert not scorer.unpadded
    assert_each_row_as_alone(model, scorer, batch([17, 3, 40], "right"))
    # the count alone: a layer the attention calls do not account for, with losses unchanged
    model = tiny(LlamaConfig(**SMALL))
    assert NLLScorer(model).unpadded
    model.config.num_hidden_layers += 1
    assert not NLLScorer(model).unpadded


def test_a_bidirectional_attention_is_not_unpadded():
    model = tiny(GemmaConfig(**SMALL, head_dim=16, use_bidirectional_attention=True))
    assert not NLLScorer(model).unpadded


def test_a_model_with_another_attention_chosen_keeps_it():
    model = tiny(LlamaConfig(**SMALL))
    model.config._attn_implementation = "eager"
    assert not NLLScorer(model).unpadded
