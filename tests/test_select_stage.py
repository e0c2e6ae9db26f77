"""Stage two end to end on real score shards from the tiny model."""

import json
import re

import datasets
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import ProvenanceError
from pipeline.config import ConfigError, load_config
from pipeline.layout import MARKER
from pipeline.scores import PROVENANCE_KEY
from stages import score, select
from tests.helpers import make_texts, write_config, write_corpus

BANDS = "select.bands=[{strategy: midranking, skip: 0.1, keep: 0.4}, {strategy: cc_net_middle, by_source: true, weights: true}]"


@pytest.fixture
def scored(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_texts(60, seed=9))
    config = write_config(tmp_path, corpus, tiny_model_dir)
    score.run(load_config(config))
    return config, corpus


def test_every_sample_is_kept_or_rejected_with_text_joined_back(scored, tmp_path):
    config, corpus = scored
    cfg = load_config(config, [BANDS, "select.write_rejected=true", "select.jsonl=true"])
    outputs = select.run(cfg)
    texts = {f"corpus.jsonl:{i}": json.loads(line)["text"] for i, line in enumerate(corpus.open())}
    scores = pl.read_parquet(tmp_path / "out" / "scores" / "part-*.parquet")
    for band_dir in outputs:
        kept = pl.read_parquet(band_dir / "part-*.parquet")
        rejected = pl.read_parquet(tmp_path / "out" / "rejected" / band_dir.name / "part-*.parquet")
        assert set(kept["sample_id"]).isdisjoint(rejected["sample_id"])
        assert sorted([*kept["sample_id"], *rejected["sample_id"]]) == sorted(scores["sample_id"])
        assert set(rejected["reason"]) <= {"too_hard", "too_easy"}
        assert all(texts[r["sample_id"]] == r["text"] for r in kept.iter_rows(named=True))
        manifest = json.loads((band_dir / "manifest.json").read_text())
        assert manifest["samples"] == {"in": 60, "kept": kept.height}
        assert manifest["tokens"]["kept"] == kept["n_tokens"].sum()
        assert sum(manifest["rejected"].values()) == rejected.height
        assert manifest["score_provenance"]["key"]["max_tokens"] == 64
        assert len((band_dir / "data.jsonl").read_text().splitlines()) == kept.height
        loaded = datasets.load_dataset("parquet", data_files=str(band_dir / "part-*.parquet"), split="train")
        assert loaded.num_rows == kept.height and "text" in loaded.column_names
        # the band's folder alone loads too: the rejected rows do not sit inside it
        assert datasets.load_dataset(str(band_dir), split="train").num_rows == kept.height
    midranking, middle = outputs
    assert pl.read_parquet(midranking / "part-*.parquet").height == 24  # 40% of 60
    weights = pl.read_parquet(middle / "part-*.parquet")["weight"]
    assert weights.mean() == pytest.approx(1.0)


def test_rerun_does_nothing_and_a_changed_named_band_is_refused(scored, caplog):
    config, _ = scored
    first = select.run(load_config(config, ["select.bands=[{name: mine, keep: 0.3}]"]))
    mtime = (first[0] / "manifest.json").stat().st_mtime_ns
    select.run(load_config(config, ["select.bands=[{name: mine, keep: 0.3}]"]))
    assert (first[0] / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="holds a different selection"):
        select.run(load_config(config, ["select.bands=[{name: mine, keep: 0.4}]"]))


def test_empty_band_and_bad_parameters_are_clear_errors(scored):
    config, _ = scored
    with pytest.raises(ConfigError, match="keeps no sample"):
        select.run(load_config(config, ["select.bands=[{strategy: bottom, keep: 0.001}]"]))
    with pytest.raises(ConfigError, match=r"select\.bands\[0\]\.keep: skip \+ keep must be <= 1"):
        load_config(config, ["select.bands=[{skip: 0.8, keep: 0.5}]"])
    with pytest.raises(ConfigError, match=r"select\.bands\[0\]\.skip: must be within \[0, 1\]"):
        load_config(config, ["select.bands=[{skip: 1.5}]"])


def mark_rescored(path):
    """Give a score shard the provenance of a rescoring in another dtype."""
    table = pq.read_table(path)
    provenance = json.loads(table.schema.metadata[PROVENANCE_KEY])
    provenance["key"]["dtype"] = "bfloat16"
    metadata = {**table.schema.metadata, PROVENANCE_KEY: json.dumps(provenance).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), path)


def test_mixed_provenance_is_refused(scored, tmp_path):
    config, _ = scored
    mark_rescored(tmp_path / "out" / "scores" / "part-00001.parquet")
    with pytest.raises(ProvenanceError, match="refusing to mix"):
        select.run(load_config(config))


def test_a_band_is_selected_again_after_the_scores_are_recomputed(scored, tmp_path):
    config, _ = scored
    (band_dir,) = select.run(load_config(config))
    for path in (tmp_path / "out" / "scores").glob("part-*.parquet"):
        mark_rescored(path)
    select.run(load_config(config))
    manifest = json.loads((band_dir / "manifest.json").read_text())
    assert manifest["score_provenance"]["key"]["dtype"] == "bfloat16"


def test_split_windows_get_their_own_span(tmp_path, tiny_model_dir):
    text = " ".join(f"w{i}" for i in range(300))
    corpus = write_corpus(tmp_path / "long.jsonl", [text])
    config = write_config(tmp_path, corpus, tiny_model_dir)
    score.run(load_config(config, ["score.long_docs=split"]))
    (band,) = select.run(load_config(config, ["score.long_docs=split", "select.bands=[{strategy: all}]"]))
    rows = pl.read_parquet(band / "part-*.parquet").sort("window")
    assert rows.height > 2 and all(t and t in text for t in rows["text"])
    assert rows["text"][0].startswith("w0") and text.endswith(rows["text"][-1].split()[-1])


def test_absolute_token_budget(scored, tmp_path):
    config, _ = scored
    (band_dir,) = select.run(
        load_config(config, ["select.bands=[{strategy: midranking, skip: 0.1, target_tokens: 500}]"])
    )
    kept = pl.read_parquet(band_dir / "part-*.parquet")
    longest = pl.read_parquet(tmp_path / "out" / "scores" / "part-*.parquet")["n_tokens"].max()
    assert abs(kept["n_tokens"].sum() - 500) <= longest
    assert band_dir.name == "midranking-s0.1-t500-tokens"


def test_a_token_budget_beyond_what_skip_leaves_is_an_error(scored, tmp_path):
    config, _ = scored
    total = pl.read_parquet(tmp_path / "out" / "scores" / "part-*.parquet")["n_tokens"].sum()
    target = int(total * 0.95)
    with pytest.raises(
        ConfigError,
        match=rf"target_tokens {target:,} .* after skip 0.1 drops 10.0% of them \(10.0% \+ 9\d\.\d% > 100%\)",
    ):
        select.run(
            load_config(
                config, [f"select.bands=[{{strategy: midranking, skip: 0.1, target_tokens: {target}}}]"]
            )
        )
    with pytest.raises(ConfigError, match=rf"target_tokens {total + 1:,} is more than the {total:,} scored"):
        select.run(load_config(config, [f"select.bands=[{{strategy: top, target_tokens: {total + 1}}}]"]))


def test_a_bad_band_stops_before_any_band_directory_is_touched(scored, tmp_path):
    config, _ = scored
    (first,) = select.run(load_config(config, ["select.bands=[{name: first, keep: 0.3}]"]))
    (first / "manifest.json").unlink()  # as if cut short: this band would be selected again
    bands = "select.bands=[{name: first, keep: 0.3}, {name: empty, strategy: bottom, keep: 0.001}]"
    with pytest.raises(ConfigError, match="empty keeps no sample"):
        select.run(load_config(config, [bands]))
    # the half-finished band was left as it was, not emptied; the bad one was never made
    assert list(first.glob("part-*.parquet")) and not (tmp_path / "out" / "selected" / "empty").exists()


def test_target_tokens_only_where_it_sizes_the_band(scored):
    config, _ = scored
    with pytest.raises(ConfigError, match=r"select\.bands\[0\]\.target_tokens: sets the size of"):
        load_config(config, ["select.bands=[{strategy: cc_net_middle, target_tokens: 100}]"])
    # with a token budget, the (unused) default keep does not cap skip
    load_config(config, ["select.bands=[{strategy: midranking, skip: 0.6, target_tokens: 100}]"])


def test_a_length_matched_band_shares_the_lengths_of_the_band_it_matches(scored, tmp_path):
    from pipeline.key_columns import length_edges

    config, _ = scored
    bands = (
        "select.bands=[{strategy: midranking, skip: 0.1, keep: 0.4, name: mid}, "
        "{strategy: length_matched, match: mid, seed: 1}]"
    )
    mid, matched = select.run(load_config(config, [bands]))
    assert matched.name == "length_matched-mid-seed1-samples"
    mid_lengths = pl.read_parquet(mid / "part-*.parquet")["n_tokens"].to_numpy()
    matched_lengths = pl.read_parquet(matched / "part-*.parquet")["n_tokens"].to_numpy()
    scores = pl.read_parquet(tmp_path / "out" / "scores" / "part-*.parquet")
    edges = length_edges(int(scores["n_tokens"].max()))
    assert np.histogram(matched_lengths, edges)[0].tolist() == np.histogram(mid_lengths, edges)[0].tolist()
    assert set(pl.read_parquet(matched / "part-*.parquet")["sample_id"]) != set(
        pl.read_parquet(mid / "part-*.parquet")["sample_id"]
    )
    with pytest.raises(ConfigError, match="matches band 'nowhere', which is not selected"):
        select.run(load_config(config, ["select.bands=[{strategy: length_matched, match: nowhere}]"]))


RANKED_BANDS = (
    "select.bands=[{name: mid, strategy: midranking, skip: 0.1, keep: 0.4, weights: true},"
    " {name: adjusted, skip: 0.05, keep: 0.5, measure: tokens, by_source: true, rank_by: length_adjusted, min_tokens: 3},"
    " {name: matched, strategy: length_matched, match: mid, seed: 1},"
    " {name: sample, strategy: random, keep: 0.3, seed: 2}]"
)


def band_files(out_dir) -> dict[str, bytes]:
    """Every file select wrote (bands and rejected rows), by path under out_dir, with its bytes;
    the manifest and config without the one thing that differs between out_dirs (out_dir)."""
    files = {}
    for folder in ("selected", "rejected"):
        for path in sorted((out_dir / folder).rglob("*")):
            if path.is_dir() or path.name == MARKER:  # the same in every folder midrank makes
                continue
            data = path.read_bytes().replace(str(out_dir).encode(), b"<out_dir>")
            if path.name == "manifest.json":
                manifest = json.loads(data)
                manifest["score_provenance"]["config"].pop("out_dir")
                data = json.dumps(manifest, sort_keys=True).encode()
            files[str(path.relative_to(out_dir))] = data
    return files


ONE_PROCESS_OPTIONS = (RANKED_BANDS, "select.write_rejected=true", "select.jsonl=true")


@pytest.mark.parametrize("nproc", [2, 4])  # 4 ranks over 3 shards: one rank has no shard
def test_select_on_several_ranks_writes_what_one_process_writes(scored, tmp_path, nproc):
    """torchrun ranks each decide over all the scores and write their own shards: every band's
    parts, weights, JSONL and manifest are byte for byte those of a single process, and no
    staging folder is left."""
    import shutil

    from tests.helpers import torchrun

    config, _ = scored
    select.run(load_config(config, list(ONE_PROCESS_OPTIONS)))
    many = tmp_path / "many"
    shutil.copytree(tmp_path / "out" / "scores", many / "scores")
    job = ("select", "--config", str(config), *ONE_PROCESS_OPTIONS, f"out_dir={many}")
    result = torchrun(*job, nproc=nproc)
    assert result.returncode == 0, result.stdout + result.stderr
    for band in ("mid", "adjusted", "matched", "sample"):  # said by whichever rank published it
        assert re.search(rf"\[midrank r\d\] {band}: kept \d+ of 60 samples", result.stderr), result.stderr
    one, ranks = band_files(tmp_path / "out"), band_files(many)
    assert len(one) == 4 * (3 + 3 + 3)  # per band: 3 parts, 3 rejected parts, jsonl, config, manifest
    assert ranks.keys() == one.keys()
    assert [name for name in one if ranks[name] != one[name]] == []
    again = torchrun(*job, nproc=nproc)
    assert again.returncode == 0 and "already selected" in again.stdout + again.stderr, again.stderr[-2000:]


def test_ranks_that_run_one_after_another_publish_once_every_part_is_written(scored, tmp_path, monkeypatch):
    """A Slurm array throttled to one task at a time: rank 0 writes its shards and publishes
    nothing; rank 1 writes the last shard and publishes. A rank run again writes only the parts
    that are missing (a cut run resumes)."""
    config, _ = scored
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    select.run(load_config(config, list(ONE_PROCESS_OPTIONS)))
    assert not list((out / "selected").glob("*/manifest.json"))
    (staged,) = [p for p in (out / "selected").iterdir() if p.name.startswith(".mid.")]
    assert sorted(p.name for p in staged.glob("part-*")) == ["part-00000.parquet", "part-00002.parquet"]
    written = (staged / "part-00000.parquet").stat().st_mtime_ns
    (staged / "part-00002.parquet").unlink()  # as if rank 0 was cut short before it
    select.run(load_config(config, list(ONE_PROCESS_OPTIONS)))  # rank 0 again: writes only shard 2
    assert (staged / "part-00000.parquet").stat().st_mtime_ns == written
    monkeypatch.setenv("RANK", "1")
    select.run(load_config(config, list(ONE_PROCESS_OPTIONS)))
    assert (out / "selected" / "mid" / "part-00000.parquet").stat().st_mtime_ns == written
    published = band_files(out)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    single = tmp_path / "single"
    import shutil

    shutil.copytree(out / "scores", single / "scores")
    select.run(load_config(config, [*ONE_PROCESS_OPTIONS, f"out_dir={single}"]))
    assert band_files(single) == published
    assert not [p for p in (out / "selected").iterdir() if p.name.startswith(".") and p.name != MARKER]


def staging_of(out, band: str):
    (staged,) = [p for p in (out / "selected").iterdir() if p.name.startswith(f".{band}.")]
    return staged


def test_a_publish_cut_between_its_renames_is_finished_by_the_rerun(scored, tmp_path):
    """Killed after the rejected rows were renamed into place and before the band was: the rerun
    stages the rejected parts again (every part of a shard must be staged, not only the kept one),
    drops a JSONL the new settings do not ask for, and publishes what one clean run does."""
    config, _ = scored
    out = tmp_path / "out"
    options = [RANKED_BANDS, "select.write_rejected=true", "select.jsonl=true"]
    select.run(load_config(config, options))
    clean = band_files(out)
    decided = {band: (out / "selected" / band).stat().st_ino for band in ("mid", "sample")}
    # the state the kill leaves: each band's folder back under its staging name, manifest inside
    from pipeline.layout import Layout
    from stages.select import bands_to_select

    layout = Layout(out)
    for band in ("mid", "sample"):
        (out / "selected" / band / "manifest.json").rename(out / "selected" / band / "manifest.kept")
    cfg = load_config(config, options)
    files, provenance = select.score_set(layout)
    pending = bands_to_select(cfg, layout, select.scan_scores(files), provenance)
    for band in ("mid", "sample"):
        (out / "selected" / band / "manifest.kept").rename(out / "selected" / band / "manifest.json")
        (out / "selected" / band).rename(pending[band].staging.dir)
        assert decided[band] == pending[band].staging.dir.stat().st_ino
    select.run(load_config(config, options))
    assert band_files(out) == clean
    assert not [p for p in (out / "selected").iterdir() if p.name.startswith(".") and p.name != MARKER]
    # again with the JSONL of the cut publish still staged, and jsonl now off: it is not published
    (out / "selected" / "mid" / "manifest.json").unlink()
    mid = pending["mid"].staging.dir
    (out / "selected" / "mid").rename(mid)
    select.run(load_config(config, [RANKED_BANDS, "select.write_rejected=true"]))
    assert not (out / "selected" / "mid" / "data.jsonl").exists()
    assert (out / "selected" / "mid" / "part-00000.parquet").read_bytes() == clean[
        "selected/mid/part-00000.parquet"
    ]


def test_a_rank_that_decided_before_another_published_leaves_nothing_behind(scored, tmp_path, monkeypatch):
    """Rank 1 decides, rank 0 then publishes on parts a cut run left (rank 1's among them); rank 1
    goes on with its stale decision: it writes nothing into the published band and removes what it
    staged again, instead of crashing on a folder renamed away or leaving an orphan."""
    from pipeline.launcher import shards_of_rank
    from pipeline.layout import Layout
    from stages.select import bands_to_select, publish, write_bands

    config, _ = scored
    out = tmp_path / "out"
    options = [RANKED_BANDS]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):  # rank 1's parts are staged by a run cut before rank 0 wrote
        monkeypatch.setenv("RANK", rank)
        if rank == "0":
            cfg = load_config(config, options)
            layout = Layout(out)
            files, provenance = select.score_set(layout)
            late = bands_to_select(cfg, layout, select.scan_scores(files), provenance)  # rank 1's view
        select.run(load_config(config, options))
    assert len(list((out / "selected").glob("*/manifest.json"))) == 4
    published = band_files(out)
    plan = select.plan_shards(cfg.corpus)
    write_bands(cfg, layout, plan, late, shards_of_rank(3, 1, 2))
    assert not any(publish(cfg, layout, name, band, 3) for name, band in late.items())
    assert band_files(out) == published
    assert not [p for p in (out / "selected").iterdir() if p.name.startswith(".") and p.name != MARKER]


def test_a_shard_another_job_writes_is_not_written_twice(scored, tmp_path):
    """Jobs of other world sizes (or a plain run beside a job's late rank) may own the same shard:
    the shard's lock stops the second writer with a line naming it, and it publishes nothing."""
    from pipeline.layout import Layout
    from pipeline.locks import lock
    from tests.helpers import midrank

    config, _ = scored
    with lock(Layout(tmp_path / "out"), "select-shard-00001"):  # held by this process, not the job's
        job = midrank("select", "--config", str(config), RANKED_BANDS)
        output, _ = job.communicate(timeout=300)
    assert job.returncode == 2 and "another run holds" in output and "select-shard-00001.lock" in output
    assert not list((tmp_path / "out" / "selected").glob("*/manifest.json"))
    select.run(load_config(config, [RANKED_BANDS]))
    assert len(list((tmp_path / "out" / "selected").glob("*/manifest.json"))) == 4


def test_a_rank_that_fails_publishes_nothing_and_the_rerun_completes(scored, tmp_path):
    from pipeline.layout import Layout
    from pipeline.locks import lock
    from tests.helpers import torchrun

    config, _ = scored
    layout = Layout(tmp_path / "out")
    with lock(layout, "select.rank-1"):
        result = torchrun("select", "--config", str(config), RANKED_BANDS, nproc=2)
    assert result.returncode != 0
    assert "select.rank-1.lock" in result.stdout + result.stderr
    assert not list((tmp_path / "out" / "selected").glob("*/manifest.json"))
    again = torchrun("select", "--config", str(config), RANKED_BANDS, nproc=2)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(list((tmp_path / "out" / "selected").glob("*/manifest.json"))) == 4


def test_a_multi_key_drop_is_recorded_per_key_and_per_sample(scored, tmp_path):
    config, _ = scored
    band = "select.bands=[{name: dropped, skip: 0, keep: 0.5, drop_top: {loss: 0.1, bits_per_byte: 0.1}}]"
    (band_dir,) = select.run(load_config(config, [band, "select.write_rejected=true"]))
    manifest = json.loads((band_dir / "manifest.json").read_text())
    rejected = pl.read_parquet(tmp_path / "out" / "rejected" / "dropped" / "part-*.parquet")
    kept = pl.read_parquet(band_dir / "part-*.parquet")
    assert "dropped_by" not in kept.columns
    dropped = rejected.filter(pl.col("reason") == "dropped_top")
    counts = manifest["dropped_top"]
    assert counts["samples"] == dropped.height == manifest["rejected"]["dropped_top"]
    assert counts["tokens"] == dropped["n_tokens"].sum()
    for key in ("loss", "bits_per_byte"):
        by = dropped["dropped_by"].str.split("+").list.contains(key)
        assert counts["by_key"][key] == by.sum() == 6  # 10% of 60 samples each
        assert counts["alone"][key] == (dropped["dropped_by"] == key).sum()
    assert counts["together"] == dropped["dropped_by"].str.contains(r"\+").sum()
    assert (
        counts["samples"] == counts["alone"]["loss"] + counts["alone"]["bits_per_byte"] + counts["together"]
    )
    # the band's shares count what remains: half of the 60 - dropped samples
    assert kept.height == -(-(60 - dropped.height) // 2)  # ceil
