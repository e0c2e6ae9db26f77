"""`score.compile`: the model's body through `torch.compile`, and whether it pays for itself.

    kernel.compile()                                   # score.compile=true (pipeline/nll.py)
    auto = AutoCompile(kernel, rows_to_score=100_000)  # score.compile=auto
    auto.advance(rows=512, tokens=90_000, seconds=50.0)  # after each window; decides after the first

Inductor keeps what it compiled under the user's cache folder (`$XDG_CACHE_HOME/midrank/inductor`,
by default `~/.cache/midrank/inductor`; `TORCHINDUCTOR_CACHE_DIR` overrides it), so a second run on
the same model shapes starts warm. `auto` scores the first window eagerly, then compiles when the
eager time it would save on the tokens left exceeds what compiling costs; both figures are measured
(docs/results/2026-12-05-score-compile.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.log import get_logger

# Measured by bench/bench_score.py --compiled (docs/results/2026-12-05-score-compile.md), SmolLM2-135M
# in bf16 on a 2-core CPU with AMX, two runs: the stage's steady speed compiled over eager (1.05x
# and 0.99x: the mean), and the seconds compiling added to a first run with a cold and a warm
# Inductor cache (the larger of the two). No GPU has been measured: there `auto` stays eager
# (bench/gpu_check.sh measures it).
GAIN = {"cpu": 1.02}
COST_S = {"cold": 76.0, "warm": 35.0}


def inductor_cache() -> Path:
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "midrank" / "inductor"


def cache_is_warm() -> bool:
    """Whether Inductor has compiled graphs cached (for some model: the measure is coarse)."""
    graphs = inductor_cache() / "fxgraph"
    return graphs.is_dir() and any(graphs.iterdir())


def compile_body(body: torch.nn.Module) -> torch.nn.Module:
    """`body` compiled for every batch shape at once (`dynamic=True`: the lengths and row counts of
    pipeline/batching.py's batches do not each compile anew), with Inductor's cache kept."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache()))
    return torch.compile(body, dynamic=True)


def worth_compiling(tokens_left: int, eager_tokens_per_s: float, device: torch.device) -> bool:
    """Whether compiling now saves time on the tokens left, at the measured gain and cost."""
    if device.type not in GAIN:
        get_logger().info(f"score.compile=auto: no measurement on {device.type} yet; staying eager")
        return False
    saved = tokens_left / eager_tokens_per_s * (1 - 1 / GAIN[device.type])
    cost = COST_S["warm" if cache_is_warm() else "cold"]
    get_logger().info(
        f"score.compile=auto: {tokens_left:,} tokens left at {eager_tokens_per_s:,.0f} tok/s; compiling "
        f"would save ~{saved:,.0f}s for ~{cost:,.0f}s -> {'compiling' if saved > cost else 'staying eager'}"
    )
    return saved > cost


class AutoCompile:
    """`score.compile=auto`: the first window is scored eagerly; from its rows, tokens and time
    follow the tokens left and the eager speed, and the kernel is compiled if that pays."""

    def __init__(self, kernel, rows_to_score: int):
        self.kernel = kernel
        self.rows_left = rows_to_score
        self.decided = False

    def advance(self, rows: int, tokens: int = 0, seconds: float = 0.0) -> None:
        """`rows` done (scored in `seconds`, holding `tokens`; or found done by a resumed run)."""
        self.rows_left -= rows
        if self.decided or tokens == 0 or seconds <= 0:
            return
        self.decided = True
        if worth_compiling(int(self.rows_left * tokens / rows), tokens / seconds, self.kernel.device):
            self.kernel.compile()
