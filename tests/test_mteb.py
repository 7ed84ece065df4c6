"""tpembed models through the real mteb package, offline: tiny local tasks of every type.

The tasks subclass mteb's own AbsTask classes and override `load_data` with a few dozen examples
built here, as mteb's mock tasks do; nothing is downloaded. The model is the quickstart stage-2
run (Token Prepending at layers 1-7) exported with tpembed-export and loaded by stock
sentence-transformers, the way a user hands it to `mteb.evaluate`.
"""

import json
import math
import os
import sys
import tempfile

# mteb reads MTEB_CACHE once, when it is imported: a private folder, never the user's cache
os.environ["MTEB_CACHE"] = tempfile.mkdtemp(prefix="tpembed-test-mteb-")

import pytest  # noqa: E402
import torch  # noqa: E402

mteb = pytest.importorskip("mteb", reason="the mteb tests need the test extra (pip install -e '.[test]')")

from datasets import Dataset, DatasetDict  # noqa: E402
from mteb.abstasks.classification import AbsTaskClassification  # noqa: E402
from mteb.abstasks.clustering import AbsTaskClustering  # noqa: E402
from mteb.abstasks.pair_classification import AbsTaskPairClassification  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.sts import AbsTaskSTS  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from tpembed.train.config import EvalTaskConfig  # noqa: E402
from tpembed.train.embedder import Embedder  # noqa: E402
from tpembed.train.eval import embedder_encode_fn, evaluate, main, open_model  # noqa: E402
from tpembed.train.export import add_results_to_card, export  # noqa: E402
from tpembed.train.mteb_adapter import TYPE_INSTRUCTIONS, TPEmbedMTEBModel, run_mteb  # noqa: E402

SUBJECTS = ["man", "woman", "child", "dog", "cat", "chef"]
ACTIONS = ["playing a guitar", "riding a bike", "cooking dinner", "reading a book"]
ACTIVITIES = [(s, a) for s in SUBJECTS for a in ACTIONS]  # 24, every text below is distinct
STS_PAIRS = [
    (f"A {s} is {a}.", f"The {s} is {a} now.", 4.5) if i % 3 == 0
    else (f"A {s} is {a}.", f"A {s} is {ACTIONS[(ACTIONS.index(a) + 1) % 4]} today.", 2.0) if i % 3 == 1
    else (f"A {s} is {a}.", f"Stock markets fell on day {i}.", 0.0)
    for i, (s, a) in enumerate(ACTIVITIES)
]  # fmt: skip
LABELLED = [(f"Someone saw a {s} {a} on day {i}.", ACTIONS.index(a)) for i, (s, a) in enumerate(ACTIVITIES * 2)]


def metadata(name: str, task_type: str, main_score: str) -> TaskMetadata:
    return TaskMetadata(
        name=name,
        type=task_type,
        main_score=main_score,
        description="a local test task",
        reference=None,
        dataset={"path": f"local/{name}", "revision": "1"},
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        sample_creation=None,
        bibtex_citation=None,
    )


def retrieval_split(reranking: bool) -> RetrievalSplitData:
    queries = [f"What is the {s} doing with {a.split()[-1]}?" for s, a in ACTIVITIES[:12]]
    documents = [f"In the park the {s} is {a}." for s, a in ACTIVITIES[:12]]
    doc_ids = [f"d{i}" for i in range(12)]
    return RetrievalSplitData(
        queries=Dataset.from_dict({"id": [f"q{i}" for i in range(12)], "text": queries}),
        corpus=Dataset.from_dict({"id": doc_ids, "text": documents}),
        relevant_docs={f"q{i}": {f"d{i}": 1} for i in range(12)},
        top_ranked={f"q{i}": doc_ids for i in range(12)} if reranking else None,
    )


class LocalSTS(AbsTaskSTS):
    metadata = metadata("LocalSTS", "STS", "cosine_spearman")
    min_score, max_score = 0, 5

    def load_data(self, **kwargs):
        first, second, scores = zip(*STS_PAIRS)
        columns = {"sentence1": list(first), "sentence2": list(second), "score": list(scores)}
        self.dataset, self.data_loaded = DatasetDict({"test": Dataset.from_dict(columns)}), True


class LocalRetrieval(AbsTaskRetrieval):
    metadata = metadata("LocalRetrieval", "Retrieval", "ndcg_at_10")

    def load_data(self, **kwargs):
        self.dataset, self.data_loaded = {"default": {"test": retrieval_split(reranking=False)}}, True


class LocalReranking(AbsTaskRetrieval):
    metadata = metadata("LocalReranking", "Reranking", "map_at_1000")

    def load_data(self, **kwargs):
        self.dataset, self.data_loaded = {"default": {"test": retrieval_split(reranking=True)}}, True


class LocalPairClassification(AbsTaskPairClassification):
    metadata = metadata("LocalPairClassification", "PairClassification", "max_ap")

    def load_data(self, **kwargs):
        first, second, scores = zip(*STS_PAIRS)
        columns = {"sentence1": list(first), "sentence2": list(second), "labels": [int(s > 3) for s in scores]}
        self.dataset, self.data_loaded = DatasetDict({"test": Dataset.from_dict(columns)}), True


class LocalClassification(AbsTaskClassification):
    metadata = metadata("LocalClassification", "Classification", "accuracy")
    n_experiments = 2

    def load_data(self, **kwargs):
        train, test = LABELLED[:32], LABELLED[32:]
        self.dataset = DatasetDict(
            {split: Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
             for split, rows in (("train", train), ("test", test))}
        )  # fmt: skip
        self.data_loaded = True


class LocalClustering(AbsTaskClustering):
    metadata = metadata("LocalClustering", "Clustering", "v_measure")
    max_document_to_embed, max_fraction_of_documents_to_embed = 24, None
    n_clusters, max_documents_per_cluster = 2, 24

    def load_data(self, **kwargs):
        rows = LABELLED[:24]
        columns = {"sentences": [t for t, _ in rows], "labels": [y for _, y in rows]}
        self.dataset, self.data_loaded = DatasetDict({"test": Dataset.from_dict(columns)}), True


@pytest.fixture(scope="module")
def export_dir(quickstart_stage2, tmp_path_factory):
    return export(quickstart_stage2[0], tmp_path_factory.mktemp("mteb") / "quickstart").out_dir


@pytest.fixture(scope="module")
def export_encode(export_dir):
    """tpembed-eval's encoder of the export (tpembed's own evaluator reads it through this)."""
    return open_model(str(export_dir))[0]


@pytest.fixture(scope="module")
def export_adapter(export_dir):
    return TPEmbedMTEBModel(str(export_dir))


@pytest.fixture(scope="module")
def run_embedder(quickstart_stage2):
    return Embedder.from_checkpoint(quickstart_stage2[0])


@pytest.fixture(scope="module")
def recording_model(export_dir):
    """The export loaded by stock sentence-transformers; every batch its input module reads is
    recorded as (prompt, texts, the first sequence decoded)."""
    model = SentenceTransformer(str(export_dir), trust_remote_code=True, device="cpu")
    module, seen = model[0], []
    original = module.preprocess

    def preprocess(inputs, prompt=None, **kwargs):
        features = original(inputs, prompt=prompt, **kwargs)
        first = features["input_ids"][0][features["attention_mask"][0].bool()]
        seen.append((prompt or "", list(inputs), module.tokenizer.decode(first)))
        return features

    module.preprocess = preprocess
    return model, seen


def rendered(prompt: str, text: str) -> str:
    return f"This sentence: <|im_start|>\u201c{prompt}{text}\u201d means in one word: \u201c"


def test_every_task_type_runs_through_mteb_with_the_prompt_of_its_type(recording_model):
    model, seen = recording_model
    assert model[0].tp_layers == [1, 2, 3, 4, 5, 6, 7] and model[0].token_prepending is not None
    prompts = model.prompts
    for task_type in ("STS", "PairClassification", "Classification", "Clustering"):
        assert prompts[task_type] == f"Instruct: {TYPE_INSTRUCTIONS['en'][task_type]}\nQuery: "
    expected = {
        LocalSTS: {prompts["STS"]},
        LocalPairClassification: {prompts["PairClassification"]},
        LocalClassification: {prompts["Classification"]},
        LocalClustering: {prompts["Clustering"]},
        LocalRetrieval: {prompts["Retrieval-query"], ""},
        LocalReranking: {prompts["Reranking-query"], ""},
    }
    for task_class, prompts_seen in expected.items():
        seen.clear()
        result = mteb.evaluate(model, task_class(), cache=None, show_progress_bar=False)
        score = result.task_results[0].get_score()
        assert math.isfinite(score), task_class.__name__
        assert {prompt for prompt, _, _ in seen} == prompts_seen, task_class.__name__
        for prompt, texts, decoded in seen:
            assert decoded == rendered(prompt, texts[0])  # what the model read, template and all
            if task_class in (LocalRetrieval, LocalReranking):
                is_query = texts[0].startswith("What is")
                assert prompt == (prompts[f"{task_class.metadata.type}-query"] if is_query else "")


def test_sts_and_retrieval_through_mteb_equal_tpembeds_own_evaluator(
    export_dir, export_encode, quickstart_stage2, run_embedder, tmp_path
):
    """mteb.evaluate(SentenceTransformer(export)) and TPEmbedMTEBModel(run) against tpembed-eval's own
    numbers on the same pairs and queries, at two Matryoshka dims."""
    sts_file, beir = tmp_path / "sts.jsonl", tmp_path / "beir"
    sts_file.write_text("\n".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) for a, b, s in STS_PAIRS))
    split = retrieval_split(reranking=False)
    (beir / "qrels").mkdir(parents=True)
    for name, rows in (("corpus", split["corpus"]), ("queries", split["queries"])):
        (beir / f"{name}.jsonl").write_text("\n".join(json.dumps({"_id": r["id"], "text": r["text"]}) for r in rows))
    (beir / "qrels/test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(12))
    )
    tasks = [
        EvalTaskConfig("LocalSTS", "sts", str(sts_file), TYPE_INSTRUCTIONS["en"]["STS"]),
        EvalTaskConfig("LocalRetrieval", "retrieval", str(beir), TYPE_INSTRUCTIONS["en"]["Retrieval"]),
    ]
    dims = [256, 1792]
    ours = evaluate(export_encode, tasks, dims)["tasks"]
    run_ours = evaluate(embedder_encode_fn(run_embedder), tasks, dims)["tasks"]
    adapter = TPEmbedMTEBModel(str(quickstart_stage2[0]), embedder=run_embedder)
    through_adapter = run_mteb(adapter, [LocalSTS(), LocalRetrieval()], dims)["tasks"]
    model = SentenceTransformer(str(export_dir), trust_remote_code=True, device="cpu")
    for dim in dims:
        model.truncate_dim = dim
        sts, retrieval = mteb.evaluate(model, [LocalSTS(), LocalRetrieval()], cache=None, show_progress_bar=False)
        assert sts.get_score() == pytest.approx(ours["LocalSTS"]["by_dim"][str(dim)]["spearman"] / 100, abs=1e-6)
        # mteb rounds retrieval metrics to 5 decimals
        ndcg = ours["LocalRetrieval"]["by_dim"][str(dim)]["ndcg@10"] / 100
        assert retrieval.get_score() == pytest.approx(ndcg, abs=5e-6 + 1e-9)
        for name, metric, tolerance in (("LocalSTS", "spearman", 1e-4), ("LocalRetrieval", "ndcg@10", 5e-4 + 1e-7)):
            mteb_metric = through_adapter[name]["main_metric"]
            assert through_adapter[name]["by_dim"][str(dim)][mteb_metric] == pytest.approx(
                run_ours[name]["by_dim"][str(dim)][metric], abs=tolerance
            )


def test_a_second_model_gets_its_own_scores(
    export_dir, export_encode, export_adapter, quickstart_stage1, monkeypatch, tmp_path
):
    """Both through mteb's default cache: each model's results are filed under its own name."""
    monkeypatch.setenv("MTEB_CACHE", str(tmp_path / "cache"))
    task = EvalTaskConfig("LocalSTS", "sts", "", TYPE_INSTRUCTIONS["en"]["STS"])
    data = {"LocalSTS": tuple(map(list, zip(*STS_PAIRS)))}
    stage1 = Embedder.from_checkpoint(quickstart_stage1)
    scores = {}
    models = ((export_dir, export_adapter, export_encode), (quickstart_stage1, None, embedder_encode_fn(stage1)))
    for path, adapter, encode in models:
        adapter = adapter or TPEmbedMTEBModel(str(path), embedder=stage1)
        results = run_mteb(adapter, [LocalSTS()], [1792], cache=mteb.ResultCache())
        own = evaluate(encode, [task], [1792], loaded=data)["tasks"]["LocalSTS"]
        scores[path] = results["tasks"]["LocalSTS"]["by_dim"]["1792"]["cosine_spearman"]
        assert scores[path] == pytest.approx(own["by_dim"]["1792"]["spearman"], abs=1e-4)
    assert scores[export_dir] != pytest.approx(scores[quickstart_stage1], abs=1e-3)
    names = sorted(p.name for p in (tmp_path / "cache" / "results").iterdir())
    assert names == ["tpembed__quickstart", "tpembed__stage1"]


def test_the_cards_snippet_names_a_plain_sentence_transformer(recording_model, monkeypatch, tmp_path):
    """Unnamed, mteb files every local SentenceTransformer under one name; the card sets one."""
    monkeypatch.setenv("MTEB_CACHE", str(tmp_path / "cache"))
    model, _ = recording_model
    monkeypatch.setattr(model.model_card_data, "model_name", "tpembed/quickstart-plain")
    assert mteb.evaluate(model, LocalSTS(), show_progress_bar=False, cache=mteb.ResultCache()).model_name == (
        "tpembed/quickstart-plain"
    )
    assert [p.name for p in (tmp_path / "cache" / "results").iterdir()] == ["tpembed__quickstart-plain"]


def test_tpembed_eval_mteb_writes_results_table_plot_and_card_line(export_dir, monkeypatch, tmp_path, capsys):
    from tpembed.train import mteb_adapter

    monkeypatch.setattr(mteb_adapter, "resolve_mteb_tasks", lambda names, skip: ([LocalSTS(), LocalClustering()], []))
    out = tmp_path / "out"
    assert (
        main(
            [str(export_dir), "--mteb", "LocalSTS", "--dims", "128", "1792", "--output-dir", str(out), "--no-progress"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "tpembed/quickstart" and results["dims"] == [128, 1792]
    assert set(results["tasks"]["LocalSTS"]["by_dim"]) == {"128", "1792"}
    assert results["summary"].startswith("mteb: mean ") and results["summary"] in printed
    assert (out / "dims.png").is_file()
    files = sorted(p.relative_to(out / "mteb" / "results") for p in (out / "mteb" / "results").rglob("LocalSTS.json"))
    assert [p.parts[0] for p in files] == ["tpembed__quickstart"] * 2
    assert sorted(p.parts[-2] for p in files) == ["dim_128", "dim_1792"]
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text((export_dir / "README.md").read_text())
    add_results_to_card(card, out / "results.json")
    assert results["summary"] in (card / "README.md").read_text()


def test_bad_input_fails_before_the_model_is_loaded(export_dir, monkeypatch, tmp_path, capsys):
    from tpembed.train import mteb_adapter

    def must_not_run(*args, **kwargs):
        raise AssertionError("neither the model nor mteb.evaluate may run on bad input")

    monkeypatch.setattr(mteb, "evaluate", must_not_run)
    monkeypatch.setattr(mteb_adapter, "TPEmbedMTEBModel", must_not_run)
    table = tmp_path / "table.yaml"
    table.write_text("tasks:\n  MyTask: {type: Retreival, instruction: find}\n")
    cases = [
        (["--mteb", "T2Retrievl"], "neither an mteb benchmark nor an mteb task"),
        (["--mteb", "MTEB(cmn, v2)"], "MTEB(cmn, v1)"),
        (["--mteb", "LCQMC", "--dims", "4096"], "--dims 4096: the model's embeddings have 1792 numbers"),
        (["--mteb", "LCQMC", "--instruction", "Retreival=find"], "unknown task type or task 'Retreival'"),
        (["--mteb", "LCQMC", "--instructions", str(table)], "task 'MyTask': unknown task type 'Retreival'"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit):
            main([str(export_dir), *flags])
        assert message in capsys.readouterr().err, flags
    monkeypatch.setitem(sys.modules, "mteb", None)  # as if mteb were not installed
    with pytest.raises(SystemExit):
        main([str(export_dir), "--mteb", "LCQMC"])
    assert "pip install 'tpembed[mteb]'" in capsys.readouterr().err


def test_a_task_whose_data_cannot_be_reached_fails_with_what_to_do(export_dir, monkeypatch, capsys):
    from tpembed.train import mteb_adapter

    class Unreachable(LocalSTS):
        def load_data(self, **kwargs):
            raise ConnectionError("Couldn't reach 'C-MTEB/LCQMC' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(mteb_adapter, "resolve_mteb_tasks", lambda names, skip: ([Unreachable()], []))
    assert main([str(export_dir), "--mteb", "LCQMC", "--dims", "256", "1792", "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert "mteb could not load or run LocalSTS: Couldn't reach 'C-MTEB/LCQMC'" in error and "run it online" in error


def test_an_export_without_task_type_prompts_still_loads_and_says_so(export_dir, export_encode, tmp_path):
    """Older exports hold only `query` and `document`: mteb reads STS without instruction."""
    old = tmp_path / "old"
    old.mkdir()
    for path in export_dir.rglob("*"):
        target = old / path.relative_to(export_dir)
        target.mkdir(exist_ok=True) if path.is_dir() else target.write_bytes(path.read_bytes())
    config = json.loads((old / "config_sentence_transformers.json").read_text())
    config["prompts"] = {name: config["prompts"][name] for name in ("query", "document")}
    (old / "config_sentence_transformers.json").write_text(json.dumps(config))
    adapter = TPEmbedMTEBModel(str(old))
    assert not adapter.has_task_type_prompts and adapter.prompt_for("LocalSTS", "STS") == ""
    texts = [a for a, _, _ in STS_PAIRS[:4]]
    encoded = adapter.encode([{"text": texts}], task_metadata=LocalSTS.metadata, prompt_type=None)
    torch.testing.assert_close(torch.as_tensor(encoded), export_encode(texts, None), atol=1e-5, rtol=0)


def test_the_card_and_the_model_meta_list_the_training_datasets(
    export_dir, export_adapter, quickstart_stage1, quickstart_stage2, run_embedder
):
    from tpembed.train.config import load_saved_config

    names = set()
    for config_path in (quickstart_stage2[0] / "config.yaml", quickstart_stage1 / "config.yaml"):
        for dataset in load_saved_config(config_path).data.datasets:
            names.add(dataset.name or dataset.path.rsplit("/", 1)[-1].removesuffix(".jsonl"))
    card = (export_dir / "README.md").read_text()
    assert "training_datasets = {" + ", ".join(f'"{n}"' for n in sorted(names)) + "}" in card
    for adapter in (export_adapter, TPEmbedMTEBModel(str(quickstart_stage2[0]), embedder=run_embedder)):
        adapter.dim = 256
        meta = adapter.mteb_model_meta
        assert meta.training_datasets == names and meta.embed_dim == 256 and meta.experiment_kwargs == {"dim": 256}
