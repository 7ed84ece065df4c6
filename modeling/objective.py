"""The training objective: task loss by task type, under Matryoshka, across ranks.

Candidates (passages, other anchors, the other side of STS pairs) are gathered
from every rank with gradient; anchors stay local. Each rank's loss is scaled so
that the data-parallel mean of the per-rank gradients equals the gradient of one
process holding the whole global batch:

- InfoNCE (retrieval, classification): each rank averages over its own anchors,
  which is the global mean once ranks are averaged.
- CoSENT compares every pair with every other pair, so each rank computes the loss
  of the whole gathered batch; the gather's backward sums the world's identical
  gradients and the data-parallel mean divides them back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tpembed.modeling import distributed
from tpembed.modeling.losses import cosent_loss, info_nce_loss, masked_classification_loss, matryoshka_loss


class EmbeddingObjective:
    """The loss of one micro-batch of embeddings, one method per task type.

    Layouts (rows are local to this rank):
        retrieval / classification: anchors (n, D); candidates (n * g, D) grouped per
            anchor as [positive, negative_1, ..., negative_{g-1}].
        sts: anchors (n, D) the left texts, candidates (n, D) the right texts,
            `scores` (n,) the gold scores.
    """

    def __init__(
        self,
        mrl_dims: Sequence[int],
        mrl_weights: Sequence[float] | None = None,
        temperature: float = 0.02,
        cosent_temperature: float = 0.02,
        query_query_negatives: bool = True,
        false_negative_margin: float | None = None,
    ):
        self.mrl_dims = list(mrl_dims)
        self.mrl_weights = list(mrl_weights) if mrl_weights is not None else None
        self.temperature = temperature
        self.cosent_temperature = cosent_temperature
        self.query_query_negatives = query_query_negatives
        self.false_negative_margin = false_negative_margin

    def retrieval(
        self, anchors: torch.Tensor, candidates: torch.Tensor, candidate_text_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """InfoNCE with query-query negatives; returns (weighted Matryoshka loss, {dim: loss})."""
        return self._contrastive(anchors, candidates, candidate_text_ids=candidate_text_ids)

    def classification(
        self,
        anchors: torch.Tensor,
        candidates: torch.Tensor,
        anchor_labels: torch.Tensor,
        candidate_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """InfoNCE with every same-label candidate masked out of the denominator."""
        return self._contrastive(anchors, candidates, anchor_labels=anchor_labels, candidate_labels=candidate_labels)

    def sts(
        self, left: torch.Tensor, right: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """CoSENT over every pair of pairs of the gathered batch."""
        if left.shape[0] != right.shape[0]:
            raise ValueError(f"sts batch has {left.shape[0]} left and {right.shape[0]} right texts")
        all_left = distributed.all_gather_with_grad(left)
        all_right = distributed.all_gather_with_grad(right)
        all_scores = distributed.all_gather_no_grad(scores)

        def task_loss(left_slice, right_slice):
            return cosent_loss(left_slice, right_slice, all_scores, self.cosent_temperature)

        return matryoshka_loss(task_loss, [all_left, all_right], self.mrl_dims, self.mrl_weights)

    def _contrastive(
        self,
        anchors: torch.Tensor,
        candidates: torch.Tensor,
        *,
        candidate_text_ids: torch.Tensor | None = None,
        anchor_labels: torch.Tensor | None = None,
        candidate_labels: torch.Tensor | None = None,
    ):
        n = anchors.shape[0]
        if candidates.shape[0] % n:
            raise ValueError(f"{candidates.shape[0]} candidates do not group evenly over {n} anchors")
        group_size = candidates.shape[0] // n
        offset = distributed.local_offset(n)
        local_rows = torch.arange(n, device=anchors.device) + offset
        positive_indices = local_rows * group_size  # positives lead each group

        all_candidates = distributed.all_gather_with_grad(candidates)  # (W * n * g, D)
        all_anchors = distributed.all_gather_with_grad(anchors) if self.query_query_negatives else None
        text_ids = distributed.all_gather_no_grad(candidate_text_ids) if candidate_text_ids is not None else None

        if anchor_labels is not None:
            all_candidate_labels = distributed.all_gather_no_grad(candidate_labels)
            all_anchor_labels = distributed.all_gather_no_grad(anchor_labels) if all_anchors is not None else None

            def task_loss(local, gathered_candidates, *pool):
                return masked_classification_loss(
                    local,
                    gathered_candidates,
                    positive_indices,
                    anchor_labels,
                    all_candidate_labels,
                    self.temperature,
                    anchor_pool=pool[0] if pool else None,
                    anchor_pool_labels=all_anchor_labels,
                    anchor_pool_self_indices=local_rows,
                )

        else:

            def task_loss(local, gathered_candidates, *pool):
                return info_nce_loss(
                    local,
                    gathered_candidates,
                    positive_indices,
                    self.temperature,
                    anchor_pool=pool[0] if pool else None,
                    anchor_pool_self_indices=local_rows,
                    false_negative_margin=self.false_negative_margin,
                    candidate_text_ids=text_ids,
                )

        tensors = [anchors, all_candidates] + ([all_anchors] if all_anchors is not None else [])
        return matryoshka_loss(task_loss, tensors, self.mrl_dims, self.mrl_weights)
