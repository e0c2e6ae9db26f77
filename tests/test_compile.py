"""score.compile: the compiled path scores what the eager path scores, and `auto` compiles only
when the time it saves exceeds what compiling costs; model.dtype=auto follows the measurements."""

import polars as pl
import pytest
import torch

from pipeline import compiling
from pipeline.compiling import AutoCompile, repeated_blocks, worth_compiling
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


class Kernel:
    device = torch.device("cpu")

    def __init__(self):
        self.compiled = 0

    def compile(self):
        self.compiled += 1


def test_auto_compiles_once_and_only_when_it_pays(monkeypatch):
    monkeypatch.setattr(compiling, "cache_is_warm", lambda: False)
    monkeypatch.setitem(compiling.GAIN, "cpu", 1.10)  # a gain as if measured
    gain, cost = compiling.GAIN["cpu"], compiling.COST_S["cold"]
    rate = 1_000.0  # tokens/s eager
    # the tokens left at which compiling saves exactly what it costs
    even = cost * rate / (1 - 1 / gain)
    assert not worth_compiling(int(even * 0.99), rate, torch.device("cpu"))
    assert worth_compiling(int(even * 1.01), rate, torch.device("cpu"))

    # a first window of 100 rows, 10,000 tokens in 10 s: the rows left decide
    for rows_to_score, expected in ((100 + int(even / 100 * 0.99), 0), (100 + int(even / 100 * 1.01), 1)):
        kernel = Kernel()
        auto = AutoCompile(kernel, rows_to_score)
        auto.advance(100, 10_000, 10.0)
        auto.advance(100, 10_000, 10.0)  # decided once, after the first window
        assert kernel.compiled == expected


def test_auto_stays_eager_where_no_gain_was_measured():
    kernel = Kernel()
    auto = AutoCompile(kernel, rows_to_score=10**12)
    auto.advance(100, 10_000, 10.0)
    assert auto.decided and kernel.compiled == 0 and "cpu" not in compiling.GAIN


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


def test_auto_counts_the_rows_a_resumed_run_finds_done(monkeypatch):
    monkeypatch.setattr(compiling, "cache_is_warm", lambda: True)
    monkeypatch.setitem(compiling.GAIN, "cpu", 1.10)
    kernel = Kernel()
    auto = AutoCompile(kernel, rows_to_score=10**9)
    auto.advance(10**9 - 200)  # scored by an earlier run: no time measured, no decision
    assert not auto.decided
    auto.advance(100, 10_000, 10.0)  # 100 rows left: not worth it
    assert auto.decided and kernel.compiled == 0


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
