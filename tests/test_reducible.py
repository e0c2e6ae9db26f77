"""The reducible rank key against independent computations: the target model made by `midrank
target` (a real fine-tune and a real second score set), each sample's key against two fp32 forward
passes of its own, and the join's refusals (other samples, a missing row, no target scores)."""

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data import build_corpus, build_target, build_tasks
from pipeline.artifacts import ProvenanceError
from pipeline.config import ConfigError, load_config
from pipeline.layout import MARKER, Layout
from pipeline.outputs import BandManifest
from stages import compare, inspect, score, select, target
from tests.helpers import make_texts, write_config

BAND = "select.bands=[{name: reducible, strategy: top, keep: 1.0, rank_by: reducible}, {name: by-loss, keep: 0.5}]"


def mean_nll(model, tokenizer, text: str) -> float:
    """BOS + the text through the model in float64 logits: the mean NLL of the text's tokens."""
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])))


@pytest.fixture
def reducible_run(tmp_path, tiny_model_dir):
    """A corpus scored by the tiny model, a target model fine-tuned on a target set of other texts
    by `midrank target` (which also scores the corpus with it), and the config of both."""
    texts = [t[:40] for t in make_texts(40, seed=3)]  # shorter than score.max_tokens
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t, "source": f"s{i % 2}"}) + "\n" for i, t in enumerate(texts))
    )
    target_set = tmp_path / "target.jsonl"
    target_set.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(12, seed=9)))
    extra = (
        f"train:\n  max_tokens: 64\n  batch_size: 4\n  save_steps: 100\n  warmup_steps: 0\n"
        f"target:\n  paths: [{target_set}]\n  max_steps: 4\n  learning_rate: 1.0e-2\n"
    )
    path = write_config(tmp_path, corpus, tiny_model_dir, extra)
    score.run(load_config(path))
    target.run(load_config(path))
    return path, texts


def test_reducible_equals_the_difference_of_two_independent_forward_passes(reducible_run, tiny_model_dir):
    path, texts = reducible_run
    cfg = load_config(path, [BAND])
    select.run(cfg)
    layout = Layout(cfg.out_dir)
    rows = pl.read_parquet(layout.band("reducible").dir / "*.parquet").sort("sample_id")
    assert rows.height == len(texts) and not rows["truncated"].any()  # every sample kept whole
    fine_tuned = layout.train_run("target").model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    tuned = AutoModelForCausalLM.from_pretrained(fine_tuned, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    differences = []
    for row in rows.iter_rows(named=True):
        text = texts[int(row["sample_id"].rsplit(":", 1)[1])]
        expected = mean_nll(base, tokenizer, text) - mean_nll(tuned, tokenizer, text)
        assert row["reducible"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        differences.append(expected)
    assert max(abs(d) for d in differences) > 0.01  # the fine-tune moved the losses
    # the band by reducible records both models; the band by loss depends on the reference only
    manifest = BandManifest.read(layout.band("reducible").manifest)
    assert manifest.score_provenance.target.model_path == str(fine_tuned)
    assert manifest.score_provenance.key["target"] == manifest.score_provenance.target.key
    by_loss = BandManifest.read(layout.band("by-loss").manifest).score_provenance
    assert by_loss.target is None and "target" not in by_loss.key
    assert "loss_target" not in pl.read_parquet(layout.band("by-loss").dir / "*.parquet").columns
    # inspect draws the reference model's loss against the target model's, with each band's cells
    report = inspect.run(cfg)
    summary = json.loads((report / "summary.json").read_text())
    for band in ("reducible", "by-loss"):
        assert summary["images"][f"reference_target-{band}.png"].startswith(
            "Each sample's loss under the reference"
        )
        assert (report / f"reference_target-{band}.png").stat().st_size > 10_000


def test_every_folder_the_target_model_takes_carries_the_marker(reducible_run):
    """So that a later run may replace them, and no other folder (pipeline/layout.py)."""
    path, _ = reducible_run
    out = Path(load_config(path).out_dir)
    made = [p for p in out.rglob("*") if p.is_dir()]
    assert out / "target" in made and [p for p in made if not (p / MARKER).is_file()] == []


def test_target_scores_over_other_samples_are_refused_naming_what_differs(reducible_run):
    path, _ = reducible_run
    cfg = load_config(path, [BAND, "target.out_dir=" + str(path.parent / "other")])
    other = load_config(path, ["out_dir=" + str(path.parent / "other"), "score.max_tokens=16"])
    score.run(other)
    with pytest.raises(ProvenanceError, match=r"not over the same samples.*max_tokens: 16 there, 64 here"):
        select.run(cfg)
    elsewhere = path.parent / "another"  # another corpus, the same score settings
    corpus = path.parent / "another.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "source": "s0"}) + "\n" for t in make_texts(6, seed=4)))
    score.run(load_config(path, [f"out_dir={elsewhere}", f"corpus.paths=[{corpus}]"]))
    with pytest.raises(ProvenanceError, match=r"same samples as the reference's \(corpus_plan_sha256: "):
        select.run(load_config(path, [BAND, f"target.out_dir={elsewhere}"]))


def test_a_target_model_is_kept_when_only_what_does_not_decide_its_weights_changes(reducible_run, caplog):
    path, _ = reducible_run
    model = Layout(load_config(path).out_dir).train_run("target").model / "model.safetensors"
    made = model.stat().st_mtime_ns
    target.run(load_config(path, ["train.eval_max_samples=2", "train.save_steps=7"]))
    assert model.stat().st_mtime_ns == made and "already trained, nothing to do" in caplog.text
    with pytest.raises(ConfigError, match=r"made under other settings .*delete it"):
        target.run(load_config(path, ["train.batch_size=2"]))  # the fine-tune trains in train's batches


def test_a_missing_target_row_is_refused_naming_a_sample(reducible_run):
    path, _ = reducible_run
    cfg = load_config(path, [BAND])
    part = Layout(cfg.out_dir + "/target").score_shard(1)
    table = pq.read_table(part)
    dropped = table["sample_id"][0].as_py()
    pq.write_table(table.slice(1), part)  # metadata kept: the provenance still matches
    with pytest.raises(
        ProvenanceError, match=f"1 scored samples have no score of the same tokens there \\(e.g. {dropped}\\)"
    ):
        select.run(cfg)


def test_without_target_scores_the_error_says_how_to_make_them(tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "source": "s"}) + "\n" for t in make_texts(10, seed=2)))
    path = write_config(tmp_path, corpus, tiny_model_dir, "target:\n  paths: [nowhere.jsonl]\n")
    score.run(load_config(path))
    with pytest.raises(
        ProvenanceError, match=r"target.out_dir: .*holds no target model.s scores; `midrank target`"
    ):
        select.run(load_config(path, [BAND]))


def test_the_reducible_key_needs_a_target(tmp_path, tiny_model_dir):
    path = write_config(tmp_path, tmp_path / "c.jsonl", tiny_model_dir)
    with pytest.raises(ConfigError, match=r"target.paths: the reducible rank key .*needs a target model"):
        load_config(path, [BAND])
    with pytest.raises(ConfigError, match=r"target.paths: .*top\.reducible"):
        load_config(path, ["compare.arms=[random,top.reducible]"])
    with pytest.raises(ConfigError, match=r"target.paths: no target set to fine-tune on"):
        target.run(load_config(path))
    with pytest.raises(ConfigError, match=r"target.paths: .*compare.drop_top.reducible"):
        load_config(path, ["compare.arms=[random,random_dropped]", "compare.drop_top.reducible=0.1"])


def test_the_target_set_is_kept_apart_from_the_corpus_and_every_task(tmp_path):
    """Built from this machine's sources: no document of the corpus (train, held-out, OOD), no
    task item's, no man page or Jargon entry named by any answer choice; twice the same bytes."""
    corpus = tmp_path / "corpus"
    build_corpus.build(
        corpus, 6, 4000, build_corpus.SOURCES, install=False, allow_missing=True, ood_per_source=2
    )
    tasks = tmp_path / "tasks"
    build_tasks.build(corpus, tasks, items=8)
    manifest = build_target.build(corpus, tasks, tmp_path / "t1", per_source=4)
    rows = [json.loads(line) for line in (tmp_path / "t1" / "target.jsonl").open()]
    assert len(rows) == sum(manifest["documents"].values()) > 0
    origins = {r["origin"] for r in rows}
    assert len(origins) == len(rows)
    corpus_origins = {
        json.loads(line)["origin"]
        for name in ("train", "heldout", "ood")
        for line in (corpus / f"{name}.jsonl").open()
    }
    items = [json.loads(line) for f in sorted(tasks.glob("*.jsonl")) for line in f.open()]
    assert not origins & corpus_origins
    assert not origins & {i["origin"] for i in items}
    named = {
        c
        for f in ("man_command", "jargon_term")
        for line in (tasks / f"{f}.jsonl").open()
        for c in json.loads(line)["choices"]
    }
    for origin in origins:  # man/man1/ls.1.gz is the page of `ls`; jargon/foo the entry of `foo`
        if origin.startswith("man/"):
            assert not any(f"/{c}." in origin for c in named), origin
        if origin.startswith("jargon/"):
            assert origin[len("jargon/") :] not in named, origin
    build_target.build(corpus, tasks, tmp_path / "t2", per_source=4)
    assert (tmp_path / "t1" / "target.jsonl").read_bytes() == (tmp_path / "t2" / "target.jsonl").read_bytes()


def test_a_band_matched_to_a_reducible_band_follows_the_target_model(reducible_run, caplog):
    """A length-matched control depends on the band it matches: when another target model's scores
    make that band again, the control is selected again too, never left matched to the old one,
    wherever it is listed; until then inspect warns of both as stale."""
    path, _ = reducible_run
    bands = "select.bands=[{name: m, strategy: length_matched, match: r}, {name: r, strategy: top, keep: 0.4, rank_by: reducible}]"
    select.run(load_config(path, [bands]))
    inspect.run(load_config(path, [bands]))
    assert "selected from other scores" not in caplog.text
    other = path.parent / "other"
    score.run(load_config(path, [f"out_dir={other}"]))  # the reference itself as a "target": reducible 0
    cfg = load_config(path, [bands, f"target.out_dir={other}"])
    inspect.run(cfg)
    assert "band r was selected from other scores" in caplog.text
    assert "band m was selected from other scores" in caplog.text
    select.run(cfg)
    layout = Layout(cfg.out_dir)
    for name in ("r", "m"):
        provenance = BandManifest.read(layout.band(name).manifest).score_provenance
        assert provenance.target.model_path == load_config(path).model.path
    assert caplog.text.count("selecting again") == 2
    caplog.clear()
    inspect.run(cfg)
    assert "selected from other scores" not in caplog.text
    # ordered by kind, a control of a control could meet its band undecided: refused
    with pytest.raises(ConfigError, match=r"select.bands: m2 matches another length_matched band"):
        load_config(
            path,
            [
                "select.bands=[{name: m2, strategy: length_matched, match: m}, {name: m, strategy: length_matched, match: r}, {name: r}]"
            ],
        )


def test_compare_makes_the_target_model_and_counts_what_choosing_cost(tmp_path, tiny_model_dir):
    """A reducible arm's selection cost: both scoring passes (their target tokens, summed from the
    score files) and the fine-tune's trained tokens three times over; a random draw costs nothing."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"text": t, "source": f"s{i % 2}"}) + "\n"
            for i, t in enumerate(make_texts(60, seed=5))
        )
    )
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t, "source": "s0"}) + "\n" for t in make_texts(4, seed=6)))
    target_set = tmp_path / "target.jsonl"
    target_set.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(8, seed=7)))
    extra = f"target:\n  paths: [{target_set}]\n  max_steps: 2\n"
    path = write_config(tmp_path, corpus, tiny_model_dir, extra)
    overrides = [
        f"train.eval_paths=[{heldout}]",
        "train.precision=fp32",
        "train.warmup_steps=0",
        "train.save_steps=1",  # checkpoints to drop
        "compare.keep=0.3",
        "compare.tokens_per_step=128",
    ]
    cfg = load_config(path, [*overrides, "compare.arms=[random, top.reducible, random_matched.reducible]"])
    results = json.loads((compare.run(cfg) / "results.json").read_text())
    costs = {row["arm"]: row["selection_tokens"] for row in results["training"]}
    out = Path(cfg.out_dir)
    scored = pl.read_parquet(out / "scores" / "*.parquet")["n_tokens"].sum()
    rescored = pl.read_parquet(out / "target" / "scores" / "*.parquet")["n_tokens"].sum()
    fine_tune = json.loads((out / "train" / "target" / "metrics.json").read_text())["train"]["trained_tokens"]
    assert costs["random"] == 0
    assert costs["top.reducible"] == costs["random_matched.reducible"] == scored + rescored + 3 * fine_tune
    assert fine_tune > 0 and rescored == scored
    # compute in all, against random's: 3 passes per trained token, plus the selection
    budget = results["token_budget"]
    ratios = {row["arm"]: row["compute_ratio"] for row in results["training"]}
    assert ratios["random"] == 1
    assert ratios["top.reducible"] == pytest.approx((3 * budget + costs["top.reducible"]) / (3 * budget))
    assert [run for run in (out / "train").iterdir() if (run / "checkpoints").exists()] == []  # models alone
    # target scores made elsewhere are read as they are: no fine-tune here, its cost unknown;
    # the whole corpus costs nothing to choose
    other = out.parent / "elsewhere"
    made_elsewhere = [f"out_dir={other}", f"target.out_dir={out / 'target'}", "target.paths=[]"]
    arms = ["compare.arms=[all, top.reducible]", "compare.reference=all"]
    elsewhere = load_config(path, [*overrides, *made_elsewhere, *arms])
    results = json.loads((compare.run(elsewhere) / "results.json").read_text())
    assert [row["selection_tokens"] for row in results["training"]] == [0, None]
    assert [row["compute_ratio"] for row in results["training"]] == [1, None]
    assert not (other / "train" / "target").exists()
    # a changed recipe is refused before any arm, not trained on the old target model's scores
    changed = load_config(path, [*overrides, "compare.arms=[random, top.reducible]", "target.max_steps=3"])
    with pytest.raises(ConfigError, match=r"holds a target model made under other settings.*delete it"):
        compare.run(changed)
