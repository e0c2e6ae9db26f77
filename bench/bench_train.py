"""Benchmark the training loss's memory: full-vocabulary logits against the chunked LM head.

    .venv/bin/python bench/bench_train.py                       # the embedded default, 20 steps
    .venv/bin/python bench/bench_train.py --config configs/tiny.yaml --steps 4   # a smoke (CI)

Trains the config's band (`make select` first) from the same start for --steps steps twice, each
run in its own process so its peak RSS is its own: (a) `train.head_chunk_tokens=0`, the model's
own forward (logits for every position, then cross-entropy), as a plain Hugging Face loop does;
(b) the chunked head, `train.head_chunk_tokens=--chunk` (logits of that many target positions at
a time, recomputed in the backward pass). Prints peak RSS, training tokens/s and the final training loss
of each (the two runs see the same batches, so their losses must agree).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.codec import parse_json  # noqa: E402
from pipeline.config import load_config  # noqa: E402


def child(config: str, overrides: list[str], result: Path) -> None:
    from pipeline.layout import Layout
    from pipeline.outputs import RunMetrics
    from stages import train

    cfg = load_config(config, overrides)
    train.run(cfg)
    metrics = RunMetrics.read(Layout(cfg.out_dir).train_run(cfg.train.name).metrics)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = metrics.train
    result.write_text(
        json.dumps(
            {
                "peak_rss_mb": peak,
                "tokens_per_s": summary.tokens_per_second,
                "loss": summary.final_train_loss,
                "tokens": summary.target_tokens_this_run,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=128, help="train.head_chunk_tokens of run (b)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.config, args.overrides, Path(args.result))
        return
    print(
        f"# bench/bench_train.py — {args.config}, {args.steps} steps from the same start, each run its own process"
    )
    print(f"{'run':34s} {'peak RSS':>10s} {'tokens/s':>9s} {'final loss':>11s}")
    results = {}
    source = ROOT / load_config(args.config).out_dir
    if not (source / "selected").is_dir():
        sys.exit(f"{source / 'selected'} is missing: run `make select` for {args.config} first")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "out").mkdir()
        for part in ("scores", "selected"):  # the runs read the config's scores and band; they train apart
            (Path(tmp) / "out" / part).symlink_to(source / part)
        for label, chunk in (
            ("(a) full logits (chunk 0)", 0),
            (f"(b) chunked head (chunk {args.chunk})", args.chunk),
        ):
            name = f"bench-head-chunk-{chunk}"
            # no checkpoint is written: saving the optimizer state has a peak of its own
            overrides = [
                f"train.max_steps={args.steps}",
                f"train.save_steps={10 * args.steps}",
                f"train.name={name}",
            ]
            overrides += [f"train.head_chunk_tokens={chunk}", "train.eval_paths=[]", f"out_dir={tmp}/out"]
            result = Path(tmp) / f"{chunk}.json"
            command = [
                sys.executable,
                __file__,
                "--config",
                args.config,
                "--child",
                "run",
                "--result",
                str(result),
            ]
            subprocess.run([*command, *overrides], cwd=ROOT, check=True)
            results[label] = parse_json(result.read_text(), str(result), ValueError)
            r = results[label]
            print(
                f"{label:34s} {r['peak_rss_mb']:8,.0f}MB {r['tokens_per_s']:9,.0f} {r['loss']:11.4f}",
                flush=True,
            )
    full, chunked = results.values()
    print(
        f"chunked head: peak RSS {chunked['peak_rss_mb'] / full['peak_rss_mb']:.0%} of full logits "
        f"({full['peak_rss_mb'] - chunked['peak_rss_mb']:+,.0f} MB saved), tokens/s "
        f"{chunked['tokens_per_s'] / full['tokens_per_s']:.2f}x, final loss difference "
        f"{abs(chunked['loss'] - full['loss']):.2e}"
    )
    if abs(chunked["loss"] - full["loss"]) > 1e-2:
        sys.exit("bench_train: the chunked head trained to another loss than full logits")


if __name__ == "__main__":
    main()
