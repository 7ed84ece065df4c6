"""InfoNCE with in-batch passages, hard negatives and query-query negatives.

What is optimised (docs/method.md section 6; Qwen3-Embedding, arXiv 2506.05176, for
the false-negative rule): for anchor i with positive candidate p(i),

    l_i = -log( exp(s(q_i, d_p(i)) / tau) / Z_i )
    Z_i = sum_j exp(s(q_i, d_j) / tau)            every passage candidate, positive included
        + sum_{k != i} exp(s(q_i, q_k) / tau)     every other anchor (query-query term)

and the loss is the mean of l_i over the anchors given. `s` is cosine similarity;
the inputs are normalised here, so a Matryoshka slice can be passed as is.
There are no passage->query or passage->passage terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce_loss(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive_indices: torch.Tensor,
    temperature: float,
    *,
    anchor_pool: torch.Tensor | None = None,
    anchor_pool_self_indices: torch.Tensor | None = None,
    candidate_mask: torch.Tensor | None = None,
    anchor_pool_mask: torch.Tensor | None = None,
    false_negative_margin: float | None = None,
    candidate_text_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE over `anchors`.

    Args:
        anchors: (n, D) the anchors whose loss this call computes (local to a rank).
        candidates: (M, D) every passage candidate (gathered over ranks).
        positive_indices: (n,) index into `candidates` of each anchor's positive.
        temperature: tau; logits are cosine / tau.
        anchor_pool: (N, D) every anchor (gathered) for the query-query term, or None
            to leave that term out.
        anchor_pool_self_indices: (n,) index of each anchor inside `anchor_pool`;
            that entry is never a negative of itself.
        candidate_mask: (n, M) bool, True removes the candidate from Z_i (used for
            same-label masking). The positive itself is never removed.
        anchor_pool_mask: (n, N) bool, the same for the query-query term.
        false_negative_margin: when set, a candidate (passage or anchor) whose
            cosine exceeds the positive's by more than this margin is removed from
            Z_i (Qwen3-Embedding's rule; off by default).
        candidate_text_ids: (M,) int64 ids of the candidate texts; when given with
            a margin, a passage whose text equals the anchor's positive is removed too.

    Returns:
        scalar loss.
    """
    n = anchors.shape[0]
    rows = torch.arange(n, device=anchors.device)
    anchors = F.normalize(anchors, dim=-1)
    candidates = F.normalize(candidates, dim=-1)

    passage_logits = anchors @ candidates.T / temperature  # (n, M)
    positive_logits = passage_logits[rows, positive_indices]  # (n,)

    passage_removed = _empty_mask(passage_logits) if candidate_mask is None else candidate_mask.clone()
    if false_negative_margin is not None:
        with torch.no_grad():
            threshold = positive_logits[:, None] + false_negative_margin / temperature
            passage_removed |= passage_logits > threshold
            if candidate_text_ids is not None:
                positive_ids = candidate_text_ids[positive_indices]  # (n,)
                passage_removed |= candidate_text_ids[None, :] == positive_ids[:, None]
    passage_removed[rows, positive_indices] = False
    logits = [passage_logits.masked_fill(passage_removed, float("-inf"))]

    if anchor_pool is not None:
        if anchor_pool_self_indices is None:
            raise ValueError("anchor_pool_self_indices is required with anchor_pool")
        anchor_pool = F.normalize(anchor_pool, dim=-1)
        pool_logits = anchors @ anchor_pool.T / temperature  # (n, N)
        pool_removed = _empty_mask(pool_logits) if anchor_pool_mask is None else anchor_pool_mask.clone()
        if false_negative_margin is not None:
            with torch.no_grad():
                pool_removed |= pool_logits > positive_logits[:, None] + false_negative_margin / temperature
        pool_removed[rows, anchor_pool_self_indices] = True
        logits.append(pool_logits.masked_fill(pool_removed, float("-inf")))

    log_partition = torch.logsumexp(torch.cat(logits, dim=1), dim=1)  # (n,)
    return (log_partition - positive_logits).mean()


def _empty_mask(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
