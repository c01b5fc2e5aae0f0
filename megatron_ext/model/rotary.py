"""Rotary position embedding (RoPE) driven by per-token position ids.

Megatron-Core's ``GPTModel`` builds RoPE for positions 0..s-1 and ignores ``position_ids``, so
skip-wise position schemes (PoSE, LongRecipe, LOGO synthesis), per-document position resets and
CP slices would all get the wrong angles. Here the angles come from the position ids themselves:

    position_ids [b, s] (long)  ->  freqs [s, b, 1, d] (fp32)

in Megatron's convention (``emb = cat(freqs, freqs)`` for the non-interleaved layout), which
``megatron.core.models.common.embeddings.rope_utils.apply_rotary_pos_emb`` consumes unchanged (the
unfused path broadcasts over the batch dimension). The inverse frequencies follow Hugging Face's
conventions ("default", "linear", "llama3", "yarn") so converted Llama-3.x / Qwen2.5 checkpoints
run with the same numerics as in ``transformers``; YaRN's attention factor multiplies cos and sin
(as in transformers) through Megatron-Core's own ``yarn_*`` config attributes.

The base is static on purpose: HF "dynamic" NTK rescales the base from the largest position id of
each batch, which differs per sample and per CP rank.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, Optional

import torch
from megatron.core.models.gpt import GPTModel
from torch import Tensor, nn

from megatron_ext.errors import UserError
from megatron_ext.model.rope_scaling import RopeScaling

def rope_scaling_from_megatron(rope_scaling: bool = False, rope_scaling_factor: float = 8.0,
                               seq_len_interpolation_factor: Optional[float] = None
                               ) -> Optional[RopeScaling]:
    """The scaling GPTModel's own arguments ask for.

    ``--use-rope-scaling`` / ``--rope-scaling-factor``: Llama-3.1 with Megatron's fixed low / high
    frequency factors 1 / 4 and original context 8192. ``--rotary-seq-len-interpolation-factor``:
    linear.
    """
    if rope_scaling and seq_len_interpolation_factor:
        raise UserError("--use-rope-scaling and --rotary-seq-len-interpolation-factor are "
                         "alternatives (llama3 vs linear RoPE scaling); pass one of them")
    if rope_scaling:
        return RopeScaling("llama3", float(rope_scaling_factor))
    if seq_len_interpolation_factor:
        return RopeScaling("linear", float(seq_len_interpolation_factor))
    return None


def default_inverse_frequencies(dim: int, base: float) -> Tensor:
    """theta_i = base^(-2i/dim), fp32, as in Megatron-Core and HF."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inverse_frequencies(inv_freq: Tensor, s: RopeScaling) -> Tensor:
    # Wavelengths longer than the original context are slowed down by `factor`; shorter than
    # original / high_freq_factor are kept; in between, a linear ramp in 1 / wavelength.
    # (Operation order kept as in HF so results match bit for bit.)
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_ramp_bounds(dim: int, base: float, s: RopeScaling) -> tuple:
    """Dimension range (low, high) over which YaRN moves from original to interpolated
    frequencies: where a pair turns beta_fast resp. beta_slow times over the original context."""
    def dim_for(rotations: float) -> float:
        # i such that the pair (2i / dim) turns `rotations` times over the original length.
        return (dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))
                ) / (2 * math.log(base))

    low, high = dim_for(s.beta_fast), dim_for(s.beta_slow)
    if s.truncate:  # Megatron's yarn_correction_range_round_to_int
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn_inverse_frequencies(dim: int, base: float, s: RopeScaling) -> Tensor:
    # Operation order kept as in HF (transformers' _compute_yarn_parameters) so the fp32 results
    # match bit for bit; Megatron-Core's YarnRotaryEmbedding computes the same blend.
    powers = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    original = 1.0 / powers
    interpolated = 1.0 / (s.factor * powers)
    low, high = _yarn_ramp_bounds(dim, base, s)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep_original = 1 - ramp  # 1 for fast-turning (high-frequency) pairs
    return interpolated * (1 - keep_original) + original * keep_original


def inverse_frequencies(dim: int, base: float, scaling: Optional[RopeScaling] = None) -> Tensor:
    """fp32 inverse frequencies [dim / 2] for a static base and optional scaling."""
    if scaling is not None and scaling.rope_type == "yarn":
        return _yarn_inverse_frequencies(dim, base, scaling)
    inv_freq = default_inverse_frequencies(dim, base)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        # Dividing the frequencies (HF) rather than the positions: same angle, HF's rounding.
        return inv_freq / scaling.factor
    return _llama3_inverse_frequencies(inv_freq, scaling)


def megatron_yarn_attributes(scaling: RopeScaling) -> Dict[str, Any]:
    """The ``TransformerConfig.yarn_*`` attributes that make Megatron-Core's attention multiply
    cos and sin by YaRN's attention factor exactly as transformers does.

    Megatron-Core's ``SelfAttention`` passes ``mscale = m(factor, yarn_mscale) /
    m(factor, yarn_mscale_all_dim)`` (``m(s, x) = 0.1 x ln s + 1``) to ``apply_rotary_pos_emb``
    whenever the config has ``yarn_rotary_scaling_factor`` (Megatron-LM sets these attributes the
    same way for ``--position-embedding-type yarn``). transformers' default factor is that with
    (1, 0), its mscale pair the same ratio; an explicit HF ``attention_factor`` has no Megatron
    spelling, so it is carried as factor e (ln e = 1) and ``yarn_mscale`` = 10 (a - 1), the float
    nearest ``a`` chosen.
    """
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor,
    )

    wanted = scaling.attention_scaling()
    attributes = {
        "yarn_rotary_scaling_factor": float(scaling.factor),
        "yarn_original_max_position_embeddings": int(scaling.original_max_position_embeddings),
        "yarn_beta_fast": float(scaling.beta_fast), "yarn_beta_slow": float(scaling.beta_slow),
        "yarn_mscale": 1.0, "yarn_mscale_all_dim": 0.0,
        "yarn_correction_range_round_to_int": bool(scaling.truncate),
    }
    if scaling.attention_factor is not None:
        def error(mscale: float) -> float:
            return abs(_yarn_get_concentration_factor(math.e, mscale, 0.0) - wanted)

        # 10 (a - 1) rounds; the best float is within a few ulps of it.
        start = (wanted - 1.0) * 10.0
        candidates = [start]
        for direction in (math.inf, -math.inf):
            value = start
            for _ in range(4):
                value = math.nextafter(value, direction)
                candidates.append(value)
        attributes.update(yarn_rotary_scaling_factor=math.e, yarn_mscale=min(candidates, key=error))
    elif scaling.mscale and scaling.mscale_all_dim:
        attributes.update(yarn_mscale=float(scaling.mscale),
                          yarn_mscale_all_dim=float(scaling.mscale_all_dim))
    got = _yarn_get_concentration_factor(attributes["yarn_rotary_scaling_factor"],
                                         attributes["yarn_mscale"],
                                         attributes["yarn_mscale_all_dim"])
    if not math.isclose(got, wanted, rel_tol=1e-15, abs_tol=0.0):
        raise ValueError(f"YaRN attention factor {wanted!r} is not reproducible by Megatron's "
                         f"mscale ({got!r})")
    return attributes


class PositionIdsRotaryEmbedding(nn.Module):
    """RoPE angles for per-token positions: ``forward(position_ids [b, s]) -> freqs [s, b, 1, d]``.

    Args:
        kv_channels: head dimension.
        rotary_base: static RoPE base (``--rotary-base``; HF ``rope_theta``).
        max_position_embeddings: positions must lie in [0, max_position_embeddings); positions may
            exceed the sequence length (skip-wise schemes) but not this bound.
        scaling: optional ``RopeScaling`` (linear, llama3 or yarn; yarn's attention factor is
            applied by the attention, see ``megatron_yarn_attributes``).
        rotary_percent / rotary_interleaved: as in Megatron's ``RotaryEmbedding`` (defaults 1.0 /
            False are the Llama layout).
    """

    def __init__(self, kv_channels: int, rotary_base: float, max_position_embeddings: int,
                 scaling: Optional[RopeScaling] = None, rotary_percent: float = 1.0,
                 rotary_interleaved: bool = False):
        super().__init__()
        dim = int(kv_channels * rotary_percent) if rotary_percent < 1.0 else kv_channels
        self.max_position_embeddings = int(max_position_embeddings)
        self.rotary_interleaved = rotary_interleaved
        self.scaling = scaling
        # A plain attribute, not a buffer: mixed-precision wrappers cast buffers to bf16/fp16,
        # and angles of positions in the 100k range need fp32 frequencies.
        self.inv_freq = inverse_frequencies(dim, rotary_base, scaling)

    def _frequencies_on(self, device: torch.device) -> Tensor:
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        return self.inv_freq

    def check_position_ids(self, position_ids: Tensor) -> None:
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [batch, seq], got shape "
                             f"{tuple(position_ids.shape)}")
        if position_ids.is_floating_point() or position_ids.is_complex():
            raise ValueError(f"position_ids must be integers, got {position_ids.dtype}")
        if position_ids.numel() == 0:
            return
        lowest, highest = (int(v) for v in torch.aminmax(position_ids))
        if lowest < 0 or highest >= self.max_position_embeddings:
            raise UserError(
                f"position ids span [{lowest}, {highest}] but must lie in [0, "
                f"{self.max_position_embeddings - 1}] (--max-position-embeddings "
                f"{self.max_position_embeddings}); raise --max-position-embeddings or fix the "
                f"position scheme")

    def forward(self, position_ids: Tensor) -> Tensor:
        self.check_position_ids(position_ids)
        inv_freq = self._frequencies_on(position_ids.device)
        angles = position_ids.float()[..., None] * inv_freq  # [b, s, d/2], fp32
        if self.rotary_interleaved:
            emb = torch.stack((angles, angles), dim=-1).flatten(-2)  # f0 f0 f1 f1 ...
        else:
            emb = torch.cat((angles, angles), dim=-1)  # f0 f1 ... f0 f1 ...
        return emb.transpose(0, 1).unsqueeze(2).contiguous()  # [s, b, 1, d]


def _bound_gpt_arguments(args, kwargs) -> dict:
    """GPTModel.__init__'s arguments by name, defaults filled in (positional or keyword callers)."""
    bound = inspect.signature(GPTModel.__init__).bind(None, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop("self")
    return arguments


class PositionIdsGPTModel(GPTModel):
    """``GPTModel`` whose RoPE angles come from the ``position_ids`` passed to ``forward``.

    Same constructor as ``GPTModel`` (a one-name swap in the builder; ``position_embedding_type``
    must be 'rope') plus an optional ``rope_scaling_config`` (a ``RopeScaling``, e.g.
    ``RopeScaling.from_hf(hf_config.rope_scaling)``) that overrides the scaling implied by
    GPTModel's ``rope_scaling`` / ``rope_scaling_factor`` / ``seq_len_interpolation_factor``.
    ``max_sequence_length`` bounds the position ids (``--max-position-embeddings``).

    The parent is built with ``position_embedding_type='none'``: it then adds no position
    embedding and computes no RoPE table of its own (its CP slicing of that table needs CUDA pinned
    memory and would be discarded anyway); ``_preprocess`` supplies ours, from ``position_ids``.
    Parameters and checkpoints are identical to a 'rope' GPTModel (RoPE has no parameters).
    KV-cache inference (``inference_context``) is not supported: use the stock GPTModel there.
    """

    def __init__(self, *args, rope_scaling_config: Optional[RopeScaling] = None, **kwargs):
        gpt_args = _bound_gpt_arguments(args, kwargs)
        if gpt_args["position_embedding_type"] != "rope":
            raise ValueError("PositionIdsGPTModel needs position_embedding_type='rope', got "
                             f"{gpt_args['position_embedding_type']!r}")
        super().__init__(**{**gpt_args, "position_embedding_type": "none"})
        scaling = rope_scaling_config or rope_scaling_from_megatron(
            gpt_args["rope_scaling"], gpt_args["rope_scaling_factor"],
            gpt_args["seq_len_interpolation_factor"])
        if scaling is not None and scaling.rope_type == "yarn":
            # YaRN's attention factor multiplies cos and sin inside Megatron-Core's attention,
            # which reads it from these config attributes (shared with every layer).
            for name, value in megatron_yarn_attributes(scaling).items():
                setattr(self.config, name, value)
        self.position_rotary = PositionIdsRotaryEmbedding(
            kv_channels=self.config.kv_channels,
            rotary_base=gpt_args["rotary_base"],
            max_position_embeddings=self.max_sequence_length,
            scaling=scaling,
            rotary_percent=gpt_args["rotary_percent"],
            rotary_interleaved=self.config.rotary_interleaved,
        )

    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                    packed_seq_params=None, padding_mask=None):
        if inference_context is not None:
            raise NotImplementedError("PositionIdsGPTModel does not support KV-cache inference; "
                                      "load the weights into a stock GPTModel for generation")
        if position_ids is None:
            raise ValueError("PositionIdsGPTModel needs position_ids on every pipeline stage "
                             "(RoPE is applied in every layer)")
        if input_ids is not None and tuple(position_ids.shape) != tuple(input_ids.shape):
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} does not match "
                             f"tokens shape {tuple(input_ids.shape)}; slice them together "
                             f"(slice_for_cp)")
        outputs = super()._preprocess(
            input_ids, position_ids, decoder_input=decoder_input,
            inference_context=inference_context, packed_seq_params=packed_seq_params,
            padding_mask=padding_mask)
        return (outputs[0], self.position_rotary(position_ids)) + tuple(outputs[2:])
