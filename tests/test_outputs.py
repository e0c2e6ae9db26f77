"""The typed records stages hand each other, the run layout, and the command table."""

import importlib
import json

import pytest

from pipeline.codec import decode, encode
from pipeline.config import BandConfig, load_config, to_dict
from pipeline.layout import Layout
from pipeline.outputs import (
    BandManifest,
    Evaluation,
    OutputError,
    ReportSummary,
    RunMetrics,
    ScoresSummary,
    SplitMetrics,
    TrainSummary,
)
from stages.cli import COMMANDS

CONFIG = to_dict(load_config(None, ["corpus.paths=[c.jsonl]", "model.path=m", "out_dir=runs/x"]))
COUNTS = {"samples": {"in": 10, "kept": 4}, "tokens": {"in": 300, "kept": 90}}
MANIFEST = {
    "band": "mid",
    "strategy": "midranking",
    "parameters": to_dict(BandConfig(skip=0.1)),
    "positions": {"start": 0.1, "stop": 0.5, "ranked_by": "loss", "measure": "samples"},
    "loss_thresholds": {"min_kept": 2.5, "max_kept": 4.0},
    "rank_key": {"key": "loss", "min_kept": 2.5, "max_kept": 4.0},
    **COUNTS,
    "rejected": {"too_easy": 5, "too_hard": 1},
    "per_source": {
        "before": {"web": {"samples": 10, "tokens": 300}},
        "after": {"web": {"samples": 4, "tokens": 90}},
    },
    "score_provenance": {
        "key": {"dtype": "float32"},
        "model_path": "m",
        "code_version": "0",
        "config": CONFIG,
    },
    "config": CONFIG,
}


def test_a_manifest_round_trips_byte_for_byte_and_reads_typed(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(MANIFEST, indent=2, sort_keys=True) + "\n")
    manifest = BandManifest.read(path)
    assert manifest.samples.total == 10 and manifest.tokens.kept == 90  # "in" is read as `total`
    assert manifest.per_source.after["web"].tokens == 90 and not manifest.parameters.by_source
    assert manifest.config.out_dir == "runs/x" and manifest.score_provenance.config["corpus"]["paths"] == [
        "c.jsonl",
    ]
    copy = tmp_path / "copy.json"
    manifest.write(copy)
    assert copy.read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d.pop("rejected"),
            r"manifest\.json\.rejected: required, missing \(written by another version",
        ),
        (
            lambda d: d.update(extra=1),
            r"manifest\.json\.extra: unknown key; allowed keys in .*manifest\.json: ",
        ),
        (lambda d: d["samples"].pop("in"), r"manifest\.json\.samples\.in: required, missing"),
        (
            lambda d: d["samples"].update({"kept": True}),
            r"manifest\.json\.samples\.kept: expected an integer, got True",
        ),
        (lambda d: d["positions"].update(start="0.1"), r"positions\.start: expected a number, got '0\.1'"),
        (lambda d: d.update(rejected=[1]), r"manifest\.json\.rejected: expected a mapping"),
        (lambda d: d["parameters"].update(keep=2), r"manifest\.json\.parameters\.keep: "),
        (lambda d: d["config"].update(out_dir=3), r"manifest\.json\.config\.out_dir: expected a string"),
    ],
)
def test_a_file_that_does_not_hold_the_record_is_a_clear_error(tmp_path, change, message):
    data = json.loads(json.dumps(MANIFEST))
    change(data)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(OutputError, match=message):
        BandManifest.read(path)


def test_missing_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(OutputError, match=r"summary\.json: missing"):
        ScoresSummary.read(tmp_path / "summary.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(OutputError, match=r"bad\.json: cannot be read as JSON"):
        ScoresSummary.read(tmp_path / "bad.json")


def test_optional_fields_are_left_out_when_absent_and_integers_pass_as_floats():
    split = SplitMetrics(samples=1, tokens=2, loss=3, perplexity=20.1, accuracy=0.5)
    summary = TrainSummary(
        objective="uniform",
        steps=1,
        steps_this_run=1,
        samples_available=4,
        dropped={},
        trained_tokens=8,
        target_tokens_this_run=8,
        tokens_per_second=1.0,
        runtime_s=8.0,
        final_train_loss=2.0,
        precision="fp32",
        world_size=1,
        data=["a.parquet"],
    )
    plain = encode(
        RunMetrics(train=summary, config=load_config(None, ["corpus.paths=[c.jsonl]", "model.path=m"]))
    )
    assert set(plain) == {"train", "config"}  # no "before": null
    evaluation = decode(Evaluation, {"overall": encode(split), "per_source": {}}, "e.json", OutputError)
    assert evaluation.overall.loss == 3
    report = encode(
        decode(
            ReportSummary,
            {
                "inputs_key": "k",
                "out_dir": "o",
                "model": {},
                "samples": 1,
                "tokens": 2,
                "quantiles": {},
                "sources": [],
                "sources_plotted": [],
                "images": {},
                "bands": [],
                "examples": None,
            },
            "s.json",
            OutputError,
        )
    )
    assert report["examples"] is None  # a required field that is None stays, as null


def test_every_path_under_out_dir_comes_from_the_layout(tmp_path):
    layout = Layout(tmp_path / "out")
    band, run, report = layout.band("b"), layout.train_run("r"), layout.report("main")
    paths = [
        layout.scores_dir,
        layout.score_shard(3),
        layout.score_chunk(3, 7),
        layout.score_chunk_provenance(3),
        layout.score_plan,
        layout.scores_summary,
        *(band.dir, band.manifest, band.rejected, band.jsonl),
        *(run.dir, run.metrics, run.selection, run.model, run.checkpoints),
        *(report.dir, report.index, report.summary, report.table, report.results, report.deltas),
        layout.eval_before("abc"),
        layout.report_staging("main").dir,
    ]
    assert all(p.is_relative_to(tmp_path / "out") for p in paths)
    assert len(set(paths)) == len(paths)
    assert layout.score_shard(3).name == "part-00003.parquet" and band.manifest.name == "manifest.json"


@pytest.mark.parametrize("command", [c for c, (module, _) in COMMANDS.items() if module])
def test_every_command_names_a_stage_with_a_run_function(command):
    module = importlib.import_module(COMMANDS[command][0])
    assert callable(module.run)
