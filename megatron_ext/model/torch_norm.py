"""Torch RMSNorm/LayerNorm that also run under --sequence-parallel (the CPU layer spec).

Megatron-Core's ``WrappedTorchNorm`` refuses sequence parallelism: under it each TP rank
normalises only its slice of the sequence, so a norm weight's gradient is a partial sum that must
be all-reduced over TP. Megatron's fused norms mark their weights ``sequence_parallel`` for that
(``finalize_model_grads`` then sums them); this norm does the same with torch's own modules.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig

NORMS = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}


class SequenceParallelTorchNorm:
    """Builds a torch norm (Megatron's norm-spec signature) with its weights marked for the TP
    gradient sum when ``config.sequence_parallel``."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        norm = NORMS[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm
