"""Context-parallel attention, its collectives and the CP batch layout.

Single process: the module (CP=1) and the per-rank CP computation (emulated ranks, keys/values
gathered by hand) against a naive full-matrix attention. torchrun (gloo, 2 and 4 ranks): the real
thing, via tests/cp_attention_worker.py.
"""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from megatron_ext.parallel.cp_layout import (
    cp_gathered_indices,
    cp_token_indices,
    document_ids_from_eod,
    merge_cp_slices,
    slice_for_cp,
)
from megatron_ext.model import cp_attention
from megatron_ext.model.cp_attention import (
    DocumentMaskParams,
    TorchContextParallelAttention,
    context_parallel_attention,
    layout_blocks,
)

# tests/ is on sys.path (conftest.py): share the reference attention with the torchrun worker.
from cp_attention_worker import document_ids_from_lengths, naive_attention

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(heads=4, groups=2, head_dim=8, **extra):
    return TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=head_dim,
                             attention_dropout=extra.pop("attention_dropout", 0.0), **extra)


def random_qkv(seq_len, batch, heads, groups, head_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = lambda n: (seq_len, batch, n, head_dim)
    return [torch.randn(shape(n), generator=generator, dtype=dtype).requires_grad_()
            for n in (heads, groups, groups)]


# ------------------------------------------------------------------------------------------------
# The module at CP=1 against a naive full-matrix reference (fp32)
# ------------------------------------------------------------------------------------------------

DOCS_37 = [[5, 11, 1, 20], [37], [18, 19]]  # uneven documents, one of a single token


@pytest.mark.parametrize("heads, groups", [(4, 2), (4, 1), (4, 4)])
@pytest.mark.parametrize("with_documents", [False, True])
@pytest.mark.parametrize("max_block_size", [None, 5])
def test_module_matches_naive_attention(heads, groups, with_documents, max_block_size):
    seq_len, head_dim = 37, 8
    q, k, v = random_qkv(seq_len, len(DOCS_37), heads, groups, head_dim)
    docs = document_ids_from_lengths(DOCS_37) if with_documents else None
    params = DocumentMaskParams.for_tokens(docs, seq_len) if with_documents else None
    attention = TorchContextParallelAttention(make_config(heads, groups, head_dim), 1,
                                              AttnMaskType.causal, "self",
                                              max_block_size=max_block_size)
    out = attention(q, k, v, None, packed_seq_params=params)
    reference = naive_attention(q, k, v, document_ids=docs)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(reference, (q, k, v), grad_out)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_no_mask_attention_type():
    q, k, v = random_qkv(12, 2, 4, 2, 8)
    attention = TorchContextParallelAttention(make_config(), 1, AttnMaskType.no_mask, "self",
                                              max_block_size=4)
    torch.testing.assert_close(attention(q, k, v, None),
                               naive_attention(q, k, v, causal=False), rtol=1e-5, atol=1e-5)


def test_blocks_hidden_by_the_causal_mask_are_skipped(monkeypatch):
    """No S x S matrix: only [block, block] scores, and only on or below the diagonal."""
    shapes = []
    real_block_scores = cp_attention._block_scores

    def recording_block_scores(q_blk, k_blk, scale, mask):
        shapes.append((q_blk.shape[-2], k_blk.shape[-2]))
        return real_block_scores(q_blk, k_blk, scale, mask)

    monkeypatch.setattr(cp_attention, "_block_scores", recording_block_scores)
    q, k, v = random_qkv(32, 1, 2, 2, 4)
    out = TorchContextParallelAttention(make_config(2, 2, 4), 1, AttnMaskType.causal, "self",
                                        max_block_size=8)(q, k, v, None)
    assert shapes == [(8, 8)] * 10  # 4 query blocks x 4 key blocks, lower triangle: 10
    shapes.clear()
    out.sum().backward()  # the backward recomputes the same 10 blocks
    assert shapes == [(8, 8)] * 10


# ------------------------------------------------------------------------------------------------
# Emulated CP ranks in one process (fp64, exact up to rounding): the layout logic
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cp_size", [2, 3, 4])
@pytest.mark.parametrize("max_block_size", [None, 4])
def test_emulated_cp_ranks_match_full_attention(cp_size, max_block_size):
    seq_len, heads, groups, head_dim = 48, 4, 2, 8
    lengths = [[7, 13, 5, 19, 4], [48], [1, 22, 25]]
    docs = document_ids_from_lengths(lengths)
    q, k, v = random_qkv(seq_len, len(lengths), heads, groups, head_dim, dtype=torch.float64)
    reference = naive_attention(q, k, v, document_ids=docs)
    grad_out = torch.randn_like(reference)
    ref_grads = torch.autograd.grad(reference, (q, k, v), grad_out)

    gathered = cp_gathered_indices(seq_len, cp_size)  # what an all-gather of K/V returns
    out_full = torch.zeros_like(reference)
    grads_full = [torch.zeros_like(t) for t in (q, k, v)]
    for rank in range(cp_size):
        local = cp_token_indices(seq_len, cp_size, rank)
        q_local = q.detach()[local].requires_grad_()
        k_all, v_all = (t.detach()[gathered].requires_grad_() for t in (k, v))
        out = context_parallel_attention(
            q_local, k_all, v_all, seq_len=seq_len, cp_size=cp_size, cp_rank=rank,
            softmax_scale=1 / math.sqrt(head_dim), query_document_ids=docs[:, local],
            key_document_ids=docs[:, gathered], max_block_size=max_block_size)
        dq, dk, dv = torch.autograd.grad(out, (q_local, k_all, v_all), grad_out[local])
        out_full[local] = out.detach()
        grads_full[0][local] += dq
        grads_full[1][gathered] += dk  # the all-gather backward: sum over ranks
        grads_full[2][gathered] += dv
    torch.testing.assert_close(out_full, reference.detach(), rtol=1e-10, atol=1e-10)
    for grad, ref_grad in zip(grads_full, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


def test_layout_blocks_are_contiguous_and_cover_the_sequence():
    blocks = layout_blocks(48, 4, range(4), block_size=4)
    assert blocks[0].start == 0 and blocks[-1].end == 48
    assert all(prev.end == nxt.start for prev, nxt in zip(blocks, blocks[1:]))
    globals_ = torch.cat([torch.arange(b.global_start, b.global_start + b.length) for b in blocks])
    assert torch.equal(globals_, cp_gathered_indices(48, 4))
    # A chunk (6 tokens) is split into 4 + 2, never merged with its neighbour.
    assert [b.length for b in layout_blocks(48, 4, [1], block_size=4)] == [4, 2, 4, 2]


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def test_attention_dropout_is_refused():
    with pytest.raises(ValueError, match="--attention-dropout 0"):
        TorchContextParallelAttention(make_config(attention_dropout=0.1), 1, AttnMaskType.causal,
                                      "self")
    with pytest.raises(ValueError, match="dropout"):
        TorchContextParallelAttention(make_config(), 1, AttnMaskType.causal, "self",
                                      attention_dropout=0.1)


def test_unsupported_forward_inputs_are_refused():
    q, k, v = random_qkv(8, 2, 4, 2, 8)
    attention = TorchContextParallelAttention(make_config(), 1, AttnMaskType.causal, "self")
    with pytest.raises(ValueError, match="DocumentMaskParams"):
        attention(q, k, v, torch.ones(2, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="THD"):
        attention(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(ValueError, match="slice_for_cp"):
        attention(q, k, v, None, packed_seq_params=DocumentMaskParams.for_tokens(
            torch.zeros(2, 7, dtype=torch.long), 8))
    with pytest.raises(ValueError, match="sbhd"):
        DocumentMaskParams(qkv_format="thd")
    with pytest.raises(ValueError, match="mask type"):
        TorchContextParallelAttention(make_config(), 1, AttnMaskType.padding, "self")


# ------------------------------------------------------------------------------------------------
# The CP batch layout
# ------------------------------------------------------------------------------------------------

def test_cp_token_indices_follow_the_load_balanced_layout():
    assert cp_token_indices(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert cp_token_indices(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert cp_token_indices(16, 1, 0).tolist() == list(range(16))
    for cp in (1, 2, 3, 4):
        everything = torch.cat([cp_token_indices(48, cp, r) for r in range(cp)])
        assert sorted(everything.tolist()) == list(range(48))


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_slice_for_cp_round_trip(cp_size):
    tokens = torch.arange(2 * 32).reshape(2, 32)
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(2, 32),
             "position_ids": tokens % 7, "document_ids": tokens // 5,
             "sample_weight": torch.tensor([1.0, 2.0]), "name": "not a tensor"}
    slices = [slice_for_cp(batch, cp_size, r) for r in range(cp_size)]
    for key in ("tokens", "labels", "loss_mask", "position_ids", "document_ids"):
        restored = merge_cp_slices([s[key] for s in slices], seq_dim=1)
        assert torch.equal(restored, batch[key]), key
        # Every per-token entry is sliced with the same indices as the tokens.
        for rank, s in enumerate(slices):
            assert torch.equal(s[key], batch[key][:, cp_token_indices(32, cp_size, rank)])
    assert all(s["sample_weight"] is batch["sample_weight"] and s["name"] == "not a tensor"
               for s in slices)


def test_slice_for_cp_numpy_and_other_sequence_dims():
    batch = {"tokens": np.arange(16)[None], "position_ids": np.arange(16)[None]}
    assert slice_for_cp(batch, 2, 1)["tokens"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    hidden = torch.arange(16 * 3).reshape(16, 1, 3)
    assert torch.equal(slice_for_cp({"h": hidden}, 2, 0, seq_dim=0)["h"],
                       hidden[cp_token_indices(16, 2, 0)])


def test_slice_for_cp_bad_input():
    with pytest.raises(ValueError, match=r"--seq-length.*--context-parallel-size"):
        slice_for_cp({"tokens": torch.zeros(1, 30)}, 4, 0)
    with pytest.raises(ValueError, match="position_ids"):
        slice_for_cp({"tokens": torch.zeros(1, 32), "position_ids": torch.zeros(1, 31)}, 2, 0)
    with pytest.raises(ValueError, match="CP rank"):
        slice_for_cp({"tokens": torch.zeros(1, 32)}, 2, 2)


def test_document_ids_from_eod():
    tokens = torch.tensor([[5, 0, 7, 8, 0, 0, 3]])
    assert document_ids_from_eod(tokens, eod_token=0).tolist() == [[0, 0, 1, 1, 1, 2, 3]]


# ------------------------------------------------------------------------------------------------
# Multi-process: gloo, 2 and 4 CP ranks
# ------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("cp_size", [2, 4])
def test_context_parallel_ranks_match_single_process(cp_size):
    """all_gather_seq gradients, the attention module and a GPTModel at CP=N vs the reference."""
    worker = os.path.join(REPO_ROOT, "tests", "cp_attention_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cp_size),
           "--master-port", str(_free_port()), worker]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert report["cp"] == cp_size
    assert set(report["checks"]) == {"comm_all_gather_grad", "attention_causal",
                                     "attention_documents", "attention_documents_block4",
                                     "gpt_loss_and_grads"}
    for name, error in report["checks"].items():
        assert error <= 1e-5, (name, error)
