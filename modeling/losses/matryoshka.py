"""Matryoshka representation learning (Kusupati et al., arXiv 2205.13147).

The task loss is computed on every prefix of the embedding and summed with
weights: L = sum_d w_d * L_task(e[:, :d]). Task losses normalise their inputs, so
each prefix is normalised after slicing. The backbone runs once per batch; only
the (cheap) loss is repeated per dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def matryoshka_loss(
    task_loss: Callable[..., torch.Tensor],
    embeddings: Sequence[torch.Tensor],
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Sum of `task_loss` over embedding prefixes.

    Args:
        task_loss: called as task_loss(*[e[:, :d] for e in embeddings]) for each dim.
        embeddings: tensors (rows, D_full) that are sliced together.
        dims: prefix sizes, ascending, each <= D_full.
        weights: one per dim; 1.0 each when None.

    Returns:
        (weighted sum, {dim: unweighted loss at that dim (detached)}).
    """
    if weights is None:
        weights = [1.0] * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"{len(weights)} Matryoshka weights for {len(dims)} dims")
    full_dim = embeddings[0].shape[-1]
    if max(dims) > full_dim:
        raise ValueError(f"Matryoshka dim {max(dims)} exceeds the embedding size {full_dim}")
    total = embeddings[0].new_zeros(())
    per_dim: dict[int, torch.Tensor] = {}
    for dim, weight in zip(dims, weights):
        loss = task_loss(*[embedding[:, :dim] for embedding in embeddings])
        per_dim[dim] = loss.detach()
        total = total + weight * loss
    return total, per_dim
