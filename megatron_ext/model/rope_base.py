"""A static RoPE setting for a longer context: the dynamic-NTK base evaluated once at T, or YaRN's
factor for T.

Dynamic NTK (transformers' ``rope_type: dynamic``) recomputes the base from the longest position
of every forward pass:

    base' = base * ((factor * T / L) - (factor - 1)) ** (d / (d - 2))

with L the original context, T the current length and d the rotary head dimension. With
skip-wise positions (PoSE, LongRecipe) the "current length" is max(position_ids) + 1, which changes
per sample, per context-parallel rank and per prompt at inference, so each of those would see a
different rotation. LongRecipe's "Dynamic NTK" bases (48.9M, 131.5M, 13.5M in the paper's Table 4)
are this formula evaluated once at the target length; use the result as a fixed ``--rotary-base``
with ``--max-position-embeddings T``.

YaRN (Qwen2.5's route to 128K) keeps the base and scales frequencies by ``factor = T / L``; it is
static too, so it is safe with skip-wise positions (``yarn_factor``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, List, Mapping, Optional, Union

from megatron_ext.errors import UserError


class RopeBaseError(UserError):
    """Invalid input; the message names the value and what to change."""


def _check_extension(original_seq_length: int, target_seq_length: int) -> None:
    if original_seq_length < 1 or target_seq_length < 1:
        raise RopeBaseError(f"sequence lengths must be >= 1, got original {original_seq_length}, "
                            f"target {target_seq_length}")
    if target_seq_length < original_seq_length:
        raise RopeBaseError(f"target length {target_seq_length} is shorter than the original "
                            f"context {original_seq_length}: nothing to extend")


def ntk_rope_base(rotary_base: float, original_seq_length: int, target_seq_length: int,
                  head_dim: int, factor: Optional[float] = None) -> float:
    """The dynamic-NTK base at ``target_seq_length``; ``factor`` defaults to T / L."""
    if not rotary_base > 0:
        raise RopeBaseError(f"rotary base must be > 0, got {rotary_base}")
    _check_extension(original_seq_length, target_seq_length)
    if head_dim <= 2 or head_dim % 2:
        raise RopeBaseError(f"head dim must be an even number > 2 (RoPE rotates pairs), got "
                            f"{head_dim}")
    if factor is None:
        factor = target_seq_length / original_seq_length
    if factor < 1:
        raise RopeBaseError(f"factor must be >= 1 (as transformers' dynamic scaling requires), "
                            f"got {factor}")
    growth = factor * target_seq_length / original_seq_length - (factor - 1)
    return float(rotary_base) * growth ** (head_dim / (head_dim - 2))


@dataclasses.dataclass(frozen=True)
class RopeSettings:
    """What the formula needs from a model, and where each value came from."""
    rotary_base: float
    head_dim: int
    original_seq_length: int
    notes: tuple = ()


def read_hf_rope_settings(config: Union[str, os.PathLike, Mapping[str, Any]]) -> RopeSettings:
    """Base, rotary head dim and original context from a HF config.json (folder, file or dict),
    in the transformers 4 (``rope_theta`` + ``rope_scaling``) or 5 (``rope_parameters``) layout."""
    if not isinstance(config, Mapping):
        path = os.path.join(config, "config.json") if os.path.isdir(config) else str(config)
        if not os.path.exists(path):
            raise RopeBaseError(f"--hf-config {config}: no config.json there")
        with open(path) as f:
            config = json.load(f)
    params = config.get("rope_parameters") or {}
    scaling = params if "rope_parameters" in config else (config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta"))
    notes: List[str] = []
    if theta is None:
        theta = 10000.0
        notes.append("config.json sets no rope_theta: using transformers' default 10000")
    head_dim = config.get("head_dim")
    if head_dim is None:
        if not config.get("hidden_size") or not config.get("num_attention_heads"):
            raise RopeBaseError("config.json has neither head_dim nor hidden_size and "
                                "num_attention_heads; pass --head-dim")
        head_dim = config["hidden_size"] // config["num_attention_heads"]
    partial = float(scaling.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        head_dim = int(head_dim * partial)
        notes.append(f"partial_rotary_factor {partial}: the rotary dimension is {head_dim}")
    original = config.get("max_position_embeddings")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default":
        original = scaling.get("original_max_position_embeddings", original)
        notes.append(f"config.json already scales RoPE ({rope_type}); the static base replaces "
                     "that scaling: remove it from the extended model's config")
    if original is None:
        raise RopeBaseError("config.json has no max_position_embeddings; pass "
                            "--original-seq-length")
    return RopeSettings(float(theta), int(head_dim), int(original), tuple(notes))


def megatron_flags(rope_base: float, target_seq_length: int) -> List[str]:
    return ["--rotary-base", f"{rope_base:.1f}", "--max-position-embeddings",
            str(target_seq_length)]


# ------------------------------------------------------------------------------------------
# YaRN: keep the base, scale by the length ratio (static, so skip-wise positions are safe too)
# ------------------------------------------------------------------------------------------

def yarn_factor(original_seq_length: int, target_seq_length: int) -> float:
    """YaRN's factor for a target context: T / L (what transformers checks the config against:
    max_position_embeddings / original_max_position_embeddings)."""
    _check_extension(original_seq_length, target_seq_length)
    return target_seq_length / original_seq_length


def yarn_megatron_flags(factor: float, original_seq_length: int,
                        target_seq_length: int) -> List[str]:
    # repr: the shortest text that parses back to exactly this factor (T / L need not be round)
    text = str(int(factor)) if float(factor).is_integer() else repr(float(factor))
    return ["--position-embedding-type", "yarn", "--rotary-scaling-factor", text,
            "--yarn-original-max-position-embeddings", str(original_seq_length),
            "--max-position-embeddings", str(target_seq_length)]


def yarn_hf_rope_parameters(rotary_base: float, factor: float,
                            original_seq_length: int) -> dict:
    return {"rope_type": "yarn", "rope_theta": float(rotary_base), "factor": float(factor),
            "original_max_position_embeddings": int(original_seq_length)}
