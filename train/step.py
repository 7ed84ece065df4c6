"""A micro-batch's loss: embed both sides, then the loss of its task."""

from __future__ import annotations

import torch

from tpembed.data import MicroBatch, Task
from tpembed.modeling import EmbeddingObjective


def micro_step_loss(
    encoder, objective: EmbeddingObjective, batch: MicroBatch, device, stats: dict | None = None
) -> tuple[torch.Tensor, dict]:
    """Embed both sides of a micro-batch and compute its task loss; with `stats`, also store there
    the anchors' mean cosine (`mean_cosine`, no gradient)."""
    anchors = encoder(**to_device(batch.anchors, device))
    candidates = encoder(**to_device(batch.candidates, device))
    if stats is not None:
        stats["mean_cosine"] = mean_cosine(anchors)
    return task_loss(objective, batch, anchors, candidates, device)


def mean_cosine(embeddings: torch.Tensor) -> torch.Tensor:
    """The mean cosine between different rows of `embeddings` (no gradient; NaN for fewer than two
    rows). It rises towards 1 when the encoder maps every text to nearly the same vector, which
    losses that only order similarities (CoSENT) do not prevent: a collapse signal."""
    with torch.no_grad():
        unit = torch.nn.functional.normalize(embeddings.detach().float(), dim=-1)
        rows = unit.shape[0]
        if rows < 2:
            return torch.tensor(float("nan"), device=unit.device)
        total = unit.sum(dim=0)
        # the sum of all pairwise cosines is |sum of the unit rows|^2; the diagonal adds `rows`
        return (total @ total - rows) / (rows * (rows - 1))


def task_loss(objective: EmbeddingObjective, batch: MicroBatch, anchors, candidates, device):
    """InfoNCE (retrieval), masked InfoNCE (classification) or CoSENT (sts) of the embedded batch;
    returns (weighted Matryoshka loss, {dim: loss})."""
    if batch.task is Task.retrieval:
        text_ids = batch.candidate_text_ids
        return objective.retrieval(anchors, candidates, text_ids.to(device) if text_ids is not None else None)
    if batch.task is Task.classification:
        labels = batch.anchor_labels.to(device), batch.candidate_labels.to(device)
        return objective.classification(anchors, candidates, *labels)
    return objective.sts(anchors, candidates, batch.scores.to(device))


def to_device(tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in tensors.items()}
