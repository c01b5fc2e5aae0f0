"""Autograd-aware collectives for context parallelism.

Why our own: ``torch.distributed.nn.functional.all_gather`` has a wrong backward on gloo in torch
2.13 (its all-to-all emulation of reduce-scatter gave key gradients off by O(1) in a 2-rank test,
while its forward was exact). The math is simple enough to own:

    forward:  y = cat(x_0, ..., x_{n-1})            (every rank gets the same y)
    backward: dx_r = sum over ranks k of dy_k[slice r]

because every rank's loss depends on every rank's x. On NCCL that sum-then-slice is one
reduce-scatter; gloo has no reduce-scatter, so we all-reduce the whole gradient and keep our slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _is_nccl(group) -> bool:
    return dist.get_backend(group) == "nccl"


def _gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 of a contiguous tensor; every rank must pass the same shape."""
    world = dist.get_world_size(group)
    if _is_nccl(group):
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=0)


def _reduce_scatter_dim0(grad: torch.Tensor, group) -> torch.Tensor:
    """Sum ``grad`` over the group and return this rank's dim-0 slice (``grad`` is not modified)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    local = grad.shape[0] // world
    if _is_nccl(group):
        out = grad.new_empty((local,) + tuple(grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=group)
        return out
    # The all-reduce works in place, and autograd's incoming gradient is not ours to overwrite.
    summed = grad.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(summed, group=group)
    # A copy of our slice, so the full-sequence buffer is freed now rather than with the slice.
    return summed[rank * local:(rank + 1) * local].clone()


class _AllGatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, dim: int) -> torch.Tensor:
        ctx.group = group
        ctx.dim = dim
        gathered = _gather_dim0(x.movedim(dim, 0).contiguous(), group)
        return gathered.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        local = _reduce_scatter_dim0(grad.movedim(ctx.dim, 0), ctx.group)
        return local.movedim(0, ctx.dim), None, None


def all_gather_seq(x: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order), with the correct gradient.

    All ranks must pass tensors of the same shape. ``group=None`` is the default process group.
    A group of one rank returns ``x`` itself (no communication). Integer tensors (document ids)
    work too; they just carry no gradient.
    """
    if group is None:
        group = dist.group.WORLD
    if dist.get_world_size(group) == 1:
        return x
    return _AllGatherSeq.apply(x, group, dim)


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_over_group(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``x`` summed, when every rank then computes the *same* loss from the sum.

    Each rank back-propagates that one loss through its own partial sum, so the gradient reaching
    ``x`` is the loss's gradient with respect to the total, unchanged (identity backward); the
    parameter gradients of the ranks' partial sums are added later by the gradient all-reduce.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _SumOverGroup.apply(x, group)
