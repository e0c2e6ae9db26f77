"""A batch through the model's body without computing its padding.

The body's per-token work (every linear layer, the norms, the activations) runs on the real tokens
only, laid end to end as one row of T tokens with their own positions; only the attention puts them
back into their rows, right-padded, for one causal `scaled_dot_product_attention`, and takes the
real tokens out again:

    rows (B x L, padded)      ->  packed (1 x T)  ->  q, k, v projections, rotary, ... (T rows)
                                                   ->  attention: scatter into (B, L), causal, gather
                                                   ->  o_proj, MLP, norms (T rows)

vLLM computes no padding either. In a window of the score stage 9% of the padded tokens were
padding (docs/results/2026-12-05-score-layers-compiled.md). The attention still runs on the padded
rows: its scatter and gather take the place of the copy that transposing its output made anyway.

It runs through transformers' attention interface under a name of its own (`UNPADDED`), set on the
model's config only for the call (`attention_as`): under that name transformers builds no mask, and
`unpadded_sdpa` takes where each token goes from the call's keyword arguments (`row_slots`,
`row_shape`). An attention with anything this function does not do (a sliding window shorter than
the rows, logit soft-capping, attention sinks, a position bias, no causal mask) raises, and
NLLScorer checks the result against the padded batch before it relies on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

UNPADDED = "midrank_unpadded"
# The packed row's length is rounded up to a multiple of this (never past the padded batch's size),
# with filler tokens whose outputs nobody reads, so that the body sees few shapes: on glibc's
# malloc the peak memory of 1,600 documents grew 21% over a tenth of them with the length free, 12%
# rounded, 9% with the padding computed (docs/results/2026-12-05-score-unpadded.md). The filler is
# at most 255 tokens, 3.1% of a full 16 x 512 batch.
PACKED_STEP = 256
NOT_DONE_HERE = ("softcap", "s_aux", "position_bias")


def unpadded_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    row_slots: torch.Tensor,
    row_shape: torch.Tensor,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention over packed tokens: `query`, `key`, `value` are (1, heads, T, dim); real
    token i sits at `row_slots[i]` (row * L + its position) of the (B, L) rows that `row_shape` has
    the shape of, and the tokens past the last real one are filler (`unpadded_inputs`), given
    zeros. Returns (1, T, heads, dim), as transformers' own attention functions do."""
    rows, length = row_shape.shape
    window = kwargs.pop("sliding_window", None)
    extra = [name for name in NOT_DONE_HERE if kwargs.get(name) is not None]
    if window is not None and window < length:  # a window at least as long as the rows changes nothing
        extra.append("sliding_window")
    if getattr(module, "is_causal", True) is False or kwargs.get("is_causal") is False:
        extra.append("bidirectional attention")
    if extra or attention_mask is not None or dropout:
        raise ValueError(f"unpadded attention does not do {extra or 'masks or dropout'}")

    def in_rows(packed: torch.Tensor) -> torch.Tensor:
        heads, dim = packed.shape[1], packed.shape[3]
        # zeros, not empty: the padding's keys and values must be finite, though no real token
        # attends to them (all of a row's padding comes after its real tokens)
        padded = packed.new_zeros(rows * length, heads, dim)
        padded.index_copy_(0, row_slots, packed[0, :, : row_slots.shape[0]].transpose(0, 1))
        return padded.view(rows, length, heads, dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        in_rows(query),
        in_rows(key),
        in_rows(value),
        is_causal=True,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    heads, dim = out.shape[1], out.shape[3]
    out = out.transpose(1, 2).reshape(rows * length, heads, dim).index_select(0, row_slots)
    return F.pad(out, (0, 0, 0, 0, 0, query.shape[2] - row_slots.shape[0]))[None], None


AttentionInterface.register(UNPADDED, unpadded_sdpa)


@contextmanager
def attention_as(model: torch.nn.Module, name: str) -> Iterator[None]:
    """The model's attention implementation set to `name` for the block only: the model may be
    trained or evaluated with its own elsewhere."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def unpadded_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The body's keyword arguments for a padded batch packed (input ids, `positions` counting real
    tokens only, where each token goes), and each padded slot's index among the packed tokens (-1
    for padding). Any padding side: a left-padded row goes into the attention right-padded."""
    real = attention_mask.bool()
    rows, length = real.shape
    slots = (torch.arange(rows, device=real.device)[:, None] * length + positions)[real]
    packed_index = real.flatten().long().cumsum(0) - 1
    packed_index[~real.flatten()] = -1
    n = slots.numel()
    filler = min(-(-n // PACKED_STEP) * PACKED_STEP, rows * length) - n  # n <= rows * length
    kwargs = {
        "input_ids": F.pad(input_ids[real], (0, filler))[None],
        "position_ids": F.pad(positions[real], (0, filler))[None],
        "row_slots": slots,
        "row_shape": real,
    }
    return packed_index, kwargs
