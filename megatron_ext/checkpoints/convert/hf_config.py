"""Hugging Face config.json <-> ``ModelSpec``, the model as Hugging Face describes it.

``ModelSpec`` is the description both conversion directions go through (``architecture.py`` maps
it to our ``ModelConfig``, training flags and ``model_args.json``). It is read from either config
layout:

  transformers 4:  top-level ``rope_theta`` + ``rope_scaling`` ({"type"|"rope_type": ..., ...})
  transformers 5:  ``rope_parameters`` ({"rope_type": ..., "rope_theta": ..., ...})

and written back in whatever layout the installed transformers writes (``save_pretrained``).
Nothing here imports Megatron or train.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Mapping, Optional, Union

from megatron_ext.checkpoints.convert.errors import ConversionError  # noqa: F401 (re-exported)
from megatron_ext.checkpoints.convert.tables import Family, family_for
from megatron_ext.errors import UserError
from megatron_ext.model.rope_scaling import RopeScaling
from megatron_ext.parallel.layout import HF_NAMES, Layout


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    family: Family
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope_theta: float
    # None, {"rope_type": "linear", "factor": f} or {"rope_type": "llama3" | "yarn", "factor": f,
    # ...} (RopeScaling.to_hf: normalized)
    rope_scaling: Optional[Dict[str, Any]] = None
    dtype: Optional[str] = None  # torch dtype name of the weights, e.g. "bfloat16"
    sliding_window: Optional[int] = None  # Mistral: carried for export; Megatron trains without it

    @property
    def qkv_bias(self) -> bool:
        return self.family.qkv_bias

    @property
    def qk_layernorm(self) -> bool:
        return self.family.qk_layernorm

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def rope_parameters(self) -> Dict[str, Any]:
        """transformers-5 ``rope_parameters`` for this model."""
        params = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            params.update(self.rope_scaling)
        return params


def _load_dict(config: Union[str, os.PathLike, Mapping, Any]) -> Dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return config.to_dict()
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{path} does not exist: expected a Hugging Face model folder with "
                              "config.json")
    with open(path) as f:
        return json.load(f)


def _read_rope(cfg: Mapping[str, Any]) -> tuple:
    """(rope_theta, normalized scaling or None) from either config layout."""
    params = cfg.get("rope_parameters")
    if params is not None:
        if params and all(isinstance(v, Mapping) for v in params.values()):
            raise ConversionError(f"rope_parameters has one entry per layer type "
                                  f"({sorted(params)}); per-layer RoPE is not supported")
        theta = params.get("rope_theta", cfg.get("rope_theta"))
    else:  # transformers 4
        params = cfg.get("rope_scaling") or {}
        theta = cfg.get("rope_theta")
    theta = 10000.0 if theta is None else float(theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("partial_rotary_factor != 1 is not supported (Megatron's "
                              "rotary_percent would be needed)")
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, {"rope_type": "linear", "factor": float(params["factor"])}
    if rope_type in ("llama3", "yarn"):
        # Any llama3 parameters and YaRN: our RoPE is computed from position ids, so it carries
        # whatever the config says (normalized by RopeScaling: YaRN keys at transformers'
        # defaults left out, as a config that omits them).
        try:
            scaling = RopeScaling.from_hf(params, cfg.get("max_position_embeddings"))
        except UserError as err:
            raise ConversionError(f"rope {rope_type}: {err}") from None
        return theta, scaling.to_hf()
    raise ConversionError(f"rope type {rope_type!r} is not supported; supported: default, linear, "
                          "llama3, yarn (dynamic NTK: use a static base from tools/rope_base.py)")


def _require(cfg: Mapping[str, Any], key: str):
    if cfg.get(key) is None:
        raise ConversionError(f"config.json has no {key!r}")
    return cfg[key]


def read_hf_config(config) -> ModelSpec:
    """A ModelSpec from a model folder, a config.json path, a dict or a PretrainedConfig."""
    cfg = _load_dict(config)
    family = family_for(cfg.get("architectures"), cfg.get("model_type"))
    heads = int(_require(cfg, "num_attention_heads"))
    hidden = int(_require(cfg, "hidden_size"))
    groups = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {cfg['hidden_act']!r} is not supported (SwiGLU needs "
                              "silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConversionError(f"{flag}=true is not supported: megatron_ext has QKV-only biases "
                                  "(Qwen2) or none")
    if cfg.get("use_sliding_window"):
        raise ConversionError("use_sliding_window=true is not supported: megatron_ext trains with "
                              "full causal attention")
    windowed = sorted({t for t in cfg.get("layer_types") or () if t != "full_attention"})
    if windowed:
        raise ConversionError(f"layer_types has {windowed} layers: megatron_ext trains every "
                              "layer with full causal attention")
    if heads % groups != 0:
        raise ConversionError(f"num_attention_heads ({heads}) is not a multiple of "
                              f"num_key_value_heads ({groups})")
    theta, scaling = _read_rope(cfg)
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    return ModelSpec(
        family=family,
        num_layers=int(_require(cfg, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(cfg, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=int(head_dim),
        vocab_size=int(_require(cfg, "vocab_size")),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family.default_tie)),
        rope_theta=theta,
        rope_scaling=scaling,
        dtype=str(dtype).replace("torch.", "") if dtype else None,
        sliding_window=cfg.get("sliding_window") if family.name == "mistral" else None,
    )


# ------------------------------------------------------------------------------------------
# Layout rules and vocabulary padding (the mapping to our names is convert/architecture.py)
# ------------------------------------------------------------------------------------------

def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int = 1) -> int:
    """Same rule as megatron_ext.data.tokenizer.padded_vocab_size (lcm, layout independent)."""
    multiple = math.lcm(divisible_by, tensor_parallel_size)
    return -(-vocab_size // multiple) * multiple


def check_layout(spec: ModelSpec, tp: int, pp: int) -> None:
    """Raise ConversionError unless TP/PP fit this model (the training layout's rules)."""
    Layout(tp, pp, error=ConversionError).check_model(
        heads=spec.num_attention_heads, groups=spec.num_query_groups, ffn=spec.ffn_hidden_size,
        layers=spec.num_layers, names=HF_NAMES)


# ------------------------------------------------------------------------------------------
# ModelSpec -> transformers config
# ------------------------------------------------------------------------------------------

# Fields the export derives from the ModelSpec; everything else is kept from the reference config.
_V4_ROPE_KEYS = ("rope_theta", "rope_scaling")
_REGENERATED_KEYS = ("transformers_version", "torch_dtype", "_name_or_path")


def to_hf_config(spec: ModelSpec, reference: Optional[Mapping[str, Any]] = None,
                 dtype: Optional[str] = None):
    """A transformers config object for ``spec``, keeping unrelated fields of ``reference``."""
    from transformers import AutoConfig

    d = {k: v for k, v in (reference or {}).items()
         if k not in _V4_ROPE_KEYS + _REGENERATED_KEYS}
    d.update(
        architectures=[spec.family.architecture], model_type=spec.family.model_type,
        num_hidden_layers=spec.num_layers, hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_query_groups, vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=spec.rms_norm_eps,
        tie_word_embeddings=spec.tie_word_embeddings, rope_parameters=spec.rope_parameters(),
        hidden_act="silu",
    )
    derived_head_dim = spec.hidden_size // spec.num_attention_heads
    if spec.family.model_type != "qwen2" or spec.head_dim != derived_head_dim:
        d["head_dim"] = spec.head_dim  # Qwen2 reads it when present, else derives it
    if spec.family.name == "mistral":
        d["sliding_window"] = spec.sliding_window
    if dtype or spec.dtype:
        d["dtype"] = dtype or spec.dtype
    model_type = d.pop("model_type")
    return AutoConfig.for_model(model_type, **d)
