"""The heap of a process that runs the model on the CPU: jemalloc when installed, else glibc tuned.

    relaunch_for_cpu(cfg.model)   # `midrank score`, before the stage runs; may exec itself
    tune_cpu_malloc()             # the stage, once the model is on the CPU

Measured on SmolLM2-135M in bf16 (`bench/bench_score.py`'s memory check, 1,600 documents against a
uniform tenth of them): with glibc's malloc, even kept from returning memory (below), the peak
resident set grew with the corpus, +20% for 10x the documents, in steps as freed blocks of one
batch's activations were split by the next and the heap grew past them. Under jemalloc, with
freed pages kept (`MALLOC_CONF` below), it grew by about 3% at the same speed. A malloc can only be
chosen at process start, so the command re-executes itself with jemalloc preloaded, as Intel's
launcher for PyTorch on CPUs does (`ipexrun`). Debian/Ubuntu: `apt-get install libjemalloc2`.

Only `midrank score` does. Training under the same jemalloc settings peaked at 11.4 GB against
4.4 GB with glibc, and ran 17% slower (`bench/bench_train.py --steps 12`, the embedded default).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from pipeline.config import ConfigError, ModelConfig
from pipeline.log import get_logger

# Freed pages stay with the process (never decayed back to the OS): what tune_cpu_malloc does for
# glibc, for the same reason. With jemalloc's default 10 s decay, scoring ran at half the speed.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
RELAUNCHED = "MIDRANK_RELAUNCHED"  # set on the re-executed process: never exec twice


def jemalloc_library() -> str | None:
    """The soname of an installed jemalloc (LD_PRELOAD finds it on the library path), or None."""
    return ctypes.util.find_library("jemalloc")


def running_allocator() -> str:
    """This process's malloc, from what is loaded (not from LD_PRELOAD's text): 'jemalloc' (its
    `mallctl` is in the global scope), 'tcmalloc' or 'mimalloc' likewise, 'preloaded' for another
    library that replaces libc's malloc, else 'glibc' or 'system'."""
    process = ctypes.CDLL(None)
    for name, symbol in (("jemalloc", "mallctl"), ("tcmalloc", "tc_malloc"), ("mimalloc", "mi_malloc")):
        if hasattr(process, symbol):
            return name
    if not hasattr(process, "gnu_get_libc_version"):
        return "system"
    libc = ctypes.CDLL("libc.so.6")
    address = ctypes.c_void_p
    replaced = ctypes.cast(process.malloc, address).value != ctypes.cast(libc.malloc, address).value
    return "preloaded" if replaced else "glibc"


def wants_jemalloc(cfg: ModelConfig) -> bool:
    """Whether this process should run under jemalloc: on the CPU, unless the config says `system`.
    `jemalloc` asked for and not installed is an error; `auto` then keeps glibc, with a hint."""
    from pipeline.model import resolve_device

    if cfg.cpu_allocator == "system" or resolve_device(cfg.device).type != "cpu":
        return False
    if sys.platform != "linux":
        if cfg.cpu_allocator == "jemalloc":
            raise ConfigError("model.cpu_allocator: jemalloc is preloaded on Linux only; set it to auto")
        return False
    if jemalloc_library() is None:
        if cfg.cpu_allocator == "jemalloc":
            raise ConfigError(
                "model.cpu_allocator: jemalloc is not installed (Debian/Ubuntu: apt-get install "
                "libjemalloc2), or set model.cpu_allocator=system"
            )
        get_logger().info(
            "jemalloc is not installed: glibc's malloc, whose peak memory grows with the corpus "
            "(apt-get install libjemalloc2 keeps it flat; see pipeline/cpu_memory.py)"
        )
        return False
    return True


def relaunch_for_cpu(cfg: ModelConfig) -> None:
    """Re-execute this process under jemalloc when `wants_jemalloc`; returns only if it does not.
    The process keeps its pid, so torchrun and Slurm still see the rank they started. Once
    re-executed, checks that jemalloc did load (a library the preload cannot use is only a
    message from the loader): an error for `jemalloc`, a warning for `auto`. A malloc the user
    preloads is kept (`jemalloc` asked for over another one is an error)."""
    running = running_allocator()
    if os.environ.pop(RELAUNCHED, None):  # popped: a process this one starts decides for itself
        if running != "jemalloc":
            message = (
                f"model.cpu_allocator: jemalloc ({jemalloc_library()}) did not load as this process's malloc"
            )
            if cfg.cpu_allocator == "jemalloc":
                raise ConfigError(message + "; set model.cpu_allocator=system")
            get_logger().warning(message + f": running on {running}'s")
        return
    if cfg.cpu_allocator == "system" or running == "jemalloc":
        return
    if running not in ("glibc", "system"):  # the user's own malloc, preloaded: kept
        if cfg.cpu_allocator == "jemalloc":
            raise ConfigError(
                f"model.cpu_allocator: jemalloc asked for, but {running} malloc is preloaded (LD_PRELOAD)"
            )
        return
    if not wants_jemalloc(cfg):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [jemalloc_library(), env.get("LD_PRELOAD")]))
    env["MALLOC_CONF"] = ",".join(filter(None, [JEMALLOC_CONF, env.get("MALLOC_CONF")]))
    env[RELAUNCHED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def tune_cpu_malloc() -> str:
    """Keep freed memory in glibc's heap instead of returning it to the OS after each batch; the
    allocator in use is returned (any other malloc is left as it is: under relaunch_for_cpu's
    jemalloc, JEMALLOC_CONF did the same).

    Measured here: with glibc defaults, batched CPU inference spent more time in page faults than
    it gained from batching (52 s of system time in one run), because every batch's activations
    were mmap'ed and unmapped afresh; with this, bf16 scoring runs ~30% faster (training too). The
    cost is a resident set that stays near its high-water mark (bench/bench_score.py prints it)."""
    allocator = running_allocator()
    if allocator != "glibc":
        return allocator
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return allocator
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 30)
    return allocator
