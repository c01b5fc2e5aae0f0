"""Context-parallel checks run by torchrun (gloo, CPU): ``torchrun --nproc-per-node N this.py``.

Every rank builds the same random full-sequence inputs, keeps its CP slice, and compares what the
CP computation gives (gathered back to full order) with a single-process reference:

* comm:      ``all_gather_seq`` gradient against the single-process math.
* attention: ``TorchContextParallelAttention`` outputs and dq/dk/dv against a naive full-matrix
             attention, with GQA, with and without documents that cross chunk and rank borders.
* gpt:       a real Megatron ``GPTModel`` (local spec, our core attention, RoPE from position ids,
             document masking via ``DocumentMaskParams``) at CP=N against CP=1 math: per-token
             losses and parameter gradients (summed over CP ranks, as DDP does).

Rank 0 prints one JSON line ``{"cp": N, "checks": {name: max error}}``; any failure exits non-zero.
"""

from __future__ import annotations

import json
import math
import sys
import types

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from megatron_ext import parallel
from megatron_ext.parallel.collectives import all_gather_seq
from megatron_ext.parallel.cp_layout import merge_cp_slices, slice_for_cp
from megatron_ext.model.cp_attention import (
    DocumentMaskParams,
    TorchContextParallelAttention,
)
from megatron_ext.model.rotary import PositionIdsGPTModel

TOLERANCE = 1e-5
HEADS, GROUPS, HEAD_DIM = 4, 2, 8
# Uneven documents: with CP=2 (chunk 12) and CP=4 (chunk 6) of 48 tokens they cross chunk and
# rank borders; the second row is a single document; the third has a 1-token document.
DOCUMENT_LENGTHS = [[7, 13, 5, 19, 4], [48], [1, 22, 25]]


def naive_attention(q, k, v, document_ids=None, causal=True):
    """Full [s, s] softmax attention in Megatron's shapes ([s, b, h, d] -> [s, b, h*d])."""
    s, b, heads, d = q.shape
    k = k.repeat_interleave(heads // k.shape[2], dim=2)
    v = v.repeat_interleave(heads // v.shape[2], dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(d)
    visible = torch.ones(b, s, s, dtype=torch.bool)
    if causal:
        visible &= torch.ones(s, s, dtype=torch.bool).tril()
    if document_ids is not None:
        visible &= document_ids[:, :, None] == document_ids[:, None, :]
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1)
    return torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(s, b, heads * d)


def document_ids_from_lengths(lengths_per_row):
    return torch.stack([torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
                        for lengths in lengths_per_row])


def gather_full(local: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Every rank's slice, put back in global sequence order."""
    group = parallel_state.get_context_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return merge_cp_slices(parts, seq_dim=seq_dim)


def max_error(actual, expected) -> float:
    return (actual - expected).abs().max().item() / max(1.0, expected.abs().max().item())


def config(cp_size: int, **extra) -> TransformerConfig:
    return TransformerConfig(
        num_layers=2, hidden_size=HEADS * HEAD_DIM * 2, num_attention_heads=HEADS,
        num_query_groups=GROUPS, kv_channels=HEAD_DIM, ffn_hidden_size=64, attention_dropout=0.0,
        hidden_dropout=0.0, use_cpu_initialization=True, normalization="RMSNorm",
        context_parallel_size=cp_size, bias_activation_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, bias_dropout_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, **extra)


def check_comm(cp: int, rank: int) -> float:
    """y = gather(x_r) on every rank, loss = sum_r <w_r, y>: dL/dx_r = sum_k w_k[slice r]."""
    group = parallel_state.get_context_parallel_group()
    torch.manual_seed(0)
    xs = [torch.randn(3, 5, 2) for _ in range(cp)]
    ws = [torch.randn(3, 5 * cp, 2) for _ in range(cp)]
    x = xs[rank].clone().requires_grad_()
    y = all_gather_seq(x, group, dim=1)
    (y * ws[rank]).sum().backward()
    expected_y = torch.cat(xs, dim=1)
    expected_grad = sum(ws)[:, 5 * rank:5 * (rank + 1)]
    return max(max_error(y.detach(), expected_y), max_error(x.grad, expected_grad))


def check_attention(cp: int, rank: int, with_documents: bool, max_block_size=None) -> float:
    torch.manual_seed(1)
    seq_len, batch = 48, len(DOCUMENT_LENGTHS)
    q = torch.randn(seq_len, batch, HEADS, HEAD_DIM)
    k = torch.randn(seq_len, batch, GROUPS, HEAD_DIM)
    v = torch.randn(seq_len, batch, GROUPS, HEAD_DIM)
    grad_out = torch.randn(seq_len, batch, HEADS * HEAD_DIM)
    docs = document_ids_from_lengths(DOCUMENT_LENGTHS) if with_documents else None

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = naive_attention(*full, document_ids=docs)
    ref_grads = torch.autograd.grad(reference, full, grad_out)

    # Slice along the sequence dim (0 for [s, b, ...] tensors, 1 for [b, s] document ids).
    local = slice_for_cp({"q": q, "k": k, "v": v, "grad_out": grad_out}, cp, rank, seq_dim=0)
    local_qkv = [local[name].clone().requires_grad_() for name in ("q", "k", "v")]
    params = None
    if docs is not None:
        params = DocumentMaskParams.for_tokens(slice_for_cp({"d": docs}, cp, rank)["d"], seq_len)
    attention = TorchContextParallelAttention(config(cp), 1, AttnMaskType.causal, "self",
                                              max_block_size=max_block_size)
    out = attention(*local_qkv, None, packed_seq_params=params)
    grads = torch.autograd.grad(out, local_qkv, local["grad_out"])

    errors = [max_error(gather_full(out.detach(), 0), reference.detach())]
    errors += [max_error(gather_full(g, 0), r) for g, r in zip(grads, ref_grads)]
    return max(errors)


class FullSequenceAttention(TorchContextParallelAttention):
    """The CP=1 reference inside a CP=N job: the same module, told there is no CP group."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
        kwargs["pg_collection"] = types.SimpleNamespace(cp=None)
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)


def gpt_model(cp: int, core_attention) -> PositionIdsGPTModel:
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = core_attention
    torch.manual_seed(2)  # identical weights for the CP model and the reference
    return PositionIdsGPTModel(config=config(cp), transformer_layer_spec=spec, vocab_size=96,
                               max_sequence_length=512, position_embedding_type="rope",
                               rotary_base=10000, share_embeddings_and_output_weights=False)


def per_token_loss_and_grads(model, batch, seq_len):
    model.zero_grad()
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                 packed_seq_params=DocumentMaskParams.for_tokens(batch["document_ids"], seq_len))
    loss.sum().backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def check_gpt(cp: int, rank: int) -> float:
    seq_len = 48
    docs = document_ids_from_lengths(DOCUMENT_LENGTHS)
    torch.manual_seed(3)
    # Positions restart per document, with a skip-wise jump (PoSE-like) in the first row.
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths])
                             for lengths in DOCUMENT_LENGTHS])
    positions[0, 20:] += 300
    batch = {"tokens": torch.randint(0, 96, docs.shape), "labels": torch.randint(0, 96, docs.shape),
             "position_ids": positions, "document_ids": docs}

    reference = gpt_model(1, FullSequenceAttention)
    ref_loss, ref_grads = per_token_loss_and_grads(reference, batch, seq_len)
    model = gpt_model(cp, TorchContextParallelAttention)
    model.load_state_dict(reference.state_dict())
    loss, grads = per_token_loss_and_grads(model, slice_for_cp(batch, cp, rank), seq_len)

    group = parallel_state.get_context_parallel_group()
    errors = [max_error(gather_full(loss, 1), ref_loss)]
    for name, grad in grads.items():
        dist.all_reduce(grad, group=group)  # DDP's all-reduce over DP x CP
        errors.append(max_error(grad, ref_grads[name]))
    # The documents must matter: without them the loss differs.
    no_docs = reference(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    assert max_error(no_docs.detach(), ref_loss) > 1e-3, "document masking had no effect"
    return max(errors)


def main() -> int:
    world = int(__import__("os").environ["WORLD_SIZE"])
    parallel.initialize(cp=world, device="cpu")
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    cp = parallel_state.get_context_parallel_world_size()
    rank = parallel_state.get_context_parallel_rank()
    checks = {
        "comm_all_gather_grad": check_comm(cp, rank),
        "attention_causal": check_attention(cp, rank, with_documents=False),
        "attention_documents": check_attention(cp, rank, with_documents=True),
        "attention_documents_block4": check_attention(cp, rank, True, max_block_size=4),
        "gpt_loss_and_grads": check_gpt(cp, rank),
    }
    failed = {name: err for name, err in checks.items() if not err <= TOLERANCE}
    if rank == 0:
        print(json.dumps({"cp": cp, "tolerance": TOLERANCE, "checks": checks}), flush=True)
    if failed:
        print(f"rank {rank}: FAILED {failed}", file=sys.stderr, flush=True)
    parallel.destroy()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
