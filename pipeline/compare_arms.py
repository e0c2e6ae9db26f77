"""The arms of a compare: each arm's training set (a band) and objective at a seed, and the
training run that gives every arm the same compute (stages/compare.py runs them).

    arms = plan_arms(cfg)                  # every (arm, seed), each with its band and objective
    budget = token_budget(cfg, sets, arms) # target tokens every arm trains on, in whole steps
    run_cfg = train_config(cfg, arm, budget // cfg.compare.tokens_per_step)
"""

from __future__ import annotations

import dataclasses
import hashlib

from pipeline.config import BandConfig, Config, ConfigError
from pipeline.outputs import BandManifest


def arm_setup(cfg: Config, arm: str, seed: int) -> tuple[BandConfig, str]:
    """(the training set's band, the training objective) of an arm: `<arm>` or `<arm>.<rank key>`.
    Every random draw has its own hash stream (`stream`): two arms' samples are independent draws,
    and overlap only as much as chance makes them."""
    c = cfg.compare
    name, _, key = arm.partition(".")
    by_key = {"rank_by": key} if key else {}
    tokens = {"measure": "tokens", "keep": c.keep, "by_source": c.by_source}
    drop = {"drop_top": c.drop_top, "min_tokens": c.min_tokens}  # the dropped arms' rule
    draw = stream(arm, seed)
    if name in ("random", "random_replicate", "irdro"):
        return BandConfig(strategy="random", seed=draw, **tokens), "irdro" if name == "irdro" else "uniform"
    if name == "random_dropped":  # the drop rule alone: what removing the junk is worth, with no ranking
        return BandConfig(strategy="random", seed=draw, **tokens, **drop), "uniform"
    if name == "weighted":  # offline IR-DRO: weights over a random sample, from its scored losses
        band = BandConfig(strategy="random", seed=draw, weights=True, kl_reg=cfg.train.kl_reg, **tokens)
        return band, "weighted"
    if name in ("top", "bottom"):
        return BandConfig(strategy=name, **tokens, **by_key), "uniform"
    if name == "midranking":
        return midranking_band(cfg, key), "uniform"
    if name == "midranking_dropped":
        return BandConfig(strategy="midranking", skip=0, rank_by=key or "loss", **tokens, **drop), "uniform"
    if name in ("random_length_matched", "random_matched"):
        match = midranking_band(cfg, key).resolved_name()
        by_source = name == "random_matched"
        return BandConfig(strategy="length_matched", match=match, seed=draw, by_source=by_source), "uniform"
    if name == "all":
        return BandConfig(strategy="all", measure="tokens"), "uniform"
    return BandConfig(strategy=name, **by_key), "uniform"  # a peer's preset band


def stream(arm: str, seed: int) -> int:
    """The hash seed of an arm's random draw at a seed: 32 bits of sha256("<arm>/<seed>"), so
    `random` and its controls at seed s are independent samples, not one sample twice."""
    return int.from_bytes(hashlib.sha256(f"{arm}/{seed}".encode()).digest()[:4], "big")


def midranking_band(cfg: Config, key: str = "") -> BandConfig:
    c = cfg.compare
    return BandConfig(
        strategy="midranking",
        skip=c.skip,
        keep=c.keep,
        measure="tokens",
        rank_by=key or "loss",
        by_source=c.by_source,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Arm:
    """One training run of the experiment."""

    arm: str
    seed: int
    band: BandConfig
    objective: str

    def key(self) -> tuple[str, int]:
        return (self.arm, self.seed)

    def run_name(self, experiment: str) -> str:
        """Its training run's name: <compare.name>-<arm>-seed<s>."""
        return f"{experiment}-{self.arm}-seed{self.seed}"


def plan_arms(cfg: Config) -> list[Arm]:
    c = cfg.compare
    return [Arm(arm, seed, *arm_setup(cfg, arm, seed)) for seed in c.seeds for arm in c.arms]


def token_budget(cfg: Config, sets: dict[str, BandManifest], arms: list[Arm]) -> int:
    """The target tokens every arm trains on: compare.token_budget, or one pass over the smallest
    set, in whole steps."""
    c = cfg.compare
    smallest = min(sets[a.band.resolved_name()].tokens.kept for a in arms)
    budget = c.token_budget or smallest
    if budget < c.tokens_per_step:
        raise ConfigError(
            f"compare.token_budget: {budget:,} target tokens (the smallest arm's set) is less than one "
            f"step of compare.tokens_per_step={c.tokens_per_step:,}; lower tokens_per_step or raise keep"
        )
    return budget // c.tokens_per_step * c.tokens_per_step


def train_config(cfg: Config, arm: Arm, steps: int) -> Config:
    """The arm's training run: same everything but its set, objective and seed (its data order:
    the arm's own stream at this seed, like its sample, so no two runs share an order); exactly
    `steps` steps of compare.tokens_per_step target tokens, packed; no evaluation (compare
    evaluates every model the same way afterwards)."""
    c = cfg.compare
    tcfg = dataclasses.replace(
        cfg.train,
        name=arm.run_name(c.name),
        band=arm.band.resolved_name(),
        data_paths=(),
        objective=arm.objective,
        seed=stream(arm.arm, arm.seed),
        max_steps=steps,
        target_tokens_per_batch=c.tokens_per_step,
        grad_accum=1,
        pack=True,  # samples packed into rows, no padding computed; isolated: the same numbers as padded
        max_tokens=cfg.score.max_tokens,
        eval_paths=(),
    )
    return dataclasses.replace(cfg, train=tcfg)
