"""The Arrow store: the same records as the in-memory reader, built once per version, opened
at once afterwards, file:line errors across parallel chunks, pinned versions, shared by ranks."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

import tpembed.data.store as store
from conftest import REPO, free_port, subprocess_env
from tpembed.data import DataError, ReadReport, read_dataset
from tpembed.data.store import load_dataset

SAMPLES = REPO / "data" / "samples"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def same(a, b):
    """Every column of two datasets, record by record."""
    assert len(a) == len(b)
    for name in ("queries", "positives", "negatives", "texts1", "texts2", "scores", "texts", "instructions"):
        if hasattr(b, name):
            assert [getattr(a, name)[i] for i in range(len(getattr(b, name)))] == list(getattr(b, name)), name
    if hasattr(b, "labels"):
        assert [a.label_names[i] for i in a.labels] == [b.label_names[i] for i in b.labels]


@pytest.mark.parametrize(
    "task, name",
    [
        ("retrieval", "snli_triplets_en.jsonl"),
        ("sts", "snli_pairs_en.jsonl"),
        ("classification", "cmrc2018_questions_zh.jsonl"),
    ],  # fmt: skip
)
def test_the_store_reads_what_the_in_memory_reader_reads(task, name, tmp_path):
    memory_report, store_report = ReadReport(), ReadReport()
    expected = read_dataset(SAMPLES / name, task, "d", report=memory_report)
    data = load_dataset(SAMPLES / name, task, "d", cache_dir=tmp_path, report=store_report, progress=False)
    same(data, expected)
    assert store_report == memory_report
    assert data.distinct_instructions == expected.distinct_instructions


def test_parquet_directories_and_saved_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [json.loads(line) for line in (SAMPLES / "snli_triplets_en.jsonl").read_text().splitlines()]
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[:300])
    pq.write_table(pa.Table.from_pylist(rows[300:]), folder / "b.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    expected = read_dataset(SAMPLES / "snli_triplets_en.jsonl", "retrieval", "d")
    for source in (folder, tmp_path / "saved"):
        same(load_dataset(source, "retrieval", source.name, cache_dir=tmp_path / "cache", progress=False), expected)


def test_built_once_then_opened_and_rebuilt_when_edited_or_older(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "r.jsonl", [{"query": f"q{i}", "pos": [f"p{i}"]} for i in range(20)])
    load_dataset(path, "retrieval", "r", cache_dir=tmp_path / "c", progress=False)
    builds = []
    original = store.build_cache
    monkeypatch.setattr(store, "build_cache", lambda *a, **k: builds.append(1) or original(*a, **k))
    assert len(load_dataset(path, "retrieval", "r", cache_dir=tmp_path / "c", progress=False)) == 20
    assert builds == [], "the second start-up opens the cache"
    write_jsonl(path, [{"query": f"x{i}", "pos": [f"p{i}"]} for i in range(21)])
    edited = load_dataset(path, "retrieval", "r", cache_dir=tmp_path / "c", progress=False)
    assert builds == [1] and len(edited) == 21 and edited.queries[0] == "x0"
    assert store.source_changed(edited) is False
    meta = edited.cache_path / "meta.json"
    meta.write_text(meta.read_text().replace(f'"format": {store.FORMAT}', '"format": 0'))
    load_dataset(path, "retrieval", "r", cache_dir=tmp_path / "c", progress=False)
    assert builds == [1, 1], "a cache of another format is rebuilt, not read"
    (edited.cache_path / "COMPLETE").unlink()  # as a killed build leaves it
    load_dataset(path, "retrieval", "r", cache_dir=tmp_path / "c", progress=False)
    assert len(builds) == 3


@pytest.mark.parametrize("num_proc", [1, 2])
def test_errors_name_the_source_line_across_chunks(tmp_path, monkeypatch, num_proc):
    monkeypatch.setattr(store, "CHUNK_BYTES", 200)  # many chunks
    rows = [{"query": f"query number {i}", "pos": [f"positive {i}"]} for i in range(60)]
    rows[46] = {"query": 5, "pos": ["p"]}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert len(store.plan_chunks(path)) > 5
    with pytest.raises(DataError, match=r"bad\.jsonl:47: field 'query': expected a string, got int"):
        load_dataset(path, "retrieval", "bad", cache_dir=tmp_path / "c", num_proc=num_proc, progress=False)
    assert not list((tmp_path / "c").glob("bad-*")), "no cache is left by a failed build"
    rows[46] = {"query": "fixed", "pos": ["p"], "instruction": "look <|im_start|> here"}
    write_jsonl(path, rows)
    report = ReadReport()
    data = load_dataset(path, "retrieval", "bad", cache_dir=tmp_path / "c", num_proc=num_proc, report=report,
                        placeholder="<|im_start|>", progress=False)  # fmt: skip
    same(data, read_dataset(path, "retrieval", "bad", placeholder="<|im_start|>"))
    assert report.placeholder_in_text == [f"{path}:47 (instruction)"]


def test_workers_that_cannot_start_give_an_error_not_a_hang(tmp_path):
    """A script without a __main__ guard: every spawned worker re-runs it and dies while starting.
    multiprocessing.Pool would start new workers forever; the store must stop and say why."""
    write_jsonl(tmp_path / "r.jsonl", [{"query": f"query {i}", "pos": [f"positive {i}"]} for i in range(100)])
    (tmp_path / "unguarded.py").write_text(
        "import tpembed.data.store as store\n"
        "store.CHUNK_BYTES = 500\n"
        "store.load_dataset('r.jsonl', 'retrieval', 'r', cache_dir='c', num_proc=2, progress=False)\n"
    )
    result = subprocess.run([sys.executable, "unguarded.py"], cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: the 2 worker processes that validate the data (data.num_proc)"), last
    assert "__main__" in last and "num_proc to 1" in last
    assert not list((tmp_path / "c").glob("r-*")), "no cache is left by a failed build"


def test_a_resumed_run_keeps_its_pinned_version(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"query": f"q{i}", "pos": ["p"]} for i in range(10)])
    first = load_dataset(path, "retrieval", "r", cache_dir=tmp_path / "c", progress=False)
    write_jsonl(path, [{"query": f"new{i}", "pos": ["p"]} for i in range(12)])
    assert store.source_changed(first)
    warnings = []
    kept = load_dataset(path, "retrieval", "r", cache_dir=tmp_path / "c", pinned=first.cache_path,
                        warn=warnings.append, progress=False)  # fmt: skip
    assert len(kept) == 10 and kept.queries[0] == "q0"
    assert "changed since this run started; it keeps the version it started with" in warnings[0]


def test_two_ranks_build_once_and_read_the_same(tmp_path):
    rows = [{"query": f"q{i}", "pos": [f"p{i}"]} for i in range(500)]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", free_port(), str(REPO / "tests" / "workers" / "store_ranks.py"), str(path),
               str(tmp_path / "cache"), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert sum(r["built"] for r in ranks) == 1
    assert ranks[0] == {**ranks[1], "built": ranks[0]["built"]} and ranks[0]["records"] == 500
    assert ranks[0]["last"] == "q499"


def test_labels_are_memory_friendly_ids(tmp_path):
    data = load_dataset(SAMPLES / "cmrc2018_questions_zh.jsonl", "classification", "c", cache_dir=tmp_path,
                        progress=False)  # fmt: skip
    assert isinstance(data.labels, np.ndarray) and data.labels.dtype == np.int32


@pytest.mark.parametrize("task", ["retrieval", "sts"])
def test_records_are_read_from_many_batches_without_mapping_the_files(tmp_path, monkeypatch, task):
    monkeypatch.setattr(store, "CHUNK_BYTES", 300)  # several part files
    monkeypatch.setattr(store, "BATCH_ROWS", 3)  # several record batches in each
    monkeypatch.setattr(store, "MAX_OPEN_PARTS", 2)  # parts are closed and opened again while reading
    if task == "retrieval":
        rows = [{"query": f"q{i} é", "pos": [f"p{i}", "" if i % 4 else f"second {i}"][: 1 + i % 2],
                 "negs": [f"n{i}.{k} 中文" for k in range(i % 3)], **({"instruction": f"ins {i % 2}"} if i % 5 else {})}
                for i in range(40)]  # fmt: skip
    else:
        rows = [{"text1": f"a{i}", "text2": f"b{i}", "score": i / 8, **({"instruction": "x"} if i % 3 else {})}
                for i in range(40)]  # fmt: skip
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    options = {"allow_empty_text": True, "score_range": (0.0, 5.0) if task == "sts" else None}
    data = load_dataset(path, task, "r", cache_dir=tmp_path / "c", progress=False, **options)
    assert len(list(data.cache_path.glob("part-*.arrow"))) > 2
    same(data, read_dataset(path, task, "r", **options))
    assert data.instructions[0] is None
    with pytest.raises(IndexError):
        data.instructions[len(data.instructions)]
    maps = open("/proc/self/maps").read()
    assert str(data.cache_path) not in maps, "values are copied out with pread; no part file stays mapped"
    column = data.queries if task == "retrieval" else data.texts2
    assert list(pickle.loads(pickle.dumps(column))) == list(column), "as a spawned DataLoader worker gets it"
