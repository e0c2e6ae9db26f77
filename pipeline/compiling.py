"""`score.compile`: the model's body through `torch.compile`, and whether it pays for itself.

    kernel.compile()                                        # score.compile=true (pipeline/nll.py)
    if worth_compiling(padded_tokens, rates, kernel_kind):  # score.compile=auto, before scoring
        kernel.compile()

Inductor keeps what it compiled under the user's cache folder (`$XDG_CACHE_HOME/midrank/inductor`,
by default `~/.cache/midrank/inductor`; `TORCHINDUCTOR_CACHE_DIR` overrides it), so a second run on
the same model shapes starts warm. `auto` decides before the first batch: it compiles when the eager
time that the gain measured on this kind of device and dtype (`GAIN`) would save on the tokens to
score exceeds what compiling costs (`COST_S`). The tokens come from the first window (padding
included), the eager speed from the start-up probe's batch of the largest shape.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from pipeline.log import get_logger

# The stage's steady speed compiled over eager, where it was measured: the lowest of the runs, by
# device, dtype and whether oneDNN multiplies on AMX (`kind_of`).
# - "cpu+amx bfloat16": 1.20-1.27x over three runs, SmolLM2-135M on a 2-core CPU, compiling layer
#   by layer (docs/results/2026-12-05-score-layers-compiled.md).
# Left out, so `auto` stays eager there: the same CPU with AMX withheld (oneDNN capped at
# AVX512_CORE_BF16), where the matmuls take nearly all the time, gained 1.02x in bf16 and 1.03x
# in fp32, inside the machine's swing (docs/results/2026-12-05-score-capped-compiled.md); no GPU
# has been measured (bench/gpu_check.sh --compile does).
GAIN: dict[str, float] = {"cpu+amx bfloat16": 1.20}
# What compiling adds to a run, on the CPU above (SmolLM2-135M): its 30 layers share one graph; a
# model whose repeated layers transformers does not name is compiled whole (`compile_body`).
COST_S = {
    ("layers", "cold"): 20.0,
    ("layers", "warm"): 5.0,
    ("whole", "cold"): 76.0,
    ("whole", "warm"): 35.0,
}


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


def kind_of(device: torch.device, dtype: torch.dtype) -> str:
    """The key of `GAIN`: e.g. "cpu+amx bfloat16", "cpu float32", "cuda bfloat16". AMX only
    multiplies bf16, so an fp32 CPU is one kind with or without it."""
    from pipeline.model import amx_in_use

    amx = device.type == "cpu" and dtype == torch.bfloat16 and amx_in_use()
    return f"{device.type}{'+amx' if amx else ''} {str(dtype).removeprefix('torch.')}"


def worth_compiling(padded_tokens: float, rates: Iterable[float], kind: str, whole: bool = False) -> bool:
    """Whether compiling saves time on `padded_tokens` at the gain measured on this `kind` and the
    eager speeds in `rates` (padded tokens/s, each taken when asked for). The first rate is the
    start-up probe's, a first call that runs slower (oneDNN builds its kernels: 3.3 s against 2.5 s
    on SmolLM2-135M in bf16), which overstates what compiling saves; so a yes is checked against a
    second, warm rate."""
    log = get_logger()
    if kind not in GAIN:
        log.info(f"score.compile=auto: no measured gain on {kind}; staying eager")
        return False
    cost = COST_S["whole" if whole else "layers", "warm" if cache_is_warm() else "cold"]
    for rate in itertools.islice(rates, 2):
        saved = padded_tokens / rate * (1 - 1 / GAIN[kind])
        worth = saved > cost
        log.info(
            f"score.compile=auto: ~{padded_tokens:,.0f} tokens to compute (padding included) at "
            f"{rate:,.0f}/s eager on {kind}; compiling would save ~{saved:,.0f}s for ~{cost:,.0f}s "
            f"-> {'compiling' if worth else 'staying eager'}"
        )
        if not worth:
            return False
    return True
