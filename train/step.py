"""A micro-batch's loss: embed both sides, then the loss of its task."""

from __future__ import annotations

import torch

from tpembed.data import MicroBatch, Task
from tpembed.modeling import EmbeddingObjective


def micro_step_loss(encoder, objective: EmbeddingObjective, batch: MicroBatch, device) -> tuple[torch.Tensor, dict]:
    """Embed both sides of a micro-batch and compute its task loss."""
    anchors = encoder(**to_device(batch.anchors, device))
    candidates = encoder(**to_device(batch.candidates, device))
    return task_loss(objective, batch, anchors, candidates, device)


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
