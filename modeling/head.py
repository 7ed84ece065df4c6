"""The Matryoshka (MRL) projection head."""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_MRL_DIMS = (128, 256, 512, 768, 1024, 1280, 1536, 1792)


class MRLHead(nn.Module):
    """Linear(hidden, output_dim, bias) with identity activation.

    The published QZhou-Embedding-Zh parameter count pins this shape: Qwen3-8B
    without its LM head plus exactly 4096 * 1792 + 1792. Its output is never
    normalised here: Matryoshka slices first, then normalises.
    """

    def __init__(self, hidden_size: int, output_dim: int = 1792, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(hidden_size, output_dim, bias=bias)

    @property
    def output_dim(self) -> int:
        return self.linear.out_features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled)  # (B, output_dim)


def validate_mrl_dims(dims, output_dim: int) -> list[int]:
    """Check Matryoshka dims: positive, strictly ascending, none above the head size."""
    dims = list(dims)
    if not dims:
        raise ValueError("mrl_dims is empty; give at least the full output dim")
    if any(int(d) != d or d <= 0 for d in dims):
        raise ValueError(f"mrl_dims must be positive integers, got {dims}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"mrl_dims has duplicates: {dims}")
    if dims != sorted(dims):
        raise ValueError(f"mrl_dims must be sorted ascending, got {dims}")
    if dims[-1] > output_dim:
        raise ValueError(f"mrl_dims {dims} has {dims[-1]} > head output_dim {output_dim}")
    return dims
