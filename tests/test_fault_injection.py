"""Fault injection: score, select and train are each killed (SIGKILL) at 5 random moments, rerun
to the end, and must then hold exactly what an uninterrupted run writes.

A kill moment is a random point of the stage's own progress (seeded), not of the clock, since
start-up takes most of a tiny run: score is killed once it has finished a random number of
shards and written a random number of checkpoints of the next, select once it has written a
random number of band files, train once a random number of its checkpoints exist, each after a
further random 0-10 ms (so some land mid-write), and always before the stage has finished. The test prints what each kill interrupted.
"""

import json
import random
import shutil
import signal
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from pipeline.layout import Layout, part_files
from tests.helpers import make_texts, midrank, write_config, write_corpus

KILLS = 5
TRAIN = (
    "train:\n  max_tokens: 48\n  batch_size: 4\n  max_steps: 8\n  save_steps: 2\n  save_total_limit: 10\n"
    "  learning_rate: 0.001\n  warmup_steps: 0\n  precision: fp32\n  name: run\n"
)


def run_to_end(out: Path, config: Path, stage: str) -> float:
    started = time.perf_counter()
    process = midrank(stage, "--config", str(config), f"out_dir={out}")
    output = process.stdout.read()
    assert process.wait() == 0, output
    return time.perf_counter() - started


def progress(out: Path, stage: str) -> int:
    """How far the stage has got, as a number that only grows."""
    layout = Layout(out)
    if stage == "score":
        while True:
            try:
                chunks = len(list(layout.scores_dir.glob(".part-*.chunks/chunk-*.parquet")))
                return 100 * len(part_files(layout.scores_dir)) + chunks
            except FileNotFoundError:  # a finished shard's checkpoint folder removed mid-glob: look again
                continue
    if stage == "select":
        return len(list(out.glob("*/*/part-*.parquet"))) + len(list(out.glob("selected/*/manifest.json")))
    return len(list(layout.train_run("run").checkpoints.glob("checkpoint-*")))


def random_target(rng: random.Random, stage: str) -> int:
    if stage == "score":  # 3 shards of ~14 windows (160 rows, window_rows 4)
        return 100 * rng.randrange(3) + rng.randint(1, 12)
    if stage == "select":  # 3 kept + 3 rejected parts; the manifest comes last
        return rng.randint(1, 6)
    return rng.randint(1, 4)  # checkpoints at steps 2, 4, 6, 8


def finished(out: Path, stage: str) -> bool:
    """Whether the stage has written the file it writes last."""
    layout = Layout(out)
    if stage == "score":
        return layout.scores_summary.is_file()
    if stage == "select":
        return any(out.glob("selected/*/manifest.json"))
    return layout.train_run("run").metrics.is_file()


def kill_then_finish(out: Path, config: Path, stage: str, target: int, jitter: float) -> str:
    """Start the stage, SIGKILL it once it has got to `target` (and `jitter` seconds more) and
    before it finished, run it again to the end; what the kill interrupted."""
    process = midrank(stage, "--config", str(config), f"out_dir={out}")
    while progress(out, stage) < target and process.poll() is None:
        time.sleep(0.002)
    time.sleep(jitter)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    assert process.returncode == -signal.SIGKILL and not finished(out, stage), "the kill came after the end"
    done = progress(out, stage)
    landed = {
        "score": f"{done // 100} shards + {done % 100} checkpoints",
        "select": f"{done} band files",
        "train": f"{done} checkpoints",
    }[stage]
    run_to_end(out, config, stage)
    return landed


def scores_of(out: Path) -> pl.DataFrame:
    return pl.read_parquet(part_files(Layout(out).scores_dir)).sort("sample_id")


def summary_of(out: Path) -> dict:
    summary = json.loads(Layout(out).scores_summary.read_text())
    return {k: v for k, v in summary.items() if k not in ("seconds", "provenance")}


def band_of(out: Path) -> tuple[pl.DataFrame, pl.DataFrame, str, dict]:
    """Every file select writes: kept rows, rejected rows, the JSONL and the manifest."""
    (band_dir,) = (p for p in (out / "selected").iterdir() if p.is_dir())
    paths = Layout(out).band(band_dir.name)
    manifest = json.loads(paths.manifest.read_text())
    for volatile in ("config", "score_provenance"):  # they hold out_dir, which differs per trial
        manifest.pop(volatile)
    kept = pl.read_parquet(part_files(paths.dir)).sort("sample_id")
    rejected = pl.read_parquet(part_files(paths.rejected)).sort("sample_id")
    return kept, rejected, paths.jsonl.read_text(), manifest


def weights_of(out: Path) -> dict:
    return load_file(Layout(out).train_run("run").model / "model.safetensors")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("faults")
    corpus = write_corpus(root / "corpus.jsonl", make_texts(160, seed=41))
    config = write_config(
        root, corpus, tiny_model_dir, TRAIN + "select:\n  write_rejected: true\n  jsonl: true\n"
    )
    # finer checkpoints than the defaults, so kills land between them
    config.write_text(config.read_text().replace("window_rows: 8", "window_rows: 4"))
    return root, config


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["score", "select", "train"])
def test_killed_at_random_moments_then_rerun_equals_an_uninterrupted_run(base, stage, capsys):
    root, config = base
    reference = root / f"reference-{stage}"
    before = {"score": [], "select": ["score"], "train": ["score", "select"]}[stage]
    reference.mkdir()
    for earlier in before:
        run_to_end(reference, config, earlier)
    prepared = root / f"prepared-{stage}"
    shutil.copytree(reference, prepared)  # what the stage starts from
    duration = run_to_end(reference, config, stage)

    rng = random.Random(f"faults-{stage}")
    landings = []
    for trial in range(KILLS):
        out = root / f"{stage}-trial{trial}"
        shutil.copytree(prepared, out)
        target = random_target(rng, stage)
        last = {"score": 212, "select": 6, "train": 4}[stage]  # the last event before the end
        jitter = 0.0 if target >= last else rng.uniform(0, 0.01)
        landings.append(kill_then_finish(out, config, stage, target, jitter))
        if stage == "score":
            assert scores_of(out).equals(scores_of(reference)), f"trial {trial}: scores differ"
            assert summary_of(out) == summary_of(reference)
        elif stage == "select":
            for found, expected in zip(band_of(out), band_of(reference), strict=True):
                same = found.equals(expected) if isinstance(found, pl.DataFrame) else found == expected
                assert same, f"trial {trial}: the band differs"
        else:
            found, expected = weights_of(out), weights_of(reference)
            for name, tensor in expected.items():
                torch.testing.assert_close(found[name], tensor, atol=1e-6, rtol=1e-5)
            metrics = json.loads(Layout(out).train_run("run").metrics.read_text())["train"]
            ref_metrics = json.loads(Layout(reference).train_run("run").metrics.read_text())["train"]
            assert metrics["trained_tokens"] == ref_metrics["trained_tokens"]
        assert not list(out.rglob("*.tmp")), f"trial {trial}: temporary files left behind"
    with capsys.disabled():
        print(
            f"\n{stage}: uninterrupted {duration:.1f}s; {KILLS} kills landed {', '.join(landings)}; all equal"
        )
