from pathlib import Path

import pytest

from pipeline.config import PAPER_TASKS, Config, ConfigError, dump_config, load_config

PRESETS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def test_there_are_presets():
    names = {p.name for p in PRESETS}
    assert {"default.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert cfg.corpus.paths and cfg.model.path


def test_the_gpu_preset_names_the_papers_tasks():
    # lm-evaluation-harness names of piqa, hellaswag, winogrande, arc-challenge, boolq and mmlu
    cfg = load_config(Path(PRESETS[0]).parent / "pythia-410m.yaml")
    assert cfg.compare.hub_tasks == PAPER_TASKS
    assert set(PAPER_TASKS) == {"piqa", "hellaswag", "winogrande", "arc_challenge", "boolq", "mmlu"}


def test_compare_checks_its_arms_and_budget(tmp_path):
    with pytest.raises(ConfigError, match=r"compare.reference: 'random' is not one of the arms"):
        load_config(write(tmp_path, BASE), ["compare.arms=[top, midranking]"])
    with pytest.raises(ConfigError, match=r"compare.token_budget: must hold at least one step"):
        load_config(write(tmp_path, BASE), ["compare.token_budget=100", "compare.tokens_per_step=1024"])
    cfg = load_config(
        write(tmp_path, BASE),
        ["compare.arms=[random, weighted, marion_middle, cc_net_middle, ankner_high50]"],
    )
    assert cfg.compare.arms[1:] == ("weighted", "marion_middle", "cc_net_middle", "ankner_high50")


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BASE = "corpus:\n  paths: [a.jsonl]\nmodel:\n  path: m\n"


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE), ["score.batch_tokens=4096", "corpus.on_error=skip", "score.add_bos=false"]
    )
    assert cfg.score.batch_tokens == 4096 and cfg.corpus.on_error == "skip" and cfg.score.add_bos is False


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["score.max_tokens=256", "corpus.paths=[x.jsonl, y.parquet]"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("score.batch_tokn=8", "score.batch_tokn: unknown key; allowed keys in score: max_tokens"),
        ("scor.batch_tokens=8", "scor: unknown key; allowed keys in config: out_dir, corpus, model, score"),
        ("score.long_docs=cut", "score.long_docs: 'cut' is not one of 'truncate', 'split'"),
        ("model.dtype=fp8", "model.dtype: 'fp8' is not one of 'auto', 'float32', 'bfloat16', 'float16'"),
        ("score.batch_tokens=lots", "score.batch_tokens: expected an integer, got 'lots'"),
        ("score.max_tokens=1", "score.max_tokens: must be >= 2, got 1"),
        ("score.batch_tokens=16", "score.batch_tokens: must be >= max_tokens (512), got 16"),
        ("corpus.num_shards=0", "corpus.num_shards: must be >= 1, got 0"),
        ("model.trust_remote_code=yes please", "model.trust_remote_code: expected true or false"),
        ("score.max_tokens.x=1", "score.max_tokens: expected an integer, got {'x': 1}"),
        ("out_dir.x=1", "out_dir: expected a string"),
        ("score.max_tokens", "is not of the form section.key=value"),
    ],
)
def test_bad_override_names_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE), [override])
    assert message in str(err.value)


def test_required_fields_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.path: required"):
        load_config(write(tmp_path, "corpus:\n  paths: [a.jsonl]\n"))
    with pytest.raises(ConfigError, match=r"corpus\.paths: at least one input path"):
        load_config(write(tmp_path, "corpus:\n  paths: []\nmodel:\n  path: m\n"))


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="corpus: expected a mapping"):
        load_config(write(tmp_path, "corpus: 3\nmodel:\n  path: m\n"))


def test_override_into_a_value_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"score\.max_tokens: is a value, not a section"):
        load_config(write(tmp_path, BASE), ["score.max_tokens=5", "score.max_tokens.x=1"])


def test_the_config_stands_on_no_selection_code():
    """pipeline/config.py is imported by nearly every module: what it imports must not pull in the
    selection engine (a fresh interpreter, so other tests' imports do not count)."""
    import subprocess
    import sys

    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, pipeline.config; print(*sorted(sys.modules))"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
    ).stdout.split()  # fmt: skip
    assert sorted(m for m in loaded if m.startswith("pipeline")) == [
        "pipeline", "pipeline.codec", "pipeline.config", "pipeline.rank_keys", "pipeline.shares"
    ]  # fmt: skip
    assert "polars" not in loaded
