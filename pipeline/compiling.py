"""`score.compile`: the model's body through `torch.compile`, and whether it pays for itself.

    kernel.compile()                                     # score.compile=true (pipeline/nll.py)
    gain = measured_gain(kind_of(device, dtype), whole=False)  # score.compile=auto, before scoring
    if gain and worth_compiling(padded_tokens, rates, gain, COST_S["cold"]):
        kernel.compile()

Inductor keeps what it compiled under the user's cache folder (`$XDG_CACHE_HOME/midrank/inductor`,
by default `~/.cache/midrank/inductor`; `TORCHINDUCTOR_CACHE_DIR` overrides it), so a second run on
the same model shapes starts warm. `auto` decides before the first batch: it compiles when the eager
time that the gain measured on this kind of device and dtype (`GAIN`) would save on the tokens to
score exceeds what compiling costs (`COST_S`). The tokens: the rows left times the padded tokens
per row of the first window still to score; the eager speed: the start-up probe's batch of the
largest shape.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from pipeline.log import get_logger

# The stage's steady speed compiled over eager, where it was measured: the lowest of the runs, by
# device, dtype and whether oneDNN multiplies on AMX (`kind_of`).
# - "cpu+amx bfloat16": 1.20-1.27x over three runs, SmolLM2-135M on a 2-core CPU, compiling layer
#   by layer (docs/results/2026-12-05-score-layers-compiled.md); 1.19-1.34x over three once the
#   padding was no longer computed (docs/results/2026-12-05-score-unpadded.md).
# Left out, so `auto` stays eager there: the same CPU with AMX withheld (oneDNN capped at
# AVX512_CORE_BF16), where the matmuls take nearly all the time, gained 1.02-1.05x in bf16 and 1.03x
# in fp32, inside the machine's swing (docs/results/2026-12-05-score-capped-compiled.md); no GPU
# has been measured (bench/gpu_check.sh --compile does).
# A model whose repeated layers transformers does not name is compiled whole (`compile_body`),
# which gained 0.97-1.06x for 66-76 s of compiling (docs/results/2026-12-05-score-full-window.md):
# no gain is kept for it anywhere.
GAIN: dict[str, float] = {"cpu+amx bfloat16": 1.19}
# What compiling the layers adds to a run, on the CPU above (SmolLM2-135M: its 30 layers share one
# graph), with Inductor's cache cold and warm for this model's shapes and dtype (`warm_marker`).
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


def warm_marker(model: torch.nn.Module, dtype: torch.dtype, unpadded: bool) -> Path:
    """A file in Inductor's cache that says it holds this architecture's graphs in this dtype and
    attention, padded or not (`NLLScorer.unpadded`), for this torch: written after a compiled run
    scored something (`mark_warm`), read by `auto` to weigh the cost. The graphs depend on the layers' shapes (config.json less its
    bookkeeping: where it was loaded from), not on the weights. Coarse still: the graphs with and
    without an attention mask, the head's (`fold_tile` on CPU, `token_nll_of` elsewhere, or none
    with argmax counting), the CPU's instruction set and midrank's own version are not in it."""
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    config["attn_implementation"] = model.config._attn_implementation
    text = json.dumps(config, sort_keys=True, default=str)
    kind = "unpadded" if unpadded else "padded"
    key = hashlib.sha256(f"{text}|{dtype}|{kind}|{torch.__version__}".encode()).hexdigest()[:16]
    return inductor_cache() / "midrank-warm" / key


def mark_warm(marker: Path) -> None:
    """Best effort: a cache folder that cannot be written costs the next run its warm estimate."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError as error:
        get_logger().warning(f"could not mark Inductor's cache warm ({marker}): {error}")


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


def measured_gain(kind: str, whole: bool) -> float | None:
    """The gain `auto` may count on: the one measured on this kind of device and dtype, for a
    model compiled layer by layer; None (logged) where none was measured."""
    gain = None if whole else GAIN.get(kind)
    if gain is None:
        what = "for a model compiled whole" if whole else f"on {kind}"
        get_logger().info(f"score.compile=auto: no measured gain {what}; staying eager")
    return gain


def worth_compiling(padded_tokens: float, rates: Iterable[float], gain: float, cost: float) -> bool:
    """Whether compiling, at `cost` seconds, saves time on `padded_tokens` at `gain` and the eager
    speeds in `rates` (padded tokens/s, each taken when asked for). The first rate is the start-up
    probe's, a first call that runs slower (oneDNN builds its kernels: 2,601 against 3,002 on
    SmolLM2-135M in bf16), which overstates what compiling saves; so a yes is checked against a
    second, warm rate. Both come from rows of the longest length, slower per token than shorter
    ones: the estimate leans towards compiling by that much."""
    for rate in itertools.islice(rates, 2):
        saved = padded_tokens / rate * (1 - 1 / gain)
        worth = saved > cost
        get_logger().info(
            f"score.compile=auto: ~{padded_tokens:,.0f} tokens to compute (padding included) at "
            f"{rate:,.0f}/s eager; compiling would save ~{saved:,.0f}s for ~{cost:,.0f}s "
            f"-> {'compiling' if worth else 'staying eager'}"
        )
        if not worth:
            return False
    return True
