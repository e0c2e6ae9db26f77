"""Corpus readers on real small files: every format, stable sample_ids, sharding, bad input."""

import gzip
import io
import json
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.config import CorpusConfig
from pipeline.readers import InputError
from pipeline.records import CorpusError, ReadStats
from pipeline.sharding import cut_into_shards, iter_corpus, iter_shard, plan_shards


def docs(prefix, n):
    return [{"text": f"{prefix} document number {i}", "source": f"{prefix}-src"} for i in range(n)]


def jsonl_bytes(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def read_all(**kwargs):
    cfg = CorpusConfig(**kwargs)
    stats = ReadStats()
    records = list(iter_corpus(plan_shards(cfg), cfg, stats))
    return records, stats


@pytest.fixture
def corpus_dir(tmp_path):
    """A directory mixing every file format the readers take."""
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.jsonl").write_bytes(jsonl_bytes(docs("plain", 7)))
    (root / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(docs("gz", 5))))
    # two zstd frames in one file, as concatenating compressed chunks produces
    rows = docs("zst", 6)
    frames = [zstandard.ZstdCompressor().compress(jsonl_bytes(part)) for part in (rows[:2], rows[2:])]
    (root / "c.jsonl.zst").write_bytes(b"".join(frames))
    pq.write_table(pa.Table.from_pylist(docs("pq", 10)), root / "d.parquet", row_group_size=3)
    return root


def test_every_file_format(corpus_dir):
    records, stats = read_all(paths=(str(corpus_dir),), source_field="source")
    by_file = {}
    for r in records:
        by_file.setdefault(r.sample_id.split(":")[0], []).append(r)
    assert {k: len(v) for k, v in by_file.items()} == {
        "a.jsonl": 7,
        "b.jsonl.gz": 5,
        "c.jsonl.zst": 6,
        "d.parquet": 10,
    }
    for name, prefix in [
        ("a.jsonl", "plain"),
        ("b.jsonl.gz", "gz"),
        ("c.jsonl.zst", "zst"),
        ("d.parquet", "pq"),
    ]:
        assert [r.text for r in by_file[name]] == [
            f"{prefix} document number {i}" for i in range(len(by_file[name]))
        ]
        assert [r.sample_id for r in by_file[name]] == [f"{name}:{i}" for i in range(len(by_file[name]))]
        assert {r.source for r in by_file[name]} == {f"{prefix}-src"}
    assert stats.rows == stats.records == 28 and not stats.skipped


def test_source_defaults_to_file_stem(corpus_dir):
    records, _ = read_all(paths=(str(corpus_dir / "b.jsonl.gz"), str(corpus_dir / "d.parquet")))
    assert {r.source for r in records} == {"b", "d"}


def test_hf_save_to_disk_dataset_and_dict(tmp_path):
    ds = datasets.Dataset.from_list(docs("hf", 2500))  # > one internal read batch
    ds.save_to_disk(str(tmp_path / "single"))
    records, _ = read_all(paths=(str(tmp_path / "single"),))
    assert [r.text for r in records] == [d["text"] for d in docs("hf", 2500)]
    assert records[42].sample_id == "single:42" and records[0].source == "single"

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(docs("t", 3)), "test": datasets.Dataset.from_list(docs("e", 2))}
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    records, _ = read_all(paths=(str(tmp_path / "dict"),), source_field="source")
    assert sorted(r.sample_id for r in records) == [
        "dict/test:0",
        "dict/test:1",
        "dict/train:0",
        "dict/train:1",
        "dict/train:2",
    ]


def test_text_directory(tmp_path):
    root = tmp_path / "texts"
    (root / "poems").mkdir(parents=True)
    (root / "poems" / "one.txt").write_text("roses are red\n")
    (root / "poems" / "two.txt").write_text("violets are blue\n")
    (root / "top.txt").write_text("a file at the top\n")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    records, _ = read_all(paths=(str(root),))
    assert [(r.sample_id, r.source, r.text) for r in records] == [
        ("poems/one.txt:0", "poems", "roses are red\n"),
        ("poems/two.txt:0", "poems", "violets are blue\n"),
        ("top.txt:0", "texts", "a file at the top\n"),
    ]


def test_globs_and_prompt_response_mode(tmp_path):
    rows = [{"q": "What is 2+2?", "a": "4"}, {"q": "", "a": "an answer to nothing"}]
    (tmp_path / "x.jsonl").write_bytes(jsonl_bytes(rows))
    records, _ = read_all(
        paths=(str(tmp_path / "*.jsonl"),), mode="prompt_response", prompt_field="q", response_field="a"
    )
    assert [(r.prompt, r.text) for r in records] == [("What is 2+2?", "4"), ("", "an answer to nothing")]


def test_chat_mode_validates_messages(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user"}]}
    (tmp_path / "chat.jsonl").write_bytes(jsonl_bytes([good, bad]))
    records, stats = read_all(paths=(str(tmp_path / "chat.jsonl"),), mode="chat", on_error="skip")
    assert records[0].messages[1] == {"role": "assistant", "content": "hello"}
    assert stats.skipped == {"wrong_type": 1}


def test_sample_ids_are_stable_across_runs_and_locations(corpus_dir, tmp_path):
    first, _ = read_all(paths=(str(corpus_dir),))
    second, _ = read_all(paths=(str(corpus_dir),))
    moved = shutil.copytree(corpus_dir, tmp_path / "elsewhere" / "renamed")
    third, _ = read_all(paths=(str(moved),))
    ids = [r.sample_id for r in first]
    assert ids == [r.sample_id for r in second] == [r.sample_id for r in third]
    assert len(set(ids)) == len(ids)


def test_colliding_names_are_refused(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "part.jsonl").write_bytes(jsonl_bytes(docs(d, 1)))
    with pytest.raises(InputError, match=r"two inputs are both named 'part\.jsonl'"):
        read_all(paths=(str(tmp_path / "x" / "part.jsonl"), str(tmp_path / "y" / "part.jsonl")))


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_all(paths=(str(tmp_path / "nope.jsonl"),))
    with pytest.raises(InputError, match="matches no file"):
        read_all(paths=(str(tmp_path / "*.parquet"),))
    (tmp_path / "weird.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="cannot tell its format"):
        read_all(paths=(str(tmp_path / "weird.csv"),))


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 8, 40])
def test_sharding_covers_every_record_once(corpus_dir, num_shards):
    (corpus_dir / "texts").mkdir()
    for i in range(3):
        (corpus_dir / "texts" / f"{i}.txt").write_text(f"text file {i}")
    cfg = CorpusConfig(paths=(str(corpus_dir), str(corpus_dir / "texts")), num_shards=num_shards)
    plan = plan_shards(cfg)
    everything = [
        r.sample_id for r in iter_corpus(plan_shards(CorpusConfig(paths=cfg.paths)), cfg, ReadStats())
    ]
    per_shard = [[r.sample_id for r in iter_shard(plan, s, cfg, ReadStats())] for s in range(num_shards)]
    assert len(everything) == 31
    assert [i for shard in per_shard for i in shard] == everything  # each once, in corpus order
    sizes = [len(s) for s in per_shard]
    assert max(sizes) - min(sizes) <= 1


def test_cut_into_shards_matches_brute_force():
    for num_rows in ([5], [0, 3, 0, 4], [1] * 9, [100, 1, 37]):
        for num_shards in (1, 2, 4, 7, 11):
            expected = [[] for _ in range(num_shards)]
            total = sum(num_rows)
            g = 0
            for f, n in enumerate(num_rows):
                for row in range(n):
                    # global row g belongs to the shard whose range [i*T/S, (i+1)*T/S) holds it
                    shard = next(
                        i
                        for i in range(num_shards)
                        if i * total // num_shards <= g < (i + 1) * total // num_shards
                    )
                    expected[shard].append((f, row))
                    g += 1
            got = [
                [(s.file_index, r) for s in shard for r in range(s.start, s.stop)]
                for shard in cut_into_shards(num_rows, num_shards)
            ]
            assert got == expected


# ------------------------------------------------------------------------------------------------
# Bad input: each case raises naming file, line and field, or is counted under its reason.

BAD_LINES = {
    "malformed_json": (b'{"text": "unterminated\n', None),
    "missing_field": (b'{"body": "no text field here"}\n', "text"),
    "not_utf8": (b'{"text": "caf\xe9 latin-1"}\n', None),
    "empty_text": (b'{"text": "   "}\n', "text"),
    "wrong_type": (b'{"text": 42}\n', "text"),
    "not_an_object": (b'["a", "list"]\n', None),
}
GOOD = b'{"text": "a good line"}\n'


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_row_raises_with_location(tmp_path, reason):
    line, field = BAD_LINES[reason]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD + GOOD + line + GOOD)
    with pytest.raises(CorpusError) as err:
        read_all(paths=(str(path),))
    message = str(err.value)
    assert str(path) in message and "line 3" in message
    if field:
        assert f"field {field!r}" in message


def test_bad_rows_are_counted_under_skip(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD + b"".join(line for line, _ in BAD_LINES.values()) + b"\n" + GOOD)
    records, stats = read_all(paths=(str(path),), on_error="skip", num_shards=3)
    assert [r.sample_id for r in records] == ["bad.jsonl:0", "bad.jsonl:8"]
    assert stats.skipped == {reason: 1 for reason in BAD_LINES} | {"blank_line": 1}
    assert stats.rows == stats.records + sum(stats.skipped.values()) == 9


def test_blank_lines_are_counted_not_fatal(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_bytes(GOOD + b"\n   \n" + GOOD.rstrip(b"\n"))  # and no newline at the end
    records, stats = read_all(paths=(str(path),))
    assert len(records) == 2 and stats.skipped == {"blank_line": 2} and stats.rows == 4


def test_non_utf8_text_file(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ok.txt").write_text("fine")
    (tmp_path / "docs" / "bad.txt").write_bytes(b"line one\nline \xff two\n")
    with pytest.raises(CorpusError, match=r"bad\.txt, row 0: invalid UTF-8 byte at line 2"):
        read_all(paths=(str(tmp_path / "docs"),))
    records, stats = read_all(paths=(str(tmp_path / "docs"),), on_error="skip")
    assert [r.sample_id for r in records] == ["ok.txt:0"] and stats.skipped == {"not_utf8": 1}


def test_missing_parquet_column_names_the_field(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "p.parquet")
    with pytest.raises(CorpusError, match=r"p\.parquet, row 0, field 'text': field missing"):
        read_all(paths=(str(tmp_path / "p.parquet"),))


def test_file_changed_after_planning_is_detected(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes(docs("a", 4)))
    cfg = CorpusConfig(paths=(str(path),))
    plan = plan_shards(cfg)
    path.write_bytes(jsonl_bytes(docs("a", 2)))
    with pytest.raises(InputError, match="did it change after the shard plan was made"):
        list(iter_corpus(plan, cfg, ReadStats()))


def zst_streamed(data: bytes) -> bytes:
    """One zstd frame written as a stream (no content size), as `zstd` on a pipe makes."""
    out = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as writer:
        for i in range(0, len(data), 1 << 14):
            writer.write(data[i : i + (1 << 14)])
    return out.getvalue()


LONG = jsonl_bytes(docs("long", 4000))
DAMAGED = {
    "single-frame.jsonl.zst": zstandard.ZstdCompressor().compress(LONG)[:-200],
    "streamed.jsonl.zst": zst_streamed(LONG)[: len(zst_streamed(LONG)) // 2],
    "cut.jsonl.gz": gzip.compress(LONG)[: len(gzip.compress(LONG)) // 2],
    "noise.jsonl.gz": b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8,
    "noise.jsonl.zst": b"\x28\xb5\x2f\xfd" + bytes(range(256)) * 8,
    "noise.parquet": b"PAR1" + bytes(range(256)) * 8 + b"PAR1",
}


@pytest.mark.parametrize("name", list(DAMAGED))
def test_a_damaged_input_fails_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(DAMAGED[name])
    with pytest.raises(InputError, match=rf"{path}: (is cut short|cannot be read)"):
        read_all(paths=(str(path),))


def test_complete_streamed_and_multi_frame_zstd_read_every_row(tmp_path):
    path = tmp_path / "whole.jsonl.zst"
    path.write_bytes(
        zst_streamed(LONG[: len(LONG) // 2]) + zstandard.ZstdCompressor().compress(LONG[len(LONG) // 2 :])
    )
    records, _ = read_all(paths=(str(path),))
    assert len(records) == 4000


def test_a_utf8_bom_opens_a_jsonl_file_and_messages_say_at_once(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(docs("bom", 3)))
    records, stats = read_all(paths=(str(path),))
    assert len(records) == 3 and not stats.skipped
    bad = tmp_path / "ctl.jsonl"
    bad.write_bytes(b'{"text": "a\x01b"}\n')
    with pytest.raises(
        CorpusError, match=r"line 1: malformed JSON: Invalid control character at column 12 \("
    ):
        read_all(paths=(str(bad),))


def test_trailing_garbage_after_zstd_frames_and_a_damaged_saved_dataset_are_named(tmp_path):
    path = tmp_path / "tail.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(LONG) + b"garbage!")
    with pytest.raises(InputError, match=rf"{path}: cannot be read"):
        read_all(paths=(str(path),))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(docs("hf", 3))}).save_to_disk(saved)
    (saved / "dataset_dict.json").write_text("{cut")
    with pytest.raises(InputError, match=r"dataset_dict\.json: damaged"):
        read_all(paths=(str(saved),))
