"""Benchmark stage one against the loop a user would otherwise write, on the same model and documents.

    .venv/bin/python bench/bench_score.py                      # the embedded 135M model and a ~30M model
    .venv/bin/python bench/bench_score.py --models 30m --docs 64
    .venv/bin/python bench/bench_score.py --models embedded,30m --embedded-model data/models/tiny \
        --corpus data/corpus-tiny/train.jsonl --docs 4 --memory-scale 2   # a smoke of every branch (CI)

(a) naive: documents in file order, fixed batches of 16 padded to the longest, fp32, HF
    `model(...)` with full logits, then a masked cross-entropy on the flat (N, V) view.
(b) midrank: the real stage (`stages.score.run`): token-budget batches sorted by length, chunked LM
    head on target positions only, tokenization in a DataLoader worker, Parquet output; under the
    malloc `midrank score` picks (jemalloc when installed: pipeline/cpu_memory.py).
(c) vLLM, when its environment is there (`make bench-peers`), in bf16 and in the dtype
    `model.dtype=auto` picks, against midrank in that dtype (and compiled, with --compiled), on
    --peer-docs documents (a full scoring window by default); ratios are to the faster vLLM.

Each run is its own process, so peak RSS is its own. Prints tokens/s, the ratio to (a), peak RSS,
MFU (2 x parameters x tokens/s against this machine's measured matmul peak in the same dtype), the
largest per-sample loss difference to (a), what bf16 does to the ranking, the tokens/s that the
model's matmuls alone allow at its own shapes in each dtype (the best rate over the kernels and
shapes tried, set against 1.5x vLLM), and peak RSS for a corpus 10x larger. Needs `make data model` first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.codec import parse_json  # noqa: E402
from pipeline.cpu_memory import tune_cpu_malloc  # noqa: E402
from pipeline.model import resolve_dtype  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MAX_TOKENS = 512
SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32"}  # as the tables label runs
NAIVE_BATCH = 16


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the DataLoader worker
    return max(own, children) / 1024


def matmul_peak(dtype: torch.dtype, n: int = 2048, device: torch.device | None = None) -> float:
    """FLOP/s of a large square matmul: the attainable peak MFU is measured against (on a GPU,
    timed between synchronisations)."""
    device = device or torch.device("cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b
    sync()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < 2.0:
        a @ b
        runs += 1
    sync()
    return 2 * n**3 * runs / (time.perf_counter() - started)


# the largest product output matmul_bound times (256 MB in fp32): the LM head's is 1,024 rows (a
# head chunk) x the vocabulary, and each timing holds two outputs at once
OUTPUT_CAP = 1 << 26


def gemm_rate(rows: int, inputs: int, outputs: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of the faster of torch's two CPU GEMMs at one shape (torch.mm, MKL's in fp32 and
    oneDNN's in bf16, into a preallocated output; and oneDNN's linear), the median of `repeats`."""
    x, weight = torch.randn(rows, inputs, dtype=dtype), torch.randn(outputs, inputs, dtype=dtype)
    out = torch.empty(rows, outputs, dtype=dtype)
    kernels = (
        lambda: torch.mm(x, weight.t(), out=out),
        lambda: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""),
    )
    best = 0.0
    for kernel in kernels:
        for _ in range(2):
            kernel()
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            kernel()
            seconds.append(time.perf_counter() - started)
        best = max(best, 2 * rows * inputs * outputs / float(np.median(seconds)))
    return best


def matmul_bound(model_dir: str, dtype: torch.dtype) -> float:
    """Tokens/s that the model's matrix products alone allow: each product at the best rate that
    torch's GEMMs reach here at its input width, over 1,024 to 16,384 rows and over outputs 1, 2
    and 4 times as wide (as if fused with products of the same input, as vLLM fuses q, k and v),
    up to `OUTPUT_CAP` elements of output.
    Attention, elementwise work and padding come on top: an empirical ceiling over the kernels and
    shapes tried (not MKL's packed GEMM, nor oneDNN with prepacked weights), tighter than the
    square matmul peak."""
    from collections import Counter

    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no weights loaded
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    shapes: Counter = Counter()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            shapes[module.in_features, module.out_features] += 1
        elif type(module).__name__ == "Conv1D":  # GPT-2's: weight (inputs, outputs)
            shapes[tuple(module.weight.shape)] += 1
    if not shapes:
        raise ValueError(f"{model_dir}: no linear layers found to time")
    seconds = 0.0
    for (inputs, outputs), count in shapes.items():
        tried = [
            (rows, outputs * wider)
            for rows in (1024, 2048, 4096, 8192, 16384)
            for wider in (1, 2, 4)
            if rows * outputs * wider <= OUTPUT_CAP
        ] or [(1024, outputs)]
        rate = max(gemm_rate(rows, inputs, width, dtype) for rows, width in tried)
        seconds += count * 2 * inputs * outputs / rate
    return 1 / seconds


def read_docs(corpus: Path) -> list[dict]:
    return [parse_json(line, str(corpus), ValueError) for line in corpus.open(encoding="utf-8")]


# ------------------------------------------------------------------------------------------------
# The two contenders, each run in a child process


def run_naive(model_dir: str, corpus: Path) -> dict:
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    docs = read_docs(corpus)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    losses, tokens = {}, 0
    started = time.perf_counter()
    for i in range(0, len(docs), NAIVE_BATCH):
        chunk = docs[i : i + NAIVE_BATCH]
        # the same BOS policy and truncation as midrank, so the losses are comparable
        ids = [
            [tokenizer.bos_token_id, *tokenizer(d["text"], add_special_tokens=False).input_ids][:MAX_TOKENS]
            for d in chunk
        ]
        length = max(map(len, ids))
        input_ids = torch.tensor([x + [pad] * (length - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (length - len(x)) for x in ids])
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
            ).view(len(ids), -1)
            target = mask[:, 1:].float()
            per_doc = (nll * target).sum(1) / target.sum(1)
        for j, loss in enumerate(per_doc.tolist()):
            losses[i + j] = loss
        tokens += int(target.sum())
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "losses": losses}


def run_midrank(
    model_dir: str, corpus: Path, dtype: str, out_dir: str, compile_mode: str, repeats: int
) -> dict:
    """The score stage, twice in one process (`repeats`): the first run is what a user waits for (end to end,
    `first_done_at`), the second the steady state (start-up, allocator warm-up and compiling done;
    Dynamo reuses what it compiled for the first run's model)."""
    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.cpu_memory import preload_jemalloc
    from pipeline.layout import Layout
    from pipeline.outputs import ScoresSummary
    from stages import score

    runs = []
    for repeat in range(repeats):
        cfg = load_config(
            None,
            [
                f"corpus.paths=[{corpus}]",
                "corpus.num_shards=1",
                f"model.path={model_dir}",
                f"model.dtype={dtype}",
                f"out_dir={out_dir}/run{repeat}",
                f"score.max_tokens={MAX_TOKENS}",
                f"score.compile={compile_mode}",
            ],
        )
        preload_jemalloc(cfg.model)  # as `midrank score` does: under jemalloc when it is installed
        score.run(cfg)
        runs.append(time.time())
    layout = Layout(cfg.out_dir)
    summary = ScoresSummary.read(layout.scores_summary)
    table = pq.read_table(layout.score_shard(0), columns=["sample_id", "loss"]).to_pylist()
    # sample_id is "<file>:<row>", the row being the document's index in the corpus file
    losses = {int(r["sample_id"].rsplit(":", 1)[1]): r["loss"] for r in table}
    return {"tokens": summary.tokens, "seconds": summary.seconds, "losses": losses, "first_done_at": runs[0]}


def child(args: argparse.Namespace) -> None:
    if args.child == "naive":
        result = run_naive(args.model, Path(args.corpus))
    else:
        result = run_midrank(
            args.model, Path(args.corpus), args.dtype, args.out_dir, args.compile, int(args.repeats)
        )
    result["peak_rss_mb"] = peak_rss_mb()
    Path(args.result).write_text(json.dumps(result))


def spawn(
    kind: str,
    model: str,
    corpus: Path,
    work: Path,
    dtype: str = "float32",
    run: str = "",
    compile_mode: str = "false",
    repeats: int = 2,
) -> dict:
    """A contender in its own process; `wall_s` is process start to (the first run's) results on
    disk. A compiled run keeps Inductor's cache in `work/inductor`: cold the first time, warm after."""
    tag = f"{kind}-{dtype}-{compile_mode}-{Path(model).name}-{corpus.stem}{run}"
    result = work / f"{tag}.json"
    command = [sys.executable, __file__, "--child", kind, "--model", model, "--corpus", str(corpus)]
    command += ["--dtype", dtype, "--out-dir", str(work / f"out-{tag}"), "--result", str(result)]
    command += ["--compile", compile_mode, "--repeats", str(repeats)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    started, started_at = time.perf_counter(), time.time()
    done = subprocess.run(command, cwd=ROOT, stderr=subprocess.PIPE, text=True, check=False, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{kind} run failed:\n{done.stderr[-3000:]}")
    out = parse_json(result.read_text(), str(result), ValueError)
    out["losses"] = {int(k): v for k, v in out["losses"].items()}
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    out["wall_s"] = out["first_done_at"] - started_at if "first_done_at" in out else wall
    return out


def token_ids(model_dir: str, corpus: Path) -> list[list[int]]:
    """Each document's ids as midrank scores them: BOS, then the text, cut to MAX_TOKENS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [
        [tokenizer.bos_token_id, *tokenizer(d["text"], add_special_tokens=False).input_ids][:MAX_TOKENS]
        for d in read_docs(corpus)
    ]


def spawn_vllm(python: str, model: str, corpus: Path, work: Path, dtype: str) -> dict:
    """vLLM in its own virtual environment, on the ids midrank scores; `wall_s` as in spawn."""
    docs, result = work / "vllm-docs.json", work / f"vllm-result-{dtype}.json"
    ids = token_ids(model, corpus)
    docs.write_text(json.dumps(ids))
    command = [python, str(ROOT / "bench" / "vllm_peer.py"), "--model", model, "--docs", str(docs)]
    command += ["--out", str(result), "--dtype", dtype]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"vLLM run failed:\n{(done.stdout + done.stderr)[-3000:]}")
    out = parse_json(result.read_text(), str(result), ValueError)
    tokens = sum(out["n_tokens"])
    return {
        "losses": {
            i: s / max(n, 1) for i, (s, n) in enumerate(zip(out["nll_sum"], out["n_tokens"], strict=True))
        },
        "tokens": tokens,
        "wall_s": wall,
        "steady_tokens_per_s": tokens / out["score_s"],
        "engine_start_s": out["engine_start_s"],
    }


# ------------------------------------------------------------------------------------------------


def build_30m_model(out: Path, tokenizer_dir: str) -> str:
    """A randomly initialised ~30M-parameter Llama with the SmolLM2 tokenizer (throughput only)."""
    from transformers import AutoTokenizer

    from data.build_tiny import save_random_llama

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    save_random_llama(tokenizer, out, hidden=384, intermediate=1024, layers=6, heads=6, kv_heads=2, tied=True)
    return str(out)


def num_params(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            total += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118
    return total


def ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    return out


def band(losses: np.ndarray, skip: float = 0.1, keep: float = 0.3) -> set[int]:
    """The MidRanking band by rank: drop the top `skip`, keep the next `keep` (highest loss first)."""
    order = np.argsort(-losses, kind="stable")
    n = len(losses)
    return set(order[int(skip * n) : int((skip + keep) * n)].tolist())


def write_corpus(docs: list[dict], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d["text"], "source": d["source"]}, ensure_ascii=False) + "\n")
    return path


def compare_vllm(
    python: str,
    name: str,
    model_dir: str,
    corpus: Path,
    work: Path,
    mine: dict[str, dict],
    params: int,
    peaks: dict,
    dtypes: list[str],
    bounds: dict[str, float],
) -> None:
    """vLLM in each of `dtypes` beside midrank's runs on the same documents and targets: end to end
    (process start to scores on disk), steady state (after start-up), MFU, and how far the rankings
    agree; midrank's ratios are against the faster vLLM (its best dtype here), and 1.5x its steady
    rate against what the matmuls alone allow (`bounds`, by dtype)."""
    peers = {f"(c) vLLM {SHORT_DTYPE[d]}": spawn_vllm(python, model_dir, corpus, work, d) for d in dtypes}
    eager = next(iter(mine.values()))
    for label, peer in peers.items():
        if peer["tokens"] != eager["tokens"]:
            sys.exit(
                f"{label} scored {peer['tokens']:,} targets, midrank {eager['tokens']:,}: not the same documents"
            )
    print(
        f"{name}: midrank against vLLM on {len(eager['losses'])} documents, {eager['tokens']:,} target tokens"
    )
    print(f"{name:12s} {'run':24s} {'end to end':>11s} {'steady':>9s} {'MFU':>6s} {'wall':>7s}  (tokens/s)")
    rows = {
        label: (run["tokens"] / run["wall_s"], run["tokens_per_s"], run["wall_s"])
        for label, run in mine.items()
    }
    for label, peer in peers.items():
        rows[label] = (peer["tokens"] / peer["wall_s"], peer["steady_tokens_per_s"], peer["wall_s"])
    for label, (end_to_end, steady, wall) in rows.items():
        peak = peaks["float32" if "fp32" in label else "bfloat16"]
        print(
            f"{name:12s} {label:24s} {end_to_end:11,.0f} {steady:9,.0f} {2 * params * steady / peak:6.1%} {wall:6.1f}s"
        )
    best = max(peers, key=lambda label: rows[label][1])
    ids = sorted(eager["losses"])
    theirs = np.array([peers[best]["losses"][i] for i in ids])
    for label, run in mine.items():
        ours = np.array([run["losses"][i] for i in ids])
        rho = np.corrcoef(ranks(ours), ranks(theirs))[0, 1]
        a, b = band(ours), band(theirs)
        print(
            f"{name:12s} {label} / {best[4:]}: end to end {rows[label][0] / rows[best][0]:.2f}x, steady state "
            f"{rows[label][1] / rows[best][1]:.2f}x; losses differ by up to {np.abs(ours - theirs).max():.3f} "
            f"nats/token, Spearman {rho:.4f}, MidRanking band membership differs for {len(a ^ b) // 2} of {len(a)}"
        )
    needed = 1.5 * rows[best][1]
    reach = ", ".join(
        f"{SHORT_DTYPE[d]} {bounds[d]:,.0f} ({'above' if bounds[d] > needed else 'below'} it)" for d in bounds
    )
    print(f"{name:12s} 1.5x {best[4:]}'s steady rate is {needed:,.0f} tokens/s; the matmul bound: {reach}")
    starts = ", ".join(f"{label[4:]} {peer['engine_start_s']:.0f}s" for label, peer in peers.items())
    print(f"{name:12s} engine start-up: {starts}\n")


def cpu_kind() -> str:
    """What oneDNN may use here: the CPU's bf16 features, less any ONEDNN_MAX_CPU_ISA cap."""
    features = [
        f
        for f, has in (
            ("AMX", torch.cpu._is_amx_tile_supported()),
            ("avx512_bf16", torch.cpu._is_avx512_bf16_supported()),
        )
        if has
    ]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"CPU {'+'.join(features) or 'without bf16 instructions'}" + (
        f", oneDNN capped at {cap}" if cap else ""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default="embedded,30m",
        help="comma-separated: embedded (the --embedded-model), 30m (a random ~30M Llama with its tokenizer)",
    )
    parser.add_argument("--docs", type=int, default=160, help="documents per run (file order)")
    parser.add_argument(
        "--peer-docs",
        type=int,
        default=512,
        help="documents in the comparison with vLLM (default: one full window, score.window_rows)",
    )
    parser.add_argument("--corpus", default="data/corpus/train.jsonl")
    parser.add_argument("--embedded-model", default="data/models/smollm2-135m")
    parser.add_argument(
        "--memory-scale", type=int, default=10, help="corpus multiple for the RSS check (0: skip)"
    )
    peers = ROOT / ".venv-peers" / "bin" / "python"
    parser.add_argument(
        "--vllm-python",
        default=str(peers) if peers.exists() else "",
        help="the python of vLLM's own environment (`make bench-peers`); empty: no vLLM run",
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also run midrank bf16 with score.compile=true, cold and warm cache",
    )
    for hidden in ("--child", "--model", "--dtype", "--out-dir", "--result", "--compile", "--repeats"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    for path in (args.corpus, args.embedded_model):
        if not Path(path).exists():
            sys.exit(f"{path} is missing: run `make data model` first")

    print(
        f"# bench/bench_score.py — {os.cpu_count()} CPU threads, {cpu_kind()}, torch {torch.__version__}, "
        f"{args.docs} documents"
    )
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    print(
        f"matmul peak: fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s\n"
    )
    all_docs = read_docs(Path(args.corpus))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = write_corpus(all_docs[: args.docs], work / "docs.jsonl")
        models = {}  # label -> model directory
        for name in args.models.split(","):
            if name == "embedded":
                models[Path(args.embedded_model).name] = args.embedded_model
            elif name == "30m":
                models["30m"] = build_30m_model(work / "m30", args.embedded_model)
            else:
                parser.error(f"--models: unknown model {name!r}; known: embedded, 30m")
        failures: list[str] = []
        header = (
            f"{'model':12s} {'run':24s} {'tokens/s':>9s} {'ratio':>6s} {'end to end':>10s} {'peak RSS':>9s} "
            f"{'MFU':>6s} {'max|Δloss| vs (a)':>18s}"
        )
        print(header)
        print("-" * len(header))
        for name, model_dir in models.items():
            params = num_params(model_dir)
            runs = {
                "(a) naive fp32": spawn("naive", model_dir, corpus, work),
                "(b) midrank fp32": spawn("midrank", model_dir, corpus, work, "float32"),
                "(b) midrank bf16": spawn("midrank", model_dir, corpus, work, "bfloat16"),
            }
            if args.compiled:
                for cache in ("cold", "warm"):  # the second finds the first's compiled graphs
                    runs[f"(b) bf16 compiled, {cache}"] = spawn(
                        "midrank", model_dir, corpus, work, "bfloat16", cache, compile_mode="true"
                    )
            naive = runs["(a) naive fp32"]
            ids = sorted(naive["losses"])
            reference = np.array([naive["losses"][i] for i in ids])
            for label, run in runs.items():
                losses = np.array([run["losses"][i] for i in ids])
                peak = peaks["bfloat16" if "bf16" in label else "float32"]
                mfu = 2 * params * run["tokens_per_s"] / peak
                worst = np.abs(losses - reference).max()
                # fp32 must agree with the naive loop; bf16 moves losses (printed) but must stay finite
                if not np.isfinite(losses).all() or ("fp32" in label and not worst <= 1e-3):
                    failures.append(f"{name} {label}: losses differ from (a) by up to {worst:.2e}")
                print(
                    f"{name:12s} {label:24s} {run['tokens_per_s']:9,.0f} {run['tokens_per_s'] / naive['tokens_per_s']:5.2f}x "
                    f"{run['tokens'] / run['wall_s']:10,.0f} {run['peak_rss_mb']:7,.0f}MB {mfu:6.1%} {worst:18.2e}"
                )
            tune_cpu_malloc()  # large GEMM outputs reused, not page-faulted anew, as in the stage
            bounds = {
                dtype: matmul_bound(model_dir, getattr(torch, dtype)) for dtype in ("float32", "bfloat16")
            }
            print(
                f"{name:12s} matmuls alone, each at the best rate torch's GEMMs reach at its width, allow at "
                f"most {bounds['float32']:,.0f} tokens/s in fp32 and {bounds['bfloat16']:,.0f} in bf16"
            )
            fp32 = np.array([runs["(b) midrank fp32"]["losses"][i] for i in ids])
            bf16 = np.array([runs["(b) midrank bf16"]["losses"][i] for i in ids])
            rho = np.corrcoef(ranks(fp32), ranks(bf16))[0, 1]
            a, b = band(fp32), band(bf16)
            print(
                f"{name:12s} bf16 vs fp32: Spearman {rho:.4f}; MidRanking band (skip 10%, keep 30%) "
                f"membership differs for {len(a ^ b) // 2} of {len(a)} samples; {params / 1e6:.1f}M parameters\n"
            )
            if args.compiled:
                eager, cold, warm = (
                    runs[k]
                    for k in ("(b) midrank bf16", "(b) bf16 compiled, cold", "(b) bf16 compiled, warm")
                )
                compiled = np.array([warm["losses"][i] for i in ids])
                worst = np.abs(compiled - bf16).max()
                off = np.abs(compiled - reference).max()
                if not off <= 0.1:  # bf16's own rounding moves a loss by ~0.05 against fp32
                    failures.append(f"{name}: compiled losses differ from fp32 by up to {off:.3f}")
                a, b = band(fp32), band(compiled)
                print(
                    f"{name:12s} compiled / eager bf16: steady state {warm['tokens_per_s'] / eager['tokens_per_s']:.2f}x; "
                    f"start-up cost (first run's wall time over eager's) {cold['wall_s'] - eager['wall_s']:.0f}s with a "
                    f"cold cache, {warm['wall_s'] - eager['wall_s']:.0f}s warm; losses differ by up to {worst:.4f} "
                    f"(from fp32: {off:.4f}); MidRanking band membership against fp32 differs for "
                    f"{len(a ^ b) // 2} of {len(a)}\n"
                )
            if args.vllm_python:
                # on a corpus of its own: a full scoring window, as every window of a real corpus
                # but its last is (a partial one pads more: the 160 first documents fill 75% of
                # their batches, 512 fill 91%), in the dtype `model.dtype=auto` picks here; vLLM
                # in that dtype and in bf16, its default
                peer_corpus = write_corpus(all_docs[: args.peer_docs], work / "peer-docs.jsonl")
                auto = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
                short = SHORT_DTYPE[auto]
                mine = {
                    f"(b) midrank {short} eager": spawn("midrank", model_dir, peer_corpus, work, auto, "peer")
                }
                if args.compiled:
                    cache = "warm" if auto == "bfloat16" else "cold"  # Inductor's cache is by dtype
                    mine[f"(b) {short} compiled, {cache}"] = spawn(
                        "midrank", model_dir, peer_corpus, work, auto, "peer", compile_mode="true"
                    )
                dtypes = sorted({auto, "bfloat16"})
                compare_vllm(
                    args.vllm_python, name, model_dir, peer_corpus, work, mine, params, peaks, dtypes, bounds
                )
        if args.memory_scale:
            # Peak RSS varies from run to run (transient allocations inside PyTorch's CPU kernels),
            # so each size runs twice and both peaks are printed.
            # The small corpus is a uniform sample of the large one, so the two hold documents of
            # the same lengths: only the corpus size differs (the first documents of a file are
            # not like the rest: the embedded corpus opens with short fortunes).
            name = "30m" if "30m" in models else next(iter(models))
            docs = (all_docs * args.memory_scale)[: args.docs * args.memory_scale]
            big = write_corpus(docs, work / "docs10x.jsonl")
            sample = write_corpus(docs[:: args.memory_scale], work / "docs-sample.jsonl")
            small = [
                spawn("midrank", models[name], sample, work, "bfloat16", f"s{i}", repeats=1)["peak_rss_mb"]
                for i in range(2)
            ]
            large = [
                spawn("midrank", models[name], big, work, "bfloat16", f"l{i}", repeats=1)["peak_rss_mb"]
                for i in range(2)
            ]
            print(
                f"memory ({name}, bf16): {len(docs[:: args.memory_scale])} docs (1 in {args.memory_scale} of the larger set) "
                f"peak RSS {small[0]:,.0f} / {small[1]:,.0f} MB; "
                f"{args.docs * args.memory_scale} docs ({args.memory_scale}x) {large[0]:,.0f} / {large[1]:,.0f} MB; "
                f"change of the larger peak {max(large) / max(small) - 1:+.1%}"
            )
        if failures:
            sys.exit("bench_score: " + "; ".join(failures))


if __name__ == "__main__":
    main()
