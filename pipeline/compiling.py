"""`score.compile`: the model's body through `torch.compile`, and whether it pays for itself.

    kernel.compile()                                   # score.compile=true (pipeline/nll.py)
    auto = AutoCompile(kernel, rows_to_score=100_000)  # score.compile=auto
    auto.advance(rows=512, tokens=90_000, seconds=50.0)  # after each window; decides after the first

Inductor keeps what it compiled under the user's cache folder (`$XDG_CACHE_HOME/midrank/inductor`,
by default `~/.cache/midrank/inductor`; `TORCHINDUCTOR_CACHE_DIR` overrides it), so a second run on
the same model shapes starts warm. `auto` scores the first window eagerly, then compiles when the
eager time it would save on the tokens left exceeds what compiling costs, at the gain measured on
that device type (`GAIN`; empty today, see there, so `auto` stays eager).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.log import get_logger

# The stage's steady speed compiled over eager, by device type, where `auto` may use it: none yet.
# On a 2-core CPU with AMX (SmolLM2-135M, bf16), compiling the whole body gained 0.97-1.06x, inside
# the machine's swing (docs/results/2026-12-05-score-full-window.md); compiling layer by layer
# (compile_body), 1.20-1.27x in the stage, its first run 17 s longer than eager's with a cold cache
# and 2 s warm, net of its own speed-up (compiling itself: ~20 s and ~5 s, the costs below)
# (docs/results/2026-12-05-score-layers-compiled.md). `auto` still stays eager there: it decides
# after an eager first window, and compiling then would leave one score set holding eager and
# compiled losses (up to 0.06 nats/token apart in bf16). No GPU has been measured
# (bench/gpu_check.sh does). Compiling a whole body (a model whose repeated layers transformers does
# not name) took up to 76 s cold and 35 s warm.
GAIN: dict[str, float] = {}
COST_S = {"cold": 20.0, "warm": 5.0}


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


def repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated layers: the outermost modules of the classes transformers keeps whole
    when it splits a model over devices (`_no_split_modules`, e.g. LlamaDecoderLayer)."""
    names = set(getattr(module, "_no_split_modules", None) or ())
    blocks: dict[str, torch.nn.Module] = {}
    for path, sub in module.named_modules():
        inside = any(path.startswith(f"{outer}.") for outer in blocks)
        if type(sub).__name__ in names and not inside:
            blocks[path] = sub
    return list(blocks.values())


def compile_body(body: torch.nn.Module) -> torch.nn.Module:
    """`body` with its repeated layers compiled in place (or all of it, where it has none), for
    every batch shape at once (`dynamic=True`: the lengths and row counts of pipeline/batching.py's
    batches do not each compile anew), with Inductor's cache kept.

    Layer by layer, not the whole body: the layers share one compiled graph, so compiling takes
    seconds instead of minutes, and what the body computes once for all layers (the rotary
    embeddings' cos and sin, the attention mask) stays computed once. Compiled whole, Inductor
    recomputed cos and sin, and rebuilt the mask as an additive float mask, inside every layer."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache())  # read by Inductor at each use
    blocks = repeated_blocks(body)
    if not blocks:
        return torch.compile(body, dynamic=True)
    # a graph per kind of layer (and per mask: with one, without), and per layer where Inductor
    # freezes the weights (bench/profile_score.py --inductor): past Dynamo's limit of 8, the rest
    # would run eagerly with a warning only
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 2 * len(blocks) + 2)
    for block in blocks:
        block.compile(dynamic=True)
    return body


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
