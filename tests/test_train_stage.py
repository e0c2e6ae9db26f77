"""The train stage end to end on the tiny model: outputs, evaluation, kill and resume, torchrun."""

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import train_run
from pipeline.config import ConfigError, load_config
from pipeline.layout import Layout
from pipeline.trainer import trained_tokens_at
from stages import score, select, train
from tests.helpers import make_texts, midrank, torchrun, write_config, write_corpus


def train_config(directory: Path, corpus: Path, model: Path, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(
        directory,
        corpus,
        model,
        "train:\n  data_paths: ["
        f"{corpus}]\n  max_tokens: 48\n  batch_size: 4\n  max_steps: 8\n  save_steps: 2\n  save_total_limit: 10\n"
        f"  learning_rate: 0.001\n  warmup_steps: 0\n  precision: fp32\n  logging_steps: 1\n  name: run\n{extra}",
    )


def final_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "out" / "train" / "run" / "model" / "model.safetensors")


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl", make_texts(48, seed=21))


def test_train_on_a_band_with_evaluation(tmp_path, tiny_model_dir, corpus):
    heldout = write_corpus(tmp_path / "heldout.jsonl", make_texts(12, seed=22))
    config = write_config(tmp_path, corpus, tiny_model_dir)
    overrides = [
        f"train.eval_paths=[{heldout}]",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.max_tokens=48",
        "train.learning_rate=0.001",
        "train.objective=irdro",
        "train.precision=fp32",
    ]
    cfg = load_config(config, overrides)
    score.run(cfg)
    select.run(cfg)
    run_dir = train.run(cfg)
    assert run_dir.name == "irdro-midranking-s0.1-k0.5-samples"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["before"]["per_source"]) == {"prose", "code", "noise", "shouting"}
    assert metrics["before"]["overall"]["tokens"] == metrics["after"]["overall"]["tokens"] > 0
    assert metrics["after"]["overall"]["loss"] < metrics["before"]["overall"]["loss"]
    assert metrics["train"]["steps"] == 3 and metrics["train"]["tokens_per_second"] > 0
    for row in metrics["table"]:
        assert row["delta"] == pytest.approx(row["loss_after"] - row["loss_before"])
    band_manifest = tmp_path / "out" / "selected" / "midranking-s0.1-k0.5-samples" / "manifest.json"
    assert (run_dir / "selection_manifest.json").read_text() == band_manifest.read_text()
    assert (run_dir / "config.yaml").is_file()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")  # loads as it is
    assert model.config.num_hidden_layers == 2
    # a rerun does nothing; another train config under the same run name is refused
    mtime = (run_dir / "metrics.json").stat().st_mtime_ns
    train.run(cfg)
    assert (run_dir / "metrics.json").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="another train config"):
        train.run(
            load_config(
                config, [*overrides, "train.kl_reg=2.0", "train.name=irdro-midranking-s0.1-k0.5-samples"]
            )
        )


def test_weighted_needs_a_weight_column(tmp_path, tiny_model_dir, corpus):
    config = train_config(tmp_path, corpus, tiny_model_dir, "  objective: weighted\n")
    with pytest.raises(ConfigError, match="needs a `weight` column"):
        train.run(load_config(config))


@pytest.mark.slow  # real processes: SIGKILL / torchrun
def test_kill_and_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, tiny_model_dir, corpus):
    reference = train_config(tmp_path / "ref", corpus, tiny_model_dir)
    finished = midrank("train", "--config", str(reference))
    assert finished.wait() == 0, finished.stdout.read()

    config = train_config(tmp_path / "run", corpus, tiny_model_dir)
    checkpoints = tmp_path / "run" / "out" / "train" / "run" / "checkpoints"
    process = midrank("train", "--config", str(config))
    deadline = time.time() + 120
    while not (checkpoints / "checkpoint-4" / "trainer_state.json").is_file():
        assert process.poll() is None, f"finished before the kill point:\n{process.stdout.read()}"
        assert time.time() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (checkpoints / "checkpoint-8").exists()

    resumed = midrank("train", "--config", str(config))
    output = resumed.stdout.read()
    assert resumed.wait() == 0, output
    assert "resuming from" in output
    metrics = json.loads((tmp_path / "run" / "out" / "train" / "run" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 8 and metrics["train"]["steps_this_run"] < 8
    reference_metrics = json.loads((tmp_path / "ref" / "out" / "train" / "run" / "metrics.json").read_text())
    # the count of trained tokens continues across the resume
    assert metrics["train"]["trained_tokens"] == reference_metrics["train"]["trained_tokens"]
    assert metrics["train"]["target_tokens_this_run"] < reference_metrics["train"]["trained_tokens"]
    expected, found = final_weights(tmp_path / "ref"), final_weights(tmp_path / "run")
    for name, tensor in expected.items():
        torch.testing.assert_close(found[name], tensor, atol=1e-6, rtol=1e-5)


@pytest.mark.slow  # real processes: SIGKILL / torchrun
@pytest.mark.parametrize("objective", ["uniform", "irdro"])
def test_torchrun_two_ranks_match_one_process_with_the_same_global_batch(
    tmp_path, tiny_model_dir, corpus, objective
):
    # IR-DRO weights span the global batch only when the losses are gathered across ranks
    extra = f"  objective: {objective}\n  gather_losses: {str(objective == 'irdro').lower()}\n"
    one = train_config(tmp_path / "one", corpus, tiny_model_dir, extra)
    single = midrank("train", "--config", str(one), "train.max_steps=3", "train.batch_size=4")
    assert single.wait() == 0, single.stdout.read()
    two = train_config(tmp_path / "two", corpus, tiny_model_dir, extra)
    result = torchrun(
        "train",
        "--config",
        str(two),
        "train.max_steps=3",
        "train.batch_size=2",
        f"train.eval_paths=[{corpus}]",  # rank 1 must wait for rank 0's evaluation, not abort
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "two" / "out" / "train" / "run" / "metrics.json").read_text())
    assert metrics["train"]["world_size"] == 2 and "after" in metrics
    single_metrics = json.loads((tmp_path / "one" / "out" / "train" / "run" / "metrics.json").read_text())
    assert (
        metrics["train"]["trained_tokens"] == single_metrics["train"]["trained_tokens"] > 0
    )  # summed over ranks
    expected, found = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name, tensor in expected.items():
        torch.testing.assert_close(found[name], tensor, atol=1e-5, rtol=1e-4)


def test_online_midranking_counts_only_the_band_as_trained(tmp_path, tiny_model_dir):
    """Every sample is cut to 16 tokens (15 targets), so 3 steps of batches of 4 that train on the
    band of 2 (skip 1, keep 2) train on exactly 3 x 2 x 15 tokens, of 3 x 4 x 15 processed."""
    corpus = write_corpus(tmp_path / "long.jsonl", [" ".join(["the cat sat on the mat"] * 20)] * 24)
    config = train_config(
        tmp_path,
        corpus,
        tiny_model_dir,
        "  objective: midranking_online\n  skip: 0.25\n  keep: 0.5\n",
    )
    run_dir = train.run(load_config(config, ["train.max_tokens=16", "train.max_steps=3"]))
    summary = json.loads((run_dir / "metrics.json").read_text())["train"]
    assert summary["trained_tokens"] == 3 * 2 * 15 and summary["target_tokens_this_run"] == 3 * 4 * 15


def test_the_starting_models_evaluation_is_shared_only_by_runs_with_the_same_inputs(
    tmp_path, tiny_model_dir, corpus
):
    """train/.eval-before/<hash>.json is keyed by the weights, the held-out records and the eval
    settings: the same inputs reuse it, a different held-out set or starting model does not."""
    heldout = write_corpus(tmp_path / "heldout.jsonl", make_texts(8, seed=41))
    other_heldout = write_corpus(tmp_path / "other.jsonl", make_texts(8, seed=42))
    config = train_config(tmp_path, corpus, tiny_model_dir, "  max_steps: 2\n")
    cache = tmp_path / "out" / "train" / ".eval-before"

    def trained(*overrides):
        run_dir = train.run(load_config(config, list(overrides)))
        return json.loads((run_dir / "metrics.json").read_text())

    a = trained(f"train.eval_paths=[{heldout}]", "train.name=a")
    (kept,) = cache.glob("*.json")
    marked = json.loads(kept.read_text())
    marked["overall"]["loss"] = 123.0  # run b must read this file, not evaluate again
    kept.write_text(json.dumps(marked))
    b = trained(f"train.eval_paths=[{heldout}]", "train.name=b", "train.learning_rate=0.01")
    assert len(list(cache.glob("*.json"))) == 1 and b["before"] == marked
    c = trained(f"train.eval_paths=[{other_heldout}]", "train.name=c")
    assert len(list(cache.glob("*.json"))) == 2 and c["before"]["overall"]["loss"] != 123.0
    assert c["before"]["overall"] != a["before"]["overall"]
    # a run that starts from run a's trained weights is evaluated afresh: its "before" is a's "after"
    d = trained(
        f"train.eval_paths=[{heldout}]",
        "train.name=d",
        f"model.path={tmp_path / 'out' / 'train' / 'a' / 'model'}",
    )
    assert len(list(cache.glob("*.json"))) == 3
    assert d["before"]["overall"]["loss"] == pytest.approx(a["after"]["overall"]["loss"], abs=1e-5)


def test_a_finished_run_from_an_older_version_is_named_not_misread(tmp_path, tiny_model_dir, corpus):
    config = train_config(tmp_path, corpus, tiny_model_dir, "  max_steps: 1\n")
    run_dir = train.run(load_config(config))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    del metrics["train"]["trained_tokens"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(
        ConfigError,
        match=r"holds a run written by an older midrank .*trained_tokens: required, missing.*delete",
    ):
        train.run(load_config(config))


def test_packing_is_refused_for_a_model_that_does_not_isolate_packed_samples(
    tmp_path, tiny_model_dir, corpus, monkeypatch
):
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    config = train_config(tmp_path, corpus, tiny_model_dir, "  pack: true\n")
    with pytest.raises(ConfigError, match="lets packed samples attend to each other"):
        train.run(load_config(config))
    # samples of n tokens with max_tokens 2n + 1: two share a row, three never do; still checked
    text = "the cat sat on the mat " * 3
    n = 1 + len(AutoTokenizer.from_pretrained(tiny_model_dir)(text, add_special_tokens=False).input_ids)
    same = write_corpus(tmp_path / "same.jsonl", [text] * 12)
    config = train_config(tmp_path / "same", same, tiny_model_dir, "  pack: true\n")
    with pytest.raises(ConfigError, match="lets packed samples attend to each other"):
        train.run(load_config(config, [f"train.max_tokens={2 * n + 1}"]))


def test_old_checkpoints_and_hidden_run_names_are_refused(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4, "stateful_callbacks": {}}))
    with pytest.raises(ConfigError, match="older midrank"):
        trained_tokens_at(checkpoint)
    config = tmp_path / "c.yaml"
    config.write_text("corpus: {paths: [x.jsonl]}\nmodel: {path: m}\n")
    with pytest.raises(ConfigError, match=r"train\.name: must be a plain name"):
        load_config(config, ["train.name=.eval-before"])


def test_a_killed_run_resumes_only_under_its_own_config(tmp_path, tiny_model_dir, corpus):
    config = train_config(tmp_path, corpus, tiny_model_dir, "  max_steps: 2\n  save_steps: 2\n")
    run_dir = train.run(load_config(config))
    (run_dir / "metrics.json").unlink()  # as if killed after its checkpoint at step 2
    changed = ["train.max_steps=4", "train.learning_rate=0.01"]
    with pytest.raises(
        ConfigError,
        match=r"started under other settings \(train\.max_steps: 2 -> 4; train\.learning_rate: 0\.001 -> 0\.01\)",
    ):
        train.run(load_config(config, changed))
    # how records become tokens decides the weights too; evaluation and logging settings do not
    with pytest.raises(ConfigError, match=r"samples\.add_bos: True -> False"):
        train.run(load_config(config, ["score.add_bos=false"]))
    layout, data = Layout(tmp_path / "out"), train_run.TrainingData([corpus], None, "corpus")
    quiet = load_config(
        config, ["train.logging_steps=7", f"train.eval_paths=[{corpus}]", "train.save_steps=1"]
    )
    assert train_run.run_identity(quiet, layout, data) == train_run.run_identity(
        load_config(config), layout, data
    )
    (run_dir / "started.json").write_text("{cut")  # damaged: a clear refusal, not a traceback
    with pytest.raises(
        ConfigError, match=r"did not record its settings .*started\.json: cannot be read as JSON"
    ):
        train.run(load_config(config))
    (run_dir / "started.json").unlink()
    resumed = train.run(load_config(config, [*changed, "train.resume_changed_config=true"]))
    metrics = json.loads((resumed / "metrics.json").read_text())["train"]
    assert metrics["steps"] == 4 and metrics["steps_this_run"] == 2  # continued from step 2


def test_token_budget_runs_train_on_exactly_the_same_tokens_whatever_their_samples(tmp_path, tiny_model_dir):
    """Equal compute: short and long documents, the same budget, the same trained tokens."""
    short = write_corpus(tmp_path / "short.jsonl", [" ".join(["cat"] * (2 + i % 5)) for i in range(40)])
    long = write_corpus(tmp_path / "long.jsonl", [" ".join(["the cat sat"] * (10 + i)) for i in range(40)])
    summaries = []
    for name, data in (("short", short), ("long", long)):
        config = train_config(
            tmp_path / name,
            data,
            tiny_model_dir,
            "  target_tokens_per_batch: 50\n  grad_accum: 2\n  pack: true\n",
        )
        run_dir = train.run(load_config(config, ["train.max_steps=3"]))
        summaries.append(json.loads((run_dir / "metrics.json").read_text())["train"])
    assert [s["trained_tokens"] for s in summaries] == [3 * 2 * 50] * 2
    assert [s["target_tokens_this_run"] for s in summaries] == [300, 300] and [
        s["steps"] for s in summaries
    ] == [3, 3]
    short_seen, long_seen = summaries
    # the long set holds more than the budget: one pass, no token twice; the short one is passed over again
    assert long_seen["distinct_tokens"] == 300 and short_seen["distinct_tokens"] < 300
    assert (
        short_seen["samples_seen"] > long_seen["samples_seen"]
        and short_seen["mean_sample_tokens"] < long_seen["mean_sample_tokens"]
    )
