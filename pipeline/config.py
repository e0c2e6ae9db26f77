"""Typed, validated configuration: YAML presets merged onto frozen dataclasses, then dotted overrides.

    cfg = load_config("configs/default.yaml", ["score.batch_tokens=8192", "corpus.on_error=skip"])

Every section is a frozen dataclass whose fields carry their defaults and a docstring. Loading is
strict: an unknown key, a value of the wrong type or one outside its allowed set raises
`ConfigError` naming the dotted key (and the allowed keys or values), so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.codec import decode, encode
from pipeline.rank_keys import FLAG_KEYS, RANK_KEYS, RankKey
from pipeline.shares import exact_share, share_of


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# A name that becomes a folder under out_dir (a band, a run, a report): letters, digits and . _ + - =,
# not starting with '.' (that would be hidden, or '..'), so it can never leave its parent folder.
SAFE_NAME = re.compile(r"[A-Za-z0-9_+=-][A-Za-z0-9._+=-]{0,127}")


def is_safe_name(name: str) -> bool:
    return SAFE_NAME.fullmatch(name) is not None


def _require_name(value: str, key: str, *, optional: bool = False) -> None:
    if optional and value == "":
        return
    _require(
        is_safe_name(value),
        key,
        f"must be a plain name of letters, digits and . _ + - = (not starting with '.', at most 128), "
        f"got {value!r}",
    )


def _require_shares(section: Any, *keys: str) -> None:
    """Each named field is a share: within [0, 1]."""
    for key in keys:
        value = getattr(section, key)
        _require(0.0 <= value <= 1.0, key, f"must be within [0, 1], got {value}")


def _require_band_fits(skip: float, keep: float, key: str = "keep") -> None:
    """skip + keep <= 1, in exact decimals."""
    _require(
        exact_share(skip) + exact_share(keep) <= 1, key, f"skip + keep must be <= 1, got {skip} + {keep}"
    )


# ------------------------------------------------------------------------------------------------
# Sections


@dataclass(kw_only=True, slots=True, frozen=True)
class CorpusConfig:
    paths: tuple[str, ...]
    """Files, directories or glob patterns to read (JSONL[.gz|.zst], Parquet, a
    `datasets.save_to_disk` directory, or a directory of text files). Relative paths are taken from
    the working directory; sample_ids only use the part below each entry, so moving the corpus does
    not change them."""

    format: Literal["auto", "jsonl", "parquet", "hf_disk", "text"] = "auto"
    """Input format; `auto` decides per file from its suffix (and per directory from its content)."""

    mode: Literal["text", "prompt_response", "alpaca", "chat"] = "text"
    """What a record holds: a plain `text`; a prompt/response pair; an Alpaca-style
    instruction/input/output record (prompt = instruction, plus a blank line and the input when
    there is one); or a chat `messages` list of {role, content}. Only responses are scored."""

    text_field: str = "text"
    """Field holding the document text (mode=text)."""

    prompt_field: str = "prompt"
    """Field holding the prompt (mode=prompt_response); context only, never a scoring target."""

    response_field: str = "response"
    """Field holding the response (mode=prompt_response)."""

    instruction_field: str = "instruction"
    """mode=alpaca: the instruction (part of the prompt)."""

    input_field: str = "input"
    """mode=alpaca: the optional input (part of the prompt; may be missing or empty)."""

    output_field: str = "output"
    """mode=alpaca: the response."""

    messages_field: str = "messages"
    """Field holding a list of {role, content} messages (mode=chat)."""

    source_field: str | None = None
    """Field holding the record's domain label. When unset, the source is the input file's stem
    (or, for a directory of text files, its first sub-directory)."""

    text_glob: str = "**/*.txt"
    """Which files of a text directory are documents (one document per file)."""

    num_shards: int = 8
    """Number of shards the corpus is cut into: contiguous, near-equal row ranges in a fixed
    order; the unit of scoring, resumption and multi-rank work."""

    on_error: Literal["raise", "skip"] = "raise"
    """Bad input (malformed JSON, non-UTF-8 bytes, a missing/non-string field, an empty text):
    `raise` stops with the file, line and field; `skip` counts it under its reason and goes on."""

    def __post_init__(self) -> None:
        _require(len(self.paths) > 0, "paths", "at least one input path is required")
        # an empty entry would be the working directory, and every file below it an input
        _require(all(p.strip() for p in self.paths), "paths", f"an entry is empty: {list(self.paths)}")
        _require(self.num_shards >= 1, "num_shards", f"must be >= 1, got {self.num_shards}")


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelConfig:
    path: str
    """A local `save_pretrained` directory (safetensors + tokenizer). Hub names only work online."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype. `auto`: bf16 where the hardware supports it, else fp32. Losses are always
    accumulated in fp32."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` takes the GPU of this rank's LOCAL_RANK when CUDA is available, else the CPU."""

    trust_remote_code: bool = False
    """Run code shipped with the model. Off unless you trust the model directory."""

    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""

    cpu_allocator: Literal["auto", "system"] = "auto"
    """The malloc of `midrank score` on the CPU (pipeline/cpu_memory.py). `auto`: jemalloc when
    installed (the command re-executes itself with it preloaded), else the system's; `system`: the
    system's. Whatever is in LD_PRELOAD already is kept. Training keeps glibc's (under jemalloc it
    peaked at 2.6x the memory)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class ScoreConfig:
    max_tokens: int = 512
    """Longest sequence scored at once (tokens, BOS included)."""

    long_docs: Literal["truncate", "split"] = "truncate"
    """A document longer than max_tokens is cut to it (`truncate`) or scored as strided windows
    that become separate samples, `sample_id` + window index (`split`)."""

    split_context_tokens: int | None = None
    """long_docs=split: each window after the first conditions on up to this many preceding tokens
    (context only, never targets; within max_tokens). More context scores later windows closer to
    how the whole document would be, at max_tokens / (max_tokens - C) the compute per target.
    Default: a quarter of max_tokens."""

    batch_tokens: int = 8192
    """Token budget of one batch (padded length x rows); halved automatically on out-of-memory."""

    add_bos: bool = True
    """Prepend the tokenizer's BOS token when it has one, so the first real token is a target."""

    window_rows: int = 512
    """Rows read, sorted by length and packed together; also the checkpoint unit: results are
    written after each window, so a killed run loses at most one window per rank."""

    head_chunk_tokens: int = 1024
    """Target tokens per LM-head chunk: bounds the fp32 logits to head_chunk_tokens x vocab."""

    num_workers: int = 1
    """DataLoader workers reading and tokenizing ahead of the model (0: in the main process)."""

    compile: Literal[False, True, "auto"] = "auto"
    """Run the model's layers through `torch.compile` (`true`; YAML reads `on` so too) or not
    (`false`, `off`), at a start-up cost that Inductor's cache (~/.cache/midrank/inductor) cuts on
    later runs (pipeline/compiling.py; on a 2-core AMX CPU in bf16: 1.20-1.27x, for ~20 s of
    compiling cold and ~5 s warm). `auto` decides before the first batch: it compiles when the time
    the gain measured on this kind of device and dtype would save on the tokens to score exceeds
    the cost of compiling, and stays eager where no gain was measured (GPUs, so far); a resumed run
    and each rank decide for themselves (`true`/`false` keeps a score set uniform). In bf16
    compiled losses differ from eager ones by up to ~0.06 nats/token on SmolLM2-135M (0.085 with
    AMX withheld; bf16 against fp32: ~0.05)."""

    prompt_format: Literal["chat_template", "plain"] = "chat_template"
    """Instruction data: render prompt and response with the tokenizer's chat template, or as
    BOS + prompt + blank line + response (`plain`). Chat data always uses the template."""

    score_prompt: bool = False
    """Instruction data: score the prompt and template tokens too, not only the responses."""

    unconditional: bool = False
    """Instruction data: also score each response without its prompt -> `nll_sum_uncond` (the same
    target tokens, preceded only by BOS and `unconditional_prefix`), for the `ifd` rank key. It
    costs one more forward of the response tokens per sample, in the same pass. A multi-turn chat's
    assistant turns are each scored alone, and their NLLs summed."""

    unconditional_prefix: str = ""
    """The context each response is scored after in the unconditional pass, as text (special
    tokens written out, e.g. a chat template's assistant header `<|im_start|>assistant\n`); no
    BOS is added to it. Empty: BOS alone. With a chat template, BOS alone is a poor context (for
    SmolLM2 it is `<|im_start|>`, after which a role name is expected): the first response tokens
    then cost tens of nats the prompt never explains, an offset per turn that makes IFD grow with
    the response's length."""

    def __post_init__(self) -> None:
        _require(self.max_tokens >= 2, "max_tokens", f"must be >= 2, got {self.max_tokens}")
        _require(
            not (self.unconditional and self.score_prompt),
            "unconditional",
            "compares a response's loss with and without its prompt; it cannot go with score_prompt=true",
        )
        if self.split_context_tokens is not None:
            _require(
                1 <= self.split_context_tokens < self.max_tokens,
                "split_context_tokens",
                f"must be within [1, max_tokens - 1] = [1, {self.max_tokens - 1}] (a window needs one "
                f"context token and one target), got {self.split_context_tokens}",
            )
        _require(self.window_rows >= 1, "window_rows", f"must be >= 1, got {self.window_rows}")
        _require(
            self.head_chunk_tokens >= 1, "head_chunk_tokens", f"must be >= 1, got {self.head_chunk_tokens}"
        )
        _require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _require(
            self.batch_tokens >= self.max_tokens,
            "batch_tokens",
            f"must be >= max_tokens ({self.max_tokens}), got {self.batch_tokens}",
        )

    def resolved_split_context(self) -> int:
        if self.split_context_tokens is not None:
            return self.split_context_tokens
        return max(1, self.max_tokens // 4)


# Peers' bands, as loss quantiles counted from the easiest sample (low, high).
BAND_PRESETS = {
    "cc_net_head": (0.0, 0.3),
    "cc_net_middle": (0.3, 0.6),
    "cc_net_tail": (0.6, 1.0),
    "marion_middle": (0.35, 0.65),
    "ankner_high50": (0.5, 1.0),
    "ankner_medium50": (0.25, 0.75),
}


@dataclass(kw_only=True, slots=True, frozen=True)
class DropTop:
    """Shares dropped from the top under several rank keys at once, before the band is taken: a
    sample in the top `loss` share by loss, or in the top `bits_per_byte` share by bits per byte,
    ... is dropped (the union), and the band is then taken from what remains. Each key is blind to
    some kind of junk (loss to numeric tables, bits per byte to word salad); together they catch
    more. For the flag keys (markup_share, mojibake) a share is a ceiling: only samples they flag
    are dropped."""

    loss: float = 0.0
    bits_per_byte: float = 0.0
    length_adjusted: float = 0.0
    tokens_per_byte: float = 0.0
    markup_share: float = 0.0
    mojibake: float = 0.0
    ifd: float = 0.0
    reducible: float = 0.0
    """The top by reducible is what the target model learned most from its fine-tune (near-copies
    of the target set, say), not junk, which sits at its bottom."""

    def __post_init__(self) -> None:
        for key in RANK_KEYS:
            value = getattr(self, key)
            _require(0.0 <= value < 1.0, key, f"must be within [0, 1), got {value}")

    def shares(self) -> dict[str, float]:
        """The keys that drop anything, with their shares, in RANK_KEYS order."""
        return {key: getattr(self, key) for key in RANK_KEYS if getattr(self, key) > 0}


assert tuple(f.name for f in dataclasses.fields(DropTop)) == RANK_KEYS, "DropTop has a share per rank key"


@dataclass(kw_only=True, slots=True, frozen=True)
class BandConfig:
    name: str = ""
    """Output directory name under selected/; derived from the parameters when empty."""

    strategy: Literal[
        "midranking", "band", "top", "bottom", "random", "length_matched", "all", *BAND_PRESETS  # type: ignore[misc]
    ] = "midranking"
    """midranking: drop the top `skip`, keep the next `keep` (by loss, hardest first); band: loss
    quantiles [low, high); top/bottom: the `keep` highest/lowest; random: a seeded `keep`;
    length_matched: a seeded random sample with the length distribution of the band `match`
    (a control for it); all; or a peer's preset band (cc_net_head/middle/tail, marion_middle,
    ankner_high50/medium50)."""

    match: str = ""
    """length_matched: the band (its name) whose kept samples' lengths the sample matches; it is
    selected first, in this run or an earlier one."""

    skip: float = 0.1
    """midranking: share of the measure dropped from the top (hardest)."""

    keep: float = 0.5
    """midranking/top/bottom/random: share of the measure kept."""

    low: float = 0.0
    """band: lower loss quantile (0 = easiest)."""

    high: float = 1.0
    """band: upper loss quantile (exclusive)."""

    measure: Literal["samples", "tokens"] = "samples"
    """What the shares count."""

    target_tokens: int = 0
    """An absolute budget in tokens instead of `keep` (0: use `keep`); implies measure=tokens."""

    by_source: bool = False
    """Apply the band within each source, so the domain mix is kept; length_matched: match the
    band's sources and, within each, its lengths (bins of source x length)."""

    seed: int = 0
    """random: the seed of the sample order."""

    weights: bool = False
    """Write an IR-DRO `weight` column: softmax(loss / kl_reg) over the kept set, mean 1."""

    kl_reg: float = 1.0
    """IR-DRO lambda: large -> uniform weights, small -> the hardest sample only."""

    rank_by: RankKey = "loss"
    """What the band ranks by (pipeline/rank_keys.py): loss (nats/token, the paper's key);
    bits_per_byte (the same for any tokenizer); length_adjusted (the loss minus the corpus's median
    loss at that length, so the top is not simply the shortest samples); tokens_per_byte (the
    tokenizer's fertility: blobs, tables and unseen scripts at the top); markup_share and
    mojibake (markup tags and wrong-charset sequences per byte, counted by the scorer); reducible
    (the loss minus a target model's: the `target` section). The shares and
    thresholds count along this ranking; the IR-DRO weights stay softmax(loss / kl_reg)."""

    adjust_by_source: bool = False
    """length_adjusted: estimate the expected loss at each length within each source (a source's
    own typical loss taken out too), not over the whole corpus."""

    min_tokens: int = 0
    """Samples with fewer scored (target) tokens are not ranked: they are rejected as too_short
    and counted, and the shares count the rest (a heading or a one-line fortune has the highest
    loss of all and says little about quality)."""

    drop_top: DropTop = field(default_factory=DropTop)
    """Drop the top share under each of several rank keys first (`drop_top: {loss: 0.1,
    bits_per_byte: 0.05}`): the union is rejected as dropped_top, and the band's shares then
    count what remains. Within each source with by_source; in the band's measure."""

    def __post_init__(self) -> None:
        _require_name(self.name, "name", optional=True)
        _require(
            not self.drop_top.shares() or self.strategy != "length_matched",
            "drop_top",
            "a length_matched sample matches another band's lengths; give drop_top to that band",
        )
        _require_name(self.match, "match", optional=self.strategy != "length_matched")
        _require(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        _require(
            self.rank_by in RANK_KEYS,
            "rank_by",
            f"must be one of {list(RANK_KEYS)}, got {self.rank_by!r}",
        )
        _require(
            self.rank_by not in FLAG_KEYS,
            "rank_by",
            f"{self.rank_by} is 0 on clean text, so a band by it fills its share with unflagged samples; "
            f"use it in drop_top (`drop_top: {{{self.rank_by}: 0.03}}`)",
        )
        _require(
            not self.adjust_by_source or self.rank_by == "length_adjusted",
            "adjust_by_source",
            f"only applies to rank_by=length_adjusted (rank_by is {self.rank_by})",
        )
        _require(
            self.rank_by == "loss" or self.strategy not in ("random", "all", "length_matched"),
            "rank_by",
            f"{self.strategy!r} does not rank samples, so rank_by={self.rank_by} would do nothing; leave it at loss",
        )
        _require_shares(self, "skip", "keep", "low", "high")
        _require(self.keep > 0 or self.target_tokens > 0, "keep", "must be > 0 (an empty band keeps nothing)")
        _require(
            not self.target_tokens or self.strategy in ("midranking", "top", "bottom", "random"),
            "target_tokens",
            f"sets the size of a midranking/top/bottom/random band; {self.strategy!r} has fixed ends",
        )
        if self.strategy == "midranking" and not self.target_tokens:
            _require_band_fits(self.skip, self.keep)
        if self.strategy == "band":
            _require(self.low < self.high, "high", f"must be > low ({self.low}), got {self.high}")
        _require(self.target_tokens >= 0, "target_tokens", f"must be >= 0, got {self.target_tokens}")
        _require(self.kl_reg > 0, "kl_reg", f"must be > 0, got {self.kl_reg}")

    def resolved_name(self) -> str:
        if self.name:
            return self.name
        if self.strategy in BAND_PRESETS or self.strategy == "all":
            parts = [self.strategy]
        elif self.strategy == "length_matched":
            parts = [self.strategy, self.match, f"seed{self.seed}"]
        elif self.strategy == "band":
            parts = [self.strategy, f"q{self.low:g}-{self.high:g}"]
        else:
            size = f"t{self.target_tokens}" if self.target_tokens else f"k{self.keep:g}"
            parts = [self.strategy, *([f"s{self.skip:g}"] if self.strategy == "midranking" else []), size]
            parts += [f"seed{self.seed}"] if self.strategy == "random" else []
        parts += [self.measure if not self.target_tokens else "tokens"]
        parts += [] if self.rank_by == "loss" else [f"by_{self.rank_by}"]
        parts += ["adjustedbysource"] if self.adjust_by_source else []
        parts += [f"min{self.min_tokens}"] if self.min_tokens else []
        parts += [f"drop_{key}{share:g}" for key, share in self.drop_top.shares().items()]
        parts += ["bysource"] if self.by_source else []
        parts += [f"irdro{self.kl_reg:g}"] if self.weights else []
        return "-".join(parts)


def band_keys(band: BandConfig) -> set[str]:
    """Every rank key a band reads: the one it ranks by and those it drops by."""
    return {band.rank_by, *band.drop_top.shares()}


@dataclass(kw_only=True, slots=True, frozen=True)
class SelectConfig:
    bands: tuple[BandConfig, ...] = (BandConfig(),)
    """The bands to emit, all from one pass over the scores and the corpus."""

    write_rejected: bool = False
    """Also write rejected/<band>/ with every dropped sample and its reason."""

    jsonl: bool = False
    """Also write selected/<band>/data.jsonl (text + source + loss) next to the Parquet."""

    def __post_init__(self) -> None:
        _require(len(self.bands) > 0, "bands", "at least one band is required")
        names = [b.resolved_name() for b in self.bands]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        _require(
            duplicate is None, "bands", f"two bands are both named {duplicate!r}; give them distinct names"
        )
        controls = {b.resolved_name() for b in self.bands if b.strategy == "length_matched"}
        chained = [
            b.resolved_name() for b in self.bands if b.strategy == "length_matched" and b.match in controls
        ]
        _require(
            not chained,
            "bands",
            f"{', '.join(chained)} matches another length_matched band; match the band that one matches",
        )


MAX_BINS = 10_000
"""More histogram bins than a figure has pixels across draws nothing more, only costs memory."""


@dataclass(kw_only=True, slots=True, frozen=True)
class InspectConfig:
    name: str = "main"
    """The report goes to <out_dir>/reports/<name>/ (index.html and the PNGs)."""

    bins: int = 60
    """Histogram bins over the loss range of the whole score set."""

    perplexity: bool = False
    """Also plot the perplexity histogram (exp(loss), on a log axis)."""

    max_sources: int = 12
    """Per-source panels for at most this many sources (the largest by samples); the terminal
    summary and the tables still list every source."""

    examples: int = 3
    """Example texts shown from each region (lowest, below the band, inside, above, highest)."""

    example_chars: int = 300
    """Characters shown of each example text."""

    def __post_init__(self) -> None:
        _require_name(self.name, "name")
        _require(1 <= self.bins <= MAX_BINS, "bins", f"must be within [1, {MAX_BINS:,}], got {self.bins}")
        _require(self.max_sources >= 0, "max_sources", f"must be >= 0, got {self.max_sources}")
        _require(self.examples >= 0, "examples", f"must be >= 0, got {self.examples}")
        _require(self.example_chars >= 1, "example_chars", f"must be >= 1, got {self.example_chars}")


@dataclass(kw_only=True, slots=True, frozen=True)
class TrainConfig:
    name: str = ""
    """Run directory under <out_dir>/train/; derived from the objective and the data when empty."""

    band: str = ""
    """The selected band to train on (a directory under <out_dir>/selected/); empty: the first
    band of select.bands."""

    data_paths: tuple[str, ...] = ()
    """Train on these Parquet/JSONL files (with a `text` field) instead of a selected band."""

    text_field: str = "text"
    """Field of the training data holding the text."""

    objective: Literal["uniform", "irdro", "midranking_online", "weighted"] = "uniform"
    """uniform: mean token loss; irdro: per-batch weights softmax(l / kl_reg); midranking_online:
    per-batch band (drop the top `skip`, train on the next `keep`); weighted: the data's `weight`
    column (offline IR-DRO from `select` with weights: true)."""

    kl_reg: float = 1.0
    """IR-DRO lambda: large -> uniform weights, small -> the hardest sample of the batch only."""

    gather_losses: bool = False
    """irdro/midranking_online: compute the weights/band over every data-parallel rank's losses."""

    skip: float = 0.1
    """midranking_online: share of each batch dropped from the top (hardest)."""

    keep: float = 0.5
    """midranking_online: share of each batch trained on, after the skipped ones."""

    max_tokens: int = 512
    """Longest training sequence (BOS included); longer texts are truncated."""

    pack: bool = False
    """Pack several samples into each row of max_tokens, kept apart: positions restart and
    attention stays inside each sample, so every sample's loss is the one it has alone (and the
    IR-DRO weights and online band do not depend on which samples share a row). Off: one sample
    per row, padded."""

    batch_size: int = 8
    """Samples per device per step (before gradient accumulation)."""

    target_tokens_per_batch: int = 0
    """Token-budget micro-batches: each holds exactly this many target tokens (samples in a
    seeded order, the one that overflows cut to fit) instead of `batch_size` samples, so a run
    trains on exactly max_steps x grad_accum x ranks x this many tokens, however long its samples
    are (equal compute across training sets). 0: `batch_size` samples per micro-batch."""

    grad_accum: int = 1
    """Gradient accumulation steps."""

    max_steps: int = 100
    """Optimizer steps (the data is cycled when shorter)."""

    learning_rate: float = 1e-5
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision; auto: bf16 where supported (CUDA, or CPUs with AVX512-BF16/AMX), else fp32."""

    seed: int = 0
    """Seed of the initialisation of anything random and of the data order."""

    save_steps: int = 50
    """Checkpoint every this many steps (resumable: a rerun continues from the latest)."""

    save_total_limit: int = 2
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    head_chunk_tokens: int = 0
    """Target tokens per LM-head chunk in the training loss, each chunk's logits recomputed in the
    backward pass, so full-vocabulary logits never exist (for large batches x vocabularies); 0
    computes them all (the model's own forward: faster, and on the embedded preset the logits are
    not what sets peak memory, bench/bench_train.py). Taken as 0 under FSDP/DeepSpeed and for
    models whose logits are not lm_head(hidden)."""
    fsdp: str = ""
    """Passed to transformers' TrainingArguments.fsdp (e.g. "full_shard auto_wrap") on GPUs."""

    deepspeed: str = ""
    """A DeepSpeed JSON config passed to TrainingArguments.deepspeed (GPUs; deepspeed installed)."""

    eval_paths: tuple[str, ...] = ()
    """Held-out data (any corpus format, read with the corpus field settings), evaluated before and
    after training: loss, perplexity and next-token accuracy per source."""

    eval_max_samples: int = 0
    """Evaluate on at most this many held-out samples (0: all)."""

    eval_max_tokens: int = 512
    """Truncation of held-out samples."""

    resume_changed_config: bool = False
    """Resume a killed run from its checkpoint although the train or model config changed since
    (the new config applies from there on). Off: such a resume is refused, naming what changed."""

    def __post_init__(self) -> None:
        _require_shares(self, "skip", "keep")
        _require(self.kl_reg > 0, "kl_reg", f"must be > 0, got {self.kl_reg}")
        _require(self.max_tokens >= 2, "max_tokens", f"must be >= 2, got {self.max_tokens}")
        _require(
            self.target_tokens_per_batch >= 0,
            "target_tokens_per_batch",
            f"must be >= 0, got {self.target_tokens_per_batch}",
        )
        for key in (
            "batch_size",
            "grad_accum",
            "max_steps",
            "save_steps",
            "logging_steps",
            "save_total_limit",
        ):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(
            self.head_chunk_tokens >= 0, "head_chunk_tokens", f"must be >= 0, got {self.head_chunk_tokens}"
        )
        _require(self.eval_max_samples >= 0, "eval_max_samples", f"must be >= 0, got {self.eval_max_samples}")
        _require(self.eval_max_tokens >= 2, "eval_max_tokens", f"must be >= 2, got {self.eval_max_tokens}")
        _require_name(self.name, "name", optional=True)
        _require_name(self.band, "band", optional=True)
        if self.objective == "midranking_online":
            n_skip, n_keep = share_of(self.batch_size, self.skip), share_of(self.batch_size, self.keep)
            _require(
                n_keep >= 1 and n_skip + n_keep <= self.batch_size,
                "keep",
                f"a batch of {self.batch_size} skips {n_skip} and keeps {n_keep} samples; the band must "
                "hold at least one sample and fit in the batch (raise keep or batch_size)",
            )


COMPARE_ARMS = (
    "random", "random_replicate", "random_length_matched", "random_matched", "top", "bottom",
    "midranking", "midranking_dropped", "random_dropped", "irdro", "weighted", "all", *BAND_PRESETS,
)  # fmt: skip

UNRANKED_ARMS = ("random", "random_replicate", "random_dropped", "irdro", "weighted", "all")

COMPARE_METRICS = ("heldout loss", "heldout loss by source", "ood loss")
"""The loss metrics a contrast can be pre-registered on (tasks: `task <name> loss`)."""

# lm-evaluation-harness names of the paper's zero-shot tasks (they download their data: hub access)
PAPER_TASKS = ("piqa", "hellaswag", "winogrande", "arc_challenge", "boolq", "mmlu")


@dataclass(kw_only=True, slots=True, frozen=True)
class CompareConfig:
    name: str = "compare"
    """Results go to <out_dir>/reports/<name>/; the training runs to <out_dir>/train/<name>-<arm>-seed<s>/."""

    arms: tuple[str, ...] = (
        "random", "random_replicate", "random_length_matched", "random_matched", "top", "bottom",
        "midranking", "irdro",
    )  # fmt: skip
    """Training sets, all from one scoring pass: a seeded `random` sample; `random_replicate` (a
    second random sample, its own draw: the A/A control, whose verdicts show how often the
    analysis calls two equal arms different); `random_length_matched` (a random sample with the
    MidRanking set's length histogram); `random_matched` (a random sample with the MidRanking
    set's sources and, within each, its lengths: the control that leaves only the loss); the
    hardest (`top`) and easiest (`bottom`); the MidRanking band; `midranking_dropped` (the top by
    loss after `drop_top`'s multi-key drop instead of the skip); `random_dropped` (a random
    sample of what that drop keeps: the drop's worth with no ranking); `irdro` (online IR-DRO on a random
    sample); `weighted` (offline IR-DRO weights on a random sample); `all`; or a peer's preset band
    (cc_net_middle, marion_middle, ankner_high50, ...). Every random draw is its own: a hash stream
    per arm and seed. An arm that ranks (top, bottom, midranking, the matched ones, a preset)
    takes a rank key after a dot, as its own arm: `midranking.bits_per_byte`,
    `midranking.length_adjusted` (plain: by loss); `random_matched.<key>` matches the MidRanking
    set of that key."""

    reference: str = "random"
    """The arm every other is compared with."""

    primary: str = ""
    """The pre-registered contrast: this arm against the reference on `primary_metric`, tested
    alone at 5%. Every other arm x metric is a secondary contrast, Holm-corrected together (all
    of them when empty)."""

    primary_metric: str = "heldout loss"
    """`heldout loss` (token-weighted), `heldout loss by source` (each source's loss, averaged with
    equal weights), `ood loss`, or `task <name> loss`."""

    equivalence_margin: float = 0.005
    """Nats per token: a loss contrast whose 90% interval lies within +-margin is `equivalent`
    (two one-sided tests); one neither different nor equivalent is `inconclusive`."""

    task_equivalence_margin: float = 0.02
    """The same for task losses, in nats per character of the correct answer."""

    by_source: bool = False
    """Take random, top, bottom and MidRanking within each source (each keeps its share of every
    source), so no arm changes the source mix."""

    drop_top: DropTop = field(default_factory=lambda: DropTop(loss=0.1, bits_per_byte=0.05))
    """The `midranking_dropped` and `random_dropped` arms: the union of these keys' top shares is
    dropped (each key is blind to some junk), then `keep` of what remains is kept from the top by
    loss (the drop in place of MidRanking's skip) or drawn at random."""

    min_tokens: int = 0
    """The `midranking_dropped` and `random_dropped` arms: samples with fewer scored tokens are
    dropped as too_short, part of their drop rule."""

    keep: float = 0.5
    """Share of the corpus's tokens each of random/top/bottom/MidRanking holds (for the dropped
    arms: of the tokens the drop leaves)."""

    skip: float = 0.1
    """MidRanking: share of the tokens dropped from the top before the kept band."""

    seeds: tuple[int, ...] = (0,)
    """Each arm is trained once per seed (data order, and its random sample). Seeds are not paired
    across arms: each arm's runs are independent draws, and two or more seeds per arm measure the
    run-to-run noise that the intervals need."""

    token_budget: int = 0
    """Target tokens every arm trains on, exactly (a whole number of steps). 0: one pass over the
    smallest arm's training set."""

    tokens_per_step: int = 1024
    """Target tokens of each optimizer step (train.target_tokens_per_batch per rank), the same for
    every arm, so equal budgets are equal steps."""

    ood_paths: tuple[str, ...] = ()
    """Held-out text of a kind the training corpus does not hold: loss on it is the
    out-of-distribution measure (JSONL, read like the corpus)."""

    tasks: tuple[str, ...] = ()
    """Local multiple-choice tasks (JSONL of question, choices, label; `make tasks` builds them),
    evaluated with lm-evaluation-harness."""

    hub_tasks: tuple[str, ...] = ()
    """lm-evaluation-harness task names (their data is downloaded: hub access); PAPER_TASKS are
    the paper's."""

    task_limit: int = 0
    """Items of each task evaluated (the first ones); 0: all."""

    eval_dtype: Literal["bfloat16", "float32"] = "float32"
    """The dtype every model (trained arms and the starting one alike) is loaded in for evaluation,
    losses and tasks. float32: a short continual-training run moves most weights by less than
    bf16's rounding step, so bf16 evaluation hides part of what training did; bfloat16 is ~2x
    faster on a CPU."""

    task_batch_size: int = 32

    def __post_init__(self) -> None:
        _require_name(self.name, "name")
        # its runs are named <name>-<arm>-seed<s>, which must stay a plain name too
        _require(len(self.name) <= 96, "name", f"must be at most 96 characters, got {len(self.name)}")
        _require(len(self.arms) > 0, "arms", "at least one arm is required")
        _require(len(set(self.arms)) == len(self.arms), "arms", "an arm is listed twice")
        _require(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        for arm in self.arms:
            base, _, key = arm.partition(".")
            _require(base in COMPARE_ARMS, "arms", f"unknown arm {arm!r}; one of {list(COMPARE_ARMS)}")
            _require(
                not arm.endswith(".") and (not key or key in RANK_KEYS),
                "arms",
                f"{arm!r}: unknown rank key {key!r}; one of {list(RANK_KEYS)}",
            )
            _require(key != "loss", "arms", f"{arm!r}: loss is every arm's default key; write {base!r}")
            _require(
                not key or base not in UNRANKED_ARMS,
                "arms",
                f"{arm!r}: {base} does not rank samples, so it takes no rank key",
            )
        _require(
            self.reference in self.arms,
            "reference",
            f"{self.reference!r} is not one of the arms {list(self.arms)}",
        )
        _require(len(self.seeds) > 0, "seeds", "at least one seed is required")
        _require(len(set(self.seeds)) == len(self.seeds), "seeds", "a seed is listed twice")
        _require_shares(self, "skip", "keep")
        _require(self.keep > 0, "keep", f"must be within (0, 1], got {self.keep}")
        _require_band_fits(self.skip, self.keep, key="skip")
        _require(self.token_budget >= 0, "token_budget", f"must be >= 0, got {self.token_budget}")
        _require(self.tokens_per_step > 0, "tokens_per_step", f"must be > 0, got {self.tokens_per_step}")
        _require(
            self.token_budget == 0 or self.token_budget >= self.tokens_per_step,
            "token_budget",
            f"must hold at least one step of tokens_per_step={self.tokens_per_step}, got {self.token_budget}",
        )
        _require(self.task_limit >= 0, "task_limit", f"must be >= 0, got {self.task_limit}")
        _require(self.task_batch_size > 0, "task_batch_size", f"must be > 0, got {self.task_batch_size}")
        _require(
            not self.primary or (self.primary in self.arms and self.primary != self.reference),
            "primary",
            f"must be one of the arms {list(self.arms)} other than the reference {self.reference!r} "
            f"(or empty), got {self.primary!r}",
        )
        _require(
            self.primary_metric in COMPARE_METRICS
            or (self.primary_metric.startswith("task ") and self.primary_metric.endswith(" loss")),
            "primary_metric",
            f"one of {list(COMPARE_METRICS)} or 'task <name> loss', got {self.primary_metric!r}",
        )
        _require(
            self.primary_metric != "ood loss" or bool(self.ood_paths),
            "primary_metric",
            "'ood loss' needs compare.ood_paths",
        )
        task = self.primary_metric.removeprefix("task ").removesuffix(" loss")
        _require(
            not self.primary_metric.startswith("task ")
            or task in {Path(t).stem for t in self.tasks} | set(self.hub_tasks),
            "primary_metric",
            f"{self.primary_metric!r} names no task of compare.tasks or compare.hub_tasks",
        )
        _require(
            self.equivalence_margin > 0, "equivalence_margin", f"must be > 0, got {self.equivalence_margin}"
        )
        _require(
            self.task_equivalence_margin > 0,
            "task_equivalence_margin",
            f"must be > 0, got {self.task_equivalence_margin}",
        )


@dataclass(kw_only=True, slots=True, frozen=True)
class TargetConfig:
    """The target model of the `reducible` rank key (docs/reducible.md): the reference model
    fine-tuned on a small target set (`midrank target`), then scoring the corpus into a score set
    of its own, joined to the reference model's on sample_id."""

    paths: tuple[str, ...] = ()
    """The target set: Parquet/JSONL files read like train.data_paths (the corpus mode's fields), a
    small sample of the data wanted, kept apart from every set the result is evaluated on."""

    out_dir: str = ""
    """Where the target model's scores are (its scores/ folder below it); empty: <out_dir>/target.
    Scores made elsewhere serve too: any model with the reference's tokenizer that scored the same
    corpus with the same score settings."""

    max_steps: int = 40
    """Optimizer steps of the fine-tune (batches of train.batch_size samples of at most
    train.max_tokens tokens, like every training run)."""

    learning_rate: float = 1.0e-4
    """The fine-tune's peak learning rate (warmup and schedule as train's)."""

    def __post_init__(self) -> None:
        _require(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        _require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")


@dataclass(kw_only=True, slots=True, frozen=True)
class Config:
    """The whole run. Stages read the sections they need."""

    out_dir: str = "runs/default"
    """Where every stage writes: scores/, selected/, reports/, train/ below it."""

    corpus: CorpusConfig
    model: ModelConfig
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    target: TargetConfig = field(default_factory=TargetConfig)

    def __post_init__(self) -> None:
        _require(bool(self.out_dir.strip()), "out_dir", 'must name a folder ("." for the current one)')
        _require(
            not self.score.unconditional or self.corpus.mode != "text",
            "score.unconditional",
            "scores responses without their prompts; corpus.mode=text has no prompts",
        )
        uses_ifd = [b.resolved_name() for b in self.select.bands if b.rank_by == "ifd"]
        uses_ifd += [arm for arm in self.compare.arms if arm.endswith(".ifd")]
        _require(
            not uses_ifd or self.score.unconditional,
            "score.unconditional",
            f"must be true for rank_by=ifd ({', '.join(uses_ifd)}): ifd needs each response scored without its prompt",
        )
        uses_target = [b.resolved_name() for b in self.select.bands if "reducible" in band_keys(b)]
        uses_target += [arm for arm in self.compare.arms if arm.endswith(".reducible")]
        dropped_arms = [arm for arm in self.compare.arms if arm.partition(".")[0].endswith("_dropped")]
        uses_target += [
            f"{a} by compare.drop_top.reducible" for a in dropped_arms if self.compare.drop_top.reducible
        ]
        _require(
            not uses_target or bool(self.target.paths or self.target.out_dir),
            "target.paths",
            f"the reducible rank key ({', '.join(uses_target)}) needs a target model's scores: give the "
            "target set it is fine-tuned on (target.paths), or target.out_dir where such scores are",
        )
        _require(
            self.inspect.name != self.compare.name,
            "inspect.name",
            f"names the same report folder as compare.name ({self.compare.name!r}); give them different names",
        )


# ------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML preset (or nothing), apply `a.b=value` overrides, validate, return the config."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: {'a directory, not' if path.is_dir() else 'no such'} config file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for override in overrides:
        apply_override(data, override)
    return decode(Config, data, "", ConfigError)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`8192` is an int)."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section (in {override!r})")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(
            f"{key}: the value {raw!r} is not valid YAML ({' '.join(str(err).split())})"
        ) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (every key, tuples as lists), for YAML/JSON and provenance."""
    return encode(cfg)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: Any, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to an artifact (atomically: a reader never sees half)."""
    from pipeline.artifacts import write_text_atomic  # artifacts sits above config

    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, dump_config(cfg))
    return path
