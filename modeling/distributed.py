"""The only place that talks to torch.distributed.

Every helper is a no-op when no process group exists, so every loss runs (and is
tested) in a single CPU process exactly as it runs on a cluster.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks.

    Each rank's loss reads every rank's slice, so the gradient of a slice is the
    sum of what every rank's loss says about it. Combined with the data-parallel
    mean over ranks this gives exactly the gradient of one process holding the
    whole global batch (tested in tests/test_distributed.py).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        ctx.local_size = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_size
        return grad[start : start + ctx.local_size]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (N, ...) from every rank in rank order: (world * N, ...).

    Every rank must pass the same N (the sampler guarantees equal per-rank batches).
    """
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor without gradient (labels, text hashes) from every rank."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def local_offset(local_size: int) -> int:
    """Index of this rank's first row in a gathered tensor."""
    return rank() * local_size


def all_finite(tensor: torch.Tensor) -> bool:
    """True when `tensor` is finite on every rank (every rank gets the same answer)."""
    flag = torch.isfinite(tensor.detach()).all().to(torch.float32).reshape(1)
    if is_distributed():
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)
