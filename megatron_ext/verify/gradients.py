"""Every parameter's gradient in its global shape, assembled on rank 0 from all ranks' shards.

Shards are placed where the sharded state dict (the checkpoint's mapping, ``model/init.py``) puts
the parameter they belong to, under the parameter's global name, so gradients of two layouts
compare key by key with the single-process model's.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from megatron.core.distributed.param_and_grad_buffer import shard_buffer

from megatron_ext.model.init import global_name, local_index, parameter_shards


def complete_distributed_optimizer_grads(ddp) -> None:
    """With --use-distributed-optimizer, the gradient sync is a reduce-scatter: after it each rank
    holds the reduced gradient of its own buffer shard only. All-gather the shards so every
    ``main_grad`` is whole (the optimizer reads only its own shard, which is left unchanged)."""
    if not ddp.ddp_config.use_distributed_optimizer:
        return
    for group in [*ddp.bucket_groups, *ddp.expert_parallel_bucket_groups]:
        comm = group.intra_distributed_optimizer_instance_group
        size = torch.distributed.get_world_size(comm)
        rank = torch.distributed.get_rank(comm)
        for bucket in group.buckets:
            shards = shard_buffer(bucket.grad_data, size)
            torch.distributed.all_gather(shards, shards[rank].clone(), group=comm)


def local_pieces(module: torch.nn.Module) -> List[tuple]:
    """(global name, global shape, index in it, gradient piece) of each shard on this rank."""
    pieces = []
    for _, param, offset, sh in parameter_shards(module):
        # A shard is the whole parameter or a contiguous block of it (SwiGLU's halves).
        grad = param.main_grad.reshape(-1)[offset:offset + sh.data.numel()].view(sh.local_shape)
        pieces.append((global_name(sh), tuple(sh.global_shape[sh.prepend_axis_num:]),
                       local_index(sh), grad.detach().clone()))
    return pieces


def global_gradients(module: torch.nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """Rank 0: {global name: gradient of global shape, in main_grad's dtype (fp32)}; other
    ranks: None.

    Call after the gradients are finalised (all-reduced, per-token scaled) and, with the
    distributed optimizer, completed by ``complete_distributed_optimizer_grads``.
    """
    mine = local_pieces(module)
    rank0 = torch.distributed.get_rank() == 0
    everyone = [None] * torch.distributed.get_world_size() if rank0 else None
    torch.distributed.gather_object(mine, everyone, dst=0)
    if not rank0:
        return None
    grads: Dict[str, torch.Tensor] = {}
    for name, shape, index, piece in (p for pieces in everyone for p in pieces):
        # Replicas (DP, CP, TP copies of norms) write the same values into the same place.
        grads.setdefault(name, torch.zeros(shape, dtype=piece.dtype))[index] = piece
    return grads
