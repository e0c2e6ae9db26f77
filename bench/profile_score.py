"""Where the score stage's time goes: its kernel alone, eager and compiled, under each malloc.

    .venv/bin/python bench/profile_score.py                    # the embedded model, bf16, 160 documents
    .venv/bin/python bench/profile_score.py --model data/models/tiny \
        --corpus data/corpus-tiny/train.jsonl --docs 8 --dtype float32 --repeats 1   # a smoke (CI)

The stage's own batches (`ShardBatches`: the same windows, packing and padding) go through its own
kernel (`NLLScorer` as `midrank score` builds it) with no DataLoader, Parquet or progress bar around
it: the rate of the model and the LM head alone. Each malloc runs in its own process: glibc's, tuned
as the stage tunes it (`tune_cpu_malloc`), and jemalloc as `midrank score` preloads it (when it is
installed). Each scores every batch `--repeats` times eagerly, then compiles the body
(`score.compile=true`'s `NLLScorer.compile`), passes once to compile every shape (into an Inductor
cache of its own, cold), and scores `--repeats` times more. Prints the median rate of each, the
compiled speed-up, and the operators of the largest batch under torch.profiler, eager and
compiled (the last malloc, after a warm-up call; eager before compiling, which compiles the
model's layers in place). `--inductor` tries Inductor's CPU inference options the stage does not
use: `freezing` (weights as constants, packed for oneDNN, pointwise work fused into the matmuls)
and `max-autotune` (freezing, and Inductor's own AMX matmul templates with their neighbours fused
in, chosen by timing each).
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def stage_batches(cfg, tokenizer) -> list[dict]:
    from pipeline.batching import ShardBatches
    from pipeline.sharding import plan_shards

    batches = []
    for item in ShardBatches(plan_shards(cfg.corpus), 0, cfg.corpus, cfg.score, tokenizer):
        if item["batch"] is not None:
            item["batch"].pop("meta")
            batches.append(item["batch"])
    return batches


def child(args: argparse.Namespace) -> None:
    from pipeline.config import load_config
    from pipeline.cpu_memory import running_allocator, tune_cpu_malloc
    from pipeline.model import load_model
    from pipeline.nll import BudgetedScorer, NLLScorer

    cfg = load_config(  # the stage's defaults but for these
        None,
        [
            f"corpus.paths=[{args.corpus_file}]",
            "corpus.num_shards=1",
            f"model.path={args.model}",
            f"model.dtype={args.dtype}",
            "out_dir=unused",
            f"score.max_tokens={args.max_tokens}",
        ],
    )
    loaded = load_model(cfg.model)
    tune_cpu_malloc()  # where the stage does it
    batches = stage_batches(cfg, loaded.tokenizer)
    tokens = sum(int(b["target_mask"][:, 1:].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    kernel = NLLScorer(loaded.model, cfg.score.head_chunk_tokens, count_correct=False)  # as the stage's
    scorer = BudgetedScorer(kernel, cfg.score.batch_tokens)
    scorer.probe_worst_batch(args.max_tokens, len(loaded.tokenizer))

    def one_pass() -> float:
        """Seconds to score every batch once."""
        started = time.perf_counter()
        for batch in batches:
            scorer(batch)
        return time.perf_counter() - started

    def profiled(label: str) -> None:
        """The operators of the largest batch, on a warm kernel."""
        from torch.profiler import ProfilerActivity, profile

        largest = max(batches, key=lambda b: b["input_ids"].numel())
        kernel(**largest)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            kernel(**largest)
        result[f"profile {label}"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
        result["profiled_shape"] = list(largest["input_ids"].shape)

    result = {"allocator": running_allocator(), "tokens": tokens, "padded": padded, "batches": len(batches)}
    eager = [tokens / one_pass() for _ in range(args.repeats)]
    if args.profile:  # before compiling: compiling changes the model's layers in place
        profiled("eager")
    if args.inductor != "default":
        import torch._inductor.config as inductor

        inductor.freezing = True
        inductor.max_autotune = args.inductor == "max-autotune"
    kernel.compile()
    compile_s = one_pass()
    compiled = [tokens / one_pass() for _ in range(args.repeats)]
    if args.profile:
        profiled("compiled")
    result |= {"eager": eager, "compiled": compiled, "compile_s": compile_s}
    Path(args.result).write_text(json.dumps(result))


def spawn(args: argparse.Namespace, allocator: str, work: Path, profile: bool) -> dict:
    from pipeline.cpu_memory import jemalloc_environ

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if allocator == "jemalloc":
        env = jemalloc_environ(env, ctypes.util.find_library("jemalloc"))
    env["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-{allocator}")  # cold, and not the user's
    result = work / f"{allocator}.json"
    command = [sys.executable, __file__, "--child", "--result", str(result), "--model", args.model]
    command += ["--corpus-file", str(args.corpus_file), "--dtype", args.dtype]
    command += ["--repeats", str(args.repeats), "--max-tokens", str(args.max_tokens)]
    command += ["--inductor", args.inductor]
    command += ["--profile"] if profile else []
    done = subprocess.run(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"the {allocator} run failed:\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="data/models/smollm2-135m")
    parser.add_argument("--corpus", default="data/corpus/train.jsonl")
    parser.add_argument(
        "--docs",
        type=int,
        default=160,
        help="documents (file order), in one window if at most score.window_rows",
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mallocs", default="glibc,jemalloc", help="comma-separated: glibc, jemalloc")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument(
        "--inductor",
        choices=["default", "freezing", "max-autotune"],
        default="default",
        help="how Inductor compiles (see above); default: as score.compile=true does",
    )
    for hidden in ("--result", "--corpus-file"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    for path in (args.corpus, args.model):
        if not Path(path).exists():
            sys.exit(f"{path} is missing: run `make data model` first")
    installed = ["glibc"] + (["jemalloc"] if ctypes.util.find_library("jemalloc") else [])
    allocators = [a for a in args.mallocs.split(",") if a in installed]
    if not allocators:
        sys.exit(f"--mallocs {args.mallocs}: none of them is here (installed: {', '.join(installed)})")
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    print(
        f"# bench/profile_score.py — {os.cpu_count()} CPU threads, AMX {torch.cpu._is_amx_tile_supported()}"
        f"{f', oneDNN capped at {cap}' if cap else ''}, torch {torch.__version__}, {Path(args.model).name} "
        f"{args.dtype}, the first {args.docs} documents of {args.corpus}, Inductor {args.inductor}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lines = Path(args.corpus).read_text(encoding="utf-8").splitlines(keepends=True)[: args.docs]
        args.corpus_file = work / "docs.jsonl"
        args.corpus_file.write_text("".join(lines), encoding="utf-8")
        runs = {a: spawn(args, a, work, profile=a == allocators[-1]) for a in allocators}
    first = next(iter(runs.values()))
    print(
        f"{first['batches']} batches, {first['tokens']:,} target tokens in {first['padded']:,} padded "
        f"({first['tokens'] / first['padded']:.0%} filled); median of {args.repeats} passes, target tokens/s\n"
    )
    print(f"{'malloc':10s} {'eager':>8s} {'compiled':>9s} {'compiled/eager':>15s} {'compiling (cold)':>17s}")
    for run in runs.values():
        eager, compiled = statistics.median(run["eager"]), statistics.median(run["compiled"])
        print(
            f"{run['allocator']:10s} {eager:8,.0f} {compiled:9,.0f} {compiled / eager:14.2f}x "
            f"{run['compile_s']:16.0f}s"
        )
    if {"glibc", "jemalloc"} <= runs.keys():
        glibc, jemalloc = runs["glibc"], runs["jemalloc"]
        print(
            f"jemalloc / glibc: eager {statistics.median(jemalloc['eager']) / statistics.median(glibc['eager']):.2f}x, "
            f"compiled {statistics.median(jemalloc['compiled']) / statistics.median(glibc['compiled']):.2f}x"
        )
    last = runs[allocators[-1]]
    for label in ("eager", "compiled"):
        print(f"\nthe largest batch {last['profiled_shape']}, {label}, under {last['allocator']}:")
        print(last[f"profile {label}"])


if __name__ == "__main__":
    main()
