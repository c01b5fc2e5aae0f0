"""Checkpoint conversion, in-process pieces: config reading, tables, transforms, RoPE, bad input.

No process group is created here (the converters that need one run as subprocesses in
test_convert_families.py and test_convert_smollm2.py).
"""

import json
import os

import pytest
import torch

from megatron_ext.checkpoints.convert import ConversionError, engine, model_flags, read_hf_config
from megatron_ext.checkpoints.convert.hf_config import to_hf_config
from megatron_ext.checkpoints.convert.hf_io import HFCheckpointReader, SafetensorsShardWriter, parse_size
from megatron_ext.checkpoints.convert.tables import (FAMILIES, checkpoint_key, local_name, state_dict_name,
                                         te_name)
from megatron_ext.checkpoints.convert.transforms import FUSE_GATE_UP, FUSE_QKV, PAD_VOCAB

# SmolLM2-135M-Instruct's config.json as transformers 5 writes it (no weights needed here).
SMOLLM2_V5 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 8192,
    "rms_norm_eps": 9.999999747378752e-06, "tie_word_embeddings": True, "vocab_size": 49152,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "dtype": "bfloat16",
    "attention_bias": False, "mlp_bias": False,
}
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Qwen2.5's model card (transformers-4 spelling "type"), and YaRN with an explicit factor.
QWEN25_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
YARN_FULL = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
             "attention_factor": 1.2, "beta_fast": 8.0, "truncate": False}


def v4_layout(cfg: dict, scaling=None) -> dict:
    """The same config as transformers 4 wrote it: top-level rope_theta + rope_scaling."""
    out = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    out["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    out["rope_scaling"] = scaling
    return out


def test_smollm2_flags_are_the_train_flags():
    flags = model_flags(SMOLLM2_V5)
    text = " ".join(flags)
    for expected in ("--num-layers 30", "--hidden-size 576", "--ffn-hidden-size 1536",
                     "--num-attention-heads 9", "--num-query-groups 3", "--kv-channels 64",
                     "--rotary-base 100000", "--max-position-embeddings 8192",
                     "--norm-epsilon 9.999999747378752e-06", "--swiglu"):
        assert expected in text
    assert "--untie-embeddings-and-output-weights" not in flags  # tied
    assert "--add-qkv-bias" not in flags
    # The flags parse with train.py's parser to exactly the config's numbers.
    from megatron_ext import arguments

    args = arguments.build_parser().parse_args(flags)
    assert args.norm_epsilon == SMOLLM2_V5["rms_norm_eps"]
    assert args.rotary_base == 100000.0 and not args.use_rope_scaling


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 4.0}, LLAMA31_ROPE,
                                     QWEN25_YARN, YARN_FULL])
def test_transformers4_and_5_layouts_read_the_same(scaling):
    v5 = dict(SMOLLM2_V5,
              rope_parameters={"rope_theta": 500000.0, **(scaling or {"rope_type": "default"})})
    v5["rope_parameters"].setdefault("rope_type", v5["rope_parameters"].pop("type", "default"))
    v4 = v4_layout(v5, scaling)
    assert read_hf_config(v4) == read_hf_config(v5)
    assert model_flags(v4) == model_flags(v5)
    flags = " ".join(model_flags(v4))
    if scaling is LLAMA31_ROPE:
        assert "--use-rope-scaling --rope-scaling-factor 8" in flags
    elif scaling is QWEN25_YARN:
        assert ("--position-embedding-type yarn --rotary-scaling-factor 4 "
                "--yarn-original-max-position-embeddings 32768") in flags
        assert "--mscale" not in flags and "--yarn-beta" not in flags  # transformers' defaults
    elif scaling is YARN_FULL:
        assert "--yarn-attention-factor 1.2" in flags and "--yarn-beta-fast 8" in flags
        assert "--no-yarn-correction-range-round-to-int" in flags
    elif scaling:
        assert "--rotary-seq-len-interpolation-factor 4" in flags


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0}, LLAMA31_ROPE,
                                     dict(LLAMA31_ROPE, low_freq_factor=2.0,
                                          original_max_position_embeddings=1024), YARN_FULL])
def test_export_config_keeps_rope_in_the_installed_layout(scaling):
    src = v4_layout(dict(SMOLLM2_V5, max_position_embeddings=131072,
                         rope_parameters={"rope_theta": 500000.0}), scaling)
    spec = read_hf_config(src)
    config = to_hf_config(spec, src)
    written = config.to_dict()
    assert "rope_parameters" in written  # what transformers 5 writes
    assert read_hf_config(written) == spec
    expected = {"rope_theta": 500000.0, **(scaling or {"rope_type": "default"})}
    assert {k: v for k, v in written["rope_parameters"].items() if k != "type"} == expected


def test_families_and_unknown_architecture():
    qwen = dict(SMOLLM2_V5, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    assert read_hf_config(qwen).qkv_bias and "--add-qkv-bias" in model_flags(qwen)
    mistral = dict(SMOLLM2_V5, architectures=["MistralForCausalLM"], model_type="mistral",
                   sliding_window=4096, tie_word_embeddings=False)
    spec = read_hf_config(mistral)
    assert spec.family is FAMILIES["mistral"] and spec.sliding_window == 4096
    assert "--untie-embeddings-and-output-weights" in model_flags(mistral)
    with pytest.raises(ConversionError, match="GPT2LMHeadModel"):
        read_hf_config(dict(SMOLLM2_V5, architectures=["GPT2LMHeadModel"], model_type="gpt2"))


# Qwen3-0.6B's config.json as transformers 5 writes it (no weights needed here).
QWEN3_V5 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
    "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "tie_word_embeddings": True,
    "vocab_size": 151936, "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"},
    "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
    "max_window_layers": 28, "layer_types": ["full_attention"] * 28, "dtype": "bfloat16",
}


def test_qwen3_reads_qk_norms_and_its_own_head_dim():
    spec = read_hf_config(QWEN3_V5)
    assert spec.family is FAMILIES["qwen3"] and spec.qk_layernorm and not spec.qkv_bias
    assert spec.head_dim == 128 != spec.hidden_size // spec.num_attention_heads
    flags = model_flags(QWEN3_V5)
    assert "--qk-layernorm" in flags and "--add-qkv-bias" not in flags
    assert flags[flags.index("--kv-channels") + 1] == "128"
    assert "--untie-embeddings-and-output-weights" not in flags  # tied, as the small sizes are
    shapes = engine.megatron_shapes(spec, 151936)
    # One weight per head_dim for all query heads, one for all key heads (HF: q_norm, k_norm).
    assert shapes["decoder.layers.27.self_attention.q_layernorm.weight"] == (128,)
    assert shapes["decoder.layers.0.self_attention.linear_qkv.weight"] == ((16 + 2 * 8) * 128,
                                                                           1024)
    hf = engine.hf_shapes(spec, shapes)
    assert hf["model.layers.3.self_attn.k_norm.weight"] == (128,)
    assert "model.layers.0.self_attn.q_proj.bias" not in hf
    # Llama and Qwen2 have no q/k norms.
    assert not read_hf_config(SMOLLM2_V5).qk_layernorm and "--qk-layernorm" not in \
        model_flags(SMOLLM2_V5)
    # The export writes a config transformers reads back as the same model.
    assert read_hf_config(to_hf_config(spec, QWEN3_V5)) == spec


def test_model_args_without_hf_config_pick_the_family():
    from megatron_ext.checkpoints.convert import architecture
    from megatron_ext.checkpoints.checkpointing import model_record

    for cfg, family in ((SMOLLM2_V5, "llama"), (QWEN3_V5, "qwen3"),
                        (dict(SMOLLM2_V5, architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
                         "qwen2")):
        spec = read_hf_config(cfg)
        record = model_record(architecture.model_config(spec, padded_vocab_size=cfg["vocab_size"]))
        assert architecture.spec_from_model_args(record).family is FAMILIES[family]
    # Both a QKV bias and q/k norms: no Hugging Face family of ours has that.
    record = dict(record, qk_layernorm=True)
    with pytest.raises(ConversionError, match="reference-hf-dir"):
        architecture.spec_from_model_args(record)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 128},
     "mixture-of-experts"),
    ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
    ({"layer_types": ["full_attention"] * 27 + ["sliding_attention"]}, "layer_types"),
])
def test_qwen3_variants_out_of_scope_are_refused_by_name(change, message):
    with pytest.raises(ConversionError, match=message):
        read_hf_config(dict(QWEN3_V5, **change))


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}},
     "dynamic.*tools/rope_base.py"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}},
     "longrope"),
    ({"rope_parameters": dict(LLAMA31_ROPE, high_freq_factor=0.5, rope_theta=1e4)},
     "high_freq_factor > low_freq_factor"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                          "original_max_position_embeddings": 4096, "mscale": 0.7}},
     "mscale_all_dim"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 4}, "num_key_value_heads"),
])
def test_unsupported_configs_are_refused_by_name(change, message):
    with pytest.raises(ConversionError, match=message):
        read_hf_config(dict(SMOLLM2_V5, **change))


def test_layout_validation_names_the_flag():
    from megatron_ext.checkpoints.convert.hf_config import check_layout

    spec = read_hf_config(SMOLLM2_V5)
    check_layout(spec, 3, 5)
    with pytest.raises(ConversionError, match=r"--tensor-model-parallel-size \(2\)"):
        check_layout(spec, 2, 1)  # 9 heads, 3 groups
    with pytest.raises(ConversionError, match=r"--pipeline-model-parallel-size \(4\)"):
        check_layout(spec, 1, 4)  # 30 layers


def test_vocab_padding_is_train_py_rule():
    from megatron_ext.checkpoints.convert.hf_config import padded_vocab_size
    from megatron_ext.data import tokenizer

    for vocab, divisible, tp in [(32000, 128, 1), (32000, 512, 2), (49152, 128, 3),
                                 (151646, 128, 4), (1000, 64, 3)]:
        assert padded_vocab_size(vocab, divisible, tp) == \
            tokenizer.padded_vocab_size(vocab, divisible, tp)


def tiny_spec(**overrides):
    cfg = dict(SMOLLM2_V5, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
               num_attention_heads=6, num_key_value_heads=2, head_dim=3, vocab_size=10,
               tie_word_embeddings=False)
    return read_hf_config(dict(cfg, **overrides))


def test_qkv_is_interleaved_per_query_group_and_round_trips():
    spec = tiny_spec()  # 6 heads, 2 groups: 3 query heads per group, head_dim 3
    d, h = 3, 8
    q = torch.arange(6 * d * h, dtype=torch.float32).reshape(6 * d, h)
    k = -torch.arange(2 * d * h, dtype=torch.float32).reshape(2 * d, h) - 1
    v = 1000 + torch.arange(2 * d * h, dtype=torch.float32).reshape(2 * d, h)
    fused = FUSE_QKV.to_megatron([q, k, v], ((6 + 4) * d, h), spec, torch.float32)
    rows = fused.view(2, 5, d, h)  # [group, (q0 q1 q2 k v), head_dim, hidden]
    for g in range(2):
        assert torch.equal(rows[g, :3].reshape(-1, h), q[g * 3 * d:(g + 1) * 3 * d])
        assert torch.equal(rows[g, 3], k[g * d:(g + 1) * d])
        assert torch.equal(rows[g, 4], v[g * d:(g + 1) * d])
    back = FUSE_QKV.to_hf(fused, spec)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))
    bias = FUSE_QKV.to_megatron([q[:, 0], k[:, 0], v[:, 0]], ((6 + 4) * d,), spec, torch.float32)
    assert torch.equal(bias, fused[:, 0])


def test_gate_up_and_vocab_padding_round_trip_with_dtype_cast():
    spec = tiny_spec()
    gate, up = torch.randn(12, 8), torch.randn(12, 8)
    fc1 = FUSE_GATE_UP.to_megatron([gate, up], (24, 8), spec, torch.float32)
    assert torch.equal(fc1[:12], gate) and torch.equal(fc1[12:], up)
    assert all(torch.equal(a, b) for a, b in zip(FUSE_GATE_UP.to_hf(fc1, spec), [gate, up]))
    emb = torch.randn(10, 8, dtype=torch.bfloat16)
    padded = PAD_VOCAB.to_megatron([emb], (16, 8), spec, torch.float32)
    assert padded.dtype == torch.float32 and torch.equal(padded[10:], torch.zeros(6, 8))
    assert torch.equal(PAD_VOCAB.to_hf(padded, spec)[0].to(torch.bfloat16), emb)


def test_hf_tensor_checks_name_missing_misshaped_and_unexpected_tensors():
    spec = tiny_spec()
    megatron = engine.megatron_shapes(spec, 16)
    hf = engine.hf_shapes(spec, megatron)
    engine.check_hf(spec, hf, megatron)
    assert hf["model.layers.1.self_attn.k_proj.weight"] == (6, 8)
    missing = {k: v for k, v in hf.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ConversionError, match=r"missing .*model\.layers\.1\.mlp\.up_proj\.weight"):
        engine.check_hf(spec, missing, megatron)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has "
                                              r"shape \(9, 8\), expected \(6, 8\)"):
        engine.check_hf(spec, dict(hf, **{"model.layers.0.self_attn.k_proj.weight": (9, 8)}),
                        megatron)
    with pytest.raises(ConversionError, match=r"does not map.*model\.layers\.0\.mlp\.extra"):
        engine.check_hf(spec, dict(hf, **{"model.layers.0.mlp.extra.weight": (2,)}), megatron)
    # RoPE buffers of old checkpoints carry no weights and are ignored.
    engine.check_hf(spec, dict(hf, **{"model.layers.0.self_attn.rotary_emb.inv_freq": (2,)}),
                    megatron)


def test_every_megatron_tensor_has_exactly_one_rule():
    for name, family in FAMILIES.items():
        cfg = dict(SMOLLM2_V5, architectures=[family.architecture], model_type=family.model_type)
        for tie in (True, False):
            spec = read_hf_config(dict(cfg, tie_word_embeddings=tie))
            produced = [m.megatron for m in engine.mappings(spec)]
            assert sorted(produced) == sorted(engine.megatron_shapes(spec, 49152)), (name, tie)


def test_te_spec_names_and_checkpoint_keys():
    # Megatron-Core stores both specs under TE names with the layer as a leading axis (observed in
    # the local spec's sharded_state_dict: input_layernorm -> linear_qkv.layer_norm_weight).
    assert te_name("decoder.layers.3.input_layernorm.weight") == \
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert local_name("decoder.layers.3.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.3.pre_mlp_layernorm.weight"
    for name in ("decoder.layers.3.input_layernorm.weight",
                 "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"):
        assert checkpoint_key(name) == (
            "decoder.layers.self_attention.linear_qkv.layer_norm_weight", 3)
    assert checkpoint_key("decoder.layers.0.mlp.linear_fc1.weight") == (
        "decoder.layers.mlp.linear_fc1.weight", 0)
    assert checkpoint_key("output_layer.weight") == ("output_layer.weight", None)
    assert state_dict_name("decoder.layers.mlp.linear_fc1.layer_norm_weight", 7) == \
        "decoder.layers.7.pre_mlp_layernorm.weight"


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA31_ROPE])
def test_rope_flags_give_hf_angles(scaling):
    """The flags we write, through the rotary embedding the builder uses (and through stock
    Megatron-Core's, which types rotary_base as int: our float base is fine), give HF's angles."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_ext import arguments
    from megatron_ext.model.rotary import PositionIdsRotaryEmbedding, rope_scaling_from_megatron

    theta, head_dim, positions = 500000.0, 16, 20000
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=131072,
                         rope_parameters={"rope_theta": theta,
                                          **(scaling or {"rope_type": "default"})})
    plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    hf_inv_freq = (plain if rope_type == "default"
                   else ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")[0])
    hf_angles = torch.outer(torch.arange(positions, dtype=torch.float), hf_inv_freq)

    args = arguments.build_parser().parse_args(model_flags(config.to_dict()))
    assert isinstance(args.rotary_base, float)
    stock = RotaryEmbedding(kv_channels=head_dim, rotary_percent=1.0, rotary_base=args.rotary_base,
                            rope_scaling=args.use_rope_scaling,
                            rope_scaling_factor=args.rope_scaling_factor,
                            seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
                            use_cpu_initialization=True)
    ours = PositionIdsRotaryEmbedding(
        head_dim, args.rotary_base, args.max_position_embeddings,
        scaling=rope_scaling_from_megatron(args.use_rope_scaling, args.rope_scaling_factor,
                                           args.rotary_seq_len_interpolation_factor))
    ours_angles = ours(torch.arange(positions)[None])[:, 0, 0, : head_dim // 2]
    torch.testing.assert_close(ours_angles, hf_angles, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(stock.get_freqs_non_repeated(positions), hf_angles,
                               rtol=1e-6, atol=1e-3)
    if scaling:  # the scaling really changes the long-wavelength frequencies
        assert not torch.allclose(torch.outer(torch.arange(positions, dtype=torch.float), plain),
                                  hf_angles, atol=1e-3)


def test_sharded_safetensors_writer_round_trips(tmp_path):
    tensors = {f"t{i}": torch.randn(100 + i, 7).to(dt)
               for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16] * 3)}
    entries = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    writer = SafetensorsShardWriter(str(tmp_path), entries, max_shard_bytes=parse_size("5KB"))
    for k, v in tensors.items():
        writer.write(k, v)
    files = writer.close()
    assert len(files) > 1 and all(f.startswith("model-000") for f in files)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    reader = HFCheckpointReader(str(tmp_path))
    for k, v in tensors.items():
        got = reader.get(k)
        assert got.dtype == v.dtype and torch.equal(got, v)
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path))
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    with pytest.raises(ConversionError, match="writer expected"):
        SafetensorsShardWriter(str(tmp_path / "x"), [("a", (2,), torch.float32)], 10).write(
            "b", torch.zeros(2))


def test_import_refuses_bad_checkpoints_before_touching_anything(tmp_path):
    """Missing and mis-shaped tensors are reported by name before any process group exists."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from megatron_ext.checkpoints.convert import hf_to_megatron

    config = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    spec = read_hf_config(config.to_dict())
    shapes = engine.hf_shapes(spec, engine.megatron_shapes(spec, 128))
    good = {k: torch.zeros(v) for k, v in shapes.items()}
    cases = {
        "missing": ({k: v for k, v in good.items() if "o_proj" not in k},
                    r"missing .*model\.layers\.0\.self_attn\.o_proj\.weight"),
        "shape": (dict(good, **{"model.layers.0.mlp.down_proj.weight": torch.zeros(8, 13)}),
                  r"model\.layers\.0\.mlp\.down_proj\.weight has shape \(8, 13\), "
                  r"expected \(8, 12\)"),
    }
    for case, (tensors, message) in cases.items():
        src = tmp_path / case
        config.save_pretrained(src)
        save_file(tensors, str(src / "model.safetensors"))
        with pytest.raises(ConversionError, match=message):
            hf_to_megatron(str(src), str(tmp_path / f"{case}-out"), progress=False)
        assert not (tmp_path / f"{case}-out").exists()
    unknown = tmp_path / "gpt2"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                    "model_type": "gpt2"}))
    with pytest.raises(ConversionError, match="unsupported architecture.*GPT2LMHeadModel"):
        hf_to_megatron(str(unknown), str(tmp_path / "gpt2-out"), progress=False)


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import convert_checkpoint

    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    code = convert_checkpoint.main(["hf-to-megatron", "--hf-dir", str(src),
                                    "--megatron-dir", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "convert_checkpoint.py: error: unsupported architecture" in err
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err
