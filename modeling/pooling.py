"""Pooling of token states into one vector per text."""

from __future__ import annotations

from enum import Enum

import torch


class Pooling(str, Enum):
    last_token = "last_token"
    mean = "mean"


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding.

    Args:
        attention_mask: (B, T) with 1 on real tokens.

    Returns:
        (B,) int64. Taking position -1 would read padding under right padding.
    """
    seq_len = attention_mask.shape[1]
    # the first 1 seen from the right is the last real token
    from_right = torch.flip(attention_mask, dims=[1]).long().argmax(dim=1)  # (B,)
    return seq_len - 1 - from_right


def pool(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    mode: Pooling = Pooling.last_token,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool (B, T, H) states into (B, H).

    `positions` (B,) overrides the last-token positions derived from the mask
    (the data pipeline computes them next to the placeholder positions).
    """
    if Pooling(mode) is Pooling.mean:
        weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if positions is None:
        positions = last_token_positions(attention_mask)
    rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    return hidden_states[rows, positions]  # (B, H)
