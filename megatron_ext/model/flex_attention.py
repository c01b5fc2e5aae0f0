"""Core attention on FlexAttention: the fused, block-sparse engine for the project's exact masks.

The same semantics as the blockwise backend (``cp_attention.py``), computed by
``torch.nn.attention.flex_attention`` under ``torch.compile``:

* Layout: Megatron's load-balanced context-parallel one. Keys and values of the CP group are
  all-gathered with our autograd collective (``all_gather_seq``; its backward reduce-scatters
  the key/value gradients), so queries are this rank's S/CP tokens and keys all S tokens, in
  rank order.
* Mask: one ``BlockMask`` per micro-batch from each token's global index, document id and branch
  key: key j is visible to query i when ``global(j) <= global(i)``, both lie in one document and
  j is shared (branch 0) or in i's branch. FlexAttention evaluates it per 128 x 128 tile, skips
  tiles it hides entirely and runs the mask only on partially hidden tiles. The mask is built once
  per micro-batch and reused by every layer (cached on the micro-batch's ``DocumentMaskParams``,
  or per shape for plain causal attention); no host synchronisation happens inside attention.
* GQA: keys and values keep their ``ng`` groups (``enable_gqa``), never repeated per head.
* Softmax: the kernel accumulates scores, the running max / sum and the output in fp32 for
  bf16/fp16 inputs.

On CPU FlexAttention has a compiled forward but no backward, so this backend serves evaluation
there; training on CPU is refused before any work (``attention_backends.plan_attention``), and
here again if a gradient is asked for.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from megatron_ext.parallel.cp_layout import cp_gathered_indices, cp_token_indices
from megatron_ext.model.attention_backends import FLEX_BLOCK_TOKENS
from megatron_ext.model.cp_attention import (
    BRANCH_BITS,
    _BRANCH_MASK,
    ContextParallelCoreAttention,
    check_attention_shapes,
    visibility_keys,
)

CPU_TRAINING_ERROR = (
    "--attention-backend flex has no backward on CPU (FlexAttention's CPU kernel is forward-only): "
    "use it on CPU for evaluation only and train on CPU with --attention-backend blockwise")

_compiled: Dict[str, Callable] = {}


def _flex():
    from torch.nn.attention import flex_attention as flex_mod

    return flex_mod


# Kernels a process may compile for flex_attention: one per (shape, mask kind, dtype, grad mode).
# Past torch's default of 8 recompilations, Dynamo would silently run FlexAttention *eagerly*,
# which materialises the full score matrix - at long context an out-of-memory, not a slowdown.
# Evaluating several lengths during training easily passes 8.
RECOMPILE_LIMIT = 64


def compiled_flex_attention() -> Callable:
    """``flex_attention`` compiled once per process (a fused kernel per shape and mask kind)."""
    if "flex" not in _compiled:
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch
            if getattr(dynamo_config, name, RECOMPILE_LIMIT) < RECOMPILE_LIMIT:
                setattr(dynamo_config, name, RECOMPILE_LIMIT)
        _compiled["flex"] = torch.compile(_flex().flex_attention, dynamic=False)
    return _compiled["flex"]


# ------------------------------------------------------------------------------------------------
# The mask
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _MaskTensors:
    """What the mask function reads: global positions and (document, branch) per token."""

    q_pos: Optional[Tensor]  # [sq] global index of each local query (None: q_idx itself)
    k_pos: Optional[Tensor]  # [sk] global index of each gathered key (None: kv_idx itself)
    q_doc: Optional[Tensor] = None  # [b, sq]
    k_doc: Optional[Tensor] = None  # [b, sk]
    q_branch: Optional[Tensor] = None
    k_branch: Optional[Tensor] = None


def _mask_mod(t: _MaskTensors, causal: bool):
    """The mask function for FlexAttention: True where the query sees the key."""
    conditions = []
    if causal:
        if t.q_pos is None:
            conditions.append(lambda b, h, q, k: q >= k)
        else:
            q_pos, k_pos = t.q_pos, t.k_pos
            conditions.append(lambda b, h, q, k: q_pos[q] >= k_pos[k])
    if t.q_doc is not None:
        q_doc, k_doc = t.q_doc, t.k_doc
        conditions.append(lambda b, h, q, k: q_doc[b, q] == k_doc[b, k])
    if t.q_branch is not None:
        q_branch, k_branch = t.q_branch, t.k_branch
        conditions.append(lambda b, h, q, k: (k_branch[b, k] == 0)
                          | (k_branch[b, k] == q_branch[b, q]))
    if not conditions:
        return None

    def mask_mod(b, h, q_idx, kv_idx):
        visible = conditions[0](b, h, q_idx, kv_idx)
        for condition in conditions[1:]:
            visible = visible & condition(b, h, q_idx, kv_idx)
        return visible

    return mask_mod


def build_block_mask(seq_len: int, cp_size: int, cp_rank: int, *, causal: bool = True,
                     query_keys: Optional[Tensor] = None, key_keys: Optional[Tensor] = None,
                     branches: bool = True, device: torch.device = torch.device("cpu")):
    """The BlockMask of this rank's queries [S/CP] against all gathered keys [S] (rank order).

    ``query_keys`` [b, S/CP] / ``key_keys`` [b, S]: visibility keys (``visibility_keys``) or None.
    ``branches=False`` when the keys carry no branch ids (plain documents: a cheaper mask).
    Returns None when nothing is hidden (non-causal, no documents).
    """
    sq = seq_len // cp_size
    t = _MaskTensors(None, None)
    if cp_size > 1:
        t.q_pos = cp_token_indices(seq_len, cp_size, cp_rank).to(device)
        t.k_pos = cp_gathered_indices(seq_len, cp_size).to(device)
    batch = None
    if query_keys is not None:
        batch = query_keys.shape[0]
        t.q_doc = (query_keys >> BRANCH_BITS).to(device)
        t.k_doc = (key_keys >> BRANCH_BITS).to(device)
        if branches:
            t.q_branch = (query_keys & _BRANCH_MASK).to(device)
            t.k_branch = (key_keys & _BRANCH_MASK).to(device)
    mask_mod = _mask_mod(t, causal)
    if mask_mod is None:
        return None
    return _flex().create_block_mask(mask_mod, batch, None, sq, seq_len, device=device,
                                     BLOCK_SIZE=FLEX_BLOCK_TOKENS,
                                     _compile=device.type == "cuda")


# Plain causal masks depend only on the shape and layout: keep a few per process.
_causal_masks: Dict[Tuple, object] = {}


def _cached_causal_mask(seq_len: int, cp_size: int, cp_rank: int, device: torch.device):
    key = (seq_len, cp_size, cp_rank, str(device))
    if key not in _causal_masks:
        if len(_causal_masks) >= 8:
            _causal_masks.clear()
        _causal_masks[key] = build_block_mask(seq_len, cp_size, cp_rank, causal=True,
                                              device=device)
    return _causal_masks[key]


# ------------------------------------------------------------------------------------------------
# The CP computation without communication (testable in one process)
# ------------------------------------------------------------------------------------------------

def flex_context_parallel_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    seq_len: int,
    cp_size: int,
    cp_rank: int,
    softmax_scale: float,
    query_document_ids: Optional[Tensor] = None,
    key_document_ids: Optional[Tensor] = None,
    causal: bool = True,
    query_branch_ids: Optional[Tensor] = None,
    key_branch_ids: Optional[Tensor] = None,
    block_mask=None,
    compiled: bool = True,
) -> Tensor:
    """FlexAttention of this rank's queries over every rank's keys, in Megatron's shapes.

    Same arguments and result as ``cp_attention.context_parallel_attention``: query
    [S/CP, b, np, hn] (this rank's tokens), key/value [S, b, ng, hn] (all ranks, rank order),
    document / branch ids [b, S/CP] and [b, S]; returns [S/CP, b, np * hn]. ``block_mask``: a
    mask from ``build_block_mask`` to reuse (the ids are then ignored). ``compiled=False`` runs
    FlexAttention eagerly (its unfused reference path; slow, for tests).
    """
    sq, b, heads, head_dim = query.shape
    groups = check_attention_shapes(query, key, value, seq_len, cp_size)
    if query.device.type == "cpu" and torch.is_grad_enabled() and any(
            t.requires_grad for t in (query, key, value)):
        raise ValueError(CPU_TRAINING_ERROR)
    if block_mask is None:
        if (query_document_ids is None) != (key_document_ids is None):
            raise ValueError("pass document ids for both queries and keys, or for neither")
        q_keys = k_keys = None
        if query_document_ids is not None:
            q_keys = visibility_keys(query_document_ids, query_branch_ids)
            k_keys = visibility_keys(key_document_ids, key_branch_ids)
        block_mask = build_block_mask(seq_len, cp_size, cp_rank, causal=causal, query_keys=q_keys,
                                      key_keys=k_keys, branches=query_branch_ids is not None,
                                      device=query.device)
    # [s, b, h, d] -> [b, h, s, d]: views; FlexAttention takes strided inputs (last dim dense).
    q = query.permute(1, 2, 0, 3)
    k = key.permute(1, 2, 0, 3)
    v = value.permute(1, 2, 0, 3)
    attend = compiled_flex_attention() if compiled else _flex().flex_attention
    out = attend(q, k, v, block_mask=block_mask, scale=softmax_scale, enable_gqa=heads != groups)
    return out.permute(2, 0, 1, 3).reshape(sq, b, heads * value.shape[-1])


# ------------------------------------------------------------------------------------------------
# The Megatron module
# ------------------------------------------------------------------------------------------------

class FlexContextParallelAttention(ContextParallelCoreAttention):
    """The ``flex`` attention backend as a drop-in ``core_attention`` (the constructor and forward
    of Megatron's ``DotProductAttention``; see ``ContextParallelCoreAttention`` and this module's
    docstring). ``packed_seq_params`` is None or ``DocumentMaskParams``."""

    backend_name = "flex"

    def attend(self, query, key_all, value_all, query_keys, key_keys, packed_seq_params, *,
               seq_len, cp_size, cp_rank, causal) -> Tensor:
        block_mask = self._block_mask(packed_seq_params, query_keys, key_keys, seq_len, cp_size,
                                      cp_rank, causal, query.device)
        return flex_context_parallel_attention(
            query, key_all, value_all, seq_len=seq_len, cp_size=cp_size, cp_rank=cp_rank,
            softmax_scale=self.softmax_scale, causal=causal, block_mask=block_mask)

    @staticmethod
    def _block_mask(params, q_keys, k_keys, seq_len, cp_size, cp_rank, causal, device):
        """One mask per micro-batch: cached on its DocumentMaskParams, shared by every layer."""
        if q_keys is None:
            if not causal:
                return None
            return _cached_causal_mask(seq_len, cp_size, cp_rank, device)
        cache = params.__dict__.setdefault("_flex_block_masks", {})
        if causal not in cache:
            cache[causal] = build_block_mask(seq_len, cp_size, cp_rank, causal=causal,
                                             query_keys=q_keys, key_keys=k_keys,
                                             branches=params.branch_ids is not None, device=device)
        return cache[causal]
