"""Typed records of what stages hand each other on disk: the scores summary, a band's manifest,
a training run's metrics (and the held-out evaluation inside it).

    manifest = BandManifest.read(layout.band("mid").manifest)
    manifest.samples.kept, manifest.loss_thresholds.max_kept
    metrics = RunMetrics.read(layout.train_run("uniform-mid").metrics)
    metrics.train.trained_tokens, metrics.after.overall.loss

Every reader and writer of these files goes through the classes here, so a field is renamed in
one place. Reading is strict: a missing or unknown field is an `OutputError` naming the file and
the field (a file written by another version of midrank, or edited by hand), not a KeyError deep
inside a stage. Files are JSON, written atomically with sorted keys; an optional field that is
None is left out, as the stages always wrote them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from pipeline.artifacts import write_json_atomic
from pipeline.codec import Sparse, decode, encode, parse_json, read_json
from pipeline.config import BandConfig, Config, ModelConfig
from pipeline.rank_keys import LengthCurve


class OutputError(ValueError):
    """A stage's output file does not hold what this version of midrank reads."""

    hint = " (written by another version of midrank?)"


class JsonRecord(Sparse):
    """read(path) / write(path) for the dataclasses below (through pipeline/codec.py)."""

    @classmethod
    def read(cls, path: Path) -> Self:
        return read_json(path, cls, OutputError)

    @classmethod
    def parse(cls, text: str | bytes, where: str) -> Self:
        return decode(cls, parse_json(text, where, OutputError), where, OutputError)

    def write(self, path: Path) -> None:
        write_json_atomic(Path(path), encode(self))


@dataclass(frozen=True, slots=True, kw_only=True)
class Provenance(JsonRecord):
    """Where scores came from: in every score file's metadata, beside a shard's checkpoints, and
    copied into the scores' summary and each band's manifest."""

    key: dict[str, Any]
    """Everything that decides the numbers (pipeline/scores.py: make_provenance): compared whole,
    so two score sets with different keys are never mixed. Its entries depend on the corpus mode."""
    model_path: str
    code_version: str
    config: dict[str, Any]
    """The config the scores were made with, as data: a record for people, never read back as a
    config, so a later midrank that renames a setting still reads the scores (the key decides)."""
    target: Provenance | None = None
    """A band by the reducible key: the target model's scores' provenance (its key is also in
    `key`, under `target`); absent elsewhere."""


# ------------------------------------------------------------------------------------------------
# Stage one: scores/summary.json


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoresSummary(JsonRecord):
    rows: int
    """Rows read from the corpus; each is a record or a count in `skipped`."""
    records: int
    samples: int
    tokens: int
    """Target tokens scored (samples: a record split into windows gives several)."""
    seconds: float
    """Scoring time, summed over every window of every shard."""
    shards: int
    skipped: dict[str, int]
    """Rows and records not scored, by reason (bad input, too_short, non_finite, ...)."""
    provenance: Provenance


# ------------------------------------------------------------------------------------------------
# Stage two: selected/<band>/manifest.json


@dataclass(frozen=True, slots=True)
class Counts:
    total: int = field(metadata={"json": "in"})
    kept: int


@dataclass(frozen=True, slots=True)
class Positions:
    """The band on the ranking line, as shares of the measure counted from the hardest sample (the
    highest rank key; the samples under min_tokens are not on the line)."""

    start: float
    stop: float
    ranked_by: str
    """The rank key the band's line is ordered by, hardest first (`loss`, `bits_per_byte`, ...), or
    `random` (a seeded hash of the sample_id)."""
    measure: str
    """What the shares count: `samples` or `tokens`."""


@dataclass(frozen=True, slots=True)
class LossRange:
    """The lowest and highest loss (nats per target token) among the band's kept samples; in a
    RankKeyRange, of its key."""

    min_kept: float
    """Of the easiest sample kept."""
    max_kept: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RankKeyRange(LossRange):
    """The key the band ranked by (a name of pipeline/rank_keys.py) and the lowest and highest
    value of it kept."""

    key: str


@dataclass(frozen=True, slots=True)
class SourceCount:
    """One source's samples and target tokens."""

    samples: int
    tokens: int
    """Target tokens (the positions a loss is computed at)."""


@dataclass(frozen=True, slots=True)
class SourceMix:
    """Per source, what the scores held and what the band kept."""

    before: dict[str, SourceCount]
    after: dict[str, SourceCount]


@dataclass(frozen=True, slots=True)
class DroppedTop:
    """What a band's drop_top dropped before the band was taken."""

    shares: dict[str, float]
    """Per rank key, the top share dropped."""
    by_key: dict[str, int]
    """Per key, the samples in its top share (alone or with other keys)."""
    alone: dict[str, int]
    """Per key, the samples no other key dropped."""
    together: int
    """Samples two or more keys dropped."""
    samples: int
    """The union: every sample dropped."""
    tokens: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BandExcerpt(Sparse):
    """What a band kept and dropped: the part of its manifest the report shows."""

    strategy: str
    positions: Positions
    loss_thresholds: LossRange
    """The lowest and highest loss kept."""
    samples: Counts
    tokens: Counts
    rejected: dict[str, int]
    """Samples dropped, by reason: too_hard, too_easy, not_sampled, too_short, dropped_top."""
    per_source: SourceMix
    rank_key: RankKeyRange
    """What the band ranked by, and the range of it kept."""
    length_curves: dict[str, LengthCurve] | None = None
    """rank_by=length_adjusted: the expected loss at each length it subtracted, per source or
    over all of them ("*"), so the key can be recomputed."""
    dropped_top: DroppedTop | None = None
    """drop_top: what each key dropped, alone and together (the band's positions count the rest)."""

    @classmethod
    def of(cls, manifest: BandExcerpt) -> BandExcerpt:
        return cls(**{f.name: getattr(manifest, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True, slots=True, kw_only=True)
class BandManifest(BandExcerpt, JsonRecord):
    band: str
    parameters: BandConfig
    """The band's config section."""
    score_provenance: Provenance
    """The scores' provenance; a band is selected again when its `key` changes."""
    config: Config


# ------------------------------------------------------------------------------------------------
# Training: train/<run>/metrics.json (and train/.eval-before/<hash>.json, an Evaluation)


@dataclass(frozen=True, slots=True)
class SplitMetrics:
    """Held-out metrics of one source, or of all of them."""

    samples: int
    tokens: int
    """Target tokens: the loss is their summed NLL over this count (token-weighted)."""
    loss: float
    perplexity: float
    accuracy: float
    """Share of the targets that are the model's argmax prediction."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation(JsonRecord):
    overall: SplitMetrics
    per_source: dict[str, SplitMetrics]


@dataclass(frozen=True, slots=True)
class DeltaRow:
    source: str
    tokens: int
    loss_before: float
    loss_after: float
    delta: float
    accuracy_before: float
    accuracy_after: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainSummary(Sparse):
    objective: str
    steps: int
    steps_this_run: int
    samples_available: int
    dropped: dict[str, int]
    trained_tokens: int
    """Target tokens the objective trained on (the online band's only), over ranks and resumes."""
    target_tokens_this_run: int
    tokens_per_second: float
    runtime_s: float
    final_train_loss: float
    precision: str
    world_size: int
    data: list[str]
    samples_seen: int | None = None
    """Distinct samples trained on (token-budget batches; a cut sample counts)."""
    mean_sample_tokens: float | None = None
    """Mean target tokens of those samples, whole (token-budget batches)."""
    distinct_tokens: int | None = None
    """Distinct target tokens trained on (token-budget batches): below the budget when the plan
    passed over the set more than once."""
    positions: int | None = None
    """Positions the model processed, targets and their context (token-budget batches)."""
    attention: int | None = None
    """Sum over the micro-batches' samples of their squared length: attention's cost (token-budget
    batches, each packed sample attending only to itself)."""
    effective_samples: float | None = None
    """Mean per micro-batch (this run, rank 0) of (sum w)^2 / sum w^2 over the samples' weights in
    the objective: how many samples a step effectively learns from."""
    batch_samples: float | None = None
    """Mean samples per micro-batch (this run, rank 0)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStart(JsonRecord):
    """train/<run>/started.json: what decides the weights a run ends with, recorded when it starts
    (a killed run resumes only under the same, unless told otherwise)."""

    train: dict[str, Any]
    """The train settings that decide the weights (not its name, logging or evaluation)."""
    model: ModelConfig
    samples: dict[str, Any]
    """How records become tokens: add_bos, prompt_format, score_prompt."""
    data: Any
    """The digest of the band's manifest, or the list of data files."""
    world_size: int
    """Ranks: they decide the data order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunMetrics(JsonRecord):
    train: TrainSummary
    config: Config
    before: Evaluation | None = None
    after: Evaluation | None = None
    table: list[DeltaRow] | None = None


# ------------------------------------------------------------------------------------------------
# Inspect: reports/<name>/summary.json (every number of the HTML report)


@dataclass(frozen=True, slots=True)
class ReportBand:
    name: str
    interval: list[float] | None
    """[low, high] of the key kept, when the band is one interval of the whole corpus (ranked,
    global)."""
    manifest: BandExcerpt
    examples: list[dict[str, Any]]
    """Regions ({region, rows}) of example samples, lowest key first."""
    key: str = "loss"
    """What the band ranked by."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportSummary(JsonRecord):
    inputs_key: str
    """A hash of the scores' provenance, the bands' manifests and the inspect settings: a report
    with the same key is up to date."""
    out_dir: str
    model: dict[str, Any]
    samples: int
    tokens: int
    quantiles: dict[str, float]
    sources: list[dict[str, Any]]
    """Per source: samples, tokens, mean and median loss, share of the top-10% loss."""
    sources_plotted: list[str]
    images: dict[str, str]
    """Figure file -> caption."""
    bands: list[ReportBand]
    examples: list[dict[str, Any]] | None
    """Example regions when no band is selected yet."""
