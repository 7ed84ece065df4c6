"""Reading records: aliases, file types, and errors that name file, line and field."""

import json

import pytest

from tpembed.data import DataError, ReadReport, read_dataset


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def test_retrieval_aliases(tmp_path):
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [
            {"query": "q1", "pos": ["p1", "p1b"], "negs": ["n1"]},
            {"query": "q2", "positive": "p2", "neg": ["n2", ""], "instruction": "own"},
            {"question": "q3", "pos": "p3"},
        ],
    )
    report = ReadReport()
    data = read_dataset(path, "retrieval", "r", report=report)
    assert data.queries == ["q1", "q2", "q3"]
    assert data.positives == [["p1", "p1b"], ["p2"], ["p3"]]
    assert data.negatives == [["n1"], ["n2"], []]
    assert data.instructions == [None, "own", None]
    assert report.dropped_empty_negatives == 1


def test_sts_scores_and_nli_labels(tmp_path):
    path = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"sentence1": "a", "sentence2": "b", "score": 4.5},
            {"premise": "a", "hypothesis": "b", "label": "entailment"},
            {"text1": "a", "text2": "b", "label": "Contradiction"},
            {"text1": "a", "text2": "b", "label": "neutral"},
            {"text1": "a", "text2": "b", "score": 1},
        ],
    )
    data = read_dataset(path, "sts", "s")
    assert data.scores == [4.5, 2.0, 0.0, 1.0, 1.0]
    assert len(data) == 10, "every pair is also used reversed"


def test_classification_drops_singleton_labels(tmp_path):
    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate(["a", "a", "b", "b", "c"])]
    report = ReadReport()
    data = read_dataset(write_jsonl(tmp_path / "c.jsonl", rows), "classification", "c", report=report)
    assert data.texts == ["t0", "t1", "t2", "t3"] and report.dropped_singleton_labels == 1


def test_parquet_and_saved_dataset(tmp_path):
    import datasets

    rows = [{"query": f"q{i}", "pos": [f"p{i}"], "negs": [f"n{i}"]} for i in range(4)]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "r.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "r.parquet", tmp_path / "saved"):
        data = read_dataset(source, "retrieval", "r")
        assert data.queries == [f"q{i}" for i in range(4)] and data.negatives[3] == ["n3"]


@pytest.mark.parametrize(
    "task, rows, line, field, message",
    [
        ("retrieval", ['{"query": "q", "pos": "p"}', '{"query": "q", "pos": '], 2, None, "invalid JSON"),
        ("retrieval", [{"query": "q", "pos": "p"}, {"pos": "p"}], 2, "query", "missing"),
        ("retrieval", [{"query": 3, "pos": "p"}], 1, "query", "expected a string"),
        (
            "retrieval",
            [{"query": "q", "pos": "p"}, {"query": "q", "pos": "p", "negs": [1]}],
            2,
            "negs",
            "list of strings",
        ),
        ("retrieval", [{"query": "", "pos": "p"}], 1, "query", "empty text"),
        ("retrieval", [{"query": "q", "pos": []}], 1, "pos", "empty list"),
        ("sts", [{"text1": "a", "text2": "b", "score": "high"}], 1, "score", "neither a number"),
        ("sts", [{"text1": "a", "text2": "b", "label": "maybe"}], 1, "label", "NLI label"),
        ("classification", [{"text": "a", "label": "x"}, {"text": "b", "label": None}], 2, "label", "missing"),
        ("retrieval", ['["not", "an", "object"]'], 1, None, "expected a JSON object"),
    ],
)
def test_malformed_records_name_file_line_and_field(tmp_path, task, rows, line, field, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as error:
        read_dataset(path, task, "bad")
    text = str(error.value)
    assert f"{path}:{line}" in text
    if field:
        assert f"field '{field}'" in text
    assert message in text


def test_allow_empty_text_keeps_the_record(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"query": "", "pos": "p"}])
    assert read_dataset(path, "retrieval", "e", allow_empty_text=True).queries == [""]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_dataset(tmp_path / "nope.jsonl", "retrieval", "x")


def test_a_file_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"query": "q", "pos": "p"}\n' + '{"query": "café", "pos": "p"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path.name}:2: not UTF-8 text \(byte 0xe9 at column 15\)"):
        read_dataset(path, "retrieval", "x")
