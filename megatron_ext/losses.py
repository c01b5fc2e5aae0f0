"""Losses written against Megatron-Core's per-token losses from vocab-parallel logits.

GPTModel(labels=...) already returns the per-token cross entropy computed by
``vocab_parallel_cross_entropy`` (no rank ever holds the full vocabulary). Here we only mask and
sum. With ``calculate_per_token_loss`` the schedule collects (sum, token count) per micro-batch and
``finalize_model_grads`` divides gradients by the token count all-reduced over DP x CP, so the
objective is the mean over every non-masked token of the global batch, for any layout.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """(sum of masked token losses, token count, {'lm loss': [sum, count]}) for one micro-batch."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(per_token_loss.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def reduce_reports(reports, group) -> Dict[str, float]:
    """Token-weighted mean of each reported loss over micro-batches and the given group."""
    if not reports:
        return {}
    out = {}
    for key in reports[0]:
        total = torch.stack([r[key] for r in reports]).sum(dim=0).double()
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(total, group=group)
        out[key] = (total[0] / total[1].clamp(min=1)).item()
        out[key + " tokens"] = int(total[1].item())
    return out
