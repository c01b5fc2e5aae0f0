"""The blockwise attention backend: context parallelism (CP) and document masks in plain torch.

Megatron-Core's only CP attention is Transformer Engine's; its local ``DotProductAttention``
asserts CP == 1. ``TorchContextParallelAttention`` is a drop-in for the layer spec's
``core_attention`` submodule that works for any CP size (CP=1 included). It is the CPU training
path and the reference that the fused ``flex`` backend (``flex_attention.py``) is tested against:

* Layout: Megatron's load-balanced one (``megatron_ext.parallel.cp_layout``): rank r holds
  chunks r and 2*CP-1-r of the sequence. Causal masking uses the *global* index of every token in
  that layout (not the position ids, which skip-wise schemes or per-document resets change).
* Exchange: every rank all-gathers the keys and values of the CP group with our autograd-correct
  ``all_gather_seq`` (its backward sums key/value gradients over the group). A ring exchange
  would keep only two key/value chunks per rank; not implemented.
* Compute: queries and keys are cut into blocks (at most 1024 tokens, or ``max_block_size``;
  never straddling a CP chunk), softmax is merged across key blocks with a running log-sum-exp,
  and blocks that the causal / document mask hides entirely are skipped (decided for all block
  pairs at once, one host synchronisation per call, not one per pair). Scores and the softmax
  are fp32 for any input dtype. No rank ever materialises an ``S x S`` score matrix; the largest
  temporary is ``[b, heads, block, block]``.
* Backward: a custom autograd Function that recomputes each block's probabilities from the saved
  (q, k, v, out, lse), FlashAttention style, instead of saving them.
* Documents: packed sequences attend only within their document. Document ids of the local tokens
  travel in ``DocumentMaskParams`` (a ``PackedSeqParams`` with ``qkv_format='sbhd'``), which
  ``GPTModel.forward(packed_seq_params=...)`` hands down to every core attention.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_ext.parallel.collectives import all_gather_seq
from megatron_ext.parallel.cp_layout import cp_chunk_spans
from megatron_ext.model.attention_backends import DEFAULT_BLOCK_TOKENS
from megatron_ext.errors import UserError

# ------------------------------------------------------------------------------------------------
# How document ids reach core attention
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DocumentMaskParams(PackedSeqParams):
    """Document ids of this rank's tokens for document-masked attention, in the ``sbhd`` format.

    ``document_ids``: LongTensor [b, s_local] (sliced with ``slice_for_cp`` like the tokens).
    ``branch_ids``: optional LongTensor [b, s_local] for prefix-sharing branches inside a document
    (preference answers sharing one prompt): a token of branch 0 is seen by every later token of
    its document, a token of branch k > 0 only by tokens of branch k.
    ``max_seqlen_q/kv`` hold the full (pre-CP) sequence length because the stock
    ``GPTModel._preprocess`` sizes its rotary table from them whenever ``packed_seq_params`` is
    given (``PositionIdsGPTModel`` does not need them); ``cu_seqlens_*`` stay None.
    """

    document_ids: Optional[Tensor] = None
    branch_ids: Optional[Tensor] = None

    def __post_init__(self):
        if self.qkv_format is None:
            self.qkv_format = "sbhd"
        if self.qkv_format != "sbhd":
            raise ValueError(f"DocumentMaskParams carries per-token document ids for the sbhd "
                             f"format, got qkv_format={self.qkv_format!r}")

    @classmethod
    def for_tokens(cls, document_ids: Tensor, seq_length: int,
                   branch_ids: Optional[Tensor] = None) -> "DocumentMaskParams":
        """``document_ids`` [b, s_local] of this rank's tokens; ``seq_length``: ``--seq-length``."""
        return cls(qkv_format="sbhd", document_ids=document_ids, branch_ids=branch_ids,
                   max_seqlen_q=seq_length, max_seqlen_kv=seq_length)

    def visibility_keys(self) -> Tensor:
        return visibility_keys(self.document_ids, self.branch_ids)


# Documents and branches travel (and are all-gathered over CP) as one integer per token.
BRANCH_BITS = 20
_BRANCH_MASK = (1 << BRANCH_BITS) - 1


def visibility_keys(document_ids: Tensor, branch_ids: Optional[Tensor] = None) -> Tensor:
    """One integer per token that decides visibility: document << BRANCH_BITS | branch."""
    keys = document_ids.long() << BRANCH_BITS
    if branch_ids is not None:
        if branch_ids.shape != document_ids.shape:
            raise ValueError(f"branch_ids shape {tuple(branch_ids.shape)} differs from "
                             f"document_ids shape {tuple(document_ids.shape)}")
        if bool((branch_ids < 0).any()) or bool((branch_ids > _BRANCH_MASK).any()):
            raise ValueError(f"branch ids must lie in [0, {_BRANCH_MASK}]")
        keys = keys | branch_ids.long()
    return keys


def _visible_keys(q_keys: Tensor, k_keys: Tensor) -> Tensor:
    """[b, q, k] bool: same document, and the key is shared (branch 0) or in the query's branch."""
    same_doc = (q_keys[:, :, None] >> BRANCH_BITS) == (k_keys[:, None, :] >> BRANCH_BITS)
    k_branch = k_keys[:, None, :] & _BRANCH_MASK
    return same_doc & ((k_branch == 0) | (k_branch == (q_keys[:, :, None] & _BRANCH_MASK)))


def visibility_keys_from(packed_seq_params: Optional[PackedSeqParams],
                         query: Tensor) -> Optional[Tensor]:
    """This rank's visibility keys [b, s_local] from the micro-batch's ``DocumentMaskParams``."""
    if packed_seq_params is None:
        return None
    if not isinstance(packed_seq_params, DocumentMaskParams):
        raise ValueError(
            f"our attention backends take document boundaries as DocumentMaskParams "
            f"(qkv_format='sbhd'), got {type(packed_seq_params).__name__} with qkv_format="
            f"{packed_seq_params.qkv_format!r}; the THD/cu_seqlens format is Transformer Engine's")
    cache = packed_seq_params.__dict__.setdefault("_attention_cache", {})
    if "query_keys" not in cache:
        keys = packed_seq_params.visibility_keys()
        local_tokens = (query.shape[1], query.shape[0])
        if tuple(keys.shape) != local_tokens:
            raise ValueError(f"document_ids shape {tuple(keys.shape)} does not match this "
                             f"rank's tokens [b={query.shape[1]}, s={query.shape[0]}]; slice them "
                             f"with slice_for_cp like the tokens")
        cache["query_keys"] = keys.to(query.device)
    return cache["query_keys"]


def gather_keys_values(key: Tensor, value: Tensor, query_keys: Optional[Tensor],
                       packed_seq_params: Optional[PackedSeqParams], cp_group):
    """Every CP rank's keys, values and visibility keys, in rank order.

    The visibility keys are gathered once per micro-batch and cached on its
    ``DocumentMaskParams``, which every layer receives.
    """
    cp_size = 1 if cp_group is None else cp_group.size()
    if cp_size == 1:
        return key, value, query_keys
    # Two gathers rather than one of cat(key, value): the cat and its backward would each add a
    # full-sequence copy.
    key_all = all_gather_seq(key, cp_group, dim=0)
    value_all = all_gather_seq(value, cp_group, dim=0)
    key_keys = None
    if query_keys is not None:
        cache = packed_seq_params.__dict__["_attention_cache"]
        if "key_keys" not in cache:
            cache["key_keys"] = all_gather_seq(query_keys.contiguous(), cp_group, dim=1)
        key_keys = cache["key_keys"]
    return key_all, value_all, key_keys


def check_core_attention_config(config: TransformerConfig, attention_type: str,
                                attention_dropout: Optional[float], backend: str) -> None:
    """What our core attentions do not implement, refused when the layer is built."""
    dropout = config.attention_dropout if attention_dropout is None else attention_dropout
    if dropout:
        raise UserError(f"the {backend} attention backend does not implement attention dropout "
                         f"(got {dropout}); set --attention-dropout 0 (long-context training "
                         f"uses 0) or use --attention-backend te")
    if attention_type != "self":
        raise ValueError(f"the {backend} attention backend supports self-attention only, got "
                         f"{attention_type!r}")
    if config.window_size is not None:
        raise ValueError(f"sliding-window attention is not supported by the {backend} backend")
    if config.softmax_type != "vanilla":
        raise ValueError(f"softmax_type {config.softmax_type!r} is not supported by the "
                         f"{backend} backend")


def check_mask_type(mask_type: AttnMaskType, backend: str) -> AttnMaskType:
    if mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
        raise ValueError(f"attention mask type {mask_type} is not supported by the {backend} "
                         f"backend (causal or no_mask; documents via DocumentMaskParams)")
    return mask_type


# ------------------------------------------------------------------------------------------------
# Blocks: contiguous runs of tokens with known global positions
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Block:
    """``length`` tokens at ``start`` of a local tensor: global positions ``global_start`` on."""

    start: int
    global_start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def global_last(self) -> int:
        return self.global_start + self.length - 1


def default_block_size(seq_len: int, cp_size: int, max_block_size: Optional[int] = None) -> int:
    """One CP chunk (``S / (2*CP)``, also for CP=1), at most ``max_block_size`` (default 1024).

    The cap keeps the score tile bounded whatever the length: one chunk at 32K and CP=1 would be
    a [b, heads, 16K, 16K] fp32 tile (34 GB at 32 heads).
    """
    chunk = math.ceil(seq_len / (2 * cp_size))
    return max(1, min(chunk, max_block_size or DEFAULT_BLOCK_TOKENS))


def layout_blocks(seq_len: int, cp_size: int, ranks: Sequence[int], block_size: int) -> List[Block]:
    """Blocks covering the concatenation of ``ranks``' local tokens (in that order).

    Blocks never straddle a CP chunk, so each one is contiguous in global positions and causal
    visibility between two blocks is decided from four integers.
    """
    blocks, offset = [], 0
    for rank in ranks:
        for global_start, length in cp_chunk_spans(seq_len, cp_size, rank):
            for piece in range(0, length, block_size):
                size = min(block_size, length - piece)
                blocks.append(Block(offset + piece, global_start + piece, size))
            offset += length
    return blocks


def _block_summaries(blocks: Sequence[Block], keys: Tensor) -> Tensor:
    """Per block and batch row: [min doc, max doc, min branch > 0, max branch, has branch 0].

    Documents and branches are contiguous runs in global order (documents are packed one after
    another, branches follow their prompt), so these ranges decide block visibility.
    """
    big = torch.iinfo(torch.long).max
    rows = []
    for blk in blocks:
        seg = keys[:, blk.start:blk.end]
        docs, branch = seg >> BRANCH_BITS, seg & _BRANCH_MASK
        rows.append(torch.stack([docs.amin(-1), docs.amax(-1),
                                 branch.masked_fill(branch == 0, big).amin(-1), branch.amax(-1),
                                 (branch == 0).any(-1).long()], dim=-1))
    return torch.stack(rows)  # [blocks, b, 5]


def hidden_block_pairs(q_blocks: Sequence[Block], k_blocks: Sequence[Block],
                       q_keys: Optional[Tensor], k_keys: Optional[Tensor],
                       causal: bool) -> List[List[bool]]:
    """hidden[i][j]: no query of q_blocks[i] sees any key of k_blocks[j], for every row.

    Decided for all pairs with tensor ops and read back once: one host synchronisation per call
    instead of one per block pair. Conservative where ranges say "maybe" (a computed block that
    turns out fully hidden contributes exp(-inf) = 0, so correctness never depends on it).
    """
    hidden = [[causal and kb.global_start > qb.global_last for kb in k_blocks] for qb in q_blocks]
    if q_keys is None:
        return hidden
    q, k = _block_summaries(q_blocks, q_keys), _block_summaries(k_blocks, k_keys)
    q, k = q[:, None], k[None, :]  # [nq, 1, b, 5] and [1, nk, b, 5]
    shared_doc = (q[..., 0] <= k[..., 1]) & (k[..., 0] <= q[..., 1])
    # A key is seen if it is shared (branch 0) or in the query's branch (branches > 0 overlap).
    same_branch = (q[..., 2] <= k[..., 3]) & (k[..., 2] <= q[..., 3])
    visible = (shared_doc & ((k[..., 4] > 0) | same_branch)).any(dim=-1)
    by_keys = (~visible).tolist()
    return [[h or d for h, d in zip(hrow, drow)] for hrow, drow in zip(hidden, by_keys)]


def _visibility_mask(qb: Block, kb: Block, q_docs: Optional[Tensor], k_docs: Optional[Tensor],
                     causal: bool, device: torch.device) -> Optional[Tensor]:
    """Bool mask [b or 1, bq, bk] (True = visible), or None when everything is visible."""
    mask = None
    if causal and kb.global_last > qb.global_start:  # the diagonal crosses this block
        q_pos = torch.arange(qb.global_start, qb.global_last + 1, device=device)
        k_pos = torch.arange(kb.global_start, kb.global_last + 1, device=device)
        mask = (k_pos[None, :] <= q_pos[:, None]).unsqueeze(0)
    if q_docs is not None:
        same_doc = _visible_keys(q_docs[:, qb.start:qb.end], k_docs[:, kb.start:kb.end])
        mask = same_doc if mask is None else mask & same_doc
    return mask


# ------------------------------------------------------------------------------------------------
# Blockwise attention with log-sum-exp merging.
# Tensors stay sequence-first as Megatron hands them over (q [s, b, g, r, d], k/v [s, b, g, d], with
# g = query groups and r = queries per group, so GQA never copies keys/values per head): a block is
# a slice along dim 0, and only block-sized tensors are ever rearranged.
# ------------------------------------------------------------------------------------------------

def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs (fp64 stays fp64, which tests use for exact references)."""
    return torch.promote_types(dtype, torch.float32)


def _mm(a: Tensor, b: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """Matmul in the inputs' dtype (tensor cores for bf16), result in the accumulation dtype."""
    product = torch.matmul(a.to(compute_dtype), b.to(compute_dtype))
    return product.to(_accumulation_dtype(compute_dtype))


def _heads_first(block: Tensor) -> Tensor:
    """[s, b, g, (r,) d] -> [b, g, (r,) s, d] (a view)."""
    return block.movedim(0, -2)


def _block_scores(q_blk: Tensor, k_blk: Tensor, scale: float, mask: Optional[Tensor]) -> Tensor:
    """Scores [b, g, r, bq, bk] in the accumulation dtype; hidden pairs are -inf.

    Computed from fp32 (or fp64) operands: a bf16 matmul would round every score to bf16 before
    the softmax, which FlashAttention-style kernels never do.
    """
    acc_dtype = _accumulation_dtype(q_blk.dtype)
    scores = _mm(q_blk, k_blk.transpose(-1, -2).unsqueeze(2), acc_dtype).mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask[:, None, None], float("-inf"))
    return scores


def _forward_query_block(q_blk, k, v, qb, k_blocks, hidden, q_docs, k_docs, causal, scale):
    """Output [b, g, r, bq, dv] and log-sum-exp [b, g, r, bq] of a query block [b, g, r, bq, d];
    ``hidden[j]``: key block j is hidden from every query of this block."""
    b, g, r, bq, _ = q_blk.shape
    acc_dtype = _accumulation_dtype(q_blk.dtype)
    running_max = q_blk.new_full((b, g, r, bq), float("-inf"), dtype=acc_dtype)
    running_sum = torch.zeros_like(running_max)
    acc = q_blk.new_zeros((b, g, r, bq, v.shape[-1]), dtype=acc_dtype)
    for kb, skip in zip(k_blocks, hidden):
        if skip:
            continue
        mask = _visibility_mask(qb, kb, q_docs, k_docs, causal, q_blk.device)
        scores = _block_scores(q_blk, _heads_first(k[kb.start:kb.end]), scale, mask)
        new_max = torch.maximum(running_max, scores.amax(dim=-1))
        # A row with nothing visible so far has max -inf; subtract 0 instead to avoid inf - inf.
        shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
        probs = scores.sub_(shift[..., None]).exp_()  # in place: one block-sized buffer, not three
        rescale = torch.exp(running_max - shift)
        running_sum = running_sum * rescale + probs.sum(dim=-1)
        v_blk = _heads_first(v[kb.start:kb.end]).unsqueeze(2)
        acc = acc * rescale[..., None] + _mm(probs, v_blk, v.dtype)
        running_max = new_max
    out = acc / running_sum.clamp_min(torch.finfo(acc_dtype).tiny)[..., None]
    # lse = +inf for a row that saw no key (impossible with causal self-attention, where a token
    # sees itself): the backward's exp(score - lse) is then 0 instead of NaN.
    lse = torch.where(running_sum > 0, running_max + torch.log(running_sum),
                      torch.full_like(running_sum, float("inf")))
    return out, lse


def _backward_query_block(q_blk, k, v, o_blk, do_blk, lse_blk, qb, k_blocks, hidden, q_docs,
                          k_docs, causal, scale, dk, dv):
    """dq [b, g, r, bq, d] of one query block; adds this block's share into ``dk``/``dv``."""
    b, g, r, bq, d = q_blk.shape
    dtype = q_blk.dtype
    acc_dtype = _accumulation_dtype(dtype)
    # D_i = sum_j dO_ij O_ij = sum_k P_ik dP_ik: the softmax Jacobian's correction term per row.
    delta = (do_blk.to(acc_dtype) * o_blk.to(acc_dtype)).sum(dim=-1)
    q_rows = q_blk.reshape(b, g, r * bq, d)  # the r query heads of a group share keys: one matmul
    do_rows = do_blk.reshape(b, g, r * bq, do_blk.shape[-1])
    dq = torch.zeros(q_blk.shape, dtype=acc_dtype, device=q_blk.device)
    for kb, skip in zip(k_blocks, hidden):
        if skip:
            continue
        mask = _visibility_mask(qb, kb, q_docs, k_docs, causal, q_blk.device)
        k_blk = _heads_first(k[kb.start:kb.end])
        v_blk = _heads_first(v[kb.start:kb.end])
        probs = _block_scores(q_blk, k_blk, scale, mask).sub_(lse_blk[..., None]).exp_()
        dv_blk = _mm(probs.reshape(b, g, r * bq, -1).transpose(-1, -2), do_rows, dtype)
        dv[kb.start:kb.end] += dv_blk.movedim(-2, 0)
        dprobs = _mm(do_blk, v_blk.transpose(-1, -2).unsqueeze(2), dtype)
        dscores = dprobs.sub_(delta[..., None]).mul_(probs)  # dS = P * (dP - D), in place
        dq += _mm(dscores, k_blk.unsqueeze(2), dtype).mul_(scale)
        dk_blk = _mm(dscores.reshape(b, g, r * bq, -1).transpose(-1, -2), q_rows, dtype)
        dk[kb.start:kb.end] += dk_blk.mul_(scale).movedim(-2, 0)
    return dq


class _BlockwiseAttention(torch.autograd.Function):
    """Blockwise softmax attention; the backward recomputes probabilities block by block.

    q [sq, b, g, r, d], k/v [sk, b, g, d] -> out [sq, b, g, r, dv]. Saves q, k, v, out and the
    log-sum-exp [sq, b, g, r]; nothing of size sq x sk.
    """

    @staticmethod
    def forward(ctx, q, k, v, q_blocks, k_blocks, q_docs, k_docs, causal, scale):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = q.new_empty(q.shape[:-1], dtype=_accumulation_dtype(q.dtype))
        hidden = hidden_block_pairs(q_blocks, k_blocks, q_docs, k_docs, causal)
        for qb, hidden_row in zip(q_blocks, hidden):
            rows = slice(qb.start, qb.end)
            out_blk, lse_blk = _forward_query_block(
                _heads_first(q[rows]), k, v, qb, k_blocks, hidden_row, q_docs, k_docs, causal,
                scale)
            out[rows] = out_blk.movedim(-2, 0)
            lse[rows] = lse_blk.movedim(-1, 0)
        ctx.save_for_backward(q, k, v, out, lse, q_docs, k_docs)
        ctx.layout = (q_blocks, k_blocks, hidden, causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, q_docs, k_docs = ctx.saved_tensors
        q_blocks, k_blocks, hidden, causal, scale = ctx.layout
        acc_dtype = _accumulation_dtype(q.dtype)
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
        for qb, hidden_row in zip(q_blocks, hidden):
            rows = slice(qb.start, qb.end)
            dq_blk = _backward_query_block(
                _heads_first(q[rows]), k, v, _heads_first(out[rows]), _heads_first(dout[rows]),
                lse[rows].movedim(0, -1), qb, k_blocks, hidden_row, q_docs, k_docs, causal, scale,
                dk, dv)
            dq[rows] = dq_blk.movedim(-2, 0)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------
# The CP computation without communication (testable in one process)
# ------------------------------------------------------------------------------------------------

def check_attention_shapes(query: Tensor, key: Tensor, value: Tensor, seq_len: int,
                           cp_size: int) -> int:
    """Validate this rank's queries against all ranks' keys/values; returns the KV group count."""
    sq, heads, groups = query.shape[0], query.shape[2], key.shape[2]
    if heads % groups:
        raise ValueError(f"{heads} query heads cannot share {groups} key/value groups evenly")
    if sq * cp_size != seq_len or key.shape[0] != seq_len or value.shape[0] != seq_len:
        raise ValueError(f"expected {seq_len // cp_size} local queries and {seq_len} keys/values "
                         f"for sequence length {seq_len} at CP={cp_size}, got {sq} and "
                         f"{key.shape[0]}")
    return groups


def context_parallel_attention(
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
    max_block_size: Optional[int] = None,
    query_branch_ids: Optional[Tensor] = None,
    key_branch_ids: Optional[Tensor] = None,
) -> Tensor:
    """Attention of this rank's queries over every rank's keys, in Megatron's shapes.

    query: [seq_len / cp_size, b, np, hn], this rank's tokens in the load-balanced layout.
    key / value: [seq_len, b, ng, hn(v)], all ranks' tokens in rank order (what an all-gather of
        every rank's local keys returns). np must be a multiple of ng (GQA).
    query_document_ids: [b, seq_len / cp_size]; key_document_ids: [b, seq_len] (rank order).
    query_branch_ids / key_branch_ids: optional, same shapes (see ``DocumentMaskParams``).
    Returns [seq_len / cp_size, b, np * hn(v)].
    """
    sq, b, heads, head_dim = query.shape
    groups = check_attention_shapes(query, key, value, seq_len, cp_size)
    if (query_document_ids is None) != (key_document_ids is None):
        raise ValueError("pass document ids for both queries and keys, or for neither")
    if (query_branch_ids is None) != (key_branch_ids is None) or (
            query_branch_ids is not None and query_document_ids is None):
        raise ValueError("branch ids come with document ids, for both queries and keys")
    if query_document_ids is not None:
        query_document_ids = visibility_keys(query_document_ids, query_branch_ids)
        key_document_ids = visibility_keys(key_document_ids, key_branch_ids)

    block = default_block_size(seq_len, cp_size, max_block_size)
    q_blocks = layout_blocks(seq_len, cp_size, [cp_rank], block)
    k_blocks = layout_blocks(seq_len, cp_size, range(cp_size), block)

    # Head h uses key/value group h // (heads / groups), as in Megatron's repeat_interleave.
    q = query.reshape(sq, b, groups, heads // groups, head_dim)
    out = _BlockwiseAttention.apply(q, key, value, q_blocks, k_blocks, query_document_ids,
                                    key_document_ids, causal, softmax_scale)
    return out.reshape(sq, b, heads * value.shape[-1])


# ------------------------------------------------------------------------------------------------
# The Megatron module
# ------------------------------------------------------------------------------------------------

def _cp_group_from(pg_collection) -> Optional[torch.distributed.ProcessGroup]:
    if pg_collection is not None and hasattr(pg_collection, "cp"):
        return pg_collection.cp
    return parallel_state.get_context_parallel_group(check_initialized=False)


class ContextParallelCoreAttention(MegatronModule):
    """What our core attentions share: Megatron's ``DotProductAttention`` constructor and forward,
    the checks of what they do not implement, the CP group, and the gathering of keys, values and
    visibility keys. Subclasses implement ``attend``.

    forward(query [sq, b, np, hn], key [sq, b, ng, hn], value, attention_mask=None,
            attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> [sq, b, np * hn]

    ``packed_seq_params``: None, or ``DocumentMaskParams`` with this rank's document ids.
    ``attention_mask`` must be None: the causal mask follows from ``attn_mask_type`` and the CP
    layout, document boundaries from ``DocumentMaskParams`` (a dense [b, 1, s, s] mask is what CP
    exists to avoid). ``cp_comm_type`` is accepted for signature compatibility; our backends
    always exchange keys/values by all-gather (``--cp-comm-type`` other than all_gather is refused
    when the flags are read).
    """

    backend_name = "?"

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        check_core_attention_config(config, attention_type, attention_dropout, self.backend_name)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = check_mask_type(attn_mask_type, self.backend_name)
        self.attention_type = attention_type
        self.cp_comm_type = cp_comm_type
        # apply_query_key_layer_scaling divides the scale by the layer number and multiplies the
        # scores back before the softmax: the same math, so it needs nothing here.
        self.softmax_scale = (softmax_scale if softmax_scale is not None
                              else 1.0 / math.sqrt(config.kv_channels))
        self.cp_group = _cp_group_from(pg_collection)
        group_size = 1 if self.cp_group is None else self.cp_group.size()
        if group_size != config.context_parallel_size:
            raise UserError(f"context-parallel group has {group_size} ranks but "
                             f"--context-parallel-size is {config.context_parallel_size}")

    def _cp_size_and_rank(self):
        if self.cp_group is None:
            return 1, 0
        return self.cp_group.size(), self.cp_group.rank()

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor] = None,
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} takes no dense attention_mask: causal "
                             "masking comes from the mask type and CP layout, document boundaries "
                             "from DocumentMaskParams(document_ids=...) as packed_seq_params")
        if attention_bias is not None:
            raise ValueError(f"attention_bias is not supported by the {self.backend_name} "
                             f"attention backend")
        mask_type = check_mask_type(attn_mask_type or self.attn_mask_type, self.backend_name)
        query_keys = visibility_keys_from(packed_seq_params, query)
        key_all, value_all, key_keys = gather_keys_values(key, value, query_keys,
                                                          packed_seq_params, self.cp_group)
        cp_size, cp_rank = self._cp_size_and_rank()
        return self.attend(query, key_all, value_all, query_keys, key_keys, packed_seq_params,
                           seq_len=query.shape[0] * cp_size, cp_size=cp_size, cp_rank=cp_rank,
                           causal=mask_type == AttnMaskType.causal)

    def attend(self, query, key_all, value_all, query_keys, key_keys, packed_seq_params, *,
               seq_len, cp_size, cp_rank, causal) -> Tensor:
        raise NotImplementedError


class TorchContextParallelAttention(ContextParallelCoreAttention):
    """The ``blockwise`` attention backend as a drop-in ``core_attention`` (see
    ``ContextParallelCoreAttention``). ``max_block_size`` (extra, via ``ModuleSpec(params=...)``)
    sets the attention block (default: 1024 tokens or one CP chunk, whichever is smaller).
    """

    backend_name = "blockwise"

    def __init__(self, *args, max_block_size: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_block_size = max_block_size

    def attend(self, query, key_all, value_all, query_keys, key_keys, packed_seq_params, *,
               seq_len, cp_size, cp_rank, causal) -> Tensor:
        split = {}
        if query_keys is not None:  # back to (document, branch) for the public function
            split = dict(query_document_ids=query_keys >> BRANCH_BITS,
                         query_branch_ids=query_keys & _BRANCH_MASK,
                         key_document_ids=key_keys >> BRANCH_BITS,
                         key_branch_ids=key_keys & _BRANCH_MASK)
        return context_parallel_attention(
            query, key_all, value_all, seq_len=seq_len, cp_size=cp_size, cp_rank=cp_rank,
            softmax_scale=self.softmax_scale, causal=causal, max_block_size=self.max_block_size,
            **split)
