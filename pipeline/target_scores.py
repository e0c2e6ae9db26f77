"""A second model's scores of the same samples, joined on sample_id: the target model of the
`reducible` rank key (pipeline/rank_keys.py; docs/reducible.md).

    views = ScoreViews(cfg, scan_scores(files), provenance)
    scores, provenance = views.for_band(band)   # joined only when the band needs it (uses_target)

The target model is the reference model fine-tuned on the target set (`midrank target`: the
`train` stage on target.paths, then the `score` stage with the fine-tuned model into
target.out_dir). Its score set must cover the very samples the reference's does: the same corpus,
shard plan, record fields, truncation or windows and prompt format: every entry of the provenance
key but the model's files, the dtype and the unconditional scoring (which only adds a column).
The tokenizer is checked row by row instead (a fine-tune saved with save_pretrained rewrites the
tokenizer's config file, not its vocabulary): every joined row must have the same number of
target tokens over the same span of the same record (its hash).
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

import polars as pl

from pipeline.artifacts import ProvenanceError
from pipeline.config import BandConfig, Config, ConfigError, TrainConfig, band_keys
from pipeline.layout import Layout
from pipeline.outputs import OutputError, Provenance, ScoresSummary
from pipeline.scores import scan_scores, score_set

TARGET_COLUMNS = ("nll_sum_target", "loss_target")
"""What the join adds: the target model's summed NLL and loss on the same target tokens."""
SAME_ROW = ("n_tokens", "char_start", "char_end", "record_hash")
"""What a joined row must share with the reference's: the same tokens of the same text."""
MODEL_ONLY = ("weights_sha256", "tokenizer_sha256", "dtype", "unconditional_prefix")
"""Provenance key entries that may differ between the two score sets (all others decide which
samples there are); the tokens are compared per row (SAME_ROW)."""
UNREAD_BY_THE_FINE_TUNE = ("band", "kl_reg", "gather_losses", "skip", "keep", "logging_steps")
"""Train settings of other objectives, other data or the log only."""
TARGET_RUN = "target"
"""The fine-tune's training run under <out_dir>/train/."""


def target_layout(cfg: Config) -> Layout:
    """Where the target model's score set lives: target.out_dir, or <out_dir>/target."""
    return Layout(Path(cfg.target.out_dir) if cfg.target.out_dir else Path(cfg.out_dir) / "target")


def uses_target(band: BandConfig, arm: str = "") -> bool:
    """Whether a band (or compare arm) needs the target model's scores: it ranks or drops by
    reducible, or (a length-matched control, `random_matched.reducible`) matches a band that does."""
    return "reducible" in band_keys(band) or arm.endswith(".reducible")


def without_target(key: dict) -> dict:
    """A provenance key without the target model's entry: what a band that reads only the
    reference's scores depends on."""
    return {name: value for name, value in key.items() if name != "target"}


def has_target_scores(cfg: Config) -> bool:
    """Whether the target score set is complete (its summary is written once every shard is)."""
    try:
        ScoresSummary.read(target_layout(cfg).scores_summary)
    except OutputError:
        return False
    return True


def check_target_set(cfg: Config) -> None:
    """target.paths name files that exist (checked before the fine-tune, under their own key)."""
    if not cfg.target.paths:
        where = (
            f"the target scores in {target_layout(cfg).scores_dir} are read as they are; "
            if cfg.target.out_dir
            else ""
        )
        raise ConfigError(
            f"target.paths: no target set to fine-tune on; {where}give the files of the target set "
            "(`make target-set` builds the embedded one)"
        )
    missing = [pattern for pattern in cfg.target.paths if not glob.glob(pattern)]
    if missing:
        raise ConfigError(
            f"target.paths: no file matches {', '.join(missing)} (`make target-set` builds data/target/)"
        )


def fine_tune_config(cfg: Config) -> Config:
    """The `train` stage's config of the fine-tune: the reference model on target.paths, for
    target.max_steps at target.learning_rate; batches, lengths, precision, checkpoints and the
    held-out set as train's. Settings a uniform fine-tune on files never reads are left at their
    defaults, so that changing them for other runs does not make this one another run."""
    unread = {name: getattr(TrainConfig(), name) for name in UNREAD_BY_THE_FINE_TUNE}
    train = dataclasses.replace(
        cfg.train,
        **unread,
        name=TARGET_RUN,
        data_paths=cfg.target.paths,
        objective="uniform",
        max_steps=cfg.target.max_steps,
        learning_rate=cfg.target.learning_rate,
        warmup_steps=min(cfg.train.warmup_steps, cfg.target.max_steps - 1),
    )
    return dataclasses.replace(cfg, train=train)


def target_scoring_config(cfg: Config) -> Config:
    """The `score` stage's config that scores the corpus with the fine-tuned model."""
    model_dir = Layout(cfg.out_dir).train_run(TARGET_RUN).model
    return dataclasses.replace(
        cfg,
        out_dir=str(target_layout(cfg).out_dir),
        model=dataclasses.replace(cfg.model, path=str(model_dir)),
    )


def check_same_samples(reference: Provenance, target: Provenance, where: str) -> None:
    """Refuse a target score set over other samples or other tokens, naming what differs."""
    differs = [
        f"{name}: {target.key.get(name)!r} there, {reference.key.get(name)!r} here"
        for name in sorted(reference.key.keys() | target.key.keys())
        if name not in MODEL_ONLY and reference.key.get(name) != target.key.get(name)
    ]
    if differs:
        raise ProvenanceError(
            f"{where}: the target model's scores are not over the same samples as the reference's "
            f"({'; '.join(differs[:3])}); score the same corpus with the same score settings and tokenizer "
            "(`midrank target` does)"
        )


def join_target(cfg: Config, scores: pl.LazyFrame, provenance: Provenance) -> tuple[pl.LazyFrame, Provenance]:
    """`scores` with TARGET_COLUMNS joined on sample_id, and a provenance whose key covers the
    target's (a band by reducible is selected again when either model changes). Every reference
    row must find its target row with the same tokens; an error names the first that does not."""
    layout = target_layout(cfg)
    if not layout.score_plan.is_file():
        raise ProvenanceError(
            f"target.out_dir: {layout.scores_dir} holds no target model's scores; `midrank target` (make "
            "target) fine-tunes the target model and scores the corpus with it"
        )
    try:
        files, target = score_set(layout)
    except ProvenanceError as err:
        raise ProvenanceError(f"target.out_dir: {err}") from None
    where = str(layout.scores_dir)
    check_same_samples(provenance, target, where)
    theirs = scan_scores(files).select(
        "sample_id",
        pl.col("nll_sum").alias("nll_sum_target"),
        pl.col("loss").alias("loss_target"),
        *(pl.col(c).alias(f"_target_{c}") for c in SAME_ROW),
    )
    joined = scores.join(theirs, on="sample_id", how="left", maintain_order="left")
    unmatched = pl.col("loss_target").is_null()
    for column in SAME_ROW:
        unmatched = unmatched | (pl.col(column) != pl.col(f"_target_{column}"))
    bad, example = (
        joined.select(bad=unmatched.sum(), example=pl.col("sample_id").filter(unmatched).first())
        .collect(engine="streaming")
        .row(0)
    )
    if bad:
        raise ProvenanceError(
            f"{where}: {bad:,} scored samples have no score of the same tokens there (e.g. {example}): "
            "scores of another corpus (score it again with `midrank target`), or a sample the target model "
            "could not score (a non-finite loss, counted under `skipped` in its summary.json: leave the "
            "sample out of the corpus, or score in float32)"
        )
    joined = joined.drop(*(f"_target_{c}" for c in SAME_ROW))
    both = dataclasses.replace(provenance, key=provenance.key | {"target": target.key}, target=target)
    return joined, both


class ScoreViews:
    """The reference model's scores for a band: joined to the target model's only when the band
    needs them (the join is made once), so a band by loss never depends on the target model."""

    def __init__(self, cfg: Config, scores: pl.LazyFrame, provenance: Provenance):
        self.cfg, self.scores, self.provenance = cfg, scores, provenance
        self.joined: tuple[pl.LazyFrame, Provenance] | None = None

    def for_band(self, band: BandConfig) -> tuple[pl.LazyFrame, Provenance]:
        if not uses_target(band):
            return self.scores, self.provenance
        if self.joined is None:
            self.joined = join_target(self.cfg, self.scores, self.provenance)
        return self.joined
