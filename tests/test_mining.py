"""Hard-negative mining: the search against a full score matrix, the selection rules against
hand-made cases, resume after a crash, faiss = exact, 2 processes = 1, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, free_port, subprocess_env
from tpembed.data import DataError
from tpembed.data.io import OutputExistsError
from tpembed.data.mining import (
    MiningSettings,
    ShardedEmbeddings,
    Summary,
    choose,
    exact_top_k,
    fill_randomly,
    mine,
    normalize_text,
    text_key,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def shards_of(tmp_path, embeddings, shard_size):
    (tmp_path / "shards").mkdir(exist_ok=True)
    for start in range(0, len(embeddings), shard_size):
        np.save(tmp_path / "shards" / f"corpus-{start // shard_size:05d}.npy", embeddings[start : start + shard_size])
    return ShardedEmbeddings(tmp_path, "corpus", len(embeddings), shard_size)


def test_exact_top_k_equals_the_full_score_matrix(tmp_path):
    generator = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(103, 16, generator=generator), dim=-1)
    corpus[50] = corpus[7]  # a tie: the lower index comes first
    queries = torch.nn.functional.normalize(torch.randn(9, 16, generator=generator), dim=-1)
    queries[0] = corpus[7]
    scores, indices = exact_top_k(queries, shards_of(tmp_path, corpus.numpy(), 10), k=12)
    full = queries @ corpus.T  # (9, 103)
    expected_scores, _ = torch.topk(full, 12, dim=1)
    torch.testing.assert_close(scores, expected_scores)
    for row in range(9):
        assert torch.allclose(full[row, indices[row]], scores[row])
    assert indices[0, :2].tolist() == [7, 50]


def test_normalised_keys_fold_case_width_and_punctuation():
    assert normalize_text("  The  Cat，sat!  ") == normalize_text("the cat sat") == "thecatsat"
    assert normalize_text("你好，世界。") == normalize_text("你好 世界") == "你好世界"
    assert normalize_text("ＡＢＣ。") == "abc"
    assert text_key(normalize_text("Hello, World")) == text_key(normalize_text("hello world"))
    assert text_key("Hello") == text_key("Hello".encode("utf-8")) != text_key("hello")


def test_ascii_texts_normalise_as_the_unicode_rule_says():
    """ASCII text takes a shortcut; it must agree with NFKC + casefold + dropping non-word
    characters (and the underscore) on every ASCII character."""
    import random
    import re
    import unicodedata

    def by_definition(text):
        return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", text).casefold())

    rng = random.Random(0)
    texts = ["".join(chr(rng.randrange(128)) for _ in range(rng.randrange(40))) for _ in range(3000)]
    texts += [chr(code) * 2 + "Ab_9 z" for code in range(128)]
    for text in texts:
        assert normalize_text(text) == by_definition(text), repr(text)
    assert normalize_text("Tab\tNew\nLine_under-score 42!") == "tabnewlineunderscore42"


def selection_case():
    """One query, positive score 0.8, candidates in score order: its positive (index 0), a
    near-duplicate of it (1), 0.79 (2, inside the 95% margin), then 0.70 ... 0.20 (3-8)."""
    scores = torch.tensor([[0.8, 0.79, 0.79, 0.70, 0.60, 0.50, 0.40, 0.30, 0.20]])
    indices = torch.arange(9).unsqueeze(0)
    keys = np.arange(100, 109, dtype=np.int64)
    keys[1] = keys[0]  # index 1 normalises to the positive's text
    return scores, indices, keys


def test_choose_removes_positives_near_duplicates_and_margin_then_takes_the_window():
    scores, indices, keys = selection_case()
    removed = __import__("collections").Counter()
    settings = MiningSettings(range_min=1, range_max=5, relative_margin=0.05, num_negatives=2)
    (choice,) = choose(scores, indices, [torch.tensor([0.8])], [np.array([0])], keys, settings, [0], removed)
    # left after the rules: 3 (0.70), 4, 5, 6, 7, 8; ranks 1..4 are 4, 5, 6, 7; the top two: 4, 5
    assert choice.negatives == [4, 5] and choice.negative_scores == pytest.approx([0.6, 0.5])
    assert removed["positive"] == 1 and removed["near_duplicate_of_positive"] == 1
    assert removed["relative_margin"] == 1  # 0.79 > 0.8 - 0.04
    # absolute margin 0.15 and max score 0.55 on top
    removed.clear()
    settings = MiningSettings(range_min=0, range_max=9, relative_margin=None, absolute_margin=0.15, max_score=0.55,
                              num_negatives=3)  # fmt: skip
    (choice,) = choose(scores, indices, [torch.tensor([0.8])], [np.array([0])], keys, settings, [0], removed)
    assert choice.negatives == [5, 6, 7]
    assert removed["absolute_margin"] == 2 and removed["max_score"] == 1  # 0.79 (x1 left), 0.70; then 0.60


def test_random_sampling_is_seeded_and_stays_in_the_window():
    scores, indices, keys = selection_case()
    settings = MiningSettings(range_min=0, range_max=9, num_negatives=3, sampling="random", seed=3)
    picks = [choose(scores, indices, [torch.tensor([0.8])], [np.array([0])], keys, settings, [5],
                    __import__("collections").Counter())[0].negatives for _ in range(2)]  # fmt: skip
    assert picks[0] == picks[1] and len(picks[0]) == 3 and set(picks[0]) <= {3, 4, 5, 6, 7, 8}


def test_summary_warns_when_a_margin_left_most_records_short():
    bunched = Summary(records=10, with_enough=2, kept_with_fewer=8)
    bunched.removed.update({"positive": 10, "relative_margin": 500})
    bunched.add_scores([0.93] * 10, [])
    warning = [line for line in bunched.lines() if line.startswith("warning")]
    assert len(warning) == 1
    assert "8 of 10 records" in warning[0] and "relative_margin" in warning[0] and "0.93" in warning[0]
    healthy = Summary(records=10, with_enough=9, kept_with_fewer=1)  # most records got their negatives
    healthy.removed.update({"relative_margin": 500})
    assert healthy.warnings() == []
    positives = Summary(records=10, with_enough=2, kept_with_fewer=8)  # short, but not because of a margin
    positives.removed.update({"positive": 50, "relative_margin": 5})
    assert positives.warnings() == []


def test_fill_never_picks_a_positive_or_a_near_duplicate():
    from tpembed.data.mining import Choice

    keys = np.array([1, 1, 2, 3, 4, 5], dtype=np.int64)  # 1 is a near-duplicate of the positive 0
    choice = Choice(negatives=[2], negative_scores=[0.1], positive_scores=[0.9])
    fill_randomly(choice, np.array([0]), keys, corpus_size=6, wanted=4, seed=0, record=0)
    assert sorted(choice.negatives) == [2, 3, 4, 5] and choice.filled == 3


class CountingEncoder:
    """A deterministic bag-of-characters encoder that counts its calls and can fail after N."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, texts, instruction):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("killed")
        out = torch.zeros(len(texts), 32)
        for row, text in enumerate(texts):
            for ch in (instruction or "")[:3] + text:
                out[row, ord(ch) % 32] += 1.0
        return out


@pytest.fixture
def small_records(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        positive = " ".join(rng.choice(words, size=6))
        rows.append({"query": positive[: 12 + i % 5], "pos": [positive], "instruction": "find it", "id": i})
    return write_jsonl(tmp_path / "records.jsonl", rows)


def test_a_killed_run_resumes_without_encoding_finished_shards(small_records, tmp_path):
    settings = MiningSettings(range_min=1, range_max=20, num_negatives=3)
    options = dict(model_id="m", settings=settings, shard_size=8, dtype="float32", progress=False)
    clean = mine(small_records, tmp_path / "clean.jsonl", encode=CountingEncoder(), work=tmp_path / "w1", **options)
    assert clean.records == 60
    crashing = CountingEncoder(fail_after=6)  # the probe, then 5 shards
    with pytest.raises(KeyboardInterrupt):
        mine(small_records, tmp_path / "out.jsonl", encode=crashing, work=tmp_path / "w2", **options)
    assert not (tmp_path / "out.jsonl").exists(), "no output that looks complete"
    finished = len(list((tmp_path / "w2" / "shards").glob("*.npy")))
    assert finished == 5
    again = CountingEncoder()
    mine(small_records, tmp_path / "out.jsonl", encode=again, work=tmp_path / "w2", **options)
    assert again.calls - 1 == 16 - finished  # 8 corpus + 8 query shards in all; the probe is the 1
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "clean.jsonl").read_bytes()


def test_output_keeps_records_in_order_with_provenance_and_no_positive_among_negatives(small_records, tmp_path):
    settings = MiningSettings(range_min=0, range_max=30, num_negatives=4, relative_margin=None)
    mine(small_records, tmp_path / "out.jsonl", encode=CountingEncoder(), work=tmp_path / "w", settings=settings,
         model_id="m", shard_size=16, progress=False)  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(60))
    for row in rows:
        positives = {normalize_text(p) for p in row["pos"]}
        assert len(row["negs"]) == 4 and not positives & {normalize_text(n) for n in row["negs"]}
        assert row["mining"]["negative_scores"] == sorted(row["mining"]["negative_scores"], reverse=True)
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["records"] == 60 and summary["with_enough"] == 60
    from tpembed.data.formats import read_dataset

    assert len(read_dataset(tmp_path / "out.jsonl", "retrieval", "mined")) == 60


def test_a_changed_setting_re_encodes(small_records, tmp_path):
    options = dict(model_id="m", shard_size=32, progress=False, work=tmp_path / "w")
    mine(small_records, tmp_path / "a.jsonl", encode=CountingEncoder(), **options)
    truncated = CountingEncoder()
    mine(small_records, tmp_path / "b.jsonl", encode=truncated, dim=8, **options)
    assert truncated.calls == 1 + 4, "a new dim: every shard again"
    shard = np.load(tmp_path / "w" / "shards" / "corpus-00000.npy")
    assert shard.shape[1] == 8 and np.allclose(np.linalg.norm(shard.astype(np.float32), axis=1), 1, atol=1e-3)


def test_faiss_finds_the_exact_neighbours(tmp_path):
    pytest.importorskip("faiss")
    from tpembed.data.mining import FaissIndex

    generator = torch.Generator().manual_seed(1)
    corpus = torch.nn.functional.normalize(torch.randn(257, 24, generator=generator), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(20, 24, generator=generator), dim=-1)
    sharded = shards_of(tmp_path, corpus.numpy(), 50)
    exact_scores, exact_indices = exact_top_k(queries, sharded, 15)
    faiss_scores, faiss_indices = FaissIndex(sharded).top_k(queries, 15)
    assert torch.equal(faiss_indices, exact_indices)
    torch.testing.assert_close(faiss_scores, exact_scores, atol=1e-5, rtol=1e-5)


def test_bad_input_names_file_line_and_option(small_records, tmp_path):
    options = dict(encode=CountingEncoder(), model_id="m", progress=False)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "pos": ["p"]}, {"query": "q2"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'pos'"):
        mine(bad, tmp_path / "o1.jsonl", work=tmp_path / "w1", **options)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "a", "text": "x"}, {"_id": "a", "text": "y"}])
    with pytest.raises(DataError, match=r"corpus\.jsonl:2: field '_id': duplicate id 'a'"):
        mine(small_records, tmp_path / "o2.jsonl", work=tmp_path / "w2", corpus_path=corpus, **options)
    corpus = write_jsonl(tmp_path / "corpus2.jsonl", [{"text": "unrelated"}])
    with pytest.raises(DataError, match=r"records\.jsonl:1: field 'pos': positive .* is not in the corpus"):
        mine(small_records, tmp_path / "o3.jsonl", work=tmp_path / "w3", corpus_path=corpus, **options)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="the corpus holds no text"):
        mine(small_records, tmp_path / "o4.jsonl", work=tmp_path / "w4", corpus_path=empty, **options)
    with pytest.raises(ValueError, match="--dim 64 is larger than the model's embedding size 32"):
        mine(small_records, tmp_path / "o5.jsonl", work=tmp_path / "w5", dim=64, **options)
    (tmp_path / "exists.jsonl").write_text("")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        mine(small_records, tmp_path / "exists.jsonl", work=tmp_path / "w6", **options)


def test_preparing_in_a_child_process_writes_what_preparing_here_writes(small_records, tmp_path):
    from tpembed.data.mining import BackgroundPrepare, prepare

    here = prepare(small_records, None, tmp_path / "here", "find it")
    with BackgroundPrepare(small_records, None, tmp_path / "child", "find it") as background:
        assert background.result() == here
    files = sorted(p.name for p in (tmp_path / "here").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "child").iterdir()) and "corpus.txt" in files
    for name in files:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "child" / name).read_bytes(), name


def test_a_failed_or_killed_preparation_process_is_an_error_here(tmp_path):
    import os

    from tpembed.data.mining import BackgroundPrepare, PreparationFailed

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "pos": ["p"]}, {"query": "q2"}])
    with BackgroundPrepare(bad, None, tmp_path / "w1", None) as background:
        with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'pos'"):
            background.result()
    blocked = tmp_path / "fifo.jsonl"  # opening a FIFO with no writer blocks: the child waits there
    os.mkfifo(blocked)
    with BackgroundPrepare(blocked, None, tmp_path / "w2", None) as background:
        background._process.kill()
        with pytest.raises(PreparationFailed, match="ended without a result"):
            background.result()
    with BackgroundPrepare(blocked, None, tmp_path / "w3", None) as background:
        child = background._process
        assert child.is_alive()
    assert not child.is_alive(), "leaving the block stops a child that is still running"


def run_cli(*args, processes=1, timeout=600):
    if processes == 1:
        command = [sys.executable, "-m", "tpembed.train.mine", *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--main_process_port", free_port(), "-m", "tpembed.train.mine", *args]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def test_two_processes_write_the_same_bytes_as_one(quickstart_stage1, tmp_path):
    records = REPO / "data" / "samples" / "snli_triplets_en.jsonl"
    common = ["--model", str(quickstart_stage1), "--range-min", "2", "--range-max", "40", "--shard-size", "100",
              "--dim", "256", "--no-progress"]  # fmt: skip
    one = run_cli(str(records), str(tmp_path / "one.jsonl"), *common)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(str(records), str(tmp_path / "two.jsonl"), *common, processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    assert "candidates removed" in one.stdout
    # the query side was encoded with the model's own template and the record's instruction
    from tpembed.train.config import DataConfig
    from tpembed.train.embedder import Embedder

    first = json.loads(records.read_text().splitlines()[0])  # no instruction of its own: the default
    embedder = Embedder.from_checkpoint(quickstart_stage1)
    query = embedder.encode([first["query"]], DataConfig.default_instruction)
    expected = torch.nn.functional.normalize(query[:, :256], dim=-1)
    stored = torch.from_numpy(np.load(tmp_path / "one.jsonl.mining" / "shards" / "queries-00000.npy")[:1]).float()
    torch.testing.assert_close(stored, expected, atol=2e-3, rtol=0)  # stored as float16


def test_a_model_that_cannot_be_loaded(tmp_path):
    records = write_jsonl(tmp_path / "r.jsonl", [{"query": "q", "pos": ["p"]}])
    result = run_cli(str(records), str(tmp_path / "o.jsonl"), "--model", str(tmp_path / "nothing"))
    assert result.returncode == 1 and "--model" in result.stderr and "cannot be loaded" in result.stderr
    assert "Traceback" not in result.stderr


def test_summary_histograms_bin_as_numpy_does():
    rng = np.random.default_rng(3)
    values = [*rng.uniform(-1.2, 1.2, 500).tolist(), -1.0, 0.0, 1.0, float("nan")]
    summary = Summary()
    summary.add_scores(values, values[:100])
    finite = [v for v in values if v == v]
    assert (summary.positive_histogram == np.histogram(finite, bins=400, range=(-1.0, 1.0))[0]).all()
    assert (summary.negative_histogram == np.histogram(finite[:100], bins=400, range=(-1.0, 1.0))[0]).all()
