"""The instruction table, mteb's prompt-key order, and the mteb encoder on a tiny random model.

tests/test_mteb.py runs exported models through mteb.evaluate; these check the pieces alone.
"""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO
from tpembed.data import TEMPLATES, TextFormat
from tpembed.train.config import ConfigError
from tpembed.train.embedder import Embedder, TextConfig
from tpembed.train.mteb_adapter import (
    ASYMMETRIC_TYPES,
    CMTEB_TASKS,
    TYPE_INSTRUCTIONS,
    InstructionTable,
    MTEBUsageError,
    TPEmbedMTEBModel,
    build_instruction_table,
    parse_assignments,
    prompt_key,
    read_instruction_file,
    table_prompts,
)


def test_prompt_key_follows_mtebs_own_order():
    """Every subset of the five candidate keys, for both prompt types and none: the same key as mteb's."""
    mteb = pytest.importorskip("mteb")
    from mteb.models.abs_encoder import get_prompt_name
    from mteb.types import PromptType

    task = mteb.get_task("T2Retrieval").metadata
    candidates = ["T2Retrieval-query", "T2Retrieval", "Retrieval-query", "Retrieval", "query", "document"]
    for size in range(len(candidates) + 1):
        for keys in itertools.combinations(candidates, size):
            prompts = {key: key for key in keys}
            for prompt_type in (PromptType.query, PromptType.document, None):
                ours = prompt_key(prompts, task.name, task.type, prompt_type.value if prompt_type else None)
                assert ours == get_prompt_name(prompts, task, prompt_type), (keys, prompt_type)


def test_the_cmteb_instructions_are_mtebs_task_prompts():
    mteb = pytest.importorskip("mteb")
    cmteb = {task.metadata.name: task.metadata for task in mteb.get_benchmark("MTEB(cmn, v1)").tasks}
    assert set(CMTEB_TASKS) == {name for name, meta in cmteb.items() if meta.prompt}
    for name, (task_type, instruction) in CMTEB_TASKS.items():
        prompt = cmteb[name].prompt
        assert cmteb[name].type == task_type
        assert instruction == (prompt["query"] if isinstance(prompt, dict) else prompt), name


def test_the_documented_tables_are_the_code():
    doc = (REPO / "docs/export-and-evaluation.md").read_text()
    for task_type, instruction in TYPE_INSTRUCTIONS["en"].items():
        key = f"{task_type}-query" if task_type in ASYMMETRIC_TYPES else task_type
        assert f"| `{key}` | {instruction} | {TYPE_INSTRUCTIONS['zh'][task_type]} |" in doc, task_type
    for name, (task_type, instruction) in CMTEB_TASKS.items():
        key = f"{name}-query" if task_type in ASYMMETRIC_TYPES else name
        assert f"| `{key}` | {task_type} | {instruction} |" in doc, name


def test_the_table_renders_into_mtebs_keys_with_documents_raw():
    table = InstructionTable.default("en")
    keys = table.prompt_instructions()
    for task_type in ("STS", "PairClassification", "Classification", "Clustering"):
        assert keys[task_type] == TYPE_INSTRUCTIONS["en"][task_type]
    for task_type in ("Retrieval", "Reranking"):
        assert keys[f"{task_type}-query"] == TYPE_INSTRUCTIONS["en"][task_type] and keys[f"{task_type}-document"] == ""
        assert task_type not in keys
    # a bare task name would reach the documents too: retrieval-like tasks only as NAME-query
    assert keys["T2Retrieval-query"] == CMTEB_TASKS["T2Retrieval"][1] and "T2Retrieval" not in keys
    assert keys["TNews"] == CMTEB_TASKS["TNews"][1]
    prompts = table_prompts(table, "find passages", lambda text: f"<{text}>")
    assert (
        prompts["query"] == "<find passages>"
        and prompts["document"] == ""
        and prompts["STS"] == "<Retrieve semantically similar text>"
    )
    assert prompts["Retrieval-document"] == ""
    zh = table_prompts(InstructionTable.default("zh"), None, lambda text: text)
    assert zh["STS"] == TYPE_INSTRUCTIONS["zh"]["STS"] and zh["query"] == TYPE_INSTRUCTIONS["zh"]["Retrieval"]


def test_a_yaml_table_and_flags_override_the_defaults(tmp_path):
    path = tmp_path / "table.yaml"
    path.write_text(
        "language: zh\n"
        "task_types:\n  STS: 判断语义\n  Classification: null\n"
        "tasks:\n  T2Retrieval: 检索段落\n  MyRetrieval: {type: Retrieval, instruction: find it}\n"
    )
    table = build_instruction_table("en", path, parse_assignments(["Clustering=主题", "TNews=新闻"], "--instruction"))
    keys = table.prompt_instructions()
    assert table.language == "zh" and keys["Retrieval-query"] == TYPE_INSTRUCTIONS["zh"]["Retrieval"]
    assert keys["STS"] == "判断语义" and keys["Classification"] == "" and keys["Clustering"] == "主题"
    assert keys["T2Retrieval-query"] == "检索段落" and keys["TNews"] == "新闻"
    assert keys["MyRetrieval-query"] == "find it" and "MyRetrieval" not in keys
    assert read_instruction_file(path)[0] == "zh"


@pytest.mark.parametrize(
    "text, message",
    [
        ("task_types:\n  Retreival: x\n", "unknown task type or task 'Retreival'"),
        ("tasks:\n  MyTask: find\n", "another task needs its type"),
        ("tasks:\n  MyTask: {type: Search, instruction: x}\n", "task 'MyTask': unknown task type 'Search'"),
        ("instructions:\n  STS: x\n", "expected the keys language, task_types and tasks, got instructions"),
        ("task_types: [unclosed\n", "cannot read the instruction table"),
        ("language: fr\n", "no default instructions for language 'fr'"),
    ],
)
def test_a_bad_table_fails_with_what_to_change(tmp_path, text, message):
    path = tmp_path / "table.yaml"
    path.write_text(text)
    with pytest.raises(MTEBUsageError, match=message.replace("[", r"\[").replace("(", r"\(")):
        build_instruction_table("en", path)
    with pytest.raises(MTEBUsageError, match="expects KEY=INSTRUCTION"):
        parse_assignments(["STS"], "--instruction")


@pytest.fixture
def adapter(tiny_encoder, qwen_tokenizer):
    text = TextConfig(TextFormat(template=TEMPLATES["instruction"]), query_max_len=32, passage_max_len=32)
    embedder = Embedder(tiny_encoder, qwen_tokenizer, text, device="cpu")
    return TPEmbedMTEBModel("tiny", embedder=embedder, dim=256, instructions={"T2Retrieval": "find answers"})


TEXTS = ["what is a cat", "a cat is an animal", "dogs bark"]


def encode(adapter, name, task_type, prompt_type):
    return adapter.encode(
        [{"text": TEXTS[:2]}, {"text": TEXTS[2:]}],
        task_metadata=SimpleNamespace(name=name, type=task_type),
        prompt_type=prompt_type,
    )


def reference(adapter, instruction, dim=256):
    return adapter.backend.encode(TEXTS, instruction)[:, :dim].numpy()  # the first `dim` numbers, as truncate_dim


def test_queries_get_the_instruction_documents_none_symmetric_tasks_their_types(adapter):
    np.testing.assert_allclose(
        encode(adapter, "T2Retrieval", "Retrieval", "query"), reference(adapter, "find answers"), atol=1e-6
    )
    documents = encode(adapter, "T2Retrieval", "Retrieval", SimpleNamespace(value="document"))
    np.testing.assert_allclose(documents, reference(adapter, None), atol=1e-6)
    sts = encode(adapter, "SomeSTS", "STS", None)
    np.testing.assert_allclose(sts, reference(adapter, TYPE_INSTRUCTIONS["en"]["STS"]), atol=1e-6)
    tnews = encode(adapter, "TNews", "Classification", None)
    np.testing.assert_allclose(tnews, reference(adapter, CMTEB_TASKS["TNews"][1]), atol=1e-6)
    assert sts.shape == (3, 256)


def test_one_encoding_serves_every_dim_while_reuse_is_on(adapter, monkeypatch):
    calls = []
    original = adapter.backend.encode
    monkeypatch.setattr(
        adapter.backend, "encode", lambda texts, prompt: calls.append(prompt) or original(texts, prompt)
    )
    adapter.reuse_embeddings = True
    at_256 = encode(adapter, "SomeSTS", "STS", None)
    adapter.dim = 128
    at_128 = encode(adapter, "SomeSTS", "STS", None)
    assert len(calls) == 1 and at_128.shape == (3, 128)
    np.testing.assert_array_equal(at_128, at_256[:, :128])
    adapter.forget()
    encode(adapter, "SomeSTS", "STS", None)
    assert len(calls) == 2


def test_similarity_is_cosine(adapter):
    a, b = np.random.default_rng(0).normal(size=(2, 256)), np.random.default_rng(1).normal(size=(3, 256))
    expected = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    np.testing.assert_allclose(adapter.similarity(a, b).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(adapter.similarity_pairwise(a, b[:2]).numpy(), np.diag(expected[:, :2]), atol=1e-6)
    assert isinstance(adapter.similarity(torch.ones(1, 4), torch.ones(1, 4)), torch.Tensor)


def test_a_dim_larger_than_the_model_is_refused(tiny_encoder, qwen_tokenizer):
    text = TextConfig(TextFormat(template=TEMPLATES["instruction"]), 32, 32)
    with pytest.raises(ConfigError, match="--dims 4096: the model's embeddings have 1792 numbers"):
        TPEmbedMTEBModel("tiny", embedder=Embedder(tiny_encoder, qwen_tokenizer, text, device="cpu"), dim=4096)
