"""bench/bench_score.py's peer: per-document loss with vLLM (`prompt_logprobs`, one prefill pass).

    .venv-peers/bin/python bench/vllm_peer.py --model DIR --docs docs.json --out result.json

Runs in vLLM's own virtual environment (`make bench-peers`), so it imports nothing of midrank.
`docs.json` holds each document's token ids exactly as midrank scores them (BOS first, cut to
max_tokens), so both score the same targets: every token after the first. Writes each document's
summed NLL and target count, the time the engine took to start, the time to score, and the time
since this process started.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the imports: a user waits for those too

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

# vLLM's CPU backend keeps a core for its engine loop by default (reserved_cpus=[1] on two cores),
# computing on the rest: on a 2-core machine that halves its compute. midrank computes on every
# core, so vLLM does too (measured: 2,069 against 1,445 tok/s steady on 2 cores), unless set.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--docs", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--memory-share", type=float, default=0.3, help="gpu_memory_utilization (on CPU: of RAM)"
    )
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    docs = json.loads(args.docs.read_text())
    longest = max(len(ids) for ids in docs)
    engine_start = time.time()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=longest + 1,  # room for the one generated token vLLM insists on
        gpu_memory_utilization=args.memory_share,
        enable_prefix_caching=False,  # every document is scored in full, as midrank does
        seed=0,
    )
    ready = time.time()
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in docs], params, use_tqdm=False)
    nll_sum, n_tokens = [], []
    for ids, output in zip(docs, outputs, strict=True):
        # prompt_logprobs[j] is None for the first token, else {token: Logprob} holding the actual token
        logprobs = output.prompt_logprobs
        nll_sum.append(-sum(logprobs[j][ids[j]].logprob for j in range(1, len(ids))))
        n_tokens.append(len(ids) - 1)
    done = time.time()
    llm.llm_engine.engine_core.shutdown()  # before this process leaves: its workers hold our pipes
    args.out.write_text(
        json.dumps(
            {
                "nll_sum": nll_sum,
                "n_tokens": n_tokens,
                "engine_start_s": ready - engine_start,
                "score_s": done - ready,
                "end_to_end_s": done - STARTED,
            }
        )
    )


if __name__ == "__main__":  # vLLM starts worker processes that import this file
    main()
    # the results are on disk and the engine's processes have ended; the interpreter's own teardown
    # sometimes aborts in a native thread of the CPU backend ("terminate called without an active
    # exception"), which would read as a failed run
    os._exit(0)
