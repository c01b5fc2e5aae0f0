"""Checkpoint merging (megatron_ext/checkpoints/merge.py, tools/merge_checkpoints.py).

- HF: SmolLM2 and a perturbed copy with a long-context config -> exactly the fp32 weighted average
  cast to bf16, with the first input's config, tokenizer and generation config;
- Megatron: two tiny random Llama models imported with tools/convert_checkpoint.py, merged, exported
  back to HF -> exactly the weighted average of the HF weights; the first input's model_args kept;
- bad input: mismatched tensors (named, with both shapes), weight count, mixed kinds.

The Megatron part runs in one subprocess (``python tests/test_merge.py megatron WORKDIR``), because
it creates process groups.
"""

import contextlib
import io
import json
import os
import shutil
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
from launch import run  # noqa: E402

HF_WEIGHTS = (0.3, 0.7)
MEGATRON_WEIGHTS = (0.25, 0.75)


def load_safetensors(folder) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def expected_average(first: dict, second: dict, weights, dtype=None) -> dict:
    return {k: (weights[0] * first[k].float() + weights[1] * second[k].float())
            .to(dtype or first[k].dtype) for k in first}


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    wrong = [k for k in expected if actual[k].dtype != expected[k].dtype
             or not torch.equal(actual[k], expected[k])]
    assert not wrong, f"merged tensors differ from the weighted average: {wrong[:5]}"


# ------------------------------------------------------------------------------------------
# HF folders: SmolLM2
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_pair(tmp_path_factory):
    """(original SmolLM2, 'extended' copy: perturbed weights + long-context config)."""
    from safetensors.torch import save_file

    from dev import assets
    from megatron_ext.model.rope_base import ntk_rope_base

    original = assets.require(assets.smollm2_hf_dir)
    extended = tmp_path_factory.mktemp("merge_hf") / "extended"
    extended.mkdir()
    weights = load_safetensors(original)
    # Every element changes (reversed rows, scaled): cheaper than random noise on 135M values.
    save_file({k: (v.float().flip(-1) * 1.5).to(v.dtype) for k, v in weights.items()},
              str(extended / "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(original):
        if not name.endswith(".safetensors"):
            shutil.copy(original / name, extended / name)
    config = json.loads((original / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = ntk_rope_base(
        config["rope_parameters"]["rope_theta"], config["max_position_embeddings"], 32768,
        config["head_dim"])
    config["max_position_embeddings"] = 32768
    (extended / "config.json").write_text(json.dumps(config, indent=2))
    generation = json.loads((original / "generation_config.json").read_text())
    (extended / "generation_config.json").write_text(json.dumps(dict(generation,
                                                                     max_new_tokens=123)))
    return original, extended


def test_hf_merge_is_the_weighted_average_with_the_first_config(smollm2_pair, tmp_path):
    original, extended = smollm2_pair
    out = tmp_path / "merged"
    proc = run([sys.executable, "tools/merge_checkpoints.py", "--inputs", extended, original,
                "--weights", *map(str, HF_WEIGHTS), "--output", out, "--no-progress"])
    merged = load_safetensors(out)
    expected = expected_average(load_safetensors(extended), load_safetensors(original),
                                HF_WEIGHTS)
    assert_same_tensors(merged, expected)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}  # the first input's dtype
    # The long-context config, tokenizer and generation config of the FIRST input, unchanged.
    assert (out / "config.json").read_bytes() == (extended / "config.json").read_bytes()
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 123
    assert (out / "tokenizer.json").read_bytes() == (original / "tokenizer.json").read_bytes()
    assert "rope_parameters" in proc.stderr and "max_position_embeddings" in proc.stderr
    assert "warning" not in proc.stderr  # the weights sum to 1
    assert not (tmp_path / "merged.partial").exists()


# ------------------------------------------------------------------------------------------
# Bad input (in-process, tiny safetensors folders)
# ------------------------------------------------------------------------------------------

def tiny_hf(folder, tensors: dict):
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "name": os.path.basename(folder)}, f)
    return str(folder)


def test_bad_input_is_refused_by_name(tmp_path):
    from megatron_ext.checkpoints.merge import TRACKER_FILE, MergeError, merge_checkpoints

    from megatron_ext.checkpoints import checkpointing

    assert TRACKER_FILE == checkpointing.TRACKER_FILE
    a = tiny_hf(tmp_path / "a", {"w": torch.ones(2, 3), "v": torch.zeros(4)})
    b = tiny_hf(tmp_path / "b", {"w": torch.ones(3, 2), "v": torch.zeros(4)})
    c = tiny_hf(tmp_path / "c", {"w": torch.ones(2, 3)})
    out = str(tmp_path / "out")
    with pytest.raises(MergeError, match=r"tensor w: shape \(2, 3\) in .*a but \(3, 2\) in .*b"):
        merge_checkpoints([a, b], out)
    with pytest.raises(MergeError, match=r"lacks 1 tensor\(s\) of .*: v"):
        merge_checkpoints([a, c], out)
    with pytest.raises(MergeError, match="--weights has 3 values for 2 --inputs"):
        merge_checkpoints([a, a + "/"], out, weights=[0.2, 0.3, 0.5])
    megatron = tmp_path / "megatron"
    megatron.mkdir()
    (megatron / TRACKER_FILE).write_text("release")
    with pytest.raises(MergeError, match="mix HF folders and Megatron checkpoints"):
        merge_checkpoints([a, str(megatron)], out)
    with pytest.raises(MergeError, match="is one of the --inputs"):
        merge_checkpoints([a, b], a)
    with pytest.raises(MergeError, match="no such directory"):
        merge_checkpoints([a, str(tmp_path / "missing")], out)
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")

    # Weights that do not sum to 1 work, with a warning; an existing output needs --overwrite.
    d = tiny_hf(tmp_path / "d", {"w": torch.full((2, 3), 3.0), "v": torch.ones(4)})
    with pytest.warns(UserWarning, match="sum to 2"):
        merge_checkpoints([a, d], out, weights=[1.0, 1.0], progress=False)
    assert torch.equal(load_safetensors(out)["w"], torch.full((2, 3), 4.0))
    assert json.loads(open(os.path.join(out, "config.json")).read())["name"] == "a"
    with pytest.raises(MergeError, match="--overwrite"):
        merge_checkpoints([a, d], out, progress=False)
    merge_checkpoints([a, d], out, overwrite=True, progress=False)
    assert torch.equal(load_safetensors(out)["w"], torch.full((2, 3), 2.0))


# ------------------------------------------------------------------------------------------
# megatron_ext checkpoints: tiny random Llama models through tools/convert_checkpoint.py
# ------------------------------------------------------------------------------------------

def make_tiny_llama(out_dir: str, seed: int, rope_theta: float, max_positions: int,
                    intermediate_size: int = 96) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=intermediate_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        max_position_embeddings=max_positions, rope_parameters={"rope_theta": rope_theta}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.ndim == 1 else 0.05)
    model.save_pretrained(out_dir)


@pytest.fixture(scope="module")
def megatron_merge(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_megatron")
    # "extended" (long config) first, "original" second, and one with another FFN size.
    make_tiny_llama(str(root / "hf" / "extended"), 0, 5e5, 4096)
    make_tiny_llama(str(root / "hf" / "original"), 1, 1e4, 1024)
    make_tiny_llama(str(root / "hf" / "wider"), 2, 1e4, 1024, intermediate_size=128)
    run([sys.executable, __file__, "megatron", str(root)])
    with open(root / "results.json") as f:
        return root, json.load(f)


def test_megatron_merge_is_the_weighted_average(megatron_merge):
    root, results = megatron_merge
    assert results["merge_exit_code"] == 0, results["merge_stderr"]
    expected = expected_average(load_safetensors(root / "hf" / "extended"),
                                load_safetensors(root / "hf" / "original"), MEGATRON_WEIGHTS)
    assert_same_tensors(load_safetensors(root / "exported"), expected)


def test_megatron_merge_keeps_the_first_model_args(megatron_merge):
    root, results = megatron_merge
    merged = root / "mg" / "merged"
    assert (merged / "latest_checkpointed_iteration.txt").read_text() == "release"
    first = json.loads((root / "mg" / "extended" / "release" / "model_args.json").read_text())
    assert json.loads((merged / "release" / "model_args.json").read_text()) == first
    assert first["rotary_base"] == 5e5 and first["max_position_embeddings"] == 4096
    assert (merged / "release" / "hf_config.json").read_text() == \
        (root / "hf" / "extended" / "config.json").read_text()
    assert json.loads((merged / "release" / "merge.json").read_text())["weights"] == \
        list(MEGATRON_WEIGHTS)
    exported = json.loads((root / "exported" / "config.json").read_text())
    assert exported["rope_parameters"]["rope_theta"] == 5e5
    assert exported["max_position_embeddings"] == 4096
    assert "rotary_base" in results["merge_stderr"]  # the model_args difference is reported


def test_megatron_shape_mismatch_names_tensor_and_shapes(megatron_merge):
    root, results = megatron_merge
    assert results["mismatch_exit_code"] == 2
    message = results["mismatch_stderr"]
    assert "tensor decoder.layers.mlp.linear_fc1.weight: shape (2, 192, 64)" in message
    assert "(2, 256, 64)" in message
    assert not (root / "mg" / "bad").exists() and not (root / "mg" / "bad.partial").exists()


def _megatron(root: str) -> None:
    import convert_checkpoint
    import merge_checkpoints

    def call(main, argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(argv)
        return code, err.getvalue()

    mg = os.path.join(root, "mg")
    for name in ("extended", "original", "wider"):
        code, err = call(convert_checkpoint.main, [
            "hf-to-megatron", "--hf-dir", os.path.join(root, "hf", name), "--megatron-dir",
            os.path.join(mg, name), "--no-progress"])
        assert code == 0, err
    results = {}
    results["merge_exit_code"], results["merge_stderr"] = call(merge_checkpoints.main, [
        "--inputs", os.path.join(mg, "extended"), os.path.join(mg, "original"), "--weights",
        *map(str, MEGATRON_WEIGHTS), "--output", os.path.join(mg, "merged"), "--no-progress"])
    results["mismatch_exit_code"], results["mismatch_stderr"] = call(merge_checkpoints.main, [
        "--inputs", os.path.join(mg, "original"), os.path.join(mg, "wider"), "--output",
        os.path.join(mg, "bad"), "--no-progress"])
    code, err = call(convert_checkpoint.main, [
        "megatron-to-hf", "--megatron-dir", os.path.join(mg, "merged"), "--hf-dir",
        os.path.join(root, "exported"), "--reference-hf-dir", os.path.join(root, "hf", "extended"),
        "--no-progress"])
    assert code == 0, err
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    if sys.argv[1] == "megatron":
        _megatron(sys.argv[2])
