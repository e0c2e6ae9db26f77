"""Rank keys: what a band ranks samples by (docs/design.md §5), each derived from stored score
columns (computed by pipeline/key_columns.py). This module depends on nothing of the selection, so
the config can name the keys.

- `loss`: mean NLL of the target tokens, nats/token (the paper's key).
- `bits_per_byte`: nll_sum / (ln 2 x n_bytes), the bits the model needs per byte of the text the
  targets cover. It does not depend on the tokenizer: two models with different vocabularies put
  the same text on the same scale.
- `length_adjusted`: loss minus the loss expected at the sample's length. Mean token loss falls
  with length (the first tokens of a text are the hardest to predict), so on a corpus of mixed
  lengths a band by plain loss is partly a length filter: the top holds the shortest samples. The
  expectation is the corpus's own (its `LengthCurve`): the median loss in log-spaced length bins,
  sparse bins merged with the next until each holds MIN_BIN_SAMPLES samples, and linear in
  log(length) between the bins' median lengths (flat beyond the first and the last). Medians,
  not means: the garbage a band is meant to drop should not pull the expectation up. The curve
  is estimated over the samples that are ranked, over the whole corpus or within each source,
  and recorded in the band's manifest, so the key can be recomputed from it. It is flat below the
  first bin's median length, and the spread of loss is not taken out: the shortest texts, whose
  loss varies most, still reach the top more often than long ones (min_tokens is the remedy).
- `tokens_per_byte`: n_tokens / n_bytes, the tokenizer's fertility on the text. A vocabulary
  learned from natural text covers its words in a few long tokens (about 0.27 tokens per byte on
  the embedded corpus); text it rarely saw — random characters, base64 and hex blobs, numeric
  tables, a script of another language — splits into short pieces (medians 0.63-0.89 per kind).
  Such text can be *easy* for the model once split (the digits of a table repeat, each Georgian
  letter is one predictable token), so loss and bits per byte rank it below real prose; this key
  ranks it at the top. It depends on the tokenizer, not on what the model learned.
- `markup_share`: n_markup_bytes / n_bytes, the share of the text inside HTML/XML tags — page
  boilerplate that text extraction left in, which the model predicts well (tags and classes
  repeat). Counted by the scorer (pipeline/text_flags.py), not by the model.
- `mojibake`: n_mojibake / n_bytes, wrong-charset sequences (`Ã©` for `é`, as ftfy finds them) per
  byte. Garbled text costs the model more than prose, but within real text's spread, so a loss
  top reaches only part of it. Counted by the scorer, not by the model.

markup_share and mojibake are flag keys (FLAG_KEYS): 0 on clean text, so they serve `drop_top`
(where a share is a ceiling on what they flag) and are refused as a band's `rank_by`, which would
fill its share with unflagged samples in sample_id order.
- `ifd` (instruction data scored with score.unconditional): the instruction-following difficulty
  of Li et al. (2023), nll_sum / nll_sum_uncond — the response's loss given its prompt over its
  loss without it, on the same tokens. Near 1 (or above) when the prompt does not help predict the
  answer: a wrong answer is fluent text whose loss barely depends on the question, so plain loss
  keeps it while ifd ranks it at the top.
- `reducible` (with a target model's scores: pipeline/target_scores.py): loss - loss_target, the
  reference model's loss minus the target model's on the same tokens, where the target model is
  the reference fine-tuned on a small set of the data wanted (RHO-LOSS, Mindermann et al. 2022;
  CoLoR-Filter, Brandfonbrener et al. 2024). Noise is hard for both models (near 0); text the
  reference finds easy already is easy for both (near 0); text of the kind the target set holds
  that the reference has not learned yet is what the fine-tune made easier (large). Its top is
  the learnable, wanted data, not the merely hard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

RankKey = Literal[
    "loss", "bits_per_byte", "length_adjusted", "tokens_per_byte", "markup_share", "mojibake", "ifd",
    "reducible",
]  # fmt: skip
RANK_KEYS: tuple[str, ...] = get_args(RankKey)

PER_BYTE = {"tokens_per_byte": "n_tokens", "markup_share": "n_markup_bytes", "mojibake": "n_mojibake"}
"""The keys that are a stored count over the text's bytes, and their count."""
FLAG_KEYS = ("markup_share", "mojibake")
"""Keys that are 0 on clean text: `drop_top` drops only what they flag, so a share above the
flagged samples' does not drop clean ones in sample_id order."""
ALL_SOURCES = "*"
"""The curve's name when it is estimated over every source together."""


@dataclass(frozen=True, slots=True)
class LengthCurve:
    """The expected loss at each length, as the manifest records it."""

    edges: list[int]
    """Bin edges in tokens after merging: bin i holds lengths in [edges[i], edges[i + 1])."""
    lengths: list[float]
    """Each bin's median length (tokens): where its median loss is placed on the curve."""
    losses: list[float]
    """Each bin's median loss (nats/token)."""
    samples: list[int]

    def at(self, lengths: np.ndarray) -> np.ndarray:
        """The expected loss at each length: linear in log(length) between the points, flat
        beyond the first and the last."""
        return np.interp(np.log(lengths), np.log(self.lengths), self.losses)
