"""`score.compile`: the model's body through `torch.compile`, and whether it pays for itself.

    kernel.compile()                                   # score.compile=true (pipeline/nll.py)
    auto = AutoCompile(kernel, rows_to_score=100_000)  # score.compile=auto
    auto.advance(rows=512, tokens=90_000, seconds=50.0)  # after each window; decides after the first

Inductor keeps what it compiled under the user's cache folder (`$XDG_CACHE_HOME/midrank/inductor`,
by default `~/.cache/midrank/inductor`; `TORCHINDUCTOR_CACHE_DIR` overrides it), so a second run on
the same model shapes starts warm. `auto` scores the first window eagerly, then compiles when the
eager time it would save on the tokens left exceeds what compiling costs, at the gain measured on
that device type (`GAIN`; none has shown one yet, so today `auto` stays eager).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.log import get_logger

# The stage's steady speed compiled over eager, by device type, where a gain has been measured:
# none yet. On a 2-core CPU with AMX (SmolLM2-135M, bf16; bench/bench_score.py --compiled): 1.05x,
# 0.99x and 1.06x on 160 documents, 0.97x on a full window of 512
# (docs/results/2026-12-05-score-compile.md, 2026-12-05-score-full-window.md); the kernel alone,
# outside the stage (bench/profile_score.py), 1.11x and 0.97x under the jemalloc `midrank score`
# runs on: inside the machine's run-to-run swing. A gain that small would not repay compiling, and
# compiling mid-run would leave one score set holding eager and compiled losses (up to 0.09
# nats/token apart in bf16): so `auto` stays eager there, as on GPUs, which no run has measured
# (bench/gpu_check.sh does). The seconds compiling added to a first run, cold and warm cache, are
# the largest measured.
GAIN: dict[str, float] = {}
COST_S = {"cold": 76.0, "warm": 35.0}


def inductor_cache() -> Path:
    """`TORCHINDUCTOR_CACHE_DIR` when the user set it, else midrank's folder in the user's cache.
    torch sets the variable itself to its own default (under /tmp, emptied on reboot) as soon as
    Dynamo is imported, which loading a model does: that value does not count as the user's."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "midrank" / "inductor"


def cache_is_warm() -> bool:
    """Whether Inductor has compiled graphs cached (for some model: the measure is coarse)."""
    graphs = inductor_cache() / "fxgraph"
    return graphs.is_dir() and any(graphs.iterdir())


def compile_body(body: torch.nn.Module) -> torch.nn.Module:
    """`body` compiled for every batch shape at once (`dynamic=True`: the lengths and row counts of
    pipeline/batching.py's batches do not each compile anew), with Inductor's cache kept."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache())  # read by Inductor at each use
    return torch.compile(body, dynamic=True)


def worth_compiling(tokens_left: int, eager_tokens_per_s: float, device: torch.device) -> bool:
    """Whether compiling now saves time on the tokens left, at the measured gain and cost."""
    if device.type not in GAIN:
        get_logger().info(f"score.compile=auto: no measured gain on {device.type}; staying eager")
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
