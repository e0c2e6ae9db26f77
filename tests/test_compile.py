"""score.compile: the compiled path scores what the eager path scores, and `auto` compiles only
when the time it saves exceeds what compiling costs; model.dtype=auto follows the measurements."""

import polars as pl
import pytest
import torch

from pipeline import compiling
from pipeline.compiling import repeated_blocks, worth_compiling
from pipeline.config import load_config
from pipeline.layout import Layout
from stages import score
from tests.helpers import make_texts, write_config, write_corpus

# nats/token, on the tiny model; on SmolLM2-135M compiled bf16 moved losses by up to 0.06 from eager
# bf16 (bench/bench_score.py --compiled prints it)
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.02}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_scoring_agrees_with_eager_scoring(tmp_path, tiny_model_dir, monkeypatch, dtype):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    corpus = write_corpus(tmp_path / "c.jsonl", make_texts(24, seed=5))
    config = write_config(tmp_path, corpus, tiny_model_dir)
    losses = {}
    for mode in (False, True):
        cfg = load_config(
            config, [f"model.dtype={dtype}", f"score.compile={mode}", f"out_dir={tmp_path / str(mode)}"]
        )
        score.run(cfg)
        files = sorted(Layout(cfg.out_dir).scores_dir.glob("part-*.parquet"))
        losses[mode] = pl.read_parquet(files).sort("sample_id")
    assert any((tmp_path / "inductor").iterdir())  # it compiled, and kept the cache where told
    eager, compiled = losses[False], losses[True]
    assert eager["sample_id"].to_list() == compiled["sample_id"].to_list()
    assert eager["n_tokens"].to_list() == compiled["n_tokens"].to_list()
    worst = (eager["loss"] - compiled["loss"]).abs().max()
    assert worst <= TOLERANCE[dtype], worst


def rates_taken(values: list[float], taken: list[float]):
    """The eager rates, each noted in `taken` when asked for (a second probe costs a batch)."""
    for value in values:
        taken.append(value)
        yield value


def test_auto_compiles_only_when_it_pays_at_the_warm_rate():
    # a worked case: at 1,000 padded tokens/s eager and a 1.25x gain, compiling saves a fifth of
    # the eager time: 100 s on 500,000 tokens, so it pays for 99 s and not for 101 s
    taken: list[float] = []
    assert worth_compiling(500_000, rates_taken([1_000.0, 1_000.0], taken), gain=1.25, cost=99.0)
    assert taken == [1_000.0, 1_000.0]  # a yes is checked against a second, warm probe
    taken.clear()
    assert not worth_compiling(500_000, rates_taken([1_000.0, 1_000.0], taken), gain=1.25, cost=101.0)
    assert taken == [1_000.0]  # a no from the (slower) first probe is final
    # the first probe, slower, said yes (100 s saved); the warm one, faster, says 95 s: no
    assert not worth_compiling(500_000, iter([1_000.0, 1_050.0]), gain=1.25, cost=99.0)


def test_auto_counts_no_gain_where_none_was_measured(monkeypatch):
    monkeypatch.setitem(compiling.GAIN, "cpu float32", 1.5)
    assert compiling.measured_gain("cpu float32", whole=False) == 1.5
    assert compiling.measured_gain("cpu float32", whole=True) is None  # compiled whole: 0.97-1.06x
    assert "cuda bfloat16" not in compiling.GAIN
    assert compiling.measured_gain("cuda bfloat16", whole=False) is None


def test_the_warm_marker_is_by_architecture_dtype_and_attention_not_by_folder(
    tmp_path, tiny_model_dir, monkeypatch
):
    import shutil

    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    copy = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    marker = compiling.warm_marker(model, torch.float32, True)
    assert compiling.warm_marker(AutoModelForCausalLM.from_pretrained(copy), torch.float32, True) == marker
    assert compiling.warm_marker(model, torch.bfloat16, True) != marker  # Inductor's graphs are by dtype
    assert compiling.warm_marker(model, torch.float32, False) != marker  # and padded or not
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert compiling.warm_marker(eager, torch.float32, True) != marker
    config = model.config.to_dict() | {"num_hidden_layers": model.config.num_hidden_layers + 1}
    deeper = AutoModelForCausalLM.from_config(type(model.config).from_dict(config))
    assert compiling.warm_marker(deeper, torch.float32, True) != marker


def test_the_stage_marks_the_cache_warm_and_auto_weighs_it(tmp_path, tiny_model_dir, monkeypatch):
    """A compiled run marks the cache warm for its model; `auto` then counts the warm cost (here
    free, the cold one infinite); for a model compiled whole it counts no gain, and so neither
    probes again nor reads the corpus ahead."""
    from pipeline.batching import ShardBatches
    from pipeline.model import load_model
    from pipeline.nll import NLLScorer

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiled: list[int] = []
    monkeypatch.setattr(NLLScorer, "compile", lambda self: compiled.append(1))
    config = write_config(
        tmp_path, write_corpus(tmp_path / "c.jsonl", make_texts(24, seed=5)), tiny_model_dir
    )
    marker = compiling.warm_marker(load_model(load_config(config).model).model, torch.float32, True)
    monkeypatch.setitem(compiling.GAIN, "cpu float32", 1e9)
    monkeypatch.setitem(compiling.COST_S, "cold", float("inf"))
    monkeypatch.setitem(compiling.COST_S, "warm", 0.0)
    score.run(load_config(config, ["score.compile=auto", f"out_dir={tmp_path / 'a'}"]))
    assert compiled == [] and not marker.is_file()  # cold: never pays
    score.run(load_config(config, ["score.compile=true", f"out_dir={tmp_path / 'b'}"]))
    assert compiled == [1] and marker.is_file()
    score.run(load_config(config, ["score.compile=auto", f"out_dir={tmp_path / 'c'}"]))
    assert compiled == [1, 1]  # warm: pays
    read: list[int] = []
    monkeypatch.setattr(ShardBatches, "padded_tokens_per_row", lambda self: read.append(1) or 1.0)
    monkeypatch.setattr(score, "repeated_blocks", lambda module: [])  # as if compiled whole
    score.run(load_config(config, ["score.compile=auto", f"out_dir={tmp_path / 'd'}"]))
    assert compiled == [1, 1] and read == []


def test_the_kind_of_device_tells_amx_in_use_and_the_dtype(monkeypatch):
    from pipeline import model

    cpu = torch.device("cpu")
    monkeypatch.setattr(model.torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert compiling.kind_of(cpu, torch.bfloat16) == "cpu+amx bfloat16"
    assert compiling.kind_of(cpu, torch.float32) == "cpu float32"  # AMX multiplies no fp32
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert compiling.kind_of(cpu, torch.bfloat16) == "cpu bfloat16"
    monkeypatch.setattr(model.torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert compiling.kind_of(cpu, torch.bfloat16) == "cpu bfloat16"
    assert compiling.kind_of(torch.device("cuda", 0), torch.bfloat16) == "cuda bfloat16"


def test_auto_decides_before_the_first_batch(tmp_path, tiny_model_dir, monkeypatch):
    """With a gain that pays at once, the stage compiles after its two probes and before any of
    the corpus is scored; with none, it never compiles."""
    from pipeline.nll import NLLScorer

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    events: list[str] = []
    call = NLLScorer.__call__
    monkeypatch.setattr(NLLScorer, "compile", lambda self: events.append("compile"))
    monkeypatch.setattr(
        NLLScorer, "__call__", lambda self, *a, **k: events.append("batch") or call(self, *a, **k)
    )
    corpus = write_corpus(tmp_path / "c.jsonl", make_texts(24, seed=5))
    config = write_config(tmp_path, corpus, tiny_model_dir)
    monkeypatch.setitem(compiling.GAIN, "cpu float32", 1e9)
    monkeypatch.setitem(compiling.COST_S, "cold", 0.0)
    monkeypatch.setitem(compiling.COST_S, "warm", 0.0)
    score.run(load_config(config, ["score.compile=auto", f"out_dir={tmp_path / 'a'}"]))
    assert events[:3] == ["batch", "batch", "compile"] and events.count("compile") == 1
    assert len(events) > 3  # the corpus was scored after
    events.clear()
    monkeypatch.delitem(compiling.GAIN, "cpu float32")
    score.run(load_config(config, ["score.compile=auto", f"out_dir={tmp_path / 'b'}"]))
    assert "compile" not in events and events.count("batch") > 1


def test_the_work_ahead_is_the_first_windows_padded_tokens_per_row(tmp_path, tiny_model_dir):
    """Identical documents of n tokens: padded to m = 16 * ceil(n / 16) (up to 128 tokens), r =
    batch_tokens // m rows a batch, every batch filled to r rows: ceil(W / r) * r * m over W rows."""
    from transformers import AutoTokenizer

    from pipeline.batching import ShardBatches
    from pipeline.sharding import plan_shards

    text = "the cat sat on the mat " * 3
    corpus = write_corpus(tmp_path / "c.jsonl", [text] * 40)
    cfg = load_config(
        write_config(tmp_path, corpus, tiny_model_dir), ["corpus.num_shards=1", "score.window_rows=13"]
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batches = ShardBatches(plan_shards(cfg.corpus), 0, cfg.corpus, cfg.score, tokenizer)
    first = next(b["batch"] for b in batches if b["batch"] is not None)
    n = int(first["attention_mask"][0].sum())
    assert n == len(tokenizer(text)["input_ids"]) + 1  # the text's tokens after BOS
    m = 16 * -(-n // 16)
    r = cfg.score.batch_tokens // m
    assert 1 < r < 13 and 13 % r  # several batches, the last one filled with empty rows
    assert batches.padded_tokens_per_row() == -(-13 // r) * r * m / 13


def test_the_inductor_cache_is_midranks_unless_the_user_chose_one(tmp_path, monkeypatch):
    """torch sets TORCHINDUCTOR_CACHE_DIR to its own /tmp default once Dynamo is imported; that is
    not the user's choice, and compiling puts the cache in the user's cache folder instead."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    from pipeline.compiling import compile_body

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # as torch leaves it
    compile_body(torch.nn.Linear(2, 2))
    assert cache_dir() == str(tmp_path / "cache" / "midrank" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compile_body(torch.nn.Linear(2, 2))
    assert cache_dir() == str(tmp_path / "mine")


@pytest.mark.parametrize(
    ("machine", "amx", "avx512_bf16", "cap", "expected"),
    [
        ("x86_64", True, True, None, True),  # AMX: bf16 3.0-3.4x fp32
        ("x86_64", True, True, "AVX512_CORE_AMX", True),
        ("x86_64", True, True, "AVX512_CORE_BF16", False),  # the same CPU, AMX withheld: 0.7-0.8x
        ("x86_64", False, True, None, True),  # AVX512-BF16 alone (AMD EPYC): 1.7x
        ("x86_64", False, True, "AVX2", False),
        ("x86_64", False, False, None, False),  # AVX512 without bf16, or less: operands converted
    ],
)
def test_model_dtype_auto_follows_what_was_measured(monkeypatch, machine, amx, avx512_bf16, cap, expected):
    from pipeline import model

    monkeypatch.setattr(model.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert model.cpu_supports_bf16() is expected
    assert model.resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if expected else torch.float32)


def test_score_compile_takes_true_false_or_auto_and_nothing_equal_to_them():
    from pipeline.config import ConfigError

    assert load_config(None, ["model.path=m", "corpus.paths=[c]", "score.compile=on"]).score.compile is True
    assert load_config(None, ["model.path=m", "corpus.paths=[c]", "score.compile=off"]).score.compile is False
    with pytest.raises(ConfigError, match=r"score\.compile: 1 is not one of False, True, 'auto'"):
        load_config(None, ["model.path=m", "corpus.paths=[c]", "score.compile=1"])


def test_compile_body_compiles_each_repeated_layer_in_place(tiny_model_dir, tmp_path, monkeypatch):
    """The layers transformers keeps whole (`_no_split_modules`) are compiled one by one, the body
    around them stays eager; a module with no such layers is compiled whole."""
    from transformers import AutoModelForCausalLM

    from pipeline.compiling import compile_body

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    body = AutoModelForCausalLM.from_pretrained(tiny_model_dir).base_model
    layers = list(body.layers)
    assert len(layers) > 1 and repeated_blocks(body) == layers
    assert compile_body(body) is body
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert body._compiled_call_impl is None
    plain = torch.nn.Linear(2, 2)
    assert compile_body(plain) is not plain  # compiled whole, as a wrapper


def test_repeated_blocks_are_the_outermost_of_their_classes():
    class Inner(torch.nn.Module):
        pass

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

    class Body(torch.nn.Module):
        _no_split_modules = ("Outer", "Inner")

        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Outer(), Outer()])
            self.extra = Inner()

    body = Body()
    assert repeated_blocks(body) == [body.blocks[0], body.blocks[1], body.extra]


def test_auto_weighs_only_the_rows_left_from_the_first_window_to_score(tmp_path, tiny_model_dir, monkeypatch):
    """A resumed run: shard 0 checkpointed 5 of its 8 rows, so 3 + 8 + 8 rows are left, and the
    tokens per row come from shard 0's rows 5 on, not from its start."""
    from pipeline.batching import ShardBatches
    from pipeline.model import load_model
    from pipeline.nll import BudgetedScorer, NLLScorer
    from pipeline.scores import SCORE_SCHEMA, ShardWriter, empty_stats, make_provenance, rows_checkpointed
    from pipeline.sharding import plan_shards

    texts = [f"short {i}" for i in range(5)] + make_texts(19, seed=3)  # shard 0 opens with 5 short rows
    corpus = write_corpus(tmp_path / "c.jsonl", texts)
    cfg = load_config(write_config(tmp_path, corpus, tiny_model_dir))
    plan, layout = plan_shards(cfg.corpus), Layout(cfg.out_dir)
    assert [plan.shard_rows(s) for s in range(3)] == [8, 8, 8]
    layout.make_dir(layout.scores_dir)
    ShardWriter(layout, 0, make_provenance(cfg, plan)).write_chunk(
        SCORE_SCHEMA.empty_table(), 5, empty_stats()
    )
    assert rows_checkpointed(layout, 0) == 5 and rows_checkpointed(layout, 1) == 0
    loaded = load_model(cfg.model)
    scorer = BudgetedScorer(NLLScorer(loaded.model, count_correct=False), cfg.score.batch_tokens)
    monkeypatch.setitem(compiling.GAIN, "cpu float32", 2.0)
    asked = {}
    monkeypatch.setattr(
        score, "worth_compiling", lambda tokens, rates, gain, cost: asked.update(tokens=tokens)
    )
    score.compiling_pays(cfg, plan, layout, [0, 1, 2], loaded, scorer, 1_000.0)
    rest = ShardBatches(plan, 0, cfg.corpus, cfg.score, loaded.tokenizer, start_row=5).padded_tokens_per_row()
    whole = ShardBatches(plan, 0, cfg.corpus, cfg.score, loaded.tokenizer).padded_tokens_per_row()
    assert rest != whole  # the short rows checkpointed would have lowered the estimate
    assert asked["tokens"] == (3 + 8 + 8) * rest
