"""One declarative parameter-mapping table per model family: (HF names, Megatron name, transform).

Megatron names are Megatron-Core GPTModel state-dict names with the local layer spec (what runs on
CPU here); ``{i}`` is the layer index. Transformer Engine's spec fuses the two RMSNorms into the
following linear layer, so two names differ there (``TE_SPEC_NAMES``). Megatron-Core's sharded
checkpoint keys are always the TE names with the layer index moved into a leading tensor axis
(``checkpoint_key``), whichever spec wrote the checkpoint: the tables therefore read and write
checkpoints from either spec.

Adding a family = adding a table and a ``Family`` entry.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Optional, Sequence, Tuple

from megatron_ext.checkpoints.convert.errors import ConversionError
from megatron_ext.checkpoints.convert.transforms import (FUSE_GATE_UP, FUSE_QKV, IDENTITY, PAD_VOCAB,
                                             Transform)


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: Tuple[str, ...]  # HF tensor names, in the order the transform takes them
    megatron: str
    transform: Transform = IDENTITY
    only_if_untied: bool = False  # the output layer exists only without tied embeddings


def rule(hf, megatron: str, transform: Transform = IDENTITY, only_if_untied: bool = False) -> Rule:
    return Rule((hf,) if isinstance(hf, str) else tuple(hf), megatron, transform, only_if_untied)


_ATTN = "model.layers.{i}.self_attn"
_MLP = "model.layers.{i}.mlp"
_LAYER = "decoder.layers.{i}"

LLAMA = (
    rule("model.embed_tokens.weight", "embedding.word_embeddings.weight", PAD_VOCAB),
    rule("model.layers.{i}.input_layernorm.weight", f"{_LAYER}.input_layernorm.weight"),
    rule((f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight", f"{_ATTN}.v_proj.weight"),
         f"{_LAYER}.self_attention.linear_qkv.weight", FUSE_QKV),
    rule(f"{_ATTN}.o_proj.weight", f"{_LAYER}.self_attention.linear_proj.weight"),
    rule("model.layers.{i}.post_attention_layernorm.weight", f"{_LAYER}.pre_mlp_layernorm.weight"),
    rule((f"{_MLP}.gate_proj.weight", f"{_MLP}.up_proj.weight"), f"{_LAYER}.mlp.linear_fc1.weight",
         FUSE_GATE_UP),
    rule(f"{_MLP}.down_proj.weight", f"{_LAYER}.mlp.linear_fc2.weight"),
    rule("model.norm.weight", "decoder.final_layernorm.weight"),
    rule("lm_head.weight", "output_layer.weight", PAD_VOCAB, only_if_untied=True),
)

# Mistral's HF module names are Llama's; the differences (sliding window) live in the config.
MISTRAL = LLAMA

QWEN2 = LLAMA + (
    rule((f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias", f"{_ATTN}.v_proj.bias"),
         f"{_LAYER}.self_attention.linear_qkv.bias", FUSE_QKV),
)

# Qwen3 (dense): no QKV bias; one RMSNorm weight per head_dim for all query heads and one for all
# key heads (Megatron-Core's qk_layernorm), replicated across TP ranks.
QWEN3 = LLAMA + (
    rule(f"{_ATTN}.q_norm.weight", f"{_LAYER}.self_attention.q_layernorm.weight"),
    rule(f"{_ATTN}.k_norm.weight", f"{_LAYER}.self_attention.k_layernorm.weight"),
)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # HF `architectures[0]`
    model_type: str
    rules: Tuple[Rule, ...]
    qkv_bias: bool = False
    default_tie: bool = False
    qk_layernorm: bool = False
    # HF tensors that carry no weights (old checkpoints stored RoPE buffers).
    ignored_hf: str = r"\.rotary_emb\.inv_freq$"

    def __repr__(self) -> str:  # keeps ModelSpec's repr short
        return f"Family({self.name})"


FAMILIES: Dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", "llama", LLAMA),
    "mistral": Family("mistral", "MistralForCausalLM", "mistral", MISTRAL),
    # Qwen2.5 checkpoints are Qwen2ForCausalLM with the same tensors: this entry reads them.
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "qwen2", QWEN2, qkv_bias=True),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", "qwen3", QWEN3, qk_layernorm=True),
}


def family_for(architectures: Optional[Sequence[str]], model_type: Optional[str]) -> Family:
    for family in FAMILIES.values():
        if architectures and family.architecture in architectures:
            return family
    if not architectures:
        for family in FAMILIES.values():
            if family.model_type == model_type:
                return family
    supported = ", ".join(f.architecture for f in FAMILIES.values())
    if any("Moe" in a for a in architectures or ()) or "moe" in (model_type or ""):
        raise ConversionError(f"{architectures or model_type!r} is a mixture-of-experts model; "
                              f"megatron_ext trains dense models only ({supported})")
    raise ConversionError(f"unsupported architecture {architectures or model_type!r}: this "
                          f"converter has tables for {supported}")


# ------------------------------------------------------------------------------------------
# Megatron names: local spec <-> Transformer Engine spec <-> sharded checkpoint keys
# ------------------------------------------------------------------------------------------

TE_SPEC_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def te_name(local_name: str) -> str:
    """The Transformer Engine spec's state-dict name for a local-spec name."""
    m = _LAYER_NAME.match(local_name)
    if m and m.group(2) in TE_SPEC_NAMES:
        return f"decoder.layers.{m.group(1)}.{TE_SPEC_NAMES[m.group(2)]}"
    return local_name


def local_name(name: str) -> str:
    """The local spec's name for a local- or TE-spec name."""
    m = _LAYER_NAME.match(name)
    if m:
        for local, te in TE_SPEC_NAMES.items():
            if m.group(2) == te:
                return f"decoder.layers.{m.group(1)}.{local}"
    return name


def checkpoint_key(name: str) -> Tuple[str, Optional[int]]:
    """(sharded checkpoint key, layer index or None) of a local- or TE-spec state-dict name."""
    m = _LAYER_NAME.match(te_name(local_name(name)))
    if m:
        return f"decoder.layers.{m.group(2)}", int(m.group(1))
    return name, None


def state_dict_name(key: str, layer: Optional[int]) -> str:
    """Inverse of ``checkpoint_key``: the local-spec state-dict name."""
    if layer is None:
        return key
    return local_name(f"decoder.layers.{layer}.{key[len('decoder.layers.'):]}")
