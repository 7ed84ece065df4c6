"""Evaluate a tpembed model with mteb (needs `pip install mteb` and hub access for its datasets).

    import mteb
    from tpembed.train.mteb_adapter import TPEmbedMTEBModel

    model = TPEmbedMTEBModel("runs/qwen3_8b_stage2", dim=1792,
                             instructions={"T2Retrieval": "为这个问题检索相关的段落"})
    results = mteb.evaluate(model, tasks=mteb.get_tasks(tasks=["T2Retrieval", "LCQMC"]))

The adapter follows mteb's encoder protocol (mteb 2.x): `encode` receives batches
of texts with the task's metadata and a prompt type. Queries (prompt type
"query") and both sides of symmetric tasks (no prompt type: STS, classification,
clustering, pair classification) get the task's instruction in tpembed's format;
documents are encoded raw, exactly as in training. Instructions come from
`instructions` by task name, else by task type (DEFAULT_INSTRUCTIONS). Embeddings
are sliced to `dim` and L2-normalised (Matryoshka), similarity is cosine.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from tpembed.train.embedder import Embedder

DEFAULT_INSTRUCTIONS = {
    "Retrieval": "Given a web search query, retrieve relevant passages that answer the query",
    "Reranking": "Given a query, retrieve documents that answer the query",
    "STS": "Retrieve semantically similar text",
    "PairClassification": "Retrieve text that is semantically similar to the given text",
    "Classification": "Classify the given text",
    "MultilabelClassification": "Classify the given text",
    "Clustering": "Identify the topic or theme of the given text",
    "Summarization": "Retrieve semantically similar summaries",
    "BitextMining": "Retrieve parallel sentences",
}


class TPEmbedMTEBModel:
    """mteb encoder wrapping a tpembed run, checkpoint or model directory."""

    def __init__(
        self,
        model_name: str,
        revision: str | None = None,
        *,
        device: str | None = None,
        dim: int | None = None,
        instructions: dict[str, str] | None = None,
        batch_size: int = 32,
        embedder: Embedder | None = None,
        **kwargs,
    ):
        self.model_name = model_name
        self.embedder = embedder or Embedder.from_checkpoint(model_name, device=device)
        self.dim = dim or self.embedder.embedding_dim
        self.instructions = dict(instructions or {})
        self.batch_size = batch_size

    def instruction_for(self, task_name: str, task_type: str) -> str | None:
        return self.instructions.get(task_name) or DEFAULT_INSTRUCTIONS.get(task_type)

    def encode(
        self, inputs: Iterable, *, task_metadata, hf_split: str = "", hf_subset: str = "", prompt_type=None, **kwargs
    ) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        kind = getattr(prompt_type, "value", prompt_type)
        instruction = None if kind == "document" else self.instruction_for(task_metadata.name, task_metadata.type)
        embeddings = self.embedder.encode(texts, instruction, batch_size=self.batch_size)
        return F.normalize(embeddings[:, : self.dim], dim=-1).numpy()

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        a, b = (
            F.normalize(torch.as_tensor(e, dtype=torch.float32).reshape(-1, self.dim), dim=-1)
            for e in (embeddings1, embeddings2)
        )
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        a, b = (
            F.normalize(torch.as_tensor(e, dtype=torch.float32).reshape(-1, self.dim), dim=-1)
            for e in (embeddings1, embeddings2)
        )
        return (a * b).sum(-1)

    @property
    def mteb_model_meta(self):
        """mteb's ModelMeta (built lazily: mteb is an optional dependency)."""
        from mteb.models import ModelMeta

        return ModelMeta(
            loader=None,
            name=f"tpembed/{self.model_name.rstrip('/').split('/')[-1]}",
            revision="local",
            release_date=None,
            languages=None,
            n_parameters=sum(p.numel() for p in self.embedder.encoder.parameters()),
            memory_usage_mb=None,
            max_tokens=self.embedder.text.passage_max_len,
            embed_dim=self.dim,
            license=None,
            open_weights=True,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch"],
            similarity_fn_name="cosine",
            use_instructions=True,
            training_datasets=None,
        )
