"""From records to token sequences ready for scoring: BOS, truncation or windows, target masks.

BOS policy: when `score.add_bos` is on and the tokenizer has a BOS token, it is prepended (the text
itself is encoded without special tokens, so it is never added twice). The BOS is context only:
every real token is then a target, predicted from what precedes it. Without a BOS, the first token
has nothing to be predicted from and is context only.

Long documents (`score.long_docs`):
- `truncate`: keep the first `max_tokens` tokens (BOS included); `truncated` is set.
- `split`: consecutive windows of at most `max_tokens` tokens, each starting with the last token of
  the previous one as context, so every target token of the document is scored exactly once and
  the windows' `nll_sum`s add up to the document's. Window k's sample_id is `<sample_id>#<k>`.

A sequence with no target token (fewer than 2 tokens, e.g. a one-token text without BOS) is not a
sample: it is counted as `too_short`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.records import Record


@dataclass(frozen=True, slots=True)
class Sample:
    sample_id: str
    source: str
    window: int
    input_ids: list[int]
    n_context: int
    """Leading tokens that are context only (the BOS, or the first token); targets follow them."""
    char_start: int
    """Span of the record's text covered by this sample's target tokens (for joining text back)."""
    char_end: int
    n_chars: int
    """Characters in the whole record's text."""
    truncated: bool

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids) - self.n_context


def bos_to_add(tokenizer, add_bos: bool) -> int | None:
    return tokenizer.bos_token_id if add_bos and tokenizer.bos_token_id is not None else None


def make_samples(
    record: Record, tokenizer, bos_id: int | None, max_tokens: int, long_docs: str
) -> tuple[list[Sample], str | None]:
    """The samples of one record, or ([], reason) when it yields none."""
    encoded = tokenizer(record.text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    offsets: list[tuple[int, int]] = encoded["offset_mapping"]
    if bos_id is not None:
        ids = [bos_id, *ids]
        offsets = [(0, 0), *offsets]
    if len(ids) < 2:
        return [], "too_short"
    if len(ids) <= max_tokens or long_docs == "truncate":
        starts, suffix = [0], False  # the whole document, or its first max_tokens
    else:
        # consecutive windows share one token: the last target of one is the next one's context
        starts, suffix = list(range(0, len(ids) - 1, max_tokens - 1)), True
    samples = []
    for k, start in enumerate(starts):
        window_ids = ids[start : start + max_tokens]
        window_offsets = offsets[start : start + max_tokens]
        samples.append(
            Sample(
                f"{record.sample_id}#{k}" if suffix else record.sample_id,
                record.source,
                k,
                window_ids,
                1,
                window_offsets[1][0],
                window_offsets[-1][1],
                len(record.text),
                not suffix and len(ids) > max_tokens,
            )
        )
    return samples, None
