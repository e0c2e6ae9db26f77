"""Inspect: binning equals NumPy's, the report renders real PNGs and escaped HTML, edge cases."""

import json

import numpy as np
import polars as pl
import pytest

from pipeline.artifacts import NoScoresError
from pipeline.codec import decode
from pipeline.config import load_config
from pipeline.histograms import histogram, histogram_2d, quantiles, uniform_edges, value_range
from pipeline.outputs import OutputError, ReportSummary
from pipeline.report import render_report
from stages import inspect, score, select
from stages.cli import main
from tests.helpers import make_texts, write_config, write_corpus

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_scores(n: int = 5000) -> tuple[pl.LazyFrame, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    loss = np.round(rng.gamma(4.0, 0.8, n), 2)  # rounded: many ties, some exactly on bin edges
    n_tokens = rng.integers(1, 2000, n)
    source = rng.choice(["a", "b", "c"], n)
    frame = pl.LazyFrame({"loss": loss, "n_tokens": n_tokens, "source": source})
    return frame, loss, n_tokens, source


@pytest.mark.parametrize("bins", [1, 7, 60])
def test_binning_equals_numpy(bins):
    scores, loss, _, source = synthetic_scores()
    edges = uniform_edges(*value_range(scores, pl.col("loss")), bins)
    np.testing.assert_array_equal(edges, np.histogram_bin_edges(loss, bins))
    np.testing.assert_array_equal(histogram(scores, pl.col("loss"), edges), np.histogram(loss, bins)[0])
    per_source = histogram(scores, pl.col("loss"), edges, by="source")
    for name in ("a", "b", "c"):
        np.testing.assert_array_equal(per_source[name], np.histogram(loss[source == name], edges)[0])
    length = pl.col("n_tokens").cast(pl.Float64).log10()
    length_edges = uniform_edges(*value_range(scores, length), bins)
    log_lengths = scores.select(length).collect().to_series().to_numpy()  # NumPy's log10 may differ by an ulp
    expected, _, _ = np.histogram2d(log_lengths, loss, [length_edges, edges])
    np.testing.assert_array_equal(histogram_2d(scores, length, length_edges, pl.col("loss"), edges), expected)
    # other bin edges than the data's own range: values outside them fall in no bin, as in NumPy
    narrow = np.linspace(2.0, 4.0, 9)
    np.testing.assert_array_equal(histogram(scores, pl.col("loss"), narrow), np.histogram(loss, narrow)[0])
    found = quantiles(scores, pl.col("loss"))
    np.testing.assert_allclose(list(found.values()), np.quantile(loss, list(found)))


def test_single_value_binning_equals_numpy():
    scores = pl.LazyFrame({"loss": [3.25] * 5})
    edges = uniform_edges(*value_range(scores, pl.col("loss")), 10)
    np.testing.assert_array_equal(edges, np.histogram_bin_edges([3.25] * 5, 10))
    np.testing.assert_array_equal(histogram(scores, pl.col("loss"), edges), np.histogram([3.25] * 5, 10)[0])
    with pytest.raises(ValueError, match="empty"):
        value_range(scores.filter(pl.col("loss") > 5), pl.col("loss"))


HOSTILE = '<script>alert("x")</script> & <b>bold</b>'


@pytest.fixture
def scored(tmp_path, tiny_model_dir):
    texts = make_texts(40, seed=3)
    texts[5] = HOSTILE
    corpus = write_corpus(tmp_path / "corpus.jsonl", texts)
    config = write_config(tmp_path, corpus, tiny_model_dir)
    score.run(load_config(config))
    return config


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, path


def test_report_has_figures_tables_examples_and_escaped_text(scored, tmp_path):
    overrides = [
        "select.bands=[{strategy: midranking, skip: 0.2, keep: 0.5}, {strategy: random, keep: 0.3}]",
        "inspect.perplexity=true",
        "inspect.examples=40",  # every sample lands in the lowest-loss region, the hostile one too
    ]
    cfg = load_config(scored, overrides)
    select.run(cfg)
    report = inspect.run(cfg)
    names = sorted(p.name for p in report.glob("*.png"))
    assert names == sorted(
        [
            "loss_vs_length.png",
            "loss_hist-midranking-s0.2-k0.5-samples.png",
            "loss_hist-random-k0.3-seed0-samples.png",
            "ppl_hist-midranking-s0.2-k0.5-samples.png",
            "ppl_hist-random-k0.3-seed0-samples.png",
        ]
    )
    for png in report.glob("*.png"):
        assert_png(png)
    page = (report / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert all(f'src="{name}"' in page for name in names)
    summary = json.loads((report / "summary.json").read_text())
    assert summary["samples"] == 40
    assert sum(s["samples"] for s in summary["sources"]) == 40
    midranking, random = summary["bands"]
    assert midranking["interval"] is not None and random["interval"] is None
    examples = {r["region"]: r["rows"] for r in midranking["examples"]}
    assert [r["region"] for r in midranking["examples"]] == [
        "lowest loss",
        "just below the band",
        "inside the band (around its median)",
        "just above the band",
        "highest loss",
    ]
    low, high = midranking["interval"]
    assert all(r["loss"] < low for r in examples["just below the band"])
    assert all(r["loss"] > high for r in examples["just above the band"])
    assert all(low <= r["loss"] <= high for r in examples["inside the band (around its median)"])
    assert len(examples["lowest loss"]) == 40
    assert (report / "config.yaml").is_file()


def test_report_before_any_selection(scored):
    report = inspect.run(load_config(scored))
    assert_png(report / "loss_hist.png")
    page = (report / "index.html").read_text()
    assert "No band selected yet" in page


def test_single_sample_score_set_plots(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl", ["just one document with a few words in it"])
    config = write_config(tmp_path, corpus, tiny_model_dir)
    score.run(load_config(config))
    report = inspect.run(load_config(config, ["select.bands=[{strategy: all}]"]))
    assert_png(report / "loss_hist.png")
    assert json.loads((report / "summary.json").read_text())["samples"] == 1


def test_empty_score_set_is_a_clear_error(tmp_path, tiny_model_dir, caplog):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "", "source": "a"}\n' * 3)
    config = write_config(tmp_path, corpus, tiny_model_dir, extra="")
    cfg = load_config(config, ["corpus.on_error=skip"])
    score.run(cfg)
    with pytest.raises(NoScoresError, match="holds no scored samples"):
        inspect.run(cfg)
    assert main(["inspect", "--config", str(config), "corpus.on_error=skip"]) == 2
    assert "holds no scored samples" in caplog.text


def test_render_escapes_every_data_string():
    hostile = "<img src=x onerror=alert(1)>"
    summary = {
        "inputs_key": "k",
        "out_dir": hostile,
        "model": {"path": hostile, "dtype": "float32"},
        "samples": 1,
        "tokens": 3,
        "quantiles": {"0.5": 1.0},
        "sources": [
            {
                "source": hostile,
                "samples": 1,
                "tokens": 3,
                "mean_loss": 1.0,
                "median_loss": 1.0,
                "top_decile_share": 1.0,
            }
        ],
        "sources_plotted": [hostile],
        "images": {},
        "bands": [],
        "examples": [
            {
                "region": "lowest loss",
                "rows": [
                    {"loss": 1.0, "n_tokens": 3, "source": hostile, "sample_id": hostile, "text": hostile}
                ],
            }
        ],
    }
    page = render_report(decode(ReportSummary, summary, "summary", OutputError))
    assert "<img" not in page and page.count("&lt;img src=x onerror=alert(1)&gt;") == 7


def test_rerun_with_the_same_inputs_does_nothing_and_a_new_band_redraws(scored, caplog):
    cfg = load_config(scored)
    select.run(cfg)
    report = inspect.run(cfg)
    stamp = (report / "index.html").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="midrank"):
        inspect.run(cfg)
    assert "up to date with the scores and bands, nothing to do" in caplog.text
    assert (report / "index.html").stat().st_mtime_ns == stamp
    other = load_config(scored, ["select.bands=[{strategy: top, keep: 0.2}]"])
    select.run(other)
    inspect.run(other)
    assert (report / "index.html").stat().st_mtime_ns != stamp
    assert "top-k0.2-samples" in (report / "index.html").read_text()


def test_report_shows_which_key_dropped_each_sample(scored, tmp_path):
    """drop_top: the report's dropped regions hold exactly the samples select rejected as
    dropped_top, each under the key set select recorded for it."""
    band = "select.bands=[{name: dropped, skip: 0, keep: 0.5, drop_top: {loss: 0.15, bits_per_byte: 0.15}}]"
    cfg = load_config(scored, [band, "select.write_rejected=true", "inspect.examples=40"])
    select.run(cfg)
    report = inspect.run(cfg)
    rejected = pl.read_parquet(tmp_path / "out" / "rejected" / "dropped" / "part-*.parquet")
    recorded = {
        r["sample_id"]: r["dropped_by"] for r in rejected.filter(pl.col("reason") == "dropped_top").to_dicts()
    }
    (drawn,) = json.loads((report / "summary.json").read_text())["bands"]
    shown = {}
    for region in drawn["examples"]:
        if region["region"].startswith("dropped by "):
            key_set = region["region"].removeprefix("dropped by ").split(" (")[0]
            assert f"({len(region['rows'])} samples)" in region["region"]  # 40 examples show them all
            shown |= {row["sample_id"]: key_set for row in region["rows"]}
    assert shown == recorded and len(set(recorded.values())) >= 2
    kept_ids = set(pl.read_parquet(tmp_path / "out" / "selected" / "dropped" / "part-*.parquet")["sample_id"])
    highest = next(r["rows"] for r in drawn["examples"] if r["region"] == "highest loss")
    assert not {r["sample_id"] for r in highest} & set(recorded)  # the rankable rest only
    assert kept_ids.isdisjoint(recorded)
    page = (report / "index.html").read_text()
    assert "drop_top key" in page and "dropped by it alone" in page
