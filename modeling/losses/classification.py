"""Classification / clustering loss: InfoNCE with same-label candidates masked.

What is optimised (docs/method.md section 6): anchors t_i with a positive t_i+ of the
same label and negatives of other labels; the denominator holds every passage
candidate and every other anchor, except those that share t_i's label (other
anchors, their positives, their negatives), which would otherwise be false
negatives. The anchor's own positive always stays. Inputs are normalised inside.
"""

from __future__ import annotations

import torch

from tpembed.modeling.losses.infonce import info_nce_loss


def masked_classification_loss(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive_indices: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    temperature: float,
    *,
    anchor_pool: torch.Tensor | None = None,
    anchor_pool_labels: torch.Tensor | None = None,
    anchor_pool_self_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean masked InfoNCE over `anchors`.

    Args:
        anchors: (n, D); candidates: (M, D); positive_indices: (n,) as in `info_nce_loss`.
        anchor_labels: (n,) int64 labels of the anchors.
        candidate_labels: (M,) int64 labels of the candidates.
        anchor_pool, anchor_pool_labels, anchor_pool_self_indices: (N, D), (N,), (n,)
            every anchor for the anchor-anchor term, with labels; None leaves it out.
    """
    candidate_mask = anchor_labels[:, None] == candidate_labels[None, :]  # (n, M)
    anchor_pool_mask = None
    if anchor_pool is not None:
        if anchor_pool_labels is None:
            raise ValueError("anchor_pool_labels is required with anchor_pool")
        anchor_pool_mask = anchor_labels[:, None] == anchor_pool_labels[None, :]  # (n, N)
    return info_nce_loss(
        anchors,
        candidates,
        positive_indices,
        temperature,
        anchor_pool=anchor_pool,
        anchor_pool_self_indices=anchor_pool_self_indices,
        candidate_mask=candidate_mask,
        anchor_pool_mask=anchor_pool_mask,
    )
