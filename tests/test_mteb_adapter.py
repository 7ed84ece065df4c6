"""The mteb adapter, tested offline with mteb-shaped inputs (mteb itself needs the hub)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tpembed.train.embedder import Embedder
from tpembed.train.mteb_adapter import DEFAULT_INSTRUCTIONS, TPEmbedMTEBModel


@pytest.fixture(scope="module")
def adapter(quickstart_stage2):
    embedder = Embedder.from_checkpoint(quickstart_stage2[0])
    return TPEmbedMTEBModel("quickstart", embedder=embedder, dim=256, instructions={"MyRetrieval": "find answers"})


def batches(texts, size=2):
    return [{"text": texts[i : i + size]} for i in range(0, len(texts), size)]


def reference(adapter, texts, instruction):
    full = adapter.embedder.encode(texts, instruction)
    return torch.nn.functional.normalize(full[:, :256], dim=-1).numpy()


TEXTS = ["what is a cat", "a cat is an animal", "dogs bark"]


def test_queries_get_the_task_instruction_and_documents_none(adapter):
    task = SimpleNamespace(name="MyRetrieval", type="Retrieval")
    queries = adapter.encode(
        batches(TEXTS), task_metadata=task, hf_split="test", hf_subset="default", prompt_type="query"
    )
    documents = adapter.encode(
        batches(TEXTS),
        task_metadata=task,
        hf_split="test",
        hf_subset="default",
        prompt_type=SimpleNamespace(value="document"),
    )
    np.testing.assert_allclose(queries, reference(adapter, TEXTS, "find answers"), atol=1e-6)
    np.testing.assert_allclose(documents, reference(adapter, TEXTS, None), atol=1e-6)
    assert queries.shape == (3, 256)


def test_symmetric_tasks_use_the_type_default_on_both_sides(adapter):
    task = SimpleNamespace(name="SomeSTS", type="STS")
    encoded = adapter.encode(batches(TEXTS), task_metadata=task, hf_split="test", hf_subset="default", prompt_type=None)
    np.testing.assert_allclose(encoded, reference(adapter, TEXTS, DEFAULT_INSTRUCTIONS["STS"]), atol=1e-6)


def test_similarity_is_cosine(adapter):
    a, b = np.random.default_rng(0).normal(size=(2, 256)), np.random.default_rng(1).normal(size=(3, 256))
    expected = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    np.testing.assert_allclose(adapter.similarity(a, b).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(adapter.similarity_pairwise(a, b[:2]).numpy(), np.diag(expected[:, :2]), atol=1e-6)
