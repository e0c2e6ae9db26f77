"""Test helpers: generated texts, small corpora and configs under tmp_path."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("the cat sat on a mat while data flows through pipes and models learn from text at night").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Documents of very different lengths (1 to ~300 words), some code-like, some noise."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        kind = i % 4
        length = rng.choice([1, 2, 5, 20, 60, 150, 300])
        if kind == 0:
            texts.append(" ".join(rng.choice(WORDS) for _ in range(length)))
        elif kind == 1:
            texts.append("\n".join(f"def f{j}(x):\n    return x * {j}" for j in range(max(1, length // 8))))
        elif kind == 2:
            texts.append("".join(rng.choice("qzxjkvbw#@!%") for _ in range(length * 3)))
        else:
            texts.append(" ".join(rng.choice(WORDS).upper() for _ in range(length)) + ".")
    return texts


def write_corpus(path: Path, texts: list[str]) -> Path:
    sources = ["prose", "code", "noise", "shouting"]
    with path.open("w") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"text": text, "source": sources[i % 4]}) + "\n")
    return path


def write_config(tmp_path: Path, corpus: Path, model: Path, extra: str = "") -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"out_dir: {tmp_path / 'out'}\n"
        f"corpus:\n  paths: [{corpus}]\n  source_field: source\n  num_shards: 3\n"
        f"model:\n  path: {model}\n  dtype: float32\n"
        f"score:\n  max_tokens: 64\n  batch_tokens: 256\n  window_rows: 8\n  num_workers: 0\n{extra}"
    )
    return config


def torchrun_command(*args: str, nproc: int = 2) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N -m stages.cli ARGS`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "stages.cli",
        *args,
    ]


TORCHRUN_ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run a torchrun job from the repository root to its end."""
    return subprocess.run(
        torchrun_command(*args, nproc=nproc),
        cwd=ROOT,
        env={**os.environ, **TORCHRUN_ENV},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def torchrun_process(*args: str, nproc: int = 2) -> subprocess.Popen:
    """A torchrun job as a separate process (to run beside another)."""
    return subprocess.Popen(
        torchrun_command(*args, nproc=nproc),
        cwd=ROOT,
        env={**os.environ, **TORCHRUN_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def midrank(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m stages.cli ARGS` as a separate process (to be killed, or run beside torchrun)."""
    return subprocess.Popen(
        [sys.executable, "-m", "stages.cli", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
