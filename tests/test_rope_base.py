"""Static RoPE base from the dynamic-NTK formula (megatron_ext/model/rope_base.py and
tools/rope_base.py).

The expected values are LongRecipe's Table 4 "RoPE scaling (Dynamic NTK)" bases as the paper prints
them (rounded to 0.1M), not numbers produced by this code.
"""

import json
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))

from megatron_ext.model.rope_base import (RopeBaseError, megatron_flags,  # noqa: E402
                                          ntk_rope_base, read_hf_rope_settings)


@pytest.mark.parametrize("model, base, original, target, factor, paper_millions", [
    ("Llama3-8B 80k", 500_000, 8192, 81920, 10, 48.9),
    ("Llama3-8B 128k", 500_000, 8192, 131072, 16, 131.5),
    ("Qwen2-7B 128k", 1_000_000, 32768, 131072, 4, 13.5),
])
def test_reproduces_longrecipe_table4(model, base, original, target, factor, paper_millions):
    value = ntk_rope_base(base, original, target, head_dim=128, factor=factor)
    assert round(value / 1e6, 1) == paper_millions, (model, value)
    # Table 4's factors are T / L, the default.
    assert ntk_rope_base(base, original, target, head_dim=128) == value


def test_formula_properties():
    # No extension leaves the base alone; longer targets and larger factors raise it.
    assert ntk_rope_base(10000, 4096, 4096, 128) == pytest.approx(10000)
    bases = [ntk_rope_base(10000, 4096, t, 128) for t in (8192, 16384, 32768)]
    assert bases == sorted(bases) and len(set(bases)) == 3
    assert ntk_rope_base(10000, 4096, 16384, 128, factor=8) > ntk_rope_base(10000, 4096, 16384,
                                                                           128, factor=2)
    # Qwen2's 80k row: the paper reused the 128k base, the formula at 80k gives about 7.2M.
    assert round(ntk_rope_base(1_000_000, 32768, 81920, 128, factor=4) / 1e6, 1) == 7.2


@pytest.mark.parametrize("kwargs, message", [
    (dict(rotary_base=10000, original_seq_length=8192, target_seq_length=4096, head_dim=128),
     "shorter than the original"),
    (dict(rotary_base=10000, original_seq_length=4096, target_seq_length=8192, head_dim=63),
     "even number"),
    (dict(rotary_base=10000, original_seq_length=4096, target_seq_length=8192, head_dim=2),
     "even number"),
    (dict(rotary_base=10000, original_seq_length=4096, target_seq_length=8192, head_dim=64,
          factor=0.5), "factor must be >= 1"),
    (dict(rotary_base=0, original_seq_length=4096, target_seq_length=8192, head_dim=64), "> 0"),
    (dict(rotary_base=10000, original_seq_length=0, target_seq_length=8192, head_dim=64), ">= 1"),
])
def test_bad_input_is_refused_by_name(kwargs, message):
    with pytest.raises(RopeBaseError, match=message):
        ntk_rope_base(**kwargs)


def test_reads_smollm2_config_and_both_layouts(tmp_path):
    from dev import assets

    smollm2 = assets.require(assets.smollm2_hf_dir)  # transformers-5 layout (rope_parameters)
    settings = read_hf_rope_settings(str(smollm2))
    config = json.loads((smollm2 / "config.json").read_text())
    assert settings.rotary_base == config["rope_parameters"]["rope_theta"]
    assert settings.head_dim == config["head_dim"]
    assert settings.original_seq_length == config["max_position_embeddings"]
    assert settings.notes == ()
    # transformers-4 layout, Llama-3.1 scaling: the original context is the scaling's, with a note.
    v4 = {"rope_theta": 500000.0, "hidden_size": 4096, "num_attention_heads": 32,
          "max_position_embeddings": 131072,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                           "original_max_position_embeddings": 8192}}
    settings = read_hf_rope_settings(v4)
    assert (settings.rotary_base, settings.head_dim, settings.original_seq_length) == \
        (500000.0, 128, 8192)
    assert any("llama3" in note for note in settings.notes)
    with pytest.raises(RopeBaseError, match="max_position_embeddings"):
        read_hf_rope_settings({"rope_theta": 1e4, "head_dim": 64})


def test_command_line(capsys):
    import rope_base

    assert rope_base.main(["--rotary-base", "500000", "--original-seq-length", "8192",
                           "--target-seq-length", "81920", "--head-dim", "128", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert round(result["rotary_base"] / 1e6, 1) == 48.9 and result["factor"] == 10
    assert result["megatron_flags"] == megatron_flags(result["rotary_base"], 81920)
    assert result["megatron_flags"][2:] == ["--max-position-embeddings", "81920"]

    assert rope_base.main(["--target-seq-length", "81920", "--head-dim", "128"]) == 2
    err = capsys.readouterr().err
    assert "--rotary-base" in err and "--original-seq-length" in err

    from dev import assets

    smollm2 = str(assets.require(assets.smollm2_hf_dir))
    assert rope_base.main(["--hf-config", smollm2, "--target-seq-length", "32768"]) == 0
    captured = capsys.readouterr()
    config = json.loads(open(os.path.join(smollm2, "config.json")).read())
    expected = ntk_rope_base(config["rope_parameters"]["rope_theta"],
                             config["max_position_embeddings"], 32768, config["head_dim"])
    assert f"--rotary-base {expected:.1f} --max-position-embeddings 32768" in captured.out
    assert "dynamic" in captured.err  # the warning against dynamic scaling


def test_yarn_factor_for_a_target_length(capsys, tmp_path):
    """Qwen2.5's model card: 32K trained, YaRN {"factor": 4.0, "original_max_position_embeddings":
    32768} for 131072 tokens. The printed flags parse, through the training parser, to the
    scaling transformers reads from that rope_scaling."""
    import rope_base

    from megatron_ext import arguments
    from megatron_ext.model.rope_scaling import RopeScaling

    qwen25 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
              "num_attention_heads": 28, "max_position_embeddings": 32768,
              "rope_theta": 1000000.0}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(qwen25))
    assert rope_base.main(["--hf-config", str(path), "--target-seq-length", "131072", "--yarn",
                           "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["yarn_factor"] == 4.0 and result["rotary_base"] == 1e6
    card = {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}
    assert RopeScaling.from_hf(result["hf_rope_parameters"]) == RopeScaling.from_hf(card)
    flags = result["megatron_flags"] + ["--num-layers", "2", "--hidden-size", "64",
                                        "--num-attention-heads", "4", "--seq-length", "128"]
    model, _ = arguments.model_and_layout(arguments.build_parser().parse_args(flags), 1)
    assert RopeScaling.from_model_fields(model) == RopeScaling.from_hf(card)
    assert model.max_position_embeddings == 131072

    # A length ratio that is not round travels exactly; shorter targets are refused.
    assert rope_base.main(["--rotary-base", "1e4", "--original-seq-length", "8192",
                           "--target-seq-length", "100000", "--yarn", "--json"]) == 0
    flags = json.loads(capsys.readouterr().out)["megatron_flags"]
    assert float(flags[flags.index("--rotary-scaling-factor") + 1]) == 100000 / 8192
    assert rope_base.main(["--rotary-base", "1e4", "--original-seq-length", "8192",
                           "--target-seq-length", "4096", "--yarn"]) == 2
    assert "shorter than the original" in capsys.readouterr().err
