"""From records to token sequences ready for scoring or training: BOS, templates, truncation or
windows, and which positions are targets.

Plain text. When `score.add_bos` is on and the tokenizer has a BOS token, it is prepended (the text
itself is encoded without special tokens, so it is never added twice). The BOS is context only:
every real token is then a target, predicted from what precedes it. Without a BOS, the first token
has nothing to be predicted from and is context only.

Long documents (`score.long_docs`):
- `truncate`: keep the first `max_tokens` tokens (BOS included); `truncated` is set.
- `split`: strided windows of at most `max_tokens` tokens. Every token after the first is a target
  in exactly one window (so the windows' `n_tokens` add up to the document's); each window after
  the first also holds, as context only, up to `score.split_context_tokens` (C) tokens that precede
  its targets — the BOS too, when the context reaches back to the start. The targets are shared
  out evenly: n = ceil(T / (max_tokens - C)) windows for T targets, each with T/n of them (to
  within one), so no window is a stub of a few tokens whose loss would rank it at an extreme.
  A window whose context reaches the document's start sees exactly what the unsplit document
  sees, so its `nll_sum` equals the unsplit one's over the same targets; otherwise it is the loss
  given only the C tokens before its targets, with no BOS (more context: closer, at
  max_tokens / (max_tokens - C) the compute per target; a BOS in place of the first context token
  was measured not to help, bench/bench_split_context.py). Window k's sample_id is
  `<sample_id>#<k>`.

Instruction data (corpus.mode prompt_response / alpaca / chat). Only the responses are targets:
the prompt and the template's tokens are context. With `score.prompt_format: chat_template` the
conversation is rendered by the tokenizer's chat template; each assistant turn's characters are
found by rendering the conversation up to that turn with and without it, and the tokens that start
inside them are the targets (so the turn's end marker, e.g. `<|im_end|>`, is a target: the model
must learn to stop). With `plain`, the sequence is BOS + prompt + a blank line + response, the
response tokenized on its own. `score.score_prompt` makes every token after the first a target.
Instruction samples are always truncated (a window without its prompt would be meaningless).

A sequence with no target token is not a sample: `too_short` (fewer than 2 tokens),
`empty_response` (no response text), `response_truncated` (max_tokens ends inside the prompt).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from pipeline.config import ConfigError, ScoreConfig
from pipeline.records import Record
from pipeline.text_flags import markup_bytes, mojibake_count

Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Sample:
    sample_id: str
    source: str
    window: int
    input_ids: list[int]
    targets: tuple[Span, ...]
    """[start, end) runs of input_ids that are targets; everything else is context."""
    char_start: int
    """Span of the record's text covered by this sample's target tokens (for joining text back)."""
    char_end: int
    n_bytes: int
    """UTF-8 bytes of the text the target tokens cover: the denominator of bits per byte."""
    n_chars: int
    """Characters in the whole record's text (the rendered conversation for instruction data)."""
    truncated: bool
    record_hash: int = 0
    """`records.record_digest` of the record the sample came from."""
    unconditional: bool = False
    """A response of the sample `sample_id` without its prompt (score.unconditional): scored
    beside it, its NLL summed into the sample's `nll_sum_uncond`."""
    _: dataclasses.KW_ONLY
    n_markup_bytes: int
    """Of the bytes the targets cover, those inside markup tags (pipeline/text_flags.py)."""
    n_mojibake: int
    """Wrong-charset sequences in the text the targets cover (pipeline/text_flags.py)."""

    @property
    def n_tokens(self) -> int:
        return sum(end - start for start, end in self.targets)


@dataclass(frozen=True, slots=True)
class SamplePolicy:
    """How records become token sequences. Scoring, training and evaluation each build one from the
    same `score` settings (BOS, prompt format, whether prompts are targets), so a record is trained
    and evaluated on the targets it was scored on — up to the length limit each one sets. A split
    window is selected as its target text and trained as a document of its own, without the
    context it was scored with."""

    max_tokens: int
    bos_id: int | None
    long_docs: str = "truncate"
    split_context_tokens: int = 1
    prompt_format: str = "chat_template"
    score_prompt: bool = False
    unconditional_ids: tuple[int, ...] = ()
    """score.unconditional: the context each response is scored after without its prompt (the
    prefix's tokens, or BOS); empty when off."""

    @classmethod
    def of(cls, score: ScoreConfig, tokenizer, *, max_tokens: int | None = None) -> SamplePolicy:
        """The scoring policy of `score`; with `max_tokens` (training, evaluation), the same
        targets truncated to that length."""
        bos_id = tokenizer.bos_token_id if score.add_bos else None
        unconditional: tuple[int, ...] = ()
        if score.unconditional and not max_tokens:
            prefix = tokenizer(score.unconditional_prefix, add_special_tokens=False)["input_ids"]
            unconditional = (
                tuple(prefix) if score.unconditional_prefix else (() if bos_id is None else (bos_id,))
            )
            if not unconditional:
                raise ConfigError(
                    f"score.unconditional: {tokenizer.name_or_path} has no BOS token (or score.add_bos is off), "
                    "so a response alone has nothing to be predicted from; set score.unconditional_prefix"
                )
        return cls(
            max_tokens=max_tokens or score.max_tokens,
            bos_id=bos_id,
            long_docs="truncate" if max_tokens else score.long_docs,
            split_context_tokens=score.resolved_split_context(),
            prompt_format=score.prompt_format,
            score_prompt=score.score_prompt,
            unconditional_ids=unconditional,
        )


def make_samples(record: Record, tokenizer, policy: SamplePolicy) -> tuple[list[Sample], str | None]:
    """The samples of one record, or ([], reason) when it yields none."""
    if record.messages is not None or record.prompt is not None:
        return instruction_sample(record, tokenizer, policy)
    needed = policy.max_tokens if policy.long_docs == "truncate" else None
    ids, offsets = encode_start(tokenizer, record.text, needed)
    if policy.bos_id is not None:
        ids = [policy.bos_id, *ids]
        offsets = [(0, 0), *offsets]
    if len(ids) < 2:
        return [], "too_short"
    max_tokens = policy.max_tokens
    if len(ids) <= max_tokens or policy.long_docs == "truncate":
        truncated = len(ids) > max_tokens
        ids, offsets = ids[:max_tokens], offsets[:max_tokens]
        sample = Sample(
            record.sample_id,
            record.source,
            0,
            ids,
            ((1, len(ids)),),
            offsets[1][0],
            offsets[-1][1],
            n_chars=len(record.text),
            truncated=truncated,
            **text_counts(record.text[offsets[1][0] : offsets[-1][1]]),
        )
        return [sample], None
    samples = []
    for k, (context, first, end) in enumerate(
        split_windows(len(ids), max_tokens, policy.split_context_tokens)
    ):
        samples.append(
            Sample(
                f"{record.sample_id}#{k}",
                record.source,
                k,
                ids[context:end],
                ((first - context, end - context),),
                offsets[first][0],
                offsets[end - 1][1],
                n_chars=len(record.text),
                truncated=False,
                **text_counts(record.text[offsets[first][0] : offsets[end - 1][1]]),
            )
        )
    return samples, None


# Characters tried per token needed, and tokens tokenized past the cut: a prefix's tokens equal the
# whole text's except near the cut (the last word there may split otherwise), so tokens well before
# it are the ones the whole text would give.
CHARS_PER_TOKEN, CUT_MARGIN = 8, 32


def encode_start(tokenizer, text: str, needed: int | None) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`, or of enough of its start to give `needed`
    tokens and more (the rest is then cut anyway): a 5 MB document truncated to 512 tokens is
    not tokenized whole. Returns more than `needed` tokens whenever the text has more."""
    limit = None if needed is None else (needed + CUT_MARGIN) * CHARS_PER_TOKEN
    while True:
        whole = limit is None or limit >= len(text)
        encoded = tokenizer(
            text if whole else text[:limit], add_special_tokens=False, return_offsets_mapping=True
        )
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        if whole or len(ids) > needed + CUT_MARGIN:
            return (ids, offsets) if whole else (ids[: needed + 1], offsets[: needed + 1])
        limit *= 4  # tokens longer than CHARS_PER_TOKEN on average: take more of the text


def split_windows(length: int, max_tokens: int, context: int) -> list[tuple[int, int, int]]:
    """(context start, first target, end) of each window of a `length`-token sequence whose first
    token is context only: targets 1..length-1 shared evenly among windows of at most max_tokens,
    each preceded by up to `context` tokens.

        positions   0  1  2  3  4  5  6  7  8  9        length 10, max_tokens 6, context 2
        window 0    c  t  t  t                          targets 1..3 (9 targets, 3 windows of 3)
        window 1          c  c  t  t  t                 targets 4..6, context 2..3
        window 2                   c  c  t  t  t        targets 7..9, context 5..6
    """
    targets, per_window = length - 1, max_tokens - context
    n = -(-targets // per_window)
    bounds = [1 + targets * k // n for k in range(n + 1)]
    return [(max(0, first - context), first, end) for first, end in itertools.pairwise(bounds)]


def conversation_of(record: Record) -> tuple[dict[str, str], ...]:
    if record.messages is not None:
        return record.messages
    prompt = [{"role": "user", "content": record.prompt}] if record.prompt else []
    return (*prompt, {"role": "assistant", "content": record.text})


def has_response(record: Record) -> bool:
    return any(m["role"] == "assistant" and m["content"].strip() for m in conversation_of(record))


def render_chat(messages: tuple[dict[str, str], ...], tokenizer) -> tuple[str, list[Span]]:
    """The conversation through the chat template, and the character span of each assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"model.path: the tokenizer ({tokenizer.name_or_path}) has no chat template; add one to its "
            "tokenizer_config.json, or for prompt/response data set score.prompt_format=plain"
        )

    def render(turns, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(
            list(turns), tokenize=False, add_generation_prompt=generation_prompt
        )

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], generation_prompt=True), render(messages[: i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise ConfigError(
                f"model.path: the chat template of {tokenizer.name_or_path} does not render a conversation "
                "turn by turn (a prefix changes when a turn is added), so the responses cannot be located"
            )
        spans.append((len(before), len(through)))
    return full, spans


def instruction_sample(record: Record, tokenizer, policy: SamplePolicy) -> tuple[list[Sample], str | None]:
    if not has_response(record):
        return [], "empty_response"
    if policy.prompt_format == "chat_template" or record.messages is not None:
        text, char_spans = render_chat(conversation_of(record), tokenizer)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        target = [any(s <= start < e for s, e in char_spans) for start, _ in offsets]
    else:
        prompt = f"{record.prompt}\n\n" if record.prompt else ""
        prefix = [] if policy.bos_id is None else [policy.bos_id]
        encoded_prompt = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        response = tokenizer(record.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = prefix + encoded_prompt["input_ids"] + response["input_ids"]
        # offsets into prompt + response, the text the sequence reads
        offsets = [(0, 0)] * len(prefix) + list(encoded_prompt["offset_mapping"])
        offsets += [(a + len(prompt), b + len(prompt)) for a, b in response["offset_mapping"]]
        target = [False] * (len(prefix) + len(encoded_prompt["input_ids"])) + [True] * len(
            response["input_ids"]
        )
        text = prompt + record.text
    if policy.score_prompt:
        target = [False] + [True] * (len(ids) - 1)
    truncated = len(ids) > policy.max_tokens
    ids, target = ids[: policy.max_tokens], target[: policy.max_tokens]
    target[0] = False  # the first token has nothing to be predicted from
    spans = runs_of(target)
    if not spans:
        return [], "too_short" if len(ids) < 2 else "response_truncated"
    covered = covered_text(text, [offsets[i] for first, end in spans for i in range(first, end)])
    return [
        Sample(
            record.sample_id,
            record.source,
            0,
            ids,
            spans,
            0,
            len(record.text),
            n_chars=len(text),
            truncated=truncated,
            **text_counts(covered, special_strings(tokenizer)),
        )
    ], None


def unconditional_samples(sample: Sample, context: tuple[int, ...]) -> list[Sample]:
    """The sample's responses without their prompt: each run of targets (an assistant turn)
    after `context` alone, the same target tokens. Their NLLs summed give the sample's
    unconditional NLL over exactly its targets.

        conditional     <sys> <user> question <asst> answer-1 <end> <user> more <asst> answer-2 <end>
        unconditional   <ctx> answer-1 <end>        <ctx> answer-2 <end>     (targets: the same tokens)
    """
    return [
        dataclasses.replace(
            sample,
            input_ids=[*context, *sample.input_ids[start:end]],
            targets=((len(context), len(context) + end - start),),
            n_bytes=0,
            n_markup_bytes=0,
            n_mojibake=0,
            unconditional=True,
        )
        for start, end in sample.targets
    ]


def text_counts(text: str, special: tuple[str, ...] = ()) -> dict[str, int]:
    """What the scores store of the text a sample's targets cover: its UTF-8 bytes, the bytes
    inside markup tags (the strings in `special`, a chat template's special tokens, are not
    markup), and its wrong-charset sequences."""
    return {
        "n_bytes": len(text.encode()),
        "n_markup_bytes": markup_bytes(text, special),
        "n_mojibake": mojibake_count(text),
    }


def special_strings(tokenizer) -> tuple[str, ...]:
    """The text of the tokenizer's special tokens (`</s>`, `<end_of_turn>`): what a chat template
    writes around the turns, longest first."""
    added = (t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return tuple(sorted({*tokenizer.all_special_tokens, *added}, key=len, reverse=True))


def covered_text(text: str, offsets: list[tuple[int, int]]) -> str:
    """The characters of `text` that at least one (start, end) span covers, in order (a
    character split over two byte-level tokens is taken once)."""
    pieces, end_so_far = [], 0
    for start, end in sorted(offsets):
        start = max(start, end_so_far)
        if end > start:
            pieces.append(text[start:end])
            end_so_far = end
    return "".join(pieces)


def runs_of(flags: list[bool]) -> tuple[Span, ...]:
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return tuple(runs)
