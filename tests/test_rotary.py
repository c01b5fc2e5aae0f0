"""RoPE from per-token position ids: equals Megatron-Core's RoPE for ids 0..s-1 and HF Llama's
rotary embedding for arbitrary ids."""

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_ext.model.rotary import (
    PositionIdsRotaryEmbedding,
    RopeScaling,
    rope_scaling_from_megatron,
)

HEAD_DIM = 64
LLAMA3 = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
SCALINGS = {"default": None, "linear": RopeScaling("linear", 4.0), "llama3": LLAMA3}


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

    rope_parameters = {"rope_type": "default", "rope_theta": float(base)}
    if scaling_name == "linear":
        rope_parameters.update(rope_type="linear", factor=4.0)
    if scaling_name == "llama3":
        rope_parameters.update(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=8192)
    config = LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, head_dim=HEAD_DIM,
                         max_position_embeddings=max_positions, rope_parameters=rope_parameters)
    return LlamaRotaryEmbedding(config), config


@pytest.mark.parametrize("base", [10000, 500000])
@pytest.mark.parametrize("scaling_name", ["default", "linear", "llama3"])
def test_matches_hf_llama_for_arbitrary_positions(base, scaling_name):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply

    max_positions = 131072
    hf_rope, hf_config = hf_llama_rotary(base, scaling_name, max_positions)
    scaling = RopeScaling.from_hf(hf_config.rope_parameters)
    assert scaling == SCALINGS[scaling_name]
    ours = PositionIdsRotaryEmbedding(HEAD_DIM, base, max_positions, scaling=scaling)

    torch.manual_seed(0)
    seq_len, batch, heads = 32, 2, 4
    # Skip-wise, per-document resets and ids far beyond the sequence length, one row each.
    position_ids = torch.stack([
        torch.sort(torch.randint(0, max_positions, (seq_len,))).values,
        torch.cat([torch.arange(12), torch.arange(20) + 100_000]),
    ])
    q = torch.randn(batch, heads, seq_len, HEAD_DIM)
    k = torch.randn(batch, heads, seq_len, HEAD_DIM)
    cos, sin = hf_rope(q, position_ids)
    q_hf, k_hf = hf_apply(q, k, cos, sin)

    freqs = ours(position_ids)
    as_sbhd = lambda t: t.permute(2, 0, 1, 3)  # [b, h, s, d] -> [s, b, h, d]
    torch.testing.assert_close(rotate(as_sbhd(q), freqs), as_sbhd(q_hf), rtol=0, atol=1e-6)
    torch.testing.assert_close(rotate(as_sbhd(k), freqs), as_sbhd(k_hf), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cos(freqs[:, :, 0]).transpose(0, 1), cos, rtol=0, atol=0)


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
