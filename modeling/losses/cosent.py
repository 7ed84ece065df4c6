"""CoSENT: a ranking loss over pairs of sentence pairs for NLI/STS data.

What is optimised (Su 2022, "CoSENT"; docs/method.md section 6): for every two pairs
(i, j) in the batch whose gold scores satisfy y_i > y_j, the cosine of pair i
should exceed the cosine of pair j:

    L = log(1 + sum_{y_i > y_j} exp((s_j - s_i) / tau))

with s the cosine of each pair's two embeddings (normalised here) and tau = 0.02
by default (0.05 is the value common elsewhere; it is a config knob).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosent_loss(left: torch.Tensor, right: torch.Tensor, scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """CoSENT over the whole batch.

    Args:
        left, right: (n, D) the two sides of each pair.
        scores: (n,) gold scores (graded, binary 0/1, or NLI 2/1/0).
        temperature: tau.

    Returns:
        scalar loss.
    """
    cosines = (F.normalize(left, dim=-1) * F.normalize(right, dim=-1)).sum(-1) / temperature  # (n,)
    # differences[i, j] = (s_j - s_i) / tau, kept where y_i > y_j
    differences = cosines[None, :] - cosines[:, None]  # (n, n)
    ordered = scores[:, None] > scores[None, :]  # (n, n)
    terms = differences.masked_fill(~ordered, float("-inf")).flatten()
    zero = torch.zeros(1, dtype=terms.dtype, device=terms.device)
    return torch.logsumexp(torch.cat([zero, terms]), dim=0)
