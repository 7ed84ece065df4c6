"""Evaluation: metrics against hand computations, per-dim results, dev sets during training."""

import json
import math

import pytest
import torch

from conftest import REPO, SHARED_DATA, run_script
from tpembed.train.config import EvalTaskConfig, load_eval_tasks
from tpembed.train.eval import clustering_scores, evaluate, main, write_results
from tpembed.train.metrics import mrr_at_k, ndcg_at_k, recall_at_k, retrieval_scores, spearman

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the workplace's ../shared/data is not present")


def test_ndcg_with_graded_qrels_by_hand():
    qrels = {"d1": 0, "d2": 2, "d3": 1, "d4": 3}
    ranked = ["d1", "d2", "d3", "d5"]
    dcg = 0 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, qrels, k=10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(ranked, qrels, k=1) == 0.0
    assert ndcg_at_k(["d4", "d2", "d3"], qrels, k=3) == pytest.approx(1.0)


def test_recall_and_mrr_by_hand():
    qrels = {"a": 1, "b": 1, "c": 0}
    assert recall_at_k(["x", "a", "c"], qrels, k=3) == pytest.approx(0.5)
    assert recall_at_k(["x", "a", "b"], qrels, k=2) == pytest.approx(0.5)
    assert mrr_at_k(["c", "x", "b"], qrels, k=10) == pytest.approx(1 / 3)
    assert mrr_at_k(["c", "x", "b"], qrels, k=2) == 0.0


def test_retrieval_scores_average_over_judged_queries():
    rankings = {"q1": ["a", "b"], "q2": ["b", "a"], "q3": ["a"]}
    qrels = {"q1": {"a": 1}, "q2": {"a": 1}, "q3": {"z": 0}}
    scores = retrieval_scores(rankings, qrels, k=10)
    assert scores["mrr@10"] == pytest.approx(100 * (1 + 0.5) / 2)
    assert scores["recall@10"] == pytest.approx(100.0)


def test_spearman_by_hand():
    # ranks of x: 1 2 3 4; ranks of y: 1 3 2 4 -> rho = 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15) = 0.8
    assert spearman([0.1, 0.2, 0.3, 0.4], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(80.0)


def test_evaluate_on_a_hand_built_dataset(tmp_path):
    """A fake encoder with known vectors: every number below is worked out by hand."""
    vectors = {
        "q1": [1.0, 0.0, 0.0, 0.0], "q2": [0.0, 1.0, 0.0, 0.0],
        "doc a": [1.0, 0.1, 0.0, 0.0], "doc b": [0.0, 1.0, 0.0, 1.0], "doc c": [0.6, 0.8, 0.0, 0.0],
        "s1": [1.0, 0.0, 0.0, 0.0], "s2": [1.0, 1.0, 0.0, 0.0], "s3": [0.0, 1.0, 1.0, 0.0],
    }  # fmt: skip

    def encode(texts, instruction):
        return torch.tensor([vectors[t] for t in texts])

    sts = tmp_path / "sts.jsonl"
    rows = [("s1", "s1", 5.0), ("s1", "s2", 3.0), ("s1", "s3", 1.0)]  # cosines 1, 0.707, 0
    sts.write_text("\n".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) for a, b, s in rows))
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(
        "\n".join(json.dumps({"_id": i, "title": "", "text": f"doc {i}"}) for i in "abc")
    )
    (beir / "queries.jsonl").write_text('{"_id": "1", "text": "q1"}\n{"_id": "2", "text": "q2"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\tc\t2\n1\ta\t1\n2\tb\t1\n")
    tasks = [
        EvalTaskConfig(name="sts", type="sts", path=str(sts)),
        EvalTaskConfig(name="ret", type="retrieval", path=str(beir)),
    ]
    lines = []
    results = evaluate(encode, tasks, dims=[1, 4], log=lines.append)
    assert results["tasks"]["sts"]["by_dim"]["4"]["spearman"] == pytest.approx(100.0)
    # one progress line per task, in order, with the main metric at the largest dim
    assert len(lines) == 2
    assert lines[0].startswith("task 1/2 sts: spearman at 4 dims 100.00 on 3 examples (")
    # q1 at dim 4 ranks a (0.995) > c (0.6) > b (0): DCG = 1 + 2/log2(3), IDCG = 2 + 1/log2(3)
    ndcg_q1 = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    # q2 ranks c (0.8) > b (0.707) > a: first relevant at rank 2
    ndcg_q2 = (1 / math.log2(3)) / 1
    retrieval = results["tasks"]["ret"]["by_dim"]["4"]
    assert retrieval["ndcg@10"] == pytest.approx(100 * (ndcg_q1 + ndcg_q2) / 2)
    assert lines[1].startswith(f"task 2/2 ret: ndcg@10 at 4 dims {100 * (ndcg_q1 + ndcg_q2) / 2:.2f} on 2 examples (")
    assert retrieval["mrr@10"] == pytest.approx(100 * (1 + 0.5) / 2)
    assert set(results["tasks"]["ret"]["by_dim"]) == {"1", "4"}
    json_path, plot_path = write_results(results, tmp_path / "out")
    assert json.loads(json_path.read_text())["dims"] == [1, 4] and plot_path.stat().st_size > 1000


def _labelled_files(directory, splits):
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (directory / f"{split}.jsonl").write_text("\n".join(json.dumps({"sentence": t, "label": y}) for t, y in rows))


def _entropy(*counts):
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c)


def test_classification_and_clustering_on_hand_built_embeddings(tmp_path):
    """Logistic regression and k-means on vectors whose answers are known: two tight groups along
    e1 and e2; one evaluation text sits in the other label's group."""
    vectors = {f"a{i}": [1.0, 0.01 * i, 0.0, 0.0] for i in range(6)} | {
        f"b{i}": [0.0, 1.0, 0.01 * i, 0.0] for i in range(6)
    }

    def encode(texts, instruction):
        assert instruction == "Classify the text"
        return torch.tensor([vectors[t] for t in texts])

    train = [(f"a{i}", "A") for i in range(4)] + [(f"b{i}", "B") for i in range(4)]
    evaluated = [("a4", "A"), ("a5", "A"), ("a0", "A"), ("b5", "A"), ("b4", "B"), ("b0", "B")]  # b5 is confused
    _labelled_files(tmp_path / "cls", {"train": train, "test": evaluated})
    _labelled_files(tmp_path / "separable", {"train": train, "test": train})
    clusters = [("a0", "A"), ("a1", "A"), ("a2", "B"), ("b0", "B"), ("b1", "B"), ("b2", "B")]
    (tmp_path / "clusters.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in clusters))
    tasks = [
        EvalTaskConfig(name="cls", type="classification", path=str(tmp_path / "cls"), instruction="Classify the text"),
        EvalTaskConfig(
            name="sep", type="classification", path=str(tmp_path / "separable"), instruction="Classify the text"
        ),
        EvalTaskConfig(
            name="sep_clu",
            type="clustering",
            path=str(tmp_path / "separable"),
            instruction="Classify the text",
            split="train",
        ),
        EvalTaskConfig(
            name="clu", type="clustering", path=str(tmp_path / "clusters.jsonl"), instruction="Classify the text"
        ),
    ]
    results = evaluate(encode, tasks, dims=[2, 4])["tasks"]
    assert results["sep"]["by_dim"]["4"]["accuracy"] == pytest.approx(100.0)
    assert results["sep_clu"]["by_dim"]["4"]["v_measure"] == pytest.approx(100.0)
    confused = results["cls"]["by_dim"]["4"]
    assert confused["accuracy"] == pytest.approx(100 * 5 / 6) and results["cls"]["num_examples"] == 6
    # A: 3 right, 1 missed (precision 1, recall 3/4); B: 2 right, 1 wrongly taken (precision 2/3, recall 1)
    assert confused["f1"] == pytest.approx(100 * (6 / 7 + 4 / 5) / 2)
    # clusters {a0, a1, a2} and {b0, b1, b2}: labels A A B | B B B
    homogeneity = 1 - (3 / 6 * _entropy(2, 1)) / _entropy(2, 4)
    completeness = 1 - (4 / 6 * _entropy(1, 3)) / _entropy(3, 3)
    v_measure = 2 * homogeneity * completeness / (homogeneity + completeness)
    assert results["clu"]["by_dim"]["4"]["v_measure"] == pytest.approx(100 * v_measure)
    # two tight groups: every single-initialisation run finds them, so the runs agree with the best one
    for task, expected in (("clu", 100 * v_measure), ("sep_clu", 100.0)):
        scores = results[task]["by_dim"]["4"]
        assert scores["v_measure_mean"] == pytest.approx(expected) and scores["v_measure_std"] == pytest.approx(0.0)
    assert results["clu"]["main_metric"] == "v_measure" and results["cls"]["main_metric"] == "accuracy"
    with pytest.raises(FileNotFoundError, match="must hold train.jsonl and validation.jsonl"):
        evaluate(encode, [EvalTaskConfig(name="x", type="classification", path=str(tmp_path), split="validation")], [4])


def test_clustering_runs_differ_where_the_data_has_no_clusters():
    """Points with no cluster structure: the single-initialisation runs use different seeds, so their
    clusterings (and V-measures) differ, and the reported sd is the spread of those runs."""
    generator = torch.Generator().manual_seed(0)
    points = torch.nn.functional.normalize(torch.randn(90, 8, generator=generator), dim=-1)
    labels = [str(i % 5) for i in range(90)]
    scores = clustering_scores(points, labels, runs=8)
    assert scores["v_measure_std"] > 0
    assert 0 <= scores["v_measure_mean"] <= 100 and 0 <= scores["v_measure"] <= 100
    assert clustering_scores(points, labels, runs=1)["v_measure_std"] == 0.0


@needs_shared
def test_tnews_task_file_with_a_character_count_encoder():
    """configs/eval/tnews.yaml end to end, the texts encoded as character counts (no model)."""

    def encode(texts, instruction):
        counts = torch.zeros(len(texts), 256)
        for row, text in enumerate(texts):
            for char in text:
                counts[row, ord(char) % 256] += 1
        return counts

    tasks = load_eval_tasks(REPO / "configs/eval/tnews.yaml")
    for task in tasks:
        task.path, task.limit = str(REPO / task.path), 300
    results = evaluate(encode, tasks, dims=[64, 256])["tasks"]
    labels = [
        json.loads(line)["label"] for line in (SHARED_DATA / "tnews/validation.jsonl").read_text().splitlines()[:300]
    ]
    majority = 100 * max(labels.count(label) for label in set(labels)) / len(labels)
    classification, clustering = results["tnews_classification"], results["tnews_clustering"]
    assert classification["num_examples"] == clustering["num_examples"] == 300
    assert classification["by_dim"]["256"]["accuracy"] > majority  # character counts beat always answering one label
    for dim in ("64", "256"):
        assert 0 <= clustering["by_dim"][dim]["v_measure"] <= 100


def test_dims_larger_than_the_models_are_refused(quickstart_stage2, tmp_path, capsys):
    sts = tmp_path / "sts.jsonl"
    sts.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "score": 1.0}))
    with pytest.raises(SystemExit):
        main([str(quickstart_stage2[0]), "--sts", str(sts), "--dims", "256", "4096"])
    assert "--dims 4096: the model's embeddings have 1792 numbers" in capsys.readouterr().err


def test_eval_task_files_load():
    for path in sorted((REPO / "configs" / "eval").glob("*.yaml")):
        tasks = load_eval_tasks(path)
        assert tasks and all(t.path.startswith("../shared/data/") for t in tasks)


@needs_shared
def test_quickstart_checkpoint_on_stsb_and_xquad_slices(quickstart_stage2, tmp_path, capsys):
    run_dir, _ = quickstart_stage2
    code = main(
        [
            str(run_dir),
            "--sts",
            str(SHARED_DATA / "stsb_en/dev.jsonl"),
            "--retrieval",
            str(SHARED_DATA / "xquad_retrieval/en"),
            "--limit",
            "40",
            "--output-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "stsb_en/dev" in printed and "ndcg@10" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dims"] == [128, 256, 512, 768, 1024, 1280, 1536, 1792]
    sts, xquad = results["tasks"]["stsb_en/dev"], results["tasks"]["xquad_retrieval/en"]
    assert sts["num_examples"] == 40 and xquad["num_examples"] == 40
    for task in (sts, xquad):
        for dim in results["dims"]:
            value = task["by_dim"][str(dim)][task["main_metric"]]
            assert math.isfinite(value) and -100 <= value <= 100
    assert (tmp_path / "dims.png").is_file()


def test_skip_leaves_out_named_tasks_and_rejects_unknown_names(quickstart_stage2, tmp_path, capsys):
    run_dir, _ = quickstart_stage2
    rows = [("a cat sits", "a cat is sitting", 4.0), ("a cat sits", "stocks fell", 0.0), ("go", "went", 3.0)]
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dev.jsonl").write_text(
            "\n".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) for a, b, s in rows)
        )
    common = [str(run_dir), "--sts", str(tmp_path / "first/dev.jsonl"), "--sts", str(tmp_path / "second/dev.jsonl")]
    with pytest.raises(SystemExit):
        main([*common, "--skip", "third/dev"])
    assert "--skip: no task named third/dev" in capsys.readouterr().err
    assert main([*common, "--skip", "first/dev", "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "out/results.json").read_text())
    assert list(results["tasks"]) == ["second/dev"]


def test_dev_sets_are_evaluated_during_training(tmp_path):
    rows = [json.loads(line) for line in (REPO / "data/samples/snli_pairs_en.jsonl").read_text().splitlines()[:30]]
    dev = tmp_path / "dev.jsonl"
    scores = {"entailment": 2, "neutral": 1, "contradiction": 0}
    dev.write_text(
        "\n".join(
            json.dumps({"sentence1": r["text1"], "sentence2": r["text2"], "score": scores[r["label"]]}) for r in rows
        )
    )
    config = tmp_path / "eval.yaml"
    config.write_text(
        json.dumps({"eval": {"eval_tasks": [{"name": "dev", "type": "sts", "path": str(dev)}], "eval_every": 2}})
    )
    run_dir = tmp_path / "run"
    run_script(
        "stage1.py",
        REPO / "configs/quickstart/stage1.yaml",
        run_dir,
        "--config",
        str(config),
        "--max-steps",
        "2",
        "--save-every",
        "2",
    )
    logged = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [2]
    assert {f"eval/dev/spearman@{d}" for d in (128, 1792)} <= set(logged[0])


def test_an_interrupted_evaluation_continues_with_the_tasks_it_had_not_finished(
    quickstart_stage2, tmp_path, monkeypatch
):
    from tpembed.train import eval as evaluation

    run_dir, _ = quickstart_stage2
    rows = [("a cat sits", "a cat is sitting", 4.0), ("a cat sits", "stocks fell", 0.0), ("go", "went", 3.0)]
    for name in ("first", "second", "third"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dev.jsonl").write_text(
            "\n".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) for a, b, s in rows)
        )
    tasks = [flag for name in ("first", "second", "third") for flag in ("--sts", str(tmp_path / name / "dev.jsonl"))]
    common = [str(run_dir), *tasks, "--dims", "256", "1792", "--no-progress"]
    out, partial = tmp_path / "out", tmp_path / "out" / evaluation.PARTIAL_NAME
    real, evaluated = evaluation.evaluate_task, []

    def interrupted_at_third(encode, task, dims, data=None):
        if task.name == "third/dev":
            raise KeyboardInterrupt
        evaluated.append(task.name)
        return real(encode, task, dims, data)

    monkeypatch.setattr(evaluation, "evaluate_task", interrupted_at_third)
    with pytest.raises(KeyboardInterrupt):
        main([*common, "--output-dir", str(out)])
    assert not (out / "results.json").exists() and evaluated == ["first/dev", "second/dev"]
    assert set(json.loads(partial.read_text())["tasks"]) == {"first/dev", "second/dev"}

    # the second file's data changed: the re-run keeps only the first task
    (tmp_path / "second/dev.jsonl").write_text(
        "\n".join(json.dumps({"sentence1": a, "sentence2": b, "score": 4.0 - s}) for a, b, s in rows)
    )
    monkeypatch.setattr(evaluation, "evaluate_task", lambda *a, **k: evaluated.append(a[1].name) or real(*a, **k))
    evaluated.clear()
    assert main([*common, "--output-dir", str(out)]) == 0
    assert evaluated == ["second/dev", "third/dev"] and not partial.exists()
    continued = json.loads((out / "results.json").read_text())

    evaluated.clear()
    assert main([*common, "--output-dir", str(tmp_path / "whole")]) == 0
    assert evaluated == ["first/dev", "second/dev", "third/dev"]
    assert continued == json.loads((tmp_path / "whole/results.json").read_text())
    # the second file was reversed, so its Spearman changed sign: the re-run did read the new data
    second = continued["tasks"]["second/dev"]["by_dim"]["1792"]["spearman"]
    first = continued["tasks"]["first/dev"]["by_dim"]["1792"]["spearman"]
    assert second == pytest.approx(-first)


def test_partial_results_are_not_reused_for_other_dims_or_with_fresh(quickstart_stage2, tmp_path, monkeypatch):
    from tpembed.train import eval as evaluation

    run_dir, _ = quickstart_stage2
    sts = tmp_path / "sts.jsonl"
    sts.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "score": 1.0}) + "\n")
    common = [str(run_dir), "--sts", str(sts), "--no-progress", "--output-dir", str(tmp_path / "out")]
    real, evaluated = evaluation.evaluate_task, []
    monkeypatch.setattr(evaluation, "evaluate_task", lambda *a, **k: evaluated.append(a[2]) or real(*a, **k))
    monkeypatch.setattr(evaluation.PartialResults, "finish", lambda self: None)  # the file stays, as after a crash
    assert main([*common, "--dims", "256"]) == 0
    assert (tmp_path / "out" / evaluation.PARTIAL_NAME).exists()
    assert main([*common, "--dims", "256", "1792"]) == 0  # other dims: evaluated again
    assert main([*common, "--dims", "256", "1792"]) == 0  # same: kept
    assert main([*common, "--dims", "256", "1792", "--fresh"]) == 0
    assert evaluated == [[256], [256, 1792], [256, 1792]]
