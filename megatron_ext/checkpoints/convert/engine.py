"""Applies a family's mapping table in either direction.

The table is expanded per layer into ``Mapping``s; before any data moves, ``check_hf`` compares the
HF checkpoint's names and shapes with what the table and the Megatron model expect, so a missing,
unexpected or mis-shaped tensor is reported by name up front.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Iterator, List, Mapping as MappingT, Sequence, Tuple

import torch

from megatron_ext.checkpoints.convert.hf_config import ConversionError, ModelSpec
from megatron_ext.checkpoints.convert.transforms import Shape, Transform


@dataclasses.dataclass(frozen=True)
class Mapping:
    hf: Tuple[str, ...]
    megatron: str
    transform: Transform
    layer: int = -1  # -1: not a per-layer tensor


def _expand(spec: ModelSpec, layered: bool) -> Iterator[Mapping]:
    for r in spec.family.rules:
        if r.only_if_untied and spec.tie_word_embeddings:
            continue
        if ("{i}" in r.megatron) != layered:
            continue
        yield r


def groups(spec: ModelSpec) -> List[List[Mapping]]:
    """Mappings grouped as: embedding (and other leading non-layer tensors), one group per layer,
    then the final norm and output layer. This is also the HF file order on export."""
    rules = spec.family.rules
    first_layered = next(k for k, r in enumerate(rules) if "{i}" in r.megatron)
    lead = [Mapping(r.hf, r.megatron, r.transform) for r in _expand(spec, False)
            if rules.index(r) < first_layered]
    tail = [Mapping(r.hf, r.megatron, r.transform) for r in _expand(spec, False)
            if rules.index(r) > first_layered]
    layers = [[Mapping(tuple(n.format(i=i) for n in r.hf), r.megatron.format(i=i), r.transform, i)
               for r in _expand(spec, True)] for i in range(spec.num_layers)]
    return [g for g in [lead, *layers, tail] if g]


def megatron_shapes(spec: ModelSpec, padded_vocab_size: int) -> Dict[str, Shape]:
    """Megatron-Core GPTModel's parameter shapes (TP=1, local spec names) for this model."""
    h, d, ffn = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    qkv_rows = (spec.num_attention_heads + 2 * spec.num_query_groups) * d
    layer = {
        "input_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": (qkv_rows, h),
        "self_attention.linear_proj.weight": (h, spec.num_attention_heads * d),
        "pre_mlp_layernorm.weight": (h,),
        "mlp.linear_fc1.weight": (2 * ffn, h),
        "mlp.linear_fc2.weight": (h, ffn),
    }
    if spec.qkv_bias:
        layer["self_attention.linear_qkv.bias"] = (qkv_rows,)
    if spec.qk_layernorm:  # one weight per head_dim, shared by all heads
        layer["self_attention.q_layernorm.weight"] = (d,)
        layer["self_attention.k_layernorm.weight"] = (d,)
    shapes = {"embedding.word_embeddings.weight": (padded_vocab_size, h)}
    for i in range(spec.num_layers):
        shapes.update({f"decoder.layers.{i}.{k}": v for k, v in layer.items()})
    shapes["decoder.final_layernorm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["output_layer.weight"] = (padded_vocab_size, h)
    return shapes


def compare_shapes(expected: MappingT[str, Shape], actual: MappingT[str, Shape],
                   where: str) -> None:
    problems = [f"{n} missing" for n in expected if n not in actual]
    problems += [f"{n} is unexpected" for n in actual if n not in expected]
    problems += [f"{n} has shape {tuple(actual[n])}, expected {tuple(expected[n])}"
                 for n in expected if n in actual and tuple(actual[n]) != tuple(expected[n])]
    if problems:
        raise ConversionError(f"{where} does not match the model config: "
                              + "; ".join(problems[:8]))


def mappings(spec: ModelSpec) -> List[Mapping]:
    return [m for g in groups(spec) for m in g]


def hf_shapes(spec: ModelSpec, megatron_shapes: MappingT[str, Shape]) -> Dict[str, Shape]:
    """Expected HF tensor shapes, derived from the Megatron shapes through each transform."""
    out = {}
    for m in mappings(spec):
        if m.megatron not in megatron_shapes:
            raise ConversionError(f"the Megatron model has no tensor {m.megatron} (needed by the "
                                  f"{spec.family.name} table for {', '.join(m.hf)})")
        for name, shape in zip(m.hf, m.transform.hf_shapes(megatron_shapes[m.megatron], spec)):
            out[name] = tuple(shape)
    return out


def check_hf(spec: ModelSpec, available: MappingT[str, Shape], megatron_shapes: MappingT[str, Shape]
             ) -> None:
    """Every tensor the table needs is present with the right shape, and nothing is left over."""
    expected = hf_shapes(spec, megatron_shapes)
    missing = [n for n in expected if n not in available]
    if missing:
        raise ConversionError(f"HF checkpoint is missing {len(missing)} tensor(s) the "
                              f"{spec.family.name} table needs: {', '.join(missing[:8])}"
                              f"{' ...' if len(missing) > 8 else ''}")
    wrong = [f"{n} has shape {tuple(available[n])}, expected {expected[n]}"
             for n in expected if tuple(available[n]) != expected[n]]
    if wrong:
        raise ConversionError("HF tensor shapes do not match config.json: " + "; ".join(wrong[:8]))
    ignored = re.compile(spec.family.ignored_hf)
    tied_head = {"lm_head.weight"} if spec.tie_word_embeddings else set()
    unexpected = [n for n in available
                  if n not in expected and n not in tied_head and not ignored.search(n)]
    if unexpected:
        raise ConversionError(f"HF checkpoint has {len(unexpected)} tensor(s) the "
                              f"{spec.family.name} table does not map (refusing to drop weights): "
                              f"{', '.join(sorted(unexpected)[:8])}")


def check_megatron(spec: ModelSpec, megatron_shapes: MappingT[str, Shape]) -> None:
    """Every Megatron tensor of the model is produced by exactly one mapping."""
    produced = {m.megatron for m in mappings(spec)}
    unmapped = [n for n in megatron_shapes if n not in produced]
    if unmapped:
        raise ConversionError(f"the {spec.family.name} table has no rule for Megatron tensor(s) "
                              f"{', '.join(unmapped[:8])}")


def to_megatron(m: Mapping, parts: Sequence[torch.Tensor], megatron_shape: Shape, spec: ModelSpec,
                dtype: torch.dtype) -> torch.Tensor:
    out = m.transform.to_megatron(parts, tuple(megatron_shape), spec, dtype)
    if tuple(out.shape) != tuple(megatron_shape):
        raise ConversionError(f"{m.transform} made {m.megatron} with shape {tuple(out.shape)}, "
                              f"expected {tuple(megatron_shape)}")
    return out


def to_hf(m: Mapping, tensor: torch.Tensor, spec: ModelSpec, dtype: torch.dtype
          ) -> List[Tuple[str, torch.Tensor]]:
    parts = m.transform.to_hf(tensor, spec)
    return [(name, part.to(dtype)) for name, part in zip(m.hf, parts)]
