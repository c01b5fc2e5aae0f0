"""Transformer Engine's core attention, guarded against the masks it would silently drop.

``TEDotProductAttention.forward`` passes only the base ``PackedSeqParams`` fields to TE, so the
per-token document ids of our ``DocumentMaskParams`` (sbhd format) would be ignored and TE would
run plain causal attention across documents. The flags that produce document ids are refused with
``--attention-backend te`` before any work (``attention_backends.plan_attention``); this guard is
the second line, for code that builds batches by hand.
"""

from __future__ import annotations

import functools

from megatron_ext.model.cp_attention import DocumentMaskParams

REFUSAL = ("Transformer Engine's attention received DocumentMaskParams (per-token document / "
           "branch ids), which it would ignore and attend across documents; use "
           "--attention-backend flex")


@functools.lru_cache(maxsize=1)
def guarded_te_attention():
    """The guarded subclass of Megatron-Core's ``TEDotProductAttention`` (made on first use, so
    this module imports without Transformer Engine)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class GuardedTEDotProductAttention(TEDotProductAttention):
        backend_name = "te"

        def forward(self, query, key, value, attention_mask, attn_mask_type,
                    attention_bias=None, packed_seq_params=None, *args, **kwargs):
            if isinstance(packed_seq_params, DocumentMaskParams):
                raise ValueError(REFUSAL)
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params, *args, **kwargs)

    return GuardedTEDotProductAttention
