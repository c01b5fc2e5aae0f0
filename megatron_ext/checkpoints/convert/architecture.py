"""One two-way table between a Hugging Face model description and ours.

``ModelSpec`` (read from a HF ``config.json`` by ``hf_config``) names things the HF way;
``ModelConfig`` names them the Megatron way, and its field names are also the training flags'
``dest`` names and the keys of a checkpoint's ``model_args.json``. Every direction goes through
``TABLE`` (plus the RoPE scaling rule, ``model/rope_scaling.py``, which maps one HF field to
several of ours):

    ModelSpec -> ModelConfig        model_config(spec, ...)        (import, parity checks)
    ModelSpec -> training flags     model_flags(spec)              (megatron_args.txt)
    model_args.json -> ModelSpec    spec_from_model_args(...)      (export without a HF config)
    ModelSpec vs model_args.json    spec_matches_model_args(...)   (export with a HF config)

Adding an architecture field is one row here; nothing else maps names by hand.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional

from megatron_ext.config import ARCHITECTURE_FIELDS, ModelConfig
from megatron_ext.checkpoints.convert.errors import ConversionError
from megatron_ext.checkpoints.convert.hf_config import ModelSpec, read_hf_config
from megatron_ext.errors import UserError
from megatron_ext.model.rope_scaling import MODEL_FIELD_DEFAULTS, RopeScaling
from megatron_ext.checkpoints.convert.tables import FAMILIES


def _same(value):
    return value


def _negate(value):
    return not value


@dataclasses.dataclass(frozen=True)
class Row:
    spec: str  # ModelSpec attribute (Hugging Face meaning)
    model: str  # ModelConfig field = training flag dest = model_args.json key
    to_model: Callable[[Any], Any] = _same
    to_spec: Callable[[Any], Any] = _same


TABLE = (
    Row("num_layers", "num_layers", int, int),
    Row("hidden_size", "hidden_size", int, int),
    Row("ffn_hidden_size", "ffn_hidden_size", int, int),
    Row("num_attention_heads", "num_attention_heads", int, int),
    Row("num_query_groups", "num_query_groups", int, int),
    Row("head_dim", "kv_channels", int, int),
    Row("max_position_embeddings", "max_position_embeddings", int, int),
    Row("rms_norm_eps", "norm_epsilon", float, float),
    Row("tie_word_embeddings", "untie_embeddings_and_output_weights", _negate, _negate),
    Row("rope_theta", "rotary_base", float, float),
    Row("qkv_bias", "add_qkv_bias", bool, bool),  # the family decides it on the HF side
    Row("qk_layernorm", "qk_layernorm", bool, bool),  # likewise (Qwen3)
)
# Rows the HF side derives from the family rather than reads from config.json.
FAMILY_ROWS = ("qkv_bias", "qk_layernorm")

# What every supported family shares; a model config or checkpoint that differs is not ours.
# (position_embedding_type is a RoPE field: rope or yarn.)
FIXED = {"normalization": "RMSNorm", "swiglu": True, "add_bias_linear": False}

# Flags that select nothing of their own but keep the command line Megatron-LM's.
COMPATIBILITY_FLAGS = ("--group-query-attention", "--disable-bias-linear")


def rope_to_model(scaling: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """HF rope scaling -> our RoPE fields (Megatron's three, llama3's parameters, YaRN's)."""
    try:
        described = RopeScaling.from_hf(scaling)
    except UserError as err:
        raise ConversionError(f"rope scaling {dict(scaling or {})}: {err}") from None
    return described.model_fields() if described else dict(MODEL_FIELD_DEFAULTS)


def rope_to_spec(fields: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """Our RoPE fields (model_args.json; missing keys: defaults) -> HF rope scaling (None: plain
    RoPE)."""
    try:
        described = RopeScaling.from_model_fields(fields)
    except UserError as err:
        raise ConversionError(f"model_args.json RoPE fields: {err}") from None
    return described.to_hf() if described else None


def model_fields(spec: ModelSpec) -> Dict[str, Any]:
    """The ModelConfig fields ``spec`` determines."""
    fields = {row.model: row.to_model(getattr(spec, row.spec)) for row in TABLE}
    return fields | rope_to_model(spec.rope_scaling) | FIXED


def model_config(spec: ModelSpec, padded_vocab_size: int, *, bf16: bool = False,
                 fp16: bool = False, make_vocab_size_divisible_by: int = 128,
                 seq_length: Optional[int] = None) -> ModelConfig:
    """The model a converted checkpoint holds, built from the spec (no flags rendered and
    re-parsed). ``seq_length`` default: the model's context length."""
    fields = model_fields(spec)
    return ModelConfig(**fields, padded_vocab_size=int(padded_vocab_size), bf16=bf16, fp16=fp16,
                       make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                       seq_length=seq_length or fields["max_position_embeddings"],
                       transformer_impl="local")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _text(value) -> str:
    """Shortest text that parses back to exactly ``value``."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


def model_flags(spec_or_config, make_vocab_size_divisible_by: int = 128) -> List[str]:
    """``megatron_ext.train`` model flags for a ModelSpec or a HF config (folder, config.json,
    dict or transformers config): every field the table and the fixed rules decide."""
    spec = (spec_or_config if isinstance(spec_or_config, ModelSpec)
            else read_hf_config(spec_or_config))
    fields = model_fields(spec) | {"make_vocab_size_divisible_by": make_vocab_size_divisible_by}
    flags = list(COMPATIBILITY_FLAGS)
    for field, value in fields.items():
        if field in MODEL_FIELD_DEFAULTS and field not in ("position_embedding_type",
                                                           "rope_scaling_factor") \
                and value == MODEL_FIELD_DEFAULTS[field]:
            continue  # RoPE scaling fields: only what differs from plain RoPE
        if isinstance(value, bool):
            if value:
                flags.append(_flag(field))
            elif field in MODEL_FIELD_DEFAULTS:  # a default-on RoPE switch turned off
                flags.append("--no-" + _flag(field)[2:])
        elif value is not None and not (field == "rope_scaling_factor"
                                        and not fields["use_rope_scaling"]):
            flags += [_flag(field), _text(value)]
    return flags


def spec_matches_model_args(spec: ModelSpec, model_args: Mapping[str, Any]) -> List[str]:
    """Differences between a ModelSpec and a checkpoint's model_args.json (empty: consistent)."""
    expected = model_fields(spec)
    out = [f"{field}: HF config {expected[field]!r} vs checkpoint {model_args[field]!r}"
           for field in ARCHITECTURE_FIELDS
           if field in expected and field in model_args and model_args[field] != expected[field]]
    if model_args.get("padded_vocab_size", spec.vocab_size) < spec.vocab_size:
        out.append(f"vocab_size: HF config {spec.vocab_size} > checkpoint padded vocab "
                   f"{model_args['padded_vocab_size']}")
    return out


def spec_from_model_args(model_args: Mapping[str, Any]) -> ModelSpec:
    """Best effort without a HF config: Qwen3 if q/k norms, Qwen2 if QKV bias, else Llama;
    vocab stays padded."""
    for field, value in FIXED.items():
        if field in model_args and model_args[field] != value:
            raise ConversionError(f"model_args.json has {field}={model_args[field]!r}; Hugging "
                                  f"Face Llama-family export needs {value!r}")
    values = {row.spec: row.to_spec(model_args[row.model]) for row in TABLE
              if row.spec not in FAMILY_ROWS and model_args.get(row.model) is not None}
    if not values.get("max_position_embeddings"):
        values["max_position_embeddings"] = 2048
    family = family_from_model_args(model_args)
    return ModelSpec(family=family, vocab_size=int(model_args["padded_vocab_size"]),
                     rope_scaling=rope_to_spec(model_args), **values)


def family_from_model_args(model_args: Mapping[str, Any]):
    """The family whose family-decided rows (QKV bias, q/k norms) match the record's."""
    record = {row.spec: bool(model_args.get(row.model)) for row in TABLE
              if row.spec in FAMILY_ROWS}
    for name in ("llama", "qwen2", "qwen3"):  # Llama first: Mistral's tensors are Llama's
        family = FAMILIES[name]
        if all(getattr(family, field) == value for field, value in record.items()):
            return family
    raise ConversionError(f"model_args.json has {record}: no supported Hugging Face family has "
                          "that combination; pass --reference-hf-dir")
