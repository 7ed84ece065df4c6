"""Decontamination: planted overlaps with evaluation data are all found, and nothing else."""

import json
import sys
import types

import pytest

from conftest import SHARED_DATA
from tpembed.data.decontaminate import (
    REPORT_NAME,
    SUMMARY_NAME,
    Decontaminator,
    EvalText,
    NormalizedText,
    decontaminate,
    main,
    ngrams,
    normalize,
)
from tpembed.data.formats import DataError, read_dataset

FESTIVAL = (
    "The committee announced on Tuesday that the annual river festival will be postponed "
    "until the flood waters recede completely."
)  # 19 words: long enough for word 13-grams
PARK_ZH = "北京市政府今天宣布将在明年春天全面开放城市北部新建的大型森林公园供市民免费游览"  # 39 characters
WALK_ZH = "今天天气很好，我们去公园散步吧。"
GLACIER = (
    "Glaciers form where the accumulation of snow and ice exceeds ablation over many years, "
    "often centuries, slowly compressing the snow into dense glacial ice."
)
STS_DEV = [
    {"sentence1": "A man is playing a large flute.", "sentence2": "A man is playing a flute.", "score": 3.8},
    {"sentence1": FESTIVAL, "sentence2": "The river festival was delayed because of flooding.", "score": 4.2},
    {"sentence1": PARK_ZH, "sentence2": "北京将免费开放新的森林公园", "score": 4.0},
    {"sentence1": "Three dogs are running through the snow.", "sentence2": "Dogs run in the snow.", "score": 4.5},
    {"sentence1": WALK_ZH, "sentence2": "天气不错，一起去公园走走。", "score": 4.0},
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def eval_sources(tmp_path):
    """An STS dev file (one English pair long enough for n-grams, two Chinese pairs) and a tiny BEIR dir."""
    sts = write_jsonl(tmp_path / "eval" / "sts_dev.jsonl", STS_DEV)
    beir = tmp_path / "eval" / "beir"
    write_jsonl(
        beir / "corpus.jsonl",
        [
            {"_id": "d1", "title": "Glacier", "text": GLACIER},
            {"_id": "d2", "title": "Volcano", "text": "Magma rises through cracks in the crust until it erupts."},
        ],
    )
    write_jsonl(
        beir / "queries.jsonl",
        [
            {"_id": "q1", "text": "How do glaciers form over centuries?"},
            {"_id": "q2", "text": "Why do volcanoes erupt?"},
        ],
    )
    return [sts, beir]


def clean_retrieval(i):
    return {
        "query": f"what is the capital of region number {i}",
        "pos": [f"Region {i} has its capital in a small harbour town."],
        "negs": [f"Region {i + 1} is known for its mountains.", "Bananas are rich in potassium."],
    }


# (record, expected): (field, rule, eval ref suffix) for a planted overlap, None for a clean record
RETRIEVAL_ROWS = [
    (clean_retrieval(0), None),
    ({**clean_retrieval(1), "query": "A man is playing a large flute."}, ("query", "exact", "sts_dev.jsonl:1")),
    (
        {
            **clean_retrieval(2),
            "pos": [
                "  the COMMITTEE announced on tuesday, that the annual river festival   "
                "will be postponed until the flood-waters recede completely!! "
            ],
        },
        ("pos[0]", "exact", "sts_dev.jsonl:2"),  # case, spaces, punctuation ("flood-waters" too)
    ),
    (
        {**clean_retrieval(3), "pos": ["「今天天气很好」，我们去公园散步吧！"]},
        ("pos[0]", "exact", "sts_dev.jsonl:5"),
    ),
    (
        {
            **clean_retrieval(4),
            "negs": [
                "Bananas are rich in potassium.",
                f"Local news roundup. {FESTIVAL} Residents were asked to avoid the riverbank for now.",
            ],
        },
        ("negs[1]", "ngram", "sts_dev.jsonl:2"),
    ),
    (
        {**clean_retrieval(5), "pos": [f"据报道，{PARK_ZH}，预计每天将接待数万名游客。"]},
        ("pos[0]", "ngram", "sts_dev.jsonl:3"),
    ),
    (
        {**clean_retrieval(6), "pos": [f"From the encyclopedia: {GLACIER} Ice then flows downhill under gravity."]},
        ("pos[0]", "ngram", "beir/corpus:d1"),
    ),
    # near misses: a few shared words; 12 shared words (not 13); 19 shared Chinese characters (not 20);
    # one character changed in a short Chinese sentence; an eval sentence only as the instruction;
    # another question about glaciers
    ({**clean_retrieval(7), "query": "A man is playing a guitar on the stage."}, None),
    (
        {
            **clean_retrieval(8),
            "pos": ["A committee announced on Tuesday that the annual river festival will be postponed indefinitely."],
        },
        None,
    ),
    ({**clean_retrieval(9), "pos": ["据说北京市政府今天宣布将在明年春天全面开放一座新的博物馆"]}, None),
    ({**clean_retrieval(10), "negs": ["上海将免费开放新的森林公园"]}, None),
    ({**clean_retrieval(11), "instruction": "A man is playing a flute."}, None),
    ({**clean_retrieval(12), "pos": ["How do glaciers form in the Alps?"]}, None),
]
STS_ROWS = [
    ({"sentence1": "Two cats sleep on a sofa.", "sentence2": "Cats are sleeping.", "score": 4.0}, None),
    (
        {"sentence1": "A child eats an apple.", "sentence2": "  three DOGS are running through the snow ", "score": 1},
        ("sentence2", "exact", "sts_dev.jsonl:4"),
    ),
    (
        {"text1": "How do glaciers form over centuries", "text2": "Ice forms slowly.", "score": 3.0},
        ("text1", "exact", "beir/queries:q1"),
    ),
    ({"premise": "三只狗在雪地里奔跑", "hypothesis": "狗在跑", "label": "entailment"}, None),
    ({"sentence1": "Dogs run in the park.", "sentence2": "A dog runs.", "score": 3.5}, None),
]
CLASSIFICATION_ROWS = [
    ({"text": "Stocks rallied on Monday.", "label": "finance"}, None),
    ({"text": "The team won the final.", "label": "sports"}, None),
    ({"text": "Why do volcanoes erupt?", "label": "science"}, ("text", "exact", "beir/queries:q2")),
    ({"text": "Bond yields fell sharply.", "label": "finance"}, None),
    ({"text": "The striker scored twice.", "label": "sports"}, None),
]


@pytest.fixture
def train_files(tmp_path):
    files = {}
    for name, rows in (("retrieval", RETRIEVAL_ROWS), ("sts", STS_ROWS), ("classification", CLASSIFICATION_ROWS)):
        files[name] = write_jsonl(tmp_path / "train" / f"{name}.jsonl", [record for record, _ in rows])
    return files


def test_planted_overlaps_are_all_found_and_nothing_else(tmp_path, eval_sources, train_files):
    out = tmp_path / "out"
    summary = decontaminate(list(train_files.values()), eval_sources, out)
    report = read_jsonl(out / REPORT_NAME)
    found = {line["source"]: line for line in report}
    assert len(found) == len(report), "one report line per removed record"
    planted = {}
    for name, rows in (("retrieval", RETRIEVAL_ROWS), ("sts", STS_ROWS), ("classification", CLASSIFICATION_ROWS)):
        for number, (_, expected) in enumerate(rows, start=1):
            if expected is not None:
                planted[f"{train_files[name]}:{number}"] = expected
    assert set(found) == set(planted)
    for source, (field, rule, eval_ref) in planted.items():
        line = found[source]
        assert (line["field"], line["rule"], line["action"]) == (field, rule, "record"), source
        assert line["eval"].endswith(eval_ref), (source, line["eval"])
        assert line["train_text"] and line["eval_text"]
    for name, rows in (("retrieval", RETRIEVAL_ROWS), ("sts", STS_ROWS), ("classification", CLASSIFICATION_ROWS)):
        kept = [record for record, expected in rows if expected is None]
        assert read_jsonl(out / f"{name}.jsonl") == kept, "kept records unchanged and in order"
    assert summary.records_removed == len(planted) and summary.records_read == 23
    assert summary.records_kept == 23 - len(planted)
    saved = json.loads((out / SUMMARY_NAME).read_text())
    assert saved["removed_by_rule"] == {"exact": 6, "ngram": 3, "minhash": 0}
    assert saved["removed_by_eval_set"] == {str(eval_sources[0]): 6, str(eval_sources[1]): 3}


def test_outputs_are_readable_training_data(tmp_path, eval_sources, train_files):
    decontaminate(list(train_files.values()), eval_sources, tmp_path / "out")
    assert len(read_dataset(tmp_path / "out" / "retrieval.jsonl", "retrieval", "r")) == 7
    assert len(read_dataset(tmp_path / "out" / "sts.jsonl", "sts", "s")) == 2 * 3
    assert len(read_dataset(tmp_path / "out" / "classification.jsonl", "classification", "c")) == 4


def test_drop_field_only_keeps_the_record_without_the_negative(tmp_path, eval_sources):
    records = [
        {"query": "q", "pos": ["p"], "negs": ["n0", f"News: {FESTIVAL} More later.", "n2"], "instruction": "i"},
        {"query": "Why do volcanoes erupt?", "pos": ["p"], "negs": [f"News: {FESTIVAL} More later."]},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    summary = decontaminate([train], eval_sources, tmp_path / "out", drop_field_only=True)
    assert read_jsonl(tmp_path / "out" / "train.jsonl") == [{**records[0], "negs": ["n0", "n2"]}]
    report = read_jsonl(tmp_path / "out" / REPORT_NAME)
    assert [(r["source"], r["field"], r["rule"], r["action"]) for r in report] == [
        (f"{train}:1", "negs[1]", "ngram", "field"),
        (f"{train}:2", "query", "exact", "record"),
    ]
    assert (summary.records_kept, summary.records_removed, summary.negatives_dropped) == (1, 1, 1)


def test_normalize():
    assert normalize("  Hello,   WORLD!! ") == "hello world"
    assert normalize("end.Start") == normalize("end. start") == "end start"
    assert normalize("ＡＢＣ　ｄｅｆ") == "abc def", "NFKC folds full-width letters and spaces"
    assert normalize("「你好」，世界。") == normalize("你好 世界") == "你好世界"
    assert normalize("I love 北京 very much") == "i love北京very much"
    assert normalize("...!?") == ""


def test_ngrams_words_characters_and_mixed_text():
    words = NormalizedText.of(" ".join(f"w{i}" for i in range(15)))
    assert not words.cjk and list(ngrams(words)) == [tuple(f"w{i}" for i in range(s, s + 13)) for s in range(3)]
    assert list(ngrams(NormalizedText.of(" ".join(f"w{i}" for i in range(12))))) == [], "shorter than n: none"
    chinese = NormalizedText.of(PARK_ZH)
    assert chinese.cjk and list(ngrams(chinese)) == [tuple(PARK_ZH[s : s + 20]) for s in range(len(PARK_ZH) - 19)]
    # a Latin word inside Chinese text is one unit: a shared name is not 20 shared characters
    name = NormalizedText.of("惠普公司(Hewlett-PackardCo.)")
    assert name.tokens == ("惠", "普", "公", "司", "hewlett", "packardco") and list(ngrams(name)) == []
    # an English sentence quoted inside a Chinese passage still yields word n-grams
    mixed = NormalizedText.of(f"他说：{FESTIVAL}然后离开了会议室去吃午饭了我们都很惊讶因为这件事情很重要")
    assert mixed.cjk and tuple(normalize(FESTIVAL).split()[:13]) in set(ngrams(mixed))


def test_match_rules_and_short_texts():
    index = Decontaminator(
        [EvalText("e:1", "sentence1", FESTIVAL, "e"), EvalText("e:2", "sentence1", "A man plays a flute.", "e")]
    )
    assert index.match("a MAN plays a flute").rule == "exact"
    match = index.match(f"Intro. {FESTIVAL} Outro.")
    assert (match.rule, match.eval_text.ref) == ("ngram", "e:1")
    assert index.match("Yesterday a man plays a flute on the street.") is None, "shorter than 13 words: exact only"
    assert index.match("") is None and index.match("!!!") is None
    assert len(index) == 2


def test_minhash_finds_near_duplicates_only(tmp_path):
    original = (
        "On a cold morning in early December the old fisherman carried his heavy wooden boat down to the grey "
        "water, checked every knot of his nets twice, and rowed slowly out past the harbour lights toward the "
        "deep channel where the herring gathered before the winter storms arrived from the north."
    )
    # a short word changed every 7-12 words: no 13-gram survives, true shingle Jaccard 0.82
    changed = original
    for old, new in [("the old", "an old"), ("the grey", "a grey"), ("his nets", "the nets")]:
        changed = changed.replace(old, new)
    for old, new in [("the harbour", "a harbour"), ("the herring", "a herring")]:
        changed = changed.replace(old, new)
    unrelated = "Quarterly revenue grew by eight percent while operating costs stayed flat across all regions."
    without = Decontaminator([EvalText("e:1", "text", original, "e")])
    assert without.match(changed) is None
    index = Decontaminator([EvalText("e:1", "text", original, "e")], minhash_threshold=0.7)
    match = index.match(changed)
    assert match.rule == "minhash" and 0.7 <= match.similarity < 1.0
    assert index.match(unrelated) is None
    again = Decontaminator([EvalText("e:1", "text", original, "e")], minhash_threshold=0.7)
    assert again.match(changed).similarity == match.similarity, "fixed seed: reproducible"


def test_existing_output_refused_without_overwrite(tmp_path, eval_sources, train_files, capsys):
    argv = [str(train_files["sts"]), "--eval", *map(str, eval_sources), "--output-dir", str(tmp_path / "o")]
    assert main([*argv, "--no-progress"]) == 0
    assert "removed by rule" in capsys.readouterr().out
    before = (tmp_path / "o" / "sts.jsonl").read_text()
    assert main([*argv, "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--no-progress", "--overwrite"]) == 0
    assert (tmp_path / "o" / "sts.jsonl").read_text() == before


def test_malformed_training_line_names_file_and_line(tmp_path, eval_sources, capsys):
    train = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "pos": ["p"]}, '{"query": "q", "pos": '])
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        decontaminate([train], eval_sources, tmp_path / "out")
    assert not (tmp_path / "out" / "bad.jsonl").exists() and not (tmp_path / "out" / REPORT_NAME).exists()
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"query": "q", "pos": [{"text": "p"}]}])
    argv = [str(wrong), "--eval", str(eval_sources[0]), "--output-dir", str(tmp_path / "o2"), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "wrong.jsonl:1: field 'pos'" in err and "Traceback" not in err


def test_mteb_option_without_mteb_names_the_extra(tmp_path, train_files, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mteb", None)  # makes `import mteb` fail
    argv = [str(train_files["sts"]), "--mteb-task", "STSBenchmark", "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "pip install 'tpembed[mteb]'" in capsys.readouterr().err


def test_mteb_task_texts_come_from_its_evaluation_splits(tmp_path, train_files, monkeypatch):
    task = types.SimpleNamespace(
        metadata=types.SimpleNamespace(eval_splits=["test"]),
        load_data=lambda: None,
        dataset={
            "train": [{"sentence1": "Cats are sleeping.", "sentence2": "x", "score": 1.0}],
            "test": {"sentence1": ["A child eats an apple."], "label": ["not a text"]},
        },
    )
    monkeypatch.setitem(sys.modules, "mteb", types.SimpleNamespace(get_task=lambda name: task))
    summary = decontaminate([train_files["sts"]], [], tmp_path / "out", mteb_tasks=["FakeSTS"])
    report = read_jsonl(tmp_path / "out" / REPORT_NAME)
    assert [(r["field"], r["eval"], r["eval_field"]) for r in report] == [
        ("sentence1", "mteb:FakeSTS/dataset/test/sentence1:0", "sentence1")
    ]
    assert summary.removed_by_eval_set == {"mteb:FakeSTS": 1}


def test_usage_errors(tmp_path, eval_sources, train_files):
    out = ["--output-dir", str(tmp_path / "o"), "--no-progress"]
    assert main([str(train_files["sts"]), *out]) == 2, "no evaluation data"
    assert main([str(train_files["sts"]), "--eval", str(eval_sources[0]), "--minhash", "1.5", *out]) == 2
    assert main([str(train_files["sts"]), str(train_files["sts"]), "--eval", str(eval_sources[0]), *out]) == 2
    twins = [write_jsonl(tmp_path / folder / "same" / "sts.jsonl", [STS_ROWS[0][0]]) for folder in ("a", "b")]
    assert main([*map(str, twins), "--eval", str(eval_sources[0]), *out]) == 2, "same file and folder names"


def test_files_of_the_same_name_go_under_their_folders(tmp_path, eval_sources):
    """Two datasets' train.jsonl: each output under its folder's name, each with its own records."""
    rows = [record for record, _ in STS_ROWS]
    clean = [record for record, expected in STS_ROWS if expected is None]
    first = write_jsonl(tmp_path / "stsb" / "train.jsonl", rows)
    second = write_jsonl(tmp_path / "sick" / "train.jsonl", rows[3:])
    unique = write_jsonl(tmp_path / "other" / "nli.jsonl", rows[:2])
    decontaminate([first, second, unique], eval_sources, tmp_path / "out")
    assert read_jsonl(tmp_path / "out/stsb/train.jsonl") == clean
    assert read_jsonl(tmp_path / "out/sick/train.jsonl") == rows[3:]
    assert read_jsonl(tmp_path / "out/nli.jsonl") == rows[:1]


def test_real_stsb_dev_lines_planted_in_train(tmp_path):
    train_source, dev = SHARED_DATA / "stsb_en" / "train.jsonl", SHARED_DATA / "stsb_en" / "dev.jsonl"
    if not train_source.is_file() or not dev.is_file():
        pytest.skip("shared STS-B data not present")
    # STS-B train and dev share many sentences (413 of 5749 train pairs have one in dev, mostly
    # short captions such as "A man is playing a flute."): lines 2001-2060 share none
    train_lines = train_source.read_text(encoding="utf-8").splitlines()[2000:2060]
    dev_lines = dev.read_text(encoding="utf-8").splitlines()
    planted = {10: dev_lines[100], 30: dev_lines[700], 50: dev_lines[1400]}  # 1-based positions in the copy
    for position in sorted(planted):
        train_lines.insert(position - 1, planted[position])
    train = tmp_path / "stsb_train_sample.jsonl"
    train.write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    summary = decontaminate([train], [dev], tmp_path / "out")
    removed = {line["source"] for line in read_jsonl(tmp_path / "out" / REPORT_NAME)}
    assert removed == {f"{train}:{position}" for position in planted}
    assert summary.records_kept == 60
