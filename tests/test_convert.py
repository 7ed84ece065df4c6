"""tpembed-convert: raw layouts -> training records that tpembed's own reader accepts.

Expected values are worked out by hand from the inputs written here (or from the first
lines of the real files in shared/data, read in the test), never taken from the output."""

import json

import pytest

from conftest import SHARED_DATA
from tpembed.data.convert import convert, main
from tpembed.data.formats import DataError, read_dataset

ZH_SEPARATOR = "\n请阅读上述文章，回答下列问题："


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def head(tmp_path, relative, lines):
    """The first `lines` lines of a shared/data file, copied into tmp_path."""
    source = SHARED_DATA / relative
    if not source.exists():
        pytest.skip(f"{source} not available")
    target = tmp_path / source.name
    with source.open(encoding="utf-8") as handle:
        target.write_text("".join(next(handle) for _ in range(lines)), encoding="utf-8")
    return target


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of tpembed-convert run in this process."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


NLI_SCORE = {"entailment": 2, "neutral": 1, "contradiction": 0}


# ---- real files -------------------------------------------------------------------------------


def test_snli_pairs_scores_follow_labels(tmp_path, capsys):
    source = head(tmp_path, "snli_en/validation.jsonl", 12)
    rows = read_jsonl(source)
    code, out, _ = cli(capsys, "nli-pairs", source, tmp_path / "pairs.jsonl")
    assert code == 0 and f"wrote {len(rows)} records" in out
    written = read_jsonl(tmp_path / "pairs.jsonl")
    assert [(r["text1"], r["text2"], r["score"]) for r in written] == [
        (row["premise"], row["hypothesis"], NLI_SCORE[row["label"]]) for row in rows
    ]
    assert written[0]["source"] == f"{source}:1"
    data = read_dataset(tmp_path / "pairs.jsonl", "sts", "snli")
    assert data.scores[:3] == [1.0, 2.0, 0.0]  # neutral, entailment, contradiction: first three lines of the file


def test_snli_triplets_first_premise(tmp_path, capsys):
    source = head(tmp_path, "snli_en/validation.jsonl", 30)
    code, out, _ = cli(capsys, "nli-triplets", source, tmp_path / "t.jsonl")
    assert code == 0 and "neutral pair" in out
    first = read_jsonl(tmp_path / "t.jsonl")[0]
    # lines 1-3 of snli validation: one premise with a neutral, an entailed and a contradicting hypothesis
    assert first["query"] == "Two women are embracing while holding to go packages."
    assert first["pos"] == ["Two woman are holding packages."]
    assert first["negs"] == ["The men are fighting outside a deli."]
    data = read_dataset(tmp_path / "t.jsonl", "retrieval", "snli_triplets")
    rows = read_jsonl(source)
    for query, positives, negatives in zip(data.queries, data.positives, data.negatives):
        labels = {row["hypothesis"]: row["label"] for row in rows if row["premise"] == query}
        assert {labels[p] for p in positives} == {"entailment"}
        assert {labels[n] for n in negatives} == {"contradiction"}


def test_stsb_and_lcqmc_pairs_keep_scores(tmp_path, capsys):
    for relative, score_range in (("stsb_en/dev.jsonl", ("0", "5")), ("lcqmc/validation.jsonl", ("0", "1"))):
        source = head(tmp_path, relative, 20)
        target = tmp_path / f"{relative.split('/')[0]}_out.jsonl"
        code, _, _ = cli(capsys, "pairs", source, target, "--score-range", *score_range)
        assert code == 0
        data = read_dataset(target, "sts", relative)
        assert data.scores == [float(row["score"]) for row in read_jsonl(source)]
        assert data.texts1 == [row["sentence1"] for row in read_jsonl(source)]


def test_lcqmc_score_outside_declared_range_is_an_error(tmp_path, capsys):
    source = head(tmp_path, "lcqmc/validation.jsonl", 5)  # line 1 has score 1
    code, _, err = cli(capsys, "pairs", source, tmp_path / "out.jsonl", "--score-range", "0", "0.5")
    assert code == 1 and f"{source}:1: field 'score'" in err and "outside" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_tnews_classification_and_fixed_examples(tmp_path, capsys):
    source = head(tmp_path, "tnews/train.jsonl", 200)
    rows = read_jsonl(source)
    label_of = {row["sentence"]: row["label"] for row in rows}
    assert cli(capsys, "classification", source, tmp_path / "c.jsonl")[0] == 0
    data = read_dataset(tmp_path / "c.jsonl", "classification", "tnews")
    assert len(set(data.texts)) == len(data.texts)
    assert all(label_of[t] == data.label_names[label] for t, label in zip(data.texts, data.labels))
    fixed = tmp_path / "f.jsonl"
    assert cli(capsys, "clustering", source, fixed, "--fixed-examples", "--num-negatives", "3", "--seed", "5")[0] == 0
    examples = read_jsonl(fixed)
    assert len(examples) == len(data)
    for example in examples:
        assert example["pos"][0] != example["query"] and label_of[example["pos"][0]] == example["label"]
        assert len(example["negs"]) == 3 and example["neg_labels"] == [label_of[n] for n in example["negs"]]
        assert example["label"] not in example["neg_labels"]
    read_dataset(fixed, "retrieval", "tnews_fixed")


def test_xquad_beir_directory(tmp_path, capsys):
    beir = SHARED_DATA / "xquad_retrieval" / "en"
    if not beir.exists():
        pytest.skip(f"{beir} not available")
    small = tmp_path / "xquad"
    (small / "qrels").mkdir(parents=True)
    for name, lines in (("queries.jsonl", 3), ("corpus.jsonl", 2), ("qrels/test.tsv", 4)):
        with (beir / name).open(encoding="utf-8") as handle:
            (small / name).write_text("".join(next(handle) for _ in range(lines)), encoding="utf-8")
    code, out, _ = cli(capsys, "beir", small, tmp_path / "b.jsonl", "--split", "test")
    assert code == 0 and "wrote 3 records" in out
    document = read_jsonl(small / "corpus.jsonl")[0]  # enq0..enq2 are all judged relevant to end0
    records = read_jsonl(tmp_path / "b.jsonl")
    assert [r["query"] for r in records] == [q["text"] for q in read_jsonl(small / "queries.jsonl")]
    assert all(r["pos"] == [f"Super_Bowl_50 {document['text']}"] and r["negs"] == [] for r in records)
    assert records[0]["query_id"] == "enq0" and records[0]["pos_ids"] == ["end0"]
    read_dataset(tmp_path / "b.jsonl", "retrieval", "xquad")


def test_cmrc_question_to_paragraph(tmp_path, capsys):
    source = head(tmp_path, "cmrc2018_trial/train.jsonl", 6)
    code, _, _ = cli(capsys, "rc", source, tmp_path / "r.jsonl", "--rc-query", "question", "--context-field", "pos")
    assert code == 0
    data = read_dataset(tmp_path / "r.jsonl", "retrieval", "cmrc")
    rows = read_jsonl(source)
    assert data.queries == [row["query"] for row in rows]
    assert data.positives == [[row["pos"]] for row in rows]


def test_text2vec_flag_import(tmp_path, capsys):
    source = head(tmp_path, "zh_triplets_text2vec/train.jsonl", 4)
    assert cli(capsys, "flag", source, tmp_path / "f.jsonl", "--instruction", "找相似句")[0] == 0
    data = read_dataset(tmp_path / "f.jsonl", "retrieval", "t2v")
    rows = read_jsonl(source)
    assert data.positives == [row["pos"] for row in rows] and data.negatives == [row["neg"] for row in rows]
    assert data.instructions == ["找相似句"] * 4


# ---- NLI ----------------------------------------------------------------------------------------

NLI_ROWS = [
    {"premise": "p", "hypothesis": "entailed", "label": "Entailment"},
    {"premise": "p", "hypothesis": "neutral", "label": "neutral"},
    {"premise": "p", "hypothesis": "contra", "label": "CONTRADICTION"},
    {"sentence1": "q", "sentence2": "h0", "label": 0},
    {"sentence1": "q", "sentence2": "h2", "gold_label": "2"},
    {"premise": "q", "hypothesis": "unlabelled", "label": "-"},
    {"premise": "q", "hypothesis": "unlabelled", "label": -1},
]


def test_nli_pairs_both_directions_exact_scores(tmp_path, capsys):
    source = write_jsonl(tmp_path / "nli.jsonl", NLI_ROWS)
    code, out, _ = cli(capsys, "nli-pairs", source, tmp_path / "both.jsonl", "--both-directions")
    assert code == 0 and "skipped 1: no gold label ('-')" in out and "skipped 1: no gold label (-1)" in out
    got = [(r["text1"], r["text2"], r["score"], r.get("reversed", False)) for r in read_jsonl(tmp_path / "both.jsonl")]
    assert got == [
        ("p", "entailed", 2, False),
        ("entailed", "p", 2, True),
        ("p", "neutral", 1, False),
        ("neutral", "p", 1, True),
        ("p", "contra", 0, False),
        ("contra", "p", 0, True),
        ("q", "h0", 2, False),  # integer 0 = entailment (Hugging Face snli / mnli)
        ("h0", "q", 2, True),
        ("q", "h2", 0, False),  # "2" = contradiction
        ("h2", "q", 0, True),
    ]
    assert len(read_dataset(tmp_path / "both.jsonl", "sts", "nli")) == 20  # tpembed swaps each again


def test_nli_pairs_default_one_direction_and_int_label_order(tmp_path, capsys):
    source = write_jsonl(tmp_path / "nli.jsonl", NLI_ROWS[3:5])
    assert cli(capsys, "nli-pairs", source, tmp_path / "one.jsonl")[0] == 0
    assert [(r["text1"], r["score"]) for r in read_jsonl(tmp_path / "one.jsonl")] == [("q", 2), ("q", 0)]
    order = "contradiction,neutral,entailment"
    assert cli(capsys, "nli-pairs", source, tmp_path / "swapped.jsonl", "--int-labels", order)[0] == 0
    assert [r["score"] for r in read_jsonl(tmp_path / "swapped.jsonl")] == [0, 2]
    assert cli(capsys, "nli-pairs", source, tmp_path / "bad.jsonl", "--int-labels", "yes,no")[0] == 2


def test_nli_triplets_grouping(tmp_path, capsys):
    rows = [
        {"premise": "A", "hypothesis": "a+", "label": "entailment"},
        {"premise": "B", "hypothesis": "b+", "label": "entailment"},
        {"premise": "A", "hypothesis": "a-", "label": "contradiction"},
        {"premise": "C", "hypothesis": "c-", "label": "contradiction"},
        {"premise": "A", "hypothesis": "a+2", "label": 0},
        {"premise": "A", "hypothesis": "a?", "label": "neutral"},
        {"premise": "A", "hypothesis": "a+", "label": "entailment"},
        {"premise": "D", "hypothesis": "  ", "label": "entailment"},
    ]
    source = write_jsonl(tmp_path / "nli.jsonl", rows)
    code, out, _ = cli(capsys, "nli-triplets", source, tmp_path / "t.jsonl")
    assert code == 0
    assert read_jsonl(tmp_path / "t.jsonl") == [
        {"query": "A", "pos": ["a+", "a+2"], "negs": ["a-"], "source": f"{source}:1"}
    ]
    assert f"skipped 1: premise without a contradiction (see --keep-without-negatives) (first: {source}:2)" in out
    assert f"skipped 1: premise without an entailment (first: {source}:4)" in out
    assert "skipped 1: duplicate text within a group" in out and "skipped 1: neutral pair" in out
    assert f"skipped 1: empty text in 'hypothesis' (first: {source}:8)" in out
    assert cli(capsys, "nli-triplets", source, tmp_path / "k.jsonl", "--keep-without-negatives")[0] == 0
    kept = read_dataset(tmp_path / "k.jsonl", "retrieval", "k")
    assert kept.queries == ["A", "B"] and kept.negatives == [["a-"], []]


# ---- scored pairs -------------------------------------------------------------------------------


def test_pairs_scores_validated(tmp_path, capsys):
    rows = [
        {"text1": "a", "text2": "b", "score": 4.25},
        {"sentence1": "a", "sentence2": "b", "label": True},
        {"sentence1": "a", "sentence2": "b", "score": "3.5"},
    ]
    source = write_jsonl(tmp_path / "s.jsonl", rows)
    code, _, err = cli(capsys, "sts", source, tmp_path / "s_out.jsonl", "--score-range", "2", "5")
    assert code == 1 and f"{source}:2: field 'label': score 1 is outside" in err  # True counts as 1
    assert cli(capsys, "pairs", source, tmp_path / "s_out.jsonl")[0] == 0
    assert read_dataset(tmp_path / "s_out.jsonl", "sts", "s").scores == [4.25, 1.0, 3.5]
    for bad, problem in (("nan", "not finite"), ("entailment", "nli-pairs"), (None, "expected a number")):
        source = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"text1": "a", "text2": "b", "score": bad}])
        code, _, err = cli(capsys, "pairs", source, tmp_path / "bad_out.jsonl")
        assert code == 1 and f"{source}:2: field 'score'" in err and problem in err


# ---- question answering, title-body, claims, reading comprehension -------------------------------------


def test_qa_pairs_and_chat_turns(tmp_path, capsys):
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "user", "content": "u3"},
        {"role": "assistant", "content": "a3"},
        {"role": "user", "content": "u4"},
    ]
    sharegpt = [{"from": "human", "value": "h1"}, {"from": "gpt", "value": "g1"}]
    rows = [{"question": "q?", "answer": "yes"}, {"messages": chat}, {"conversations": sharegpt}]
    source = write_jsonl(tmp_path / "qa.jsonl", rows)
    code, out, _ = cli(capsys, "qa", source, tmp_path / "qa_out.jsonl")
    assert code == 0 and "skipped 2: user turn not followed by an assistant turn" in out  # u2, u4
    written = read_jsonl(tmp_path / "qa_out.jsonl")
    assert [(r["query"], r["pos"]) for r in written] == [
        ("q?", ["yes"]),
        ("u1", ["a1"]),
        ("u3", ["a3"]),
        ("h1", ["g1"]),
    ]
    assert [r.get("turn") for r in written] == [None, 1, 4, 0]
    read_dataset(tmp_path / "qa_out.jsonl", "retrieval", "qa")


def test_title_body(tmp_path, capsys):
    rows = [{"title": "T1", "abstract": "B1"}, {"headline": "T2", "body": "B2"}, {"title": "T3", "abstract": ""}]
    source = write_jsonl(tmp_path / "tb.jsonl", rows)
    code, out, _ = cli(capsys, "title-body", source, tmp_path / "tb_out.jsonl", "--instruction", "find the paper")
    assert code == 0 and f"skipped 1: empty text in 'abstract' (first: {source}:3)" in out
    data = read_dataset(tmp_path / "tb_out.jsonl", "retrieval", "tb")
    assert data.queries == ["T1", "T2"] and data.positives == [["B1"], ["B2"]]
    assert data.instructions == ["find the paper"] * 2


def test_claims_verdicts(tmp_path, capsys):
    rows = [
        {"claim": "c1", "evidence": "s1", "label": "SUPPORTS"},
        {"claim": "c1", "evidence": "r1", "label": "refutes"},
        {"claim": "c2", "evidence": "r2", "label": "REFUTES"},
        {"claim": "c1", "evidence": ["s2", "s3"], "verdict": "Supports"},
        {"claim": "c3", "evidence": "x", "label": "NOT ENOUGH INFO"},
        {"claim": "c4", "evidence": "s4", "label": "supports"},
    ]
    source = write_jsonl(tmp_path / "claims.jsonl", rows)
    code, out, _ = cli(capsys, "claims", source, tmp_path / "c.jsonl")
    assert code == 0
    assert [(r["query"], r["pos"], r["negs"]) for r in read_jsonl(tmp_path / "c.jsonl")] == [
        ("c1", ["s1", "s2", "s3"], ["r1"]),
        ("c4", ["s4"], []),
    ]
    assert f"skipped 1: claim without supporting evidence (first: {source}:3)" in out
    assert f"skipped 1: NOT ENOUGH INFO evidence (not used) (first: {source}:5)" in out
    read_dataset(tmp_path / "c.jsonl", "retrieval", "claims")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"claim": "c", "evidence": "e", "label": "maybe"}])
    code, _, err = cli(capsys, "claims", bad, tmp_path / "bad_out.jsonl")
    assert code == 1 and f"{bad}:1: field 'label'" in err


def test_reading_comprehension_query_text(tmp_path, capsys):
    rows = [
        {"context": "文章。", "question": "问题？", "answer": "答案"},
        {
            "context": "Passage.",
            "question": "Who?",
            "answers": {"text": ["Ann", "Ann", "Bo"], "answer_start": [0, 0, 4]},
        },
    ]
    source = write_jsonl(tmp_path / "rc.jsonl", rows)
    assert cli(capsys, "rc", source, tmp_path / "zh.jsonl")[0] == 0
    zh = read_jsonl(tmp_path / "zh.jsonl")
    assert zh[0]["query"] == "文章。\n请阅读上述文章，回答下列问题：问题？" and zh[0]["pos"] == ["答案"]
    assert zh[1]["query"] == "Passage." + ZH_SEPARATOR + "Who?" and zh[1]["pos"] == ["Ann", "Bo"]
    assert cli(capsys, "rc", source, tmp_path / "en.jsonl", "--language", "en")[0] == 0
    assert (
        read_jsonl(tmp_path / "en.jsonl")[1]["query"]
        == "Passage.\nRead the passage above and answer the question: Who?"
    )
    assert cli(capsys, "rc", source, tmp_path / "own.jsonl", "--rc-separator", "\\nQ: ")[0] == 0
    assert read_jsonl(tmp_path / "own.jsonl")[1]["query"] == "Passage.\nQ: Who?"
    assert cli(capsys, "rc", source, tmp_path / "q.jsonl", "--rc-query", "question")[0] == 0
    data = read_dataset(tmp_path / "q.jsonl", "retrieval", "rc")
    assert data.queries == ["问题？", "Who?"] and data.positives == [["文章。"], ["Passage."]]


# ---- classification -----------------------------------------------------------------------------


def test_classification_drops_singletons_and_duplicates(tmp_path, capsys):
    rows = [
        {"text": "x1", "label": "a"},
        {"text": "x2", "label": "a"},
        {"text": "x1", "label": "a"},
        {"text": "x2", "label": "b"},
        {"text": "y1", "category": 7},
        {"text": "y2", "category": 7},
        {"text": "z1", "label": "c"},
    ]
    source = write_jsonl(tmp_path / "c.jsonl", rows)
    code, out, _ = cli(capsys, "classification", source, tmp_path / "c_out.jsonl")
    assert code == 0
    assert [(r["text"], r["label"]) for r in read_jsonl(tmp_path / "c_out.jsonl")] == [
        ("x1", "a"),
        ("x2", "a"),
        ("y1", "7"),
        ("y2", "7"),
    ]
    assert f"skipped 1: duplicate text (first: {source}:3)" in out
    assert f"skipped 1: duplicate text with another label (first kept) (first: {source}:4)" in out
    assert f"skipped 1: only text of its label (first: {source}:7)" in out
    read_dataset(tmp_path / "c_out.jsonl", "classification", "c")
    one_label = write_jsonl(tmp_path / "one.jsonl", rows[:2])
    code, _, err = cli(capsys, "classification", one_label, tmp_path / "one_out.jsonl")
    assert code == 1 and "needs two" in err and not (tmp_path / "one_out.jsonl").exists()


def test_fixed_examples_reproducible_and_label_correct(tmp_path, capsys):
    rows = [{"text": f"{label}{i}", "label": label} for label in "abcd" for i in range(5)]
    source = write_jsonl(tmp_path / "c.jsonl", rows)

    def examples(name, seed, k="4"):
        argv = ["classification", source, tmp_path / name, "--fixed-examples", "--num-negatives", k, "--seed", seed]
        assert cli(capsys, *argv)[0] == 0
        return (tmp_path / name).read_text()

    first, again, other = examples("s1.jsonl", "1"), examples("s1b.jsonl", "1"), examples("s2.jsonl", "2")
    assert first == again and first != other
    records = read_jsonl(tmp_path / "s1.jsonl")
    assert [r["query"] for r in records] == [row["text"] for row in rows]
    for record in records:
        label = record["query"][0]  # each text starts with its label
        assert record["label"] == label
        assert record["pos"][0] != record["query"] and record["pos"][0][0] == label
        assert len(set(record["negs"])) == 4 and all(n[0] != label for n in record["negs"])
        assert record["neg_labels"] == [n[0] for n in record["negs"]]
    many = json.loads(examples("k.jsonl", "0", k="100").splitlines()[0])
    assert len(many["negs"]) == 15  # every text of the three other labels, each once
    assert cli(capsys, "classification", source, tmp_path / "x.jsonl", "--seed", "3")[0] == 2


# ---- BEIR ---------------------------------------------------------------------------------------


def make_beir(root, qrels_lines):
    (root / "qrels").mkdir(parents=True)
    write_jsonl(
        root / "corpus.jsonl",
        [
            {"_id": "d1", "title": "T", "text": "one"},
            {"_id": "d2", "title": "", "text": "two"},
            {"_id": 3, "text": "x"},
        ],
    )
    write_jsonl(root / "queries.jsonl", [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}])
    (root / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{line}\n" for line in qrels_lines)
    )
    return root


def test_beir_titles_scores_and_missing_documents(tmp_path, capsys):
    beir = make_beir(tmp_path / "beir", ["q1\td1\t1", "q1\td2\t2", "q1\t3\t0", "q2\td2\t0"])
    code, out, _ = cli(capsys, "beir", beir, tmp_path / "b.jsonl")
    assert code == 0 and f"skipped 1: query without a positive in train.tsv (first: {beir / 'queries.jsonl'}:2)" in out
    assert read_jsonl(tmp_path / "b.jsonl") == [
        {
            "query": "first",
            "pos": ["T one", "two"],  # title + " " + text; an empty title adds nothing
            "negs": [],
            "source": f"{beir / 'queries.jsonl'}:1",
            "query_id": "q1",
            "pos_ids": ["d1", "d2"],
        }
    ]
    assert cli(capsys, "beir", beir, tmp_path / "nt.jsonl", "--no-title")[0] == 0
    assert read_jsonl(tmp_path / "nt.jsonl")[0]["pos"] == ["one", "two"]
    broken = make_beir(tmp_path / "broken", ["q1\td1\t1", "q2\tgone\t1"])
    code, _, err = cli(capsys, "beir", broken, tmp_path / "x.jsonl")
    assert code == 1 and f"{broken / 'qrels' / 'train.tsv'}:3: field 'corpus-id'" in err and "'gone'" in err
    assert not (tmp_path / "x.jsonl").exists()
    code, out, _ = cli(capsys, "beir", broken, tmp_path / "x.jsonl", "--skip-invalid")
    assert code == 0 and "wrote 1 records" in out and "invalid record: field 'corpus-id'" in out
    assert cli(capsys, "beir", broken, tmp_path / "y.jsonl", "--split", "dev")[0] == 1


# ---- imports ------------------------------------------------------------------------------------


def test_sentence_transformers_columns(tmp_path, capsys):
    rows = [
        {"anchor": "a", "positive": "p", "negative_10": "n10", "negative_2": "n2", "negative_1": "n1"},
        {"anchor": "b", "positive": "q", "negative": "m"},
        {"anchor": "c", "positive": "r"},
    ]
    source = write_jsonl(tmp_path / "st.jsonl", rows)
    assert cli(capsys, "st", source, tmp_path / "st_out.jsonl")[0] == 0
    data = read_dataset(tmp_path / "st_out.jsonl", "retrieval", "st")
    assert data.queries == ["a", "b", "c"] and data.positives == [["p"], ["q"], ["r"]]
    assert data.negatives == [["n1", "n2", "n10"], ["m"], []]
    pairs = write_jsonl(tmp_path / "stp.jsonl", [{"sentence1": "x", "sentence2": "y", "score": 0.8}])
    assert cli(capsys, "st", pairs, tmp_path / "stp_out.jsonl", "--both-directions")[0] == 0
    data = read_dataset(tmp_path / "stp_out.jsonl", "sts", "stp")
    assert data.texts1 == ["x", "y"] and data.texts2 == ["y", "x"] and data.scores == [0.8, 0.8]


def test_flagembedding_prompt_becomes_instruction(tmp_path, capsys):
    rows = [
        {"query": "q1", "pos": ["p1"], "neg": ["n1", ""], "prompt": "own prompt", "pos_scores": [1.0]},
        {"query": "q2", "pos": ["p2"], "neg": []},
    ]
    source = write_jsonl(tmp_path / "flag.jsonl", rows)
    code, out, _ = cli(capsys, "flag", source, tmp_path / "f.jsonl", "--instruction", "default")
    assert code == 0 and f"skipped 1: empty texts dropped from 'neg' (record kept) (first: {source}:1)" in out
    data = read_dataset(tmp_path / "f.jsonl", "retrieval", "flag")
    assert data.negatives == [["n1"], []] and data.instructions == ["own prompt", "default"]


def test_tevatron_passages(tmp_path, capsys):
    rows = [
        {
            "query_id": 7,
            "query": "q",
            "positive_passages": [{"docid": "d1", "title": "Title", "text": "pos"}, {"docid": "d0", "text": ""}],
            "negative_passages": [{"docid": "d2", "title": "", "text": "neg"}],
        },
        {"query": "r", "positive_passages": [{"docid": "d3", "title": "", "text": ""}]},
    ]
    source = write_jsonl(tmp_path / "tev.jsonl", rows)
    code, out, _ = cli(capsys, "tevatron", source, tmp_path / "t.jsonl")
    assert code == 0 and f"skipped 1: no non-empty text in 'positive_passages' (first: {source}:2)" in out
    written = read_jsonl(tmp_path / "t.jsonl")
    assert [(r["query"], r["pos"], r["negs"], r["query_id"], r["pos_ids"]) for r in written] == [
        ("q", ["Title pos"], ["neg"], "7", ["d1"])
    ]
    read_dataset(tmp_path / "t.jsonl", "retrieval", "tev")


# ---- errors, skipping, targets ------------------------------------------------------------------------


def test_malformed_record_names_file_line_and_field(tmp_path, capsys):
    rows = [{"question": "q", "answer": "a"}, {"question": "q2", "answer": 3}, {"answer": "a3"}]
    source = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DataError) as error:
        convert("qa", source, tmp_path / "out.jsonl")
    assert f"{source}:2: field 'answer'" in str(error.value) and "expected a string" in str(error.value)
    code, _, err = cli(capsys, "qa", source, tmp_path / "out.jsonl")
    assert code == 1 and f"{source}:2: field 'answer'" in err and "Traceback" not in err
    code, out, _ = cli(capsys, "qa", source, tmp_path / "out.jsonl", "--skip-invalid")
    assert code == 0 and "wrote 1 records" in out
    answer_problem = "field 'answer': expected a string or a list of strings, got int"
    assert f"skipped 1: invalid record: {answer_problem} (first: {source}:2)" in out
    question_problem = "field 'question': missing (accepted names: question, query, prompt)"
    assert f"skipped 1: invalid record: {question_problem} (first: {source}:3)" in out


def test_invalid_json_stops_even_with_skip_invalid(tmp_path, capsys):
    source = write_jsonl(tmp_path / "bad.jsonl", [{"title": "t", "body": "b"}, "{not json"])
    code, _, err = cli(capsys, "title-body", source, tmp_path / "out.jsonl", "--skip-invalid")
    assert code == 1 and f"{source}:2" in err and "invalid JSON" in err


def test_failure_at_line_3_leaves_no_target(tmp_path, capsys):
    rows = [{"premise": "p", "hypothesis": "h", "label": "entailment"}] * 2 + [{"premise": "p", "label": "neutral"}]
    source = write_jsonl(tmp_path / "nli.jsonl", rows)
    code, _, err = cli(capsys, "nli-pairs", source, tmp_path / "out" / "pairs.jsonl")
    assert code == 1 and f"{source}:3: field 'hypothesis'" in err
    assert list((tmp_path / "out").iterdir()) == []  # neither the target nor a partial file


def test_existing_target_refused_without_overwrite(tmp_path, capsys):
    source = write_jsonl(tmp_path / "tb.jsonl", [{"title": "t", "body": "b"}])
    target = tmp_path / "out.jsonl"
    target.write_text("keep me\n")
    code, _, err = cli(capsys, "title-body", source, target)
    assert code == 2 and "--overwrite" in err and target.read_text() == "keep me\n"
    assert cli(capsys, "title-body", source, target, "--overwrite", "--no-provenance")[0] == 0
    assert read_jsonl(target) == [{"query": "t", "pos": ["b"], "negs": []}]


def test_empty_texts_skipped_and_nothing_to_write_is_an_error(tmp_path, capsys):
    source = write_jsonl(tmp_path / "e.jsonl", [{"question": " ", "answer": "a"}, {"question": "q", "answer": ""}])
    code, _, err = cli(capsys, "qa", source, tmp_path / "out.jsonl")
    assert code == 1 and "nothing to write" in err and "empty text in 'question'" in err
    assert "no non-empty text in 'answer'" in err and not (tmp_path / "out.jsonl").exists()


def test_usage_errors_exit_2(tmp_path, capsys):
    assert cli(capsys, "pairs", tmp_path / "missing.jsonl", tmp_path / "o.jsonl")[0] == 2
    assert cli(capsys, "no-such-kind", tmp_path, tmp_path / "o.jsonl")[0] == 2
    source = write_jsonl(tmp_path / "s.jsonl", [{"text1": "a", "text2": "b", "score": 1}])
    assert cli(capsys, "beir", source, tmp_path / "o.jsonl")[0] == 2
    assert cli(capsys, "pairs", source, tmp_path / "o.jsonl", "--one-direction", "--both-directions")[0] == 2
    assert cli(capsys, "--help")[0] == 0


def test_convert_function_takes_options_by_python_name(tmp_path):
    beir = make_beir(tmp_path / "beir", ["q1\td1\t1"])
    report = convert("beir", beir, tmp_path / "b.jsonl", no_title=True)
    assert report.written == 1 and read_jsonl(tmp_path / "b.jsonl")[0]["pos"] == ["one"]
    with pytest.raises(TypeError):
        convert("beir", beir, tmp_path / "c.jsonl", no_such_option=True)
    with pytest.raises(ValueError):
        convert("nope", beir, tmp_path / "c.jsonl")
