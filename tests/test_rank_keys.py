"""Rank keys and min_tokens against independent computations: bits per byte from the text and a
direct forward pass, the length curve and length_adjusted in plain Python, and every strategy with
every key against a brute-force sort."""

import itertools
import json
import math
import random
import statistics
from fractions import Fraction

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.artifacts import ProvenanceError
from pipeline.band_decision import decide
from pipeline.codec import decode, encode
from pipeline.config import BandConfig, ConfigError, load_config
from pipeline.key_columns import with_key
from pipeline.outputs import BandManifest, OutputError
from pipeline.rank_keys import FLAG_KEYS, RANK_KEYS, LengthCurve
from pipeline.records import Record
from pipeline.samples import SamplePolicy, make_samples
from pipeline.scores import PROVENANCE_KEY, SCORING_VERSION
from stages import inspect, score, select
from tests.helpers import ROOT, write_config
from tests.test_selection import brute_force, exact_ends

UNICODE_TEXTS = [
    "Café au lait, naïve résumé — déjà vu.",
    "日本語のテキストとデータ。",
    "mixed: the cat 🐈 sat on the mat 🧶 while data flows",
    "plain ascii text about models that learn from text at night",
    "Ωμέγα and ß and ø, the cat sat on a mat",
    "x",
    "the the the the the the the the the",
]


def direct_bits_per_byte(model, tokenizer, text: str) -> float:
    """BOS + the whole text through the model in float32: summed NLL of every text token over
    the UTF-8 bytes of the text, in bits."""
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")
    return float(nll) / (math.log(2) * len(text.encode("utf-8")))


def test_bits_per_byte_equals_a_direct_computation_from_the_text(tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "source": "s"}) + "\n" for t in UNICODE_TEXTS))
    cfg = load_config(write_config(tmp_path, corpus, tiny_model_dir))
    score.run(cfg)
    scores = pl.read_parquet(tmp_path / "out" / "scores" / "part-*.parquet")
    scores = with_key(scores.lazy(), "bits_per_byte").collect().sort("sample_id")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    by_id = {f"corpus.jsonl:{i}": t for i, t in enumerate(UNICODE_TEXTS)}
    assert scores.height == len(UNICODE_TEXTS)
    for row in scores.iter_rows(named=True):
        text = by_id[row["sample_id"]]
        assert row["n_bytes"] == len(text.encode("utf-8"))
        assert row["bits_per_byte"] == pytest.approx(direct_bits_per_byte(model, tokenizer, text), rel=1e-4)


def test_n_bytes_without_bos_and_across_split_windows(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "the cat sat on a mat while data flows through pipes " * 12
    first = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][0]
    (sample,), _ = make_samples(
        Record("r:0", "s", text), tokenizer, SamplePolicy(max_tokens=512, bos_id=None)
    )
    assert sample.n_bytes == len(text.encode()) - (first[1] - first[0])  # the first token is context
    split = SamplePolicy(
        max_tokens=32, bos_id=tokenizer.bos_token_id, long_docs="split", split_context_tokens=8
    )
    windows, _ = make_samples(Record("r:0", "s", text), tokenizer, split)
    assert len(windows) > 3 and sum(w.n_bytes for w in windows) == len(text.encode())


# texts as (piece, is a tag) parts: the markup bytes are known by construction, not by a pattern
MARKUP_TEXTS = [
    [("Intro text. ", False), ('<div class="nav">', True), ("Home", False), ("</div>", True), (" more ", False),
     ('<a href="/x">', True), ("link", False), ("</a>", True), (".", False)],
    [("Math: a < b and c > d, x<3 and i<j are no tags; ", False), ("<br/>", True), (" is one.", False)],
    [("Unicode <ö> is not a tag, ", False), ("<p>", True), ("para", False), ("</p>", True),
     (" nor <|im_end|>.", False)],
    [("A page cut in the middle of ", False), ('<span class="co', True)],
    [("<!DOCTYPE html>", True), ("<script>", True), ('gtag("config");', False), ("</script>", True)],
    [("Compare: if a <b then the\nrest follows, and x > 1.", False)],  # a stray `<b` is no tag to the end
]  # fmt: skip
GARBLED = "Café naïve résumé, déjà vu".encode().decode("cp1252")


def test_markup_and_mojibake_counts_equal_an_independent_reading_of_the_text(tmp_path, tiny_model_dir):
    from ftfy.badness import badness

    texts = ["".join(p for p, _ in parts) for parts in MARKUP_TEXTS] + ["Café naïve résumé, déjà vu", GARBLED]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "source": "s"}) + "\n" for t in texts))
    cfg = load_config(
        write_config(tmp_path, corpus, tiny_model_dir), ["score.max_tokens=1024", "score.batch_tokens=1024"]
    )
    score.run(cfg)
    scores = pl.read_parquet(tmp_path / "out" / "scores" / "part-*.parquet")
    rows = {r["sample_id"]: r for r in scores.iter_rows(named=True)}
    for i, parts in enumerate(MARKUP_TEXTS):
        row = rows[f"corpus.jsonl:{i}"]
        assert (row["char_start"], row["char_end"]) == (0, len(texts[i]))
        assert row["n_markup_bytes"] == sum(len(p.encode("utf-8")) for p, tag in parts if tag), texts[i]
        assert row["n_mojibake"] == 0
    clean, garbled = rows[f"corpus.jsonl:{len(MARKUP_TEXTS)}"], rows[f"corpus.jsonl:{len(MARKUP_TEXTS) + 1}"]
    assert clean["n_mojibake"] == 0 and clean["n_markup_bytes"] == 0
    assert garbled["n_mojibake"] == badness(GARBLED) > 0
    keyed = with_key(with_key(scores.lazy(), "markup_share"), "mojibake").collect()
    for row in keyed.iter_rows(named=True):
        assert row["markup_share"] == row["n_markup_bytes"] / row["n_bytes"]
        assert row["mojibake"] == row["n_mojibake"] / row["n_bytes"]


def test_n_bytes_of_a_response_is_its_utf8_bytes(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    record = Record("r:0", "s", "Réponse: 日本 🐈 ok", prompt="Question?")
    policy = SamplePolicy(max_tokens=512, bos_id=tokenizer.bos_token_id, prompt_format="plain")
    (sample,), _ = make_samples(record, tokenizer, policy)
    assert sample.n_bytes == len(record.text.encode("utf-8"))
    whole = SamplePolicy(
        max_tokens=512, bos_id=tokenizer.bos_token_id, prompt_format="plain", score_prompt=True
    )
    (sample,), _ = make_samples(record, tokenizer, whole)
    assert sample.n_bytes == len("Question?\n\nRéponse: 日本 🐈 ok".encode())


# -- length_adjusted in plain Python ----------------------------------------------------------------


def brute_curve(rows, longest, min_samples=50, bins=32):
    """(lengths, losses) of the curve, from its definition: 32 log-spaced integer edges from 1 to
    the longest ranked sample + 1 (of every source), bins merged low lengths first until each holds min_samples (a short remainder joins
    the last), median length and median loss per bin."""
    edges = sorted({int(x) for x in np.geomspace(1, longest + 1, bins + 1)})
    groups, current = [], []
    for low, high in itertools.pairwise(edges):
        current += [r for r in rows if low <= r["n_tokens"] < high]
        if len(current) >= min_samples:
            groups.append(current)
            current = []
    if current:
        if groups:
            groups[-1] += current
        else:
            groups.append(current)
    lengths = [statistics.median(r["n_tokens"] for r in g) for g in groups]
    losses = [statistics.median(r["loss"] for r in g) for g in groups]
    return lengths, losses


def interpolate(lengths, losses, n):
    x, xs = math.log(n), [math.log(v) for v in lengths]
    if x <= xs[0]:
        return losses[0]
    for x0, x1, y0, y1 in zip(xs, xs[1:], losses, losses[1:], strict=False):
        if x <= x1:
            return y0 + (x - x0) * (y1 - y0) / (x1 - x0)
    return losses[-1]


def brute_keys(rows, key, by_source=False):
    """{sample_id: key} from each key's definition."""
    if key == "loss":
        return {r["sample_id"]: r["loss"] for r in rows}
    if key == "bits_per_byte":
        return {r["sample_id"]: r["nll_sum"] / (math.log(2) * r["n_bytes"]) for r in rows}
    if key == "ifd":
        return {r["sample_id"]: r["nll_sum"] / r["nll_sum_uncond"] for r in rows}
    if key == "reducible":  # from the sums: the stored losses are not reused
        return {r["sample_id"]: (r["nll_sum"] - r["nll_sum_target"]) / r["n_tokens"] for r in rows}
    counts = {"tokens_per_byte": "n_tokens", "markup_share": "n_markup_bytes", "mojibake": "n_mojibake"}
    if key in counts:  # exact rationals: ties are true ties, broken by sample_id
        return {r["sample_id"]: Fraction(r[counts[key]], r["n_bytes"]) for r in rows}
    groups = {}
    for r in rows:
        groups.setdefault(r["source"] if by_source else "", []).append(r)
    values = {}
    for group in groups.values():
        curve = brute_curve(group, max(r["n_tokens"] for r in rows))
        values |= {r["sample_id"]: r["loss"] - interpolate(*curve, r["n_tokens"]) for r in group}
    return values


@pytest.fixture
def rows():
    """Scores with lengths spread over 1..600 (many short), loss falling with length plus noise,
    sources of their own loss level, and bytes per token varying per sample."""
    rng = random.Random(5)
    out = []
    for i in range(1500):
        source = rng.choice(["web", "code", "books"])
        n = max(1, int(math.exp(rng.uniform(0, math.log(600)))))
        loss = 2.5 + 3.0 / math.sqrt(n) + {"web": 0.5, "code": -0.6, "books": 0.0}[source] + rng.gauss(0, 0.4)
        out.append(
            {
                "sample_id": f"c.jsonl:{i}",
                "source": source,
                "n_tokens": n,
                "nll_sum": loss * n,
                "loss": loss,
                "n_bytes": n * rng.randint(2, 6) + rng.randint(0, 3),
                "n_markup_bytes": rng.choice([0, 0, 0, rng.randint(0, 2 * n)]),
                "n_mojibake": rng.choice([0, 0, rng.randint(0, n)]),
                "nll_sum_uncond": loss * n * rng.uniform(0.8, 1.6),
            }
        )
        # a target model's loss on the same tokens: lower on most samples, by a varying amount
        target = loss - rng.uniform(-0.2, 0.8)
        out[-1] |= {"nll_sum_target": target * n, "loss_target": target}
    return out


@pytest.mark.parametrize("by_source", [False, True])
def test_length_adjusted_equals_brute_force(rows, by_source):
    cfg = BandConfig(strategy="top", keep=0.2, rank_by="length_adjusted", adjust_by_source=by_source)
    decision = decide(pl.LazyFrame(rows), cfg, "test")
    got = dict(decision.rows.select("sample_id", "length_adjusted").collect().iter_rows())
    expected = brute_keys(rows, "length_adjusted", by_source)
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v, abs=1e-12) for k, v in expected.items())
    # the curves as a manifest records them (JSON) give the same key back
    recorded = decode(
        dict[str, LengthCurve], json.loads(json.dumps(encode(decision.curves))), "test", OutputError
    )
    again = with_key(pl.LazyFrame(rows), "length_adjusted", recorded, by_source=by_source)
    again = again.select("sample_id", "length_adjusted")
    assert dict(again.collect().iter_rows()) == got


STRATEGIES = [
    ("midranking", {"skip": 0.1, "keep": 0.3}),
    ("band", {"low": 0.3, "high": 0.6}),
    ("marion_middle", {}),  # a peer's preset: loss quantiles [0.35, 0.65)
    ("top", {"keep": 0.25}),
    ("bottom", {"keep": 0.25}),
    ("all", {}),
]


@pytest.mark.parametrize(("strategy", "params"), STRATEGIES)
@pytest.mark.parametrize("key", [k for k in RANK_KEYS if k not in FLAG_KEYS])
@pytest.mark.parametrize(("measure", "by_source", "min_tokens"), [("samples", False, 0), ("tokens", True, 6)])
def test_every_strategy_with_every_key_equals_a_brute_force_sort(
    rows, strategy, params, key, measure, by_source, min_tokens
):
    if strategy == "all" and key != "loss":
        with pytest.raises(ConfigError, match="rank_by"):
            BandConfig(strategy=strategy, rank_by=key)
        return
    cfg = BandConfig(
        strategy=strategy, measure=measure, by_source=by_source, min_tokens=min_tokens, rank_by=key, **params
    )
    decided = decide(pl.LazyFrame(rows), cfg, "test").rows.collect()
    ranked = [r for r in rows if r["n_tokens"] >= min_tokens]
    values = brute_keys(ranked, key)
    gaps = np.diff(np.sort(np.fromiter(values.values(), dtype=float)))
    assert gaps[gaps > 0].min() > 1e-9  # no near-tie that rounding could flip
    preset = strategy == "marion_middle"
    ends = exact_ends("band", {"low": 0.35, "high": 0.65}) if preset else exact_ends(strategy, params)
    expected = brute_force(
        ranked,
        ends,
        measure,
        by_source,
        order_key=lambda r: (-values[r["sample_id"]], r["sample_id"]),
    )
    assert set(decided.filter(pl.col("kept"))["sample_id"]) == expected
    short = {r["sample_id"] for r in rows if r["n_tokens"] < min_tokens}
    assert set(decided.filter(pl.col("reason") == "too_short")["sample_id"]) == short
    assert decided.height == len(rows)


@pytest.mark.parametrize(
    "drops",
    [
        {"length_adjusted": Fraction(5, 100), "tokens_per_byte": Fraction(8, 100)},
        {"reducible": Fraction(7, 100), "bits_per_byte": Fraction(4, 100)},
        # markup_share's share is above the share of samples it flags: a ceiling, nothing unflagged dropped
        {"tokens_per_byte": Fraction(5, 100), "markup_share": Fraction(4, 10), "mojibake": Fraction(3, 100)},
    ],
)
def test_a_drop_by_keys_of_their_own_equals_a_brute_force(rows, drops):
    """drop_top with the keys computed here only: the length curve over every ranked sample, the
    per-byte keys in exact rationals; each key's top share in exact rationals (a flag key's only
    where it is above 0), then MidRanking by loss over the rest."""
    from pipeline.config import DropTop

    band = BandConfig(
        strategy="midranking", skip=0.1, keep=0.4, drop_top=DropTop(**{k: float(v) for k, v in drops.items()})
    )
    decided = decide(pl.LazyFrame(rows), band, "test").rows.collect()
    dropped = set()
    for key, share in drops.items():
        values = brute_keys(rows, key)
        order = sorted(rows, key=lambda r: (-values[r["sample_id"]], r["sample_id"]))
        top = {r["sample_id"] for i, r in enumerate(order) if i < share * len(rows)}
        if key in ("markup_share", "mojibake"):
            flagged = {k for k, v in values.items() if v > 0}
            assert len(flagged) < share * len(rows) or key == "mojibake"
            top &= flagged
        dropped |= top
    rest = sorted(
        (r for r in rows if r["sample_id"] not in dropped), key=lambda r: (-r["loss"], r["sample_id"])
    )
    kept = {
        r["sample_id"]
        for i, r in enumerate(rest)
        if Fraction(1, 10) * len(rest) <= i < Fraction(5, 10) * len(rest)
    }
    assert set(decided.filter(pl.col("reason") == "dropped_top")["sample_id"]) == dropped
    assert set(decided.filter(pl.col("kept"))["sample_id"]) == kept


def test_a_source_named_like_the_global_curve_gets_its_own_curve(rows):
    renamed = [r | {"source": "*" if r["source"] == "web" else r["source"]} for r in rows]
    cfg = BandConfig(strategy="top", keep=0.2, rank_by="length_adjusted", adjust_by_source=True)
    got = decide(pl.LazyFrame(renamed), cfg, "test").rows.select("sample_id", "length_adjusted").collect()
    expected = brute_keys(renamed, "length_adjusted", by_source=True)
    assert all(value == pytest.approx(expected[k], abs=1e-12) for k, value in got.iter_rows())


def test_ifd_refuses_scores_without_the_unconditional_loss(rows):
    rows[3]["nll_sum_uncond"] = None
    with pytest.raises(ProvenanceError, match="1 scored samples have no unconditional loss"):
        decide(pl.LazyFrame(rows), BandConfig(rank_by="ifd"), "here")


def test_bits_per_byte_refuses_a_sample_without_bytes(rows):
    rows[7]["n_bytes"] = 0
    with pytest.raises(
        ProvenanceError, match=r"1 scored samples cover no byte of text \(n_bytes 0, e.g. c.jsonl:7"
    ):
        decide(pl.LazyFrame(rows), BandConfig(rank_by="bits_per_byte"), "here")
    decide(pl.LazyFrame(rows), BandConfig(rank_by="length_adjusted"), "here")  # other keys do not need it


def test_ranking_strategies_refuse_nothing_but_random_ones_refuse_a_key():
    for strategy in ("random", "all", "length_matched"):
        with pytest.raises(ConfigError, match="does not rank"):
            BandConfig(strategy=strategy, rank_by="bits_per_byte", match="x")
    with pytest.raises(ConfigError, match="adjust_by_source"):
        BandConfig(adjust_by_source=True)
    with pytest.raises(ConfigError, match="min_tokens"):
        BandConfig(min_tokens=-1)
    with pytest.raises(ConfigError, match="rank_by: must be one of"):
        BandConfig(rank_by="perplexity")
    for key in FLAG_KEYS:  # 0 on clean text: a band by it would fill its share in sample_id order
        with pytest.raises(ConfigError, match="use it in drop_top"):
            BandConfig(rank_by=key)


# -- the stage: too_short counted and rejected, old scores, the report ------------------------------


TEXTS = [("the cat sat " * (1 + i % 30)).strip() for i in range(60)] + ["x", "a mat", "data"]


@pytest.fixture
def scored(tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t, "source": f"s{i % 3}"}) + "\n" for i, t in enumerate(TEXTS))
    )
    config = write_config(tmp_path, corpus, tiny_model_dir)
    score.run(load_config(config))
    return config


BANDS = (
    "select.bands=[{strategy: midranking, skip: 0.1, keep: 0.4, rank_by: bits_per_byte, min_tokens: 4}, "
    "{strategy: top, keep: 0.3, rank_by: length_adjusted, measure: tokens}]"
)


def test_too_short_samples_are_rejected_and_counted(scored, tmp_path):
    cfg = load_config(scored, [BANDS, "select.write_rejected=true"])
    bpb_band, _ = select.run(cfg)
    scores = pl.read_parquet(tmp_path / "out" / "scores" / "part-*.parquet")
    short = set(scores.filter(pl.col("n_tokens") < 4)["sample_id"])
    assert short  # the corpus holds some
    manifest = BandManifest.read(bpb_band / "manifest.json")
    assert manifest.rejected["too_short"] == len(short)
    assert manifest.samples.total == scores.height
    rejected = pl.read_parquet(tmp_path / "out" / "rejected" / bpb_band.name / "part-*.parquet")
    assert set(rejected.filter(pl.col("reason") == "too_short")["sample_id"]) == short
    kept = pl.read_parquet(bpb_band / "part-*.parquet")
    ranked = scores.height - len(short)
    assert kept.height == int(Fraction(ranked) * Fraction("0.5")) - int(Fraction(ranked) * Fraction("0.1"))
    assert manifest.rank_key.key == "bits_per_byte"
    assert manifest.positions.ranked_by == "bits_per_byte"
    assert manifest.rank_key.max_kept == pytest.approx(kept["bits_per_byte"].max())


def test_scores_of_another_scoring_version_are_refused_with_one_line(scored, tmp_path):
    """A score set of an older midrank lacks columns the keys read: select and inspect refuse it,
    naming the file and the versions, instead of reading it with holes."""
    part = tmp_path / "out" / "scores" / "part-00001.parquet"
    table = pq.read_table(part)
    metadata = dict(table.schema.metadata)
    provenance = json.loads(metadata[PROVENANCE_KEY])
    provenance["key"]["scoring_version"] = SCORING_VERSION - 1
    metadata[PROVENANCE_KEY] = json.dumps(provenance).encode()
    pq.write_table(table.drop(["n_mojibake"]).replace_schema_metadata(metadata), part)
    message = rf"part-00001.parquet: scored by another midrank \(scoring version {SCORING_VERSION - 1}; .*score again"
    with pytest.raises(ProvenanceError, match=message):
        select.run(load_config(scored, [BANDS]))
    with pytest.raises(ProvenanceError, match=message):
        inspect.run(load_config(scored, []))


def test_report_draws_the_key_and_where_the_band_falls(scored, tmp_path):
    cfg = load_config(scored, [BANDS])
    select.run(cfg)
    report = inspect.run(cfg)
    summary = json.loads((report / "summary.json").read_text())
    names = [b["name"] for b in summary["bands"]]
    for name in names:
        assert (report / f"key_hist-{name}.png").stat().st_size > 5000
        assert (report / f"loss_vs_length-{name}.png").stat().st_size > 5000
    bpb = summary["bands"][0]
    assert bpb["key"] == "bits_per_byte"
    for region in bpb["examples"]:
        values = [r["bits_per_byte"] for r in region["rows"]]
        assert values == sorted(values)
        assert all(r["n_tokens"] >= 4 for r in region["rows"])
    html = (report / "index.html").read_text()
    assert "ranked by bits_per_byte" in html and f"key_hist-{names[1]}.png" in html


def test_compare_arms_take_a_rank_key():
    from pipeline.compare_arms import arm_setup

    arms = "compare.arms=[random,midranking.bits_per_byte,random_length_matched.length_adjusted,top.length_adjusted]"
    cfg = load_config(ROOT / "configs/tiny.yaml", [arms])
    band, objective = arm_setup(cfg, "midranking.bits_per_byte", 0)
    assert (band.strategy, band.rank_by, objective) == ("midranking", "bits_per_byte", "uniform")
    band, _ = arm_setup(cfg, "random_length_matched.length_adjusted", 1)
    assert band.match == arm_setup(cfg, "midranking.length_adjusted", 0)[0].resolved_name()
    assert arm_setup(cfg, "top.length_adjusted", 0)[0].rank_by == "length_adjusted"
    # the positive control's drop rule, as the preset says
    noisy = load_config(ROOT / "configs/noisy.yaml", [])
    band, _ = arm_setup(noisy, "midranking_dropped", 0)
    assert (band.min_tokens, band.skip, band.keep) == (8, 0, noisy.compare.keep)
    assert band.drop_top.shares() == {
        "length_adjusted": 0.1, "tokens_per_byte": 0.1, "markup_share": 0.03, "mojibake": 0.03
    }  # fmt: skip
    assert noisy.select.bands[0].drop_top == band.drop_top  # select's preset band drops the same
    clean, _ = arm_setup(noisy, "random_dropped", 0)  # the same drop, then a random draw
    assert (clean.strategy, clean.drop_top, clean.min_tokens) == ("random", band.drop_top, 8)
    assert clean.seed != arm_setup(noisy, "random", 0)[0].seed
    bad_arms = [
        ("irdro.bits_per_byte", "does not rank"),
        ("midranking.perplexity", "unknown rank key"),
        ("midranking.", "unknown rank key"),
        ("midranking.loss", "write 'midranking'"),
    ]
    for bad, message in bad_arms:
        with pytest.raises(ConfigError, match=message):
            load_config(ROOT / "configs/tiny.yaml", [f"compare.arms=[random,{bad}]"])
