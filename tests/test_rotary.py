"""RoPE from per-token position ids: equals Megatron-Core's RoPE for ids 0..s-1 and HF Llama's
rotary embedding for arbitrary ids."""

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_ext.model.rotary import (
    PositionIdsRotaryEmbedding,
    RopeScaling,
    megatron_yarn_attributes,
    rope_scaling_from_megatron,
)

HEAD_DIM = 64
LLAMA3 = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
# HF rope_parameters (besides rope_theta) of each variant, and the RopeScaling we expect for it.
HF_SCALINGS = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    # Llama-3 with every parameter off Megatron-LM's fixed 1 / 4 / 8192.
    "llama3_custom": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0,
                      "high_freq_factor": 8.0, "original_max_position_embeddings": 1024},
    # YaRN as Qwen2.5 ships it (factor 4 over 32K), and with every optional key.
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    "yarn_mscale": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096,
                    "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.3, "mscale_all_dim": 0.7,
                    "truncate": False},
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 32.0,
                              "original_max_position_embeddings": 4096,
                              "attention_factor": 1.17},
}
SCALINGS = {
    "default": None, "linear": RopeScaling("linear", 4.0), "llama3": LLAMA3,
    "llama3_custom": RopeScaling("llama3", 32.0, 2.0, 8.0, 1024),
    "yarn": RopeScaling("yarn", 4.0, original_max_position_embeddings=32768),
    "yarn_mscale": RopeScaling("yarn", 16.0, original_max_position_embeddings=4096,
                               beta_fast=16.0, beta_slow=2.0, mscale=1.3, mscale_all_dim=0.7,
                               truncate=False),
    "yarn_attention_factor": RopeScaling("yarn", 32.0, original_max_position_embeddings=4096,
                                         attention_factor=1.17),
}


def megatron_freqs(monkeypatch, seq_len, base, interleaved=False, **scaling_kwargs):
    """Megatron-Core's RotaryEmbedding table [s, 1, 1, d] for positions 0..s-1 (on CPU)."""
    # get_emb moves its frequencies to torch.cuda.current_device(); point that at the CPU.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    rope = RotaryEmbedding(kv_channels=HEAD_DIM, rotary_percent=1.0, rotary_interleaved=interleaved,
                           rotary_base=base, use_cpu_initialization=True, **scaling_kwargs)
    return rope.get_emb(seq_len)


def rotate(t_sbhd, freqs, interleaved=False):
    return _apply_rotary_pos_emb_bshd(t_sbhd, freqs, rotary_interleaved=interleaved)


@pytest.mark.parametrize("base", [10000, 500000])
@pytest.mark.parametrize("interleaved", [False, True])
def test_matches_megatron_for_contiguous_positions(monkeypatch, base, interleaved):
    seq_len, batch = 48, 3
    ours = PositionIdsRotaryEmbedding(HEAD_DIM, base, max_position_embeddings=64,
                                      rotary_interleaved=interleaved)
    freqs = ours(torch.arange(seq_len).expand(batch, seq_len))
    reference = megatron_freqs(monkeypatch, seq_len, base, interleaved=interleaved)
    assert freqs.shape == (seq_len, batch, 1, HEAD_DIM) and freqs.dtype == torch.float32
    torch.testing.assert_close(freqs, reference.expand_as(freqs), rtol=0, atol=0)
    t = torch.randn(seq_len, batch, 4, HEAD_DIM)
    torch.testing.assert_close(rotate(t, freqs, interleaved), rotate(t, reference, interleaved),
                               rtol=0, atol=0)


@pytest.mark.parametrize("megatron_kwargs, scaling", [
    ({"rope_scaling": True, "rope_scaling_factor": 8.0}, LLAMA3),
    ({"seq_len_interpolation_factor": 4.0}, RopeScaling("linear", 4.0)),
])
def test_matches_megatron_scaling(monkeypatch, megatron_kwargs, scaling):
    seq_len = 40
    freqs = PositionIdsRotaryEmbedding(HEAD_DIM, 500000, 64, scaling=scaling)(
        torch.arange(seq_len)[None])
    reference = megatron_freqs(monkeypatch, seq_len, 500000, **megatron_kwargs)
    # Megatron scales linear positions (p * (1/f)); HF and we scale frequencies: 1-ulp differences.
    torch.testing.assert_close(freqs, reference, rtol=1e-6, atol=1e-6)


def hf_llama_rotary(base, scaling_name, max_positions):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope_parameters = {**HF_SCALINGS[scaling_name], "rope_theta": float(base)}
    config = LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, head_dim=HEAD_DIM,
                         max_position_embeddings=max_positions, rope_parameters=rope_parameters)
    return LlamaRotaryEmbedding(config), config


def megatron_attention_mscale(scaling):
    """The mscale Megatron-Core's attention passes to apply_rotary_pos_emb for a config carrying
    the attributes PositionIdsGPTModel sets (1.0 without YaRN)."""
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    config = SimpleNamespace()
    if scaling is not None and scaling.rope_type == "yarn":
        config = SimpleNamespace(**megatron_yarn_attributes(scaling))
    return _yarn_get_concentration_factor_from_config(config)


@pytest.mark.parametrize("base", [10000, 500000])
@pytest.mark.parametrize("scaling_name", list(HF_SCALINGS))
def test_matches_hf_llama_for_arbitrary_positions(base, scaling_name):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply

    max_positions = 131072
    hf_rope, hf_config = hf_llama_rotary(base, scaling_name, max_positions)
    scaling = RopeScaling.from_hf(hf_config.rope_parameters)
    assert scaling == SCALINGS[scaling_name]
    ours = PositionIdsRotaryEmbedding(HEAD_DIM, base, max_positions, scaling=scaling)
    # The frequencies themselves: bit for bit.
    assert torch.equal(ours.inv_freq, hf_rope.inv_freq)
    mscale = megatron_attention_mscale(scaling)
    assert mscale == hf_rope.attention_scaling  # YaRN's attention factor, exactly
    if scaling_name.startswith("yarn"):
        assert mscale != 1.0

    torch.manual_seed(0)
    seq_len, batch, heads = 32, 2, 4
    # Skip-wise, per-document resets and ids far beyond the sequence length (up to 131071).
    position_ids = torch.stack([
        torch.sort(torch.randint(0, max_positions, (seq_len,))).values,
        torch.cat([torch.arange(12), torch.arange(19) + 100_000, torch.tensor([131071])]),
    ])
    q = torch.randn(batch, heads, seq_len, HEAD_DIM)
    k = torch.randn(batch, heads, seq_len, HEAD_DIM)
    cos, sin = hf_rope(q, position_ids)
    q_hf, k_hf = hf_apply(q, k, cos, sin)

    freqs = ours(position_ids)
    as_sbhd = lambda t: t.permute(2, 0, 1, 3)  # [b, h, s, d] -> [s, b, h, d]
    rotated = lambda t: _apply_rotary_pos_emb_bshd(as_sbhd(t), freqs, mscale=mscale)
    torch.testing.assert_close(rotated(q), as_sbhd(q_hf), rtol=0, atol=1e-6)
    torch.testing.assert_close(rotated(k), as_sbhd(k_hf), rtol=0, atol=1e-6)
    torch.testing.assert_close((torch.cos(freqs[:, :, 0]) * mscale).transpose(0, 1), cos,
                               rtol=0, atol=0)


@pytest.mark.parametrize("bad_ids", [[[0, 1, 64]], [[-1, 0, 1]]])
def test_out_of_range_positions_name_the_flag(bad_ids):
    rope = PositionIdsRotaryEmbedding(HEAD_DIM, 10000, max_position_embeddings=64)
    rope(torch.tensor([[0, 1, 63]]))  # the last valid position
    with pytest.raises(ValueError, match="--max-position-embeddings"):
        rope(torch.tensor(bad_ids))


def test_bad_position_id_tensors():
    rope = PositionIdsRotaryEmbedding(HEAD_DIM, 10000, max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        rope(torch.arange(4))
    with pytest.raises(ValueError, match="integers"):
        rope(torch.arange(4.0)[None])


def test_scaling_configuration():
    assert RopeScaling.from_hf(None) is None
    assert RopeScaling.from_hf({"rope_type": "default", "rope_theta": 1e4}) is None
    assert RopeScaling.from_hf({"type": "linear", "factor": 2.0}) == RopeScaling("linear", 2.0)
    with pytest.raises(ValueError, match="dynamic"):
        RopeScaling.from_hf({"rope_type": "dynamic", "factor": 2.0})
    assert rope_scaling_from_megatron() is None
    assert rope_scaling_from_megatron(rope_scaling=True, rope_scaling_factor=8.0) == LLAMA3
    linear = rope_scaling_from_megatron(seq_len_interpolation_factor=2.0)
    assert linear == RopeScaling("linear", 2.0)
    with pytest.raises(ValueError, match="alternatives"):
        rope_scaling_from_megatron(rope_scaling=True, seq_len_interpolation_factor=2.0)


@pytest.mark.parametrize("fields, message", [
    ({"yarn_beta_fast": 16.0}, "--yarn-beta-fast set but read only with --position-embedding-type"),
    ({"rope_scaling_original_max_position_embeddings": 1024},
     "--rope-scaling-original-max-position-embeddings set but read only with --use-rope-scaling"),
    ({"position_embedding_type": "yarn", "rotary_scaling_factor": 4.0},
     "--yarn-original-max-position-embeddings"),
    ({"position_embedding_type": "yarn", "use_rope_scaling": True,
      "yarn_original_max_position_embeddings": 4096}, "alternatives"),
    ({"position_embedding_type": "yarn", "rotary_scaling_factor": 4.0,
      "yarn_original_max_position_embeddings": 4096, "mscale": 2.0},
     "--mscale 2.0 --mscale-all-dim 0.0"),
    ({"use_rope_scaling": True, "rope_scaling_low_freq_factor": 4.0}, "high_freq_factor >"),
])
def test_scaling_flags_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        RopeScaling.from_model_fields(fields)


def test_scaling_flags_through_the_training_parser():
    from megatron_ext import arguments
    from megatron_ext.errors import ArgumentError

    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "128"]
    parser = arguments.build_parser()
    yarn = ["--position-embedding-type", "yarn", "--rotary-scaling-factor", "4",
            "--yarn-original-max-position-embeddings", "32", "--no-yarn-correction-range-round-to-int"]
    model, _ = arguments.model_and_layout(parser.parse_args(base + yarn), world_size=1)
    assert RopeScaling.from_model_fields(model) == RopeScaling(
        "yarn", 4.0, original_max_position_embeddings=32, truncate=False)
    with pytest.raises(ArgumentError, match="--mscale-all-dim"):
        arguments.model_and_layout(parser.parse_args(base + ["--mscale-all-dim", "1"]), 1)
