"""A hostile (or careless) user's probes: nothing outside out_dir changes, nothing midrank did not
make is deleted or replaced, and every bad input or environment ends in one line, exit 2.

Each test snapshots the folder around out_dir before and after: a probe passes only when it was
refused in one line (or worked) and the snapshot is unchanged."""

import errno
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.layout import MARKER, Layout
from stages import score
from stages.cli import main
from tests.helpers import make_texts, midrank, write_config, write_corpus

BAND = "select.bands=[{name: mid, keep: 0.5}]"


def snapshot(root: Path) -> dict[str, str]:
    """Every entry below `root`: a file's content hash, a link's target, or 'dir'."""
    seen = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            seen[name] = f"-> {path.readlink()}"
        elif path.is_dir():
            seen[name] = "dir"
        else:
            seen[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def without_locks(seen: dict[str, str]) -> dict[str, str]:
    """A snapshot less the lock files, whose records every run rewrites."""
    return {name: value for name, value in seen.items() if not name.startswith("out/.locks")}


@contextmanager
def nothing_changes_outside(root: Path, out: str = "out") -> Iterator[None]:
    """Everything below `root` but the out_dir `root/out` is the same after the block as before."""
    inside = Path(out).parts

    def outside() -> dict[str, str]:
        return {name: v for name, v in snapshot(root).items() if Path(name).parts[: len(inside)] != inside}

    before = outside()
    yield
    assert outside() == before


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("error: ")]


def refused(caplog, argv: list[str], match: str) -> None:
    """`midrank ARGV` ends in exactly one error line matching `match`, with exit status 2."""
    caplog.clear()
    assert main(argv) == 2
    lines = errors(caplog)
    assert len(lines) == 1 and match in lines[0], lines


@pytest.fixture
def scored(tmp_path, tiny_model_dir):
    """A scored out_dir inside `tmp_path/world`, beside a folder of someone else's files."""
    world = tmp_path / "world"
    world.mkdir()
    corpus = write_corpus(world / "corpus.jsonl", make_texts(24, seed=4))
    config = write_config(world, corpus, tiny_model_dir)
    (world / "precious").mkdir()
    (world / "precious" / "thesis.txt").write_text("years of work")
    score.run(_load(config))
    return config, world


def _load(config: Path, *overrides: str):
    from pipeline.config import load_config

    return load_config(config, list(overrides))


def cli(config: Path, command: str, *overrides: str) -> list[str]:
    return [command, "--config", str(config), *overrides]


@pytest.mark.parametrize("folder", ["selected/mid", "rejected/mid"])
def test_select_never_replaces_a_band_folder_it_did_not_make(scored, caplog, folder):
    config, world = scored
    foreign = world / "out" / folder
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    before = without_locks(snapshot(world))  # nothing inside out_dir changes either
    refused(
        caplog,
        cli(config, "select", BAND),
        f"refusing to delete or replace {foreign}: midrank did not make it",
    )
    assert without_locks(snapshot(world)) == before


def test_inspect_never_replaces_a_report_folder_it_did_not_make(scored, caplog):
    config, world = scored
    assert main(cli(config, "select", BAND)) == 0
    foreign = world / "out" / "reports" / "main"
    foreign.mkdir(parents=True)
    (foreign / "slides.pdf").write_text("mine")
    before = without_locks(snapshot(world))
    refused(caplog, cli(config, "inspect", BAND), f"refusing to delete or replace {foreign}")
    assert without_locks(snapshot(world)) == before


def test_the_folders_midrank_makes_carry_its_marker(scored):
    """The marker is what lets a later run replace them: every folder a stage makes holds one."""
    config, world = scored
    overrides = [BAND, "train.max_steps=1", "train.band=mid", "train.max_tokens=32", "train.batch_size=2"]
    overrides.append("train.save_steps=1")
    with nothing_changes_outside(world):
        for command in ("select", "inspect", "train"):
            assert main(cli(config, command, *overrides)) == 0
    out = world / "out"
    made = [p for p in out.rglob("*") if p.is_dir()]  # the Trainer's checkpoint-N included
    assert any(p.name.startswith("checkpoint-") for p in made)
    assert [p for p in made if not (p / MARKER).is_file()] == []


@pytest.mark.parametrize(
    ("link", "command", "setup"),
    [
        ("selected", "select", None),
        ("rejected", "select", None),
        ("reports", "inspect", "select"),
        (".locks", "select", None),
        ("train", "train", "select"),
    ],
)
def test_a_symlinked_folder_sends_no_write_outside(scored, caplog, link, command, setup):
    config, world = scored
    overrides = [BAND, "train.max_steps=1", "train.band=mid", "train.max_tokens=32", "train.batch_size=2"]
    if setup:
        assert main(cli(config, setup, *overrides)) == 0
    out = world / "out"
    elsewhere = world / "elsewhere"
    if (out / link).exists():
        shutil.move(out / link, elsewhere)
    else:
        elsewhere.mkdir()
    (out / link).symlink_to(elsewhere)
    with nothing_changes_outside(world):
        refused(caplog, cli(config, command, *overrides), "leads outside")


def test_a_symlinked_selection_manifest_is_refused_not_written_through(scored, caplog):
    """The run's folder is checked whole before training: a link out of it is refused, and a link
    inside it would be replaced (written under a fresh name and renamed)."""
    config, world = scored
    overrides = [BAND, "train.max_steps=1", "train.band=mid", "train.max_tokens=32", "train.batch_size=2"]
    for command in ("select", "train"):
        assert main(cli(config, command, *overrides)) == 0
    run = next((world / "out" / "train").glob("*-mid*"))
    (run / "metrics.json").unlink()  # trained again: it writes its files again
    (run / "selection_manifest.json").unlink()
    (run / "selection_manifest.json").symlink_to(world / "precious" / "thesis.txt")
    with nothing_changes_outside(world):
        refused(caplog, cli(config, "train", *overrides), f"{run / 'selection_manifest.json'} leads outside")


def test_a_link_at_a_files_temporary_name_is_replaced_not_written_through(tmp_path):
    from pipeline.artifacts import write_text_atomic

    (tmp_path / "precious.txt").write_text("mine")
    planted = tmp_path / f".manifest.json.{socket.gethostname()}.{os.getpid()}.tmp"
    planted.symlink_to(tmp_path / "precious.txt")
    write_text_atomic(tmp_path / "manifest.json", "{}")
    assert (tmp_path / "precious.txt").read_text() == "mine" and not planted.exists()
    assert (tmp_path / "manifest.json").read_text() == "{}"


def test_a_job_id_in_the_environment_names_no_folder(scored, monkeypatch):
    """Select's ranks meet in staging folders named by what they decide, never by an id from the
    environment: a hostile one in a two-rank job changes nothing outside out_dir."""
    from tests.helpers import torchrun

    config, world = scored
    monkeypatch.setenv("MIDRANK_JOB_ID", "../../../victim")
    monkeypatch.setenv("SLURM_JOB_ID", "../../victim")
    with nothing_changes_outside(world.parent, out="world/out"):
        result = torchrun("select", "--config", str(config), BAND, nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]


def test_a_hash_sign_in_an_input_path_selects(tmp_path, tiny_model_dir):
    folder = tmp_path / "lang" / "C#"
    folder.mkdir(parents=True)
    texts = make_texts(12, seed=6)
    corpus = write_corpus(folder / "x#1.jsonl", texts)
    config = write_config(tmp_path, corpus, tiny_model_dir)
    with nothing_changes_outside(tmp_path):
        assert main(cli(config, "score")) == 0
        assert main(cli(config, "select", "select.bands=[{name: all, strategy: all}]")) == 0
    rows = pl.read_parquet(Layout(tmp_path / "out").band("all").dir / "*.parquet")
    assert sorted(rows["text"]) == sorted(texts)


def test_a_lone_surrogate_is_a_bad_row_not_a_crash(tmp_path, tiny_model_dir, caplog):
    corpus = tmp_path / "c.jsonl"
    good = [json.dumps({"text": t, "source": "s"}) for t in make_texts(6, seed=2)]
    corpus.write_text("\n".join([*good, '{"text": "half \\ud800 pair", "source": "s"}']) + "\n")
    config = write_config(tmp_path, corpus, tiny_model_dir)
    with nothing_changes_outside(tmp_path):
        refused(caplog, cli(config, "corpus"), f"{corpus}, line 7, field 'text': a lone surrogate")
        refused(caplog, cli(config, "score"), "a lone surrogate")
        assert main(cli(config, "score", "corpus.on_error=skip")) == 0
    assert json.loads((tmp_path / "out" / "scores" / "summary.json").read_text())["skipped"]["not_utf8"] == 1


def test_deeply_nested_json_is_a_bad_row_not_a_crash(tmp_path, tiny_model_dir, caplog):
    corpus = tmp_path / "c.jsonl"
    nested = '{"text": "fine", "source": "s", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    corpus.write_text(json.dumps({"text": "a text", "source": "s"}) + "\n" + nested + "\n")
    config = write_config(tmp_path, corpus, tiny_model_dir)
    with nothing_changes_outside(tmp_path):
        refused(caplog, cli(config, "corpus"), f"{corpus}, line 2: JSON nested too deeply")
        assert main(cli(config, "score", "corpus.on_error=skip")) == 0
    assert json.loads((tmp_path / "out" / "scores" / "summary.json").read_text())["skipped"] == {
        "malformed_json": 1
    }


@pytest.mark.parametrize("command", ["inspect", "train"])
def test_a_damaged_band_file_is_named(scored, caplog, command):
    config, world = scored
    overrides = [BAND, "train.max_steps=1", "train.band=mid", "train.max_tokens=32"]
    assert main(cli(config, "select", *overrides)) == 0
    part = sorted(Layout(world / "out").band("mid").dir.glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:-20])  # cut short
    with nothing_changes_outside(world):
        refused(caplog, cli(config, command, *overrides), f"{part}: damaged")


@pytest.mark.filterwarnings("error::UserWarning")  # matplotlib warns of a glyph it lacks (ESC)
def test_labels_from_the_data_are_inert_in_figures_and_on_the_terminal(tmp_path, tiny_model_dir):
    corpus = tmp_path / "c.jsonl"
    labels = ["$x^$", "\x1b[2J\x1b[31mred", "plain"]
    corpus.write_text(
        "".join(
            json.dumps({"text": t, "source": labels[i % 3]}) + "\n"
            for i, t in enumerate(make_texts(30, seed=3))
        )
    )
    config = write_config(tmp_path, corpus, tiny_model_dir)
    with nothing_changes_outside(tmp_path):
        process = midrank("corpus", "--config", str(config))  # a real terminal's view: it logs each source
        output = process.stdout.read()
        assert process.wait() == 0 and "\x1b" not in output and "\\x1b[2J\\x1b[31mred" in output, output
        for command in ("score", "select", "inspect"):  # matplotlib typesets "$...$" unless told not to
            assert main(cli(config, command, BAND)) == 0
    pngs = list((tmp_path / "out" / "reports" / "main").glob("*.png"))
    assert pngs and all(png.stat().st_size > 5_000 for png in pngs)


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE: 'two' is not a whole number"),
        ({"WORLD_SIZE": "2", "RANK": "5"}, "rank 5 of 2 processes"),
        ({"SLURM_ARRAY_TASK_COUNT": "4"}, "SLURM_ARRAY_TASK_ID: not set"),
    ],
)
def test_a_launcher_environment_that_makes_no_sense_is_one_line(
    tmp_path, tiny_model_dir, caplog, monkeypatch, env, match
):
    config = write_config(tmp_path, write_corpus(tmp_path / "c.jsonl", make_texts(6, seed=1)), tiny_model_dir)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with nothing_changes_outside(tmp_path):
        for command in ("config", "score", "select"):
            refused(caplog, cli(config, command), match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (
            "inspect.bins=1e9",
            "inspect.bins: expected an integer, got '1e9' (YAML reads 1e9 as text; write 1.0e+9)",
        ),
        ("inspect.bins=1.0e9", "(YAML reads 1.0e9 as text; write 1.0e+9)"),
        ("inspect.bins=1.0e+9", "inspect.bins: must be within [1, 10,000]"),
        ("out_dir=", 'out_dir: must name a folder ("." for the current one)'),
        ("train.learning_rate=1e-4", "write 1.0e-4"),
    ],
)
def test_config_values_a_careless_user_writes_are_one_line(tmp_path, tiny_model_dir, caplog, override, match):
    config = write_config(tmp_path, write_corpus(tmp_path / "c.jsonl", make_texts(6, seed=1)), tiny_model_dir)
    with nothing_changes_outside(tmp_path):
        for command in ("config", "score", "inspect"):
            refused(caplog, cli(config, command, override), match)
    assert not (tmp_path / "out").exists()


def test_a_lock_that_cannot_be_made_says_why(scored, caplog):
    config, world = scored
    (world / "out" / ".locks").rename(world / "out" / ".locks-moved")
    (world / "out" / ".locks").write_text("a file where the folder should be")
    with nothing_changes_outside(world):
        refused(
            caplog,
            cli(config, "select", BAND),
            f"{world / 'out' / '.locks'}: a file stands where midrank makes a folder",
        )


def test_a_full_disk_in_inspect_leaves_no_temporary_folder(scored, caplog, monkeypatch):
    config, world = scored
    assert main(cli(config, "select", BAND)) == 0

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "index.html")

    monkeypatch.setattr("stages.inspect.render_report", full)
    with nothing_changes_outside(world):
        refused(caplog, cli(config, "inspect", BAND), "No space left on device; free some space")
    assert not list((world / "out" / "reports").glob(".*.tmp"))


def test_a_part_file_is_readable_parquet_before_it_is_read(tmp_path):
    """The check a damaged band meets: a whole file passes, a cut one names itself."""
    from pipeline.artifacts import readable_parquet

    good = tmp_path / "good.parquet"
    pq.write_table(pl.DataFrame({"a": [1, 2]}).to_arrow(), good)
    assert readable_parquet([good], ValueError, "redo it") == [good]
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:10])
    with pytest.raises(ValueError, match=f"{cut}: damaged .*; redo it"):
        readable_parquet([cut], ValueError, "redo it")


def test_train_on_a_full_disk_is_one_line(scored, caplog, monkeypatch):
    """Refused before training when the disk cannot hold a checkpoint; a disk that fills during the
    run (torch's save says so with a RuntimeError) named as full. No mount of a small disk in CI:
    the disk's free space is what is replaced."""
    import shutil as shutil_module

    import torch

    config, world = scored
    overrides = [BAND, "train.max_steps=2", "train.save_steps=1", "train.band=mid", "train.max_tokens=32"]
    assert main(cli(config, "select", *overrides)) == 0
    usage, saves = shutil_module.disk_usage(world), []
    monkeypatch.setattr(shutil_module, "disk_usage", lambda _: usage._replace(free=2**20))  # 1 MiB
    with nothing_changes_outside(world):
        refused(caplog, cli(config, "train", *overrides), "1 MiB free, a run needs ~2; free some space")

    def full(*args, **kwargs):  # what torch.save raises when a write comes up short
        saves.append(args)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 445632 vs 445520")

    # room at the start, none once the first save was cut short
    monkeypatch.setattr(
        shutil_module, "disk_usage", lambda _: usage._replace(free=2**10 if saves else usage.free)
    )
    monkeypatch.setattr(torch, "save", full)
    with nothing_changes_outside(world):
        refused(caplog, cli(config, "train", *overrides), "No space left on device; free some space")


TRAIN = [
    BAND,
    "train.max_steps=1",
    "train.save_steps=1",
    "train.band=mid",
    "train.max_tokens=32",
    "train.batch_size=2",
]


@pytest.mark.parametrize("planted", ["checkpoints/checkpoint-1", "model/config.json"])
def test_a_link_planted_in_a_run_folder_is_refused_before_training(scored, caplog, planted):
    """The Trainer and save_pretrained write through links: every entry of the run's folder is
    checked first."""
    config, world = scored
    assert main(cli(config, "select", *TRAIN)) == 0
    run = world / "out" / "train" / "uniform-mid"
    for folder in (run, run / "checkpoints", run / "model"):
        Layout(world / "out").make_dir(folder)
    (world / "precious" / "aim").mkdir()
    (run / planted).symlink_to(world / "precious" / "aim")
    with nothing_changes_outside(world):
        refused(caplog, cli(config, "train", *TRAIN), f"{run / planted} leads outside")
    assert [p for p in (run / "checkpoints").glob("checkpoint-*") if not p.is_symlink()] == []  # no step
    assert not (run / "metrics.json").exists()


def test_a_link_at_a_lock_file_is_not_written_through(scored, caplog):
    config, world = scored
    locks = world / "out" / ".locks"
    (locks / "select.lock").unlink(missing_ok=True)
    (locks / "select.lock").symlink_to(world / "precious" / "thesis.txt")
    with nothing_changes_outside(world):
        refused(caplog, cli(config, "select", BAND), f"{locks / 'select.lock'}: a link stands where")


def test_a_figure_is_saved_under_a_fresh_name_never_through_a_link(tmp_path):
    import matplotlib.pyplot as plt

    from pipeline.plots import _save

    (tmp_path / "elsewhere.txt").write_text("mine")
    (tmp_path / "deltas.png").symlink_to(tmp_path / "elsewhere.txt")
    _save(plt.figure(), tmp_path / "deltas.png")
    assert (tmp_path / "elsewhere.txt").read_text() == "mine"
    assert not (tmp_path / "deltas.png").is_symlink() and (tmp_path / "deltas.png").stat().st_size > 0


def test_a_link_left_in_a_band_staging_is_not_written_through(scored, monkeypatch):
    """Rank 0 of two stages its part and leaves; a link planted at the band's JSONL in that staging
    folder is replaced when rank 1 publishes, not written through."""
    config, world = scored
    band = ["select.bands=[{name: two, keep: 0.2}]", "select.jsonl=true"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(cli(config, "select", *band)) == 0
    (staging,) = (world / "out" / "selected").glob(".two.*")
    (staging / "data.jsonl").symlink_to(world / "precious" / "thesis.txt")
    monkeypatch.setenv("RANK", "1")
    with nothing_changes_outside(world):
        assert main(cli(config, "select", *band)) == 0
    published = world / "out" / "selected" / "two" / "data.jsonl"
    assert not published.is_symlink() and published.read_text().count("\n") > 0


@pytest.mark.parametrize(
    ("command", "folder"),
    [("select", "selected/mid"), ("select", "rejected/mid"), ("inspect", "reports/main")],
)
@pytest.mark.parametrize("standing", ["a file", "a folder of the user's inside"])
def test_nothing_midrank_did_not_make_is_replaced_with_its_folder(scored, caplog, command, folder, standing):
    config, world = scored
    overrides = [BAND, "select.write_rejected=true", "inspect.bins=20"]
    for made_by in ("select", "inspect"):
        assert main(cli(config, made_by, *overrides)) == 0
    path, manifest = world / "out" / folder, world / "out" / "selected" / "mid" / "manifest.json"
    if standing == "a file":
        Layout(world / "out").remove(path)
        path.write_text("thesis")
        match = f"refusing to delete or replace {path}: midrank makes a folder there, and a file"
    else:
        (path / "mine").mkdir()
        (path / "mine" / "notes.txt").write_text("mine")
        match = f"refusing to delete or replace {path}: midrank did not make {path / 'mine'}"
    if manifest.exists():
        manifest.unlink()  # the band is selected again (its report drawn again)
    before = without_locks(snapshot(world))
    refused(caplog, cli(config, command, *overrides), match)
    assert without_locks(snapshot(world)) == before


def test_a_full_disk_while_drawing_names_the_figure(scored, caplog, monkeypatch):
    """What matplotlib raises when the disk is full: an OSError without a file name."""
    config, world = scored
    assert main(cli(config, "select", BAND)) == 0

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", full)
    with nothing_changes_outside(world):
        refused(caplog, cli(config, "inspect", BAND), ".png: No space left on device; free some space")
    assert not list((world / "out" / "reports").glob(".*.tmp"))


def test_a_number_python_will_not_read_is_a_bad_row(tmp_path, tiny_model_dir, caplog):
    corpus = tmp_path / "c.jsonl"
    huge = '{"text": "fine", "source": "s", "meta": ' + "1" * 5_000 + "}"
    corpus.write_text(json.dumps({"text": "a text", "source": "s"}) + "\n" + huge + "\n")
    config = write_config(tmp_path, corpus, tiny_model_dir)
    with nothing_changes_outside(tmp_path):
        refused(caplog, cli(config, "corpus"), f"{corpus}, line 2: malformed JSON: Exceeds the limit")
        assert main(cli(config, "score", "corpus.on_error=skip")) == 0


@pytest.mark.parametrize(
    "damage", ["optimizer.pt cut", "model.safetensors cut", "optimizer.pt text", "tokens"]
)
def test_a_damaged_checkpoint_is_named(scored, caplog, damage):
    config, world = scored
    overrides = [*TRAIN, "train.max_steps=2", "train.name=r"]
    assert main(cli(config, "select", *overrides)) == 0
    assert main(cli(config, "train", *overrides)) == 0
    run, checkpoint = (
        world / "out" / "train" / "r",
        world / "out" / "train" / "r" / "checkpoints" / "checkpoint-1",
    )
    (run / "metrics.json").unlink()  # a run killed after its first checkpoint, damaged
    shutil.rmtree(run / "checkpoints" / "checkpoint-2", ignore_errors=True)
    name, how = damage.split(" ") if " " in damage else ("trainer_state.json", damage)
    target = checkpoint / name
    if how == "cut":
        target.write_bytes(target.read_bytes()[:100])
    elif how == "text":
        target.write_text("not a checkpoint")
    else:  # trainer_state.json whose count of trained tokens is not a number
        state = json.loads(target.read_text())
        state["stateful_callbacks"]["TrainedTokens"]["args"]["tokens"] = "many"
        target.write_text(json.dumps(state))
    with nothing_changes_outside(world):
        refused(caplog, cli(config, "train", *overrides), f"{checkpoint}")
    assert "damaged" in errors(caplog)[0]


def test_midranks_own_json_nested_too_deeply_is_one_line(scored, caplog):
    config, world = scored
    assert main(cli(config, "select", BAND)) == 0
    deep = "[" * 100_000 + "]" * 100_000
    (world / "out" / ".locks" / "inspect-main.lock").write_text(deep)  # a lock's record: someone held it
    manifest = world / "out" / "selected" / "mid" / "manifest.json"
    manifest.write_text(deep)
    with nothing_changes_outside(world):
        refused(
            caplog, cli(config, "inspect", BAND), f"{manifest}: cannot be read as JSON (nested too deeply)"
        )


def test_a_hard_linked_lock_file_is_not_written_through(scored, caplog):
    config, world = scored
    lock = world / "out" / ".locks" / "select.lock"
    lock.unlink(missing_ok=True)
    lock.hardlink_to(world / "precious" / "thesis.txt")
    with nothing_changes_outside(world):
        refused(caplog, cli(config, "select", BAND), f"{lock}: a file linked from elsewhere (a hard link)")


def test_a_model_config_with_a_field_of_the_wrong_type_is_one_line(scored, caplog, tiny_model_dir):
    config, world = scored
    model = world / "model"
    shutil.copytree(tiny_model_dir, model)
    settings = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**settings, "hidden_size": "x"}))
    with nothing_changes_outside(world):
        refused(
            caplog,
            cli(config, "score", f"model.path={model}", f"out_dir={world / 'out' / 'other'}"),
            f"model.path: '{model}' cannot be loaded",
        )


def test_training_ranks_started_by_hand_are_told_to_use_torchrun(scored, caplog, monkeypatch):
    config, world = scored
    assert main(cli(config, "select", *TRAIN)) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with nothing_changes_outside(world):
        refused(caplog, cli(config, "train", *TRAIN), "MASTER_ADDR and MASTER_PORT: not set")


def test_a_report_cleans_up_only_its_own_stagings(tmp_path):
    layout = Layout(tmp_path)
    for name in (".main.12.tmp", ".main.x.13.tmp", ".main.tmp", ".mainer.14.tmp"):
        (tmp_path / "reports" / name).mkdir(parents=True)
    assert [p.name for p in layout.report_stagings("main")] == [".main.12.tmp"]
