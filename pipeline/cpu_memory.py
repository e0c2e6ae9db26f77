"""The heap of a process that runs the model on the CPU: jemalloc for `midrank score` when it is
installed, else glibc's, tuned.

    preload_jemalloc(cfg.model)   # `midrank score`, before the stage runs; may exec itself
    tune_cpu_malloc()             # the stage, once the model is on the CPU

Measured on SmolLM2-135M in bf16 (`bench/bench_score.py`'s memory check, 1,600 documents against a
uniform tenth of them): with glibc's malloc, even kept from returning memory (below), the peak
resident set grew with the corpus, about +20% for 10x the documents, in steps as freed blocks of
one batch's activations were split by the next and the heap grew past them. Under jemalloc, with
freed pages kept (`JEMALLOC_CONF`), it grew by about 2% at the same speed. A malloc can only be
chosen at process start, so the command re-executes itself once with jemalloc put first in
`LD_PRELOAD`, as Intel's launcher for PyTorch on CPUs does (`ipexrun`). A process whose
`LD_PRELOAD` names jemalloc already (the re-executed one), or that runs on a malloc you preloaded,
is left as it is; other preloads (a profiler, a monitoring tool) are kept behind jemalloc. Debian
and Ubuntu: `apt-get install libjemalloc2`.

Only `midrank score` does this. Training under the same jemalloc settings peaked at 11.4 GB
against 4.4 GB with glibc, and ran 17% slower (`bench/bench_train.py --steps 12`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping

from pipeline.config import ModelConfig
from pipeline.log import get_logger

# Freed pages stay with the process (never decayed back to the OS): what tune_cpu_malloc does for
# glibc, for the same reason. With jemalloc's default 10 s decay, scoring ran at half the speed.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def preload_jemalloc(cfg: ModelConfig) -> None:
    """Re-execute this process with jemalloc preloaded when it will run the model on the CPU on
    Linux, jemalloc is installed, `model.cpu_allocator` is `auto`, no jemalloc is in LD_PRELOAD
    yet and the process runs on glibc's malloc; otherwise return. The process keeps its pid, so
    torchrun and Slurm still see their rank."""
    from pipeline.model import resolve_device

    preloaded = os.environ.get("LD_PRELOAD", "")
    if cfg.cpu_allocator == "system" or "jemalloc" in preloaded or sys.platform != "linux":
        return
    if running_allocator() != "glibc":  # a malloc of the user's own, preloaded
        return
    if resolve_device(cfg.device).type != "cpu":
        return
    library = ctypes.util.find_library("jemalloc")
    if library is None:
        get_logger().info(
            "jemalloc is not installed: glibc's malloc, whose peak memory grows with the corpus "
            "(apt-get install libjemalloc2 keeps it flat; see pipeline/cpu_memory.py)"
        )
        return
    env = jemalloc_environ(os.environ, library)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def jemalloc_environ(environ: Mapping[str, str], library: str) -> dict[str, str]:
    """`environ` with jemalloc (`library`) first in LD_PRELOAD and JEMALLOC_CONF ahead of any
    MALLOC_CONF of the user's, as `midrank score` re-executes itself."""
    env = {**environ, "LD_PRELOAD": " ".join(filter(None, [library, environ.get("LD_PRELOAD", "")]))}
    env["MALLOC_CONF"] = ",".join(filter(None, [JEMALLOC_CONF, environ.get("MALLOC_CONF")]))
    return env


def running_allocator() -> str:
    """This process's malloc, from what is loaded: 'jemalloc' (its `mallctl` is in the global
    scope), 'glibc', or 'other' (another preloaded malloc, or another libc)."""
    process = ctypes.CDLL(None)
    if hasattr(process, "mallctl"):
        return "jemalloc"
    if not hasattr(process, "gnu_get_libc_version"):
        return "other"
    libc = ctypes.CDLL("libc.so.6")
    address = ctypes.c_void_p
    glibc = ctypes.cast(process.malloc, address).value == ctypes.cast(libc.malloc, address).value
    return "glibc" if glibc else "other"


def tune_cpu_malloc() -> str:
    """Keep freed memory in glibc's heap instead of returning it to the OS after each batch; the
    allocator in use is returned (any other malloc is left as it is: under preload_jemalloc's
    jemalloc, JEMALLOC_CONF did the same).

    Measured here: with glibc defaults, batched CPU inference spent more time in page faults than
    it gained from batching (52 s of system time in one run), because every batch's activations
    were mmap'ed and unmapped afresh; with this, bf16 scoring runs ~30% faster (training too). The
    cost is a resident set that stays near its high-water mark (bench/bench_score.py prints it)."""
    allocator = running_allocator()
    if allocator != "glibc":
        return allocator
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 30)
    return allocator
