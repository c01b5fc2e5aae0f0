"""How HF tensors become one Megatron tensor and back: the transforms a mapping table names.

Each transform knows, for a Megatron tensor of a given shape, which HF shapes it corresponds to
(so both directions can validate shapes before reading any data), and converts both ways. Casting
to the target dtype happens inside the copy, so a transform allocates its output once.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

Shape = Tuple[int, ...]


class Transform:
    name = "identity"

    def hf_shapes(self, megatron_shape: Shape, spec) -> List[Shape]:
        return [tuple(megatron_shape)]

    def to_megatron(self, parts: Sequence[torch.Tensor], megatron_shape: Shape, spec,
                    dtype: torch.dtype) -> torch.Tensor:
        return parts[0].to(dtype)

    def to_hf(self, tensor: torch.Tensor, spec) -> List[torch.Tensor]:
        return [tensor]

    def __repr__(self) -> str:
        return self.name


class PadVocab(Transform):
    """Embedding / output layer: rows beyond the HF vocab are Megatron's padding (zeros)."""

    name = "pad_vocab"

    def hf_shapes(self, megatron_shape, spec):
        return [(spec.vocab_size, *megatron_shape[1:])]

    def to_megatron(self, parts, megatron_shape, spec, dtype):
        out = torch.zeros(megatron_shape, dtype=dtype)
        out[: spec.vocab_size].copy_(parts[0])
        return out

    def to_hf(self, tensor, spec):
        return [tensor[: spec.vocab_size]]


class FuseQKV(Transform):
    """q, k, v -> Megatron's linear_qkv, interleaved per query group: [q heads of g, k_g, v_g]."""

    name = "fuse_qkv"

    @staticmethod
    def _grouped_shape(spec, rest: Shape) -> Shape:
        return (spec.num_query_groups, spec.heads_per_group + 2, spec.head_dim, *rest)

    def hf_shapes(self, megatron_shape, spec):
        rest = tuple(megatron_shape[1:])
        kv_rows = spec.num_query_groups * spec.head_dim
        q_rows = spec.num_attention_heads * spec.head_dim
        return [(q_rows, *rest), (kv_rows, *rest), (kv_rows, *rest)]

    def to_megatron(self, parts, megatron_shape, spec, dtype):
        q, k, v = parts
        rest = tuple(megatron_shape[1:])
        g, hpg, d = spec.num_query_groups, spec.heads_per_group, spec.head_dim
        out = torch.empty(megatron_shape, dtype=dtype)
        grouped = out.view(self._grouped_shape(spec, rest))
        grouped[:, :hpg].copy_(q.reshape(g, hpg, d, *rest))
        grouped[:, hpg].copy_(k.reshape(g, d, *rest))
        grouped[:, hpg + 1].copy_(v.reshape(g, d, *rest))
        return out

    def to_hf(self, tensor, spec):
        rest = tuple(tensor.shape[1:])
        hpg = spec.heads_per_group
        grouped = tensor.view(self._grouped_shape(spec, rest))
        q = grouped[:, :hpg].reshape(spec.num_attention_heads * spec.head_dim, *rest)
        k = grouped[:, hpg].reshape(spec.num_query_groups * spec.head_dim, *rest)
        v = grouped[:, hpg + 1].reshape(spec.num_query_groups * spec.head_dim, *rest)
        return [q, k, v]


class FuseGateUp(Transform):
    """gate_proj, up_proj -> Megatron's linear_fc1 = [gate; up] (SwiGLU)."""

    name = "fuse_gate_up"

    def hf_shapes(self, megatron_shape, spec):
        half = (megatron_shape[0] // 2, *megatron_shape[1:])
        return [half, half]

    def to_megatron(self, parts, megatron_shape, spec, dtype):
        gate, up = parts
        out = torch.empty(megatron_shape, dtype=dtype)
        out[: gate.shape[0]].copy_(gate)
        out[gate.shape[0]:].copy_(up)
        return out

    def to_hf(self, tensor, spec):
        half = tensor.shape[0] // 2
        return [tensor[:half], tensor[half:]]


IDENTITY = Transform()
PAD_VOCAB = PadVocab()
FUSE_QKV = FuseQKV()
FUSE_GATE_UP = FuseGateUp()
