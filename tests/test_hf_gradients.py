"""Every parameter's iteration-1 gradient of converted SmolLM2-135M equals transformers' backward.

SmolLM2-135M-Instruct (a real pretrained Llama: GQA 9 heads / 3 groups, tied embeddings) is
converted to an fp32 Megatron checkpoint and trained one iteration by ``megatron_ext.verify.probe``
(the trainer's own setup and step) on one 128-token window of Austen; its gradients, gathered to
global shape, are mapped to Hugging Face names by the converter's tables (the mapping is linear, so
it maps gradients as it maps weights). transformers computes the same token-averaged loss on the
same tokens in fp32 and backpropagates. Per tensor: ||g_megatron - g_hf|| / ||g_hf|| <= 1e-4, at
TP=1, TP=3 (9 heads: TP must divide 9 and 3), CP=2 and PP=2.
"""

import json
import sys

import pytest
import torch

from evaluate_fixtures import smollm2, smollm2_megatron  # noqa: F401  (fixtures)
from hf_reference import first_batches, token_averaged_loss
from launch import REPO_ROOT, probe, run

pytestmark = pytest.mark.multiprocess

SEQ, SEED, TOLERANCE = 128, 1234, 1e-4
LAYOUTS = {"TP=1": (1, []), "TP=3": (3, ["--tensor-model-parallel-size", "3"]),
           "CP=2": (2, ["--context-parallel-size", "2"]),
           # Tied embeddings across stages: the last stage's output layer is the embedding.
           "PP=2": (2, ["--pipeline-model-parallel-size", "2"])}


@pytest.fixture(scope="module")
def data(smollm2, tmp_path_factory):  # noqa: F811
    """A few thousand characters of Persuasion, tokenized with SmolLM2's tokenizer."""
    from dev import assets

    root = tmp_path_factory.mktemp("hf-gradients")
    with open(assets.require(assets.corpus_jsonl, "austen")) as f:
        novel = next(d for d in map(json.loads, f) if d["id"] == "austen/persuasion")["text"]
    with open(root / "doc.jsonl", "w") as f:
        f.write(json.dumps({"text": novel[10_000:14_000]}) + "\n")
    run([sys.executable, f"{REPO_ROOT}/tools/preprocess_data.py", "--input", root / "doc.jsonl",
         "--output-prefix", root / "doc", "--tokenizer-type", "HuggingFaceTokenizer",
         "--tokenizer-model", smollm2["hf"], "--append-eod"])
    return {"prefix": str(root / "doc_text_document"), "cache": str(root / "cache"), "root": root}


@pytest.fixture(scope="module")
def hf_grads(smollm2, data):  # noqa: F811
    from transformers import AutoModelForCausalLM

    batches = first_batches(smollm2["hf"], data["prefix"], data["cache"], SEQ, SEED, 1)
    model = AutoModelForCausalLM.from_pretrained(smollm2["hf"], dtype=torch.float32)
    token_averaged_loss(model, batches).backward()
    return {name: p.grad.double() for name, p in model.named_parameters()}


def to_hf_names(grads: dict, hf_dir: str) -> dict:
    """Megatron global gradients (probe names: checkpoint keys, layer as '@(i,)') -> HF names."""
    from megatron_ext.checkpoints.convert import engine
    from megatron_ext.checkpoints.convert.hf_config import read_hf_config
    from megatron_ext.checkpoints.convert.tables import state_dict_name

    by_state_name = {}
    for name, grad in grads.items():
        key, _, layer = name.partition("@")
        by_state_name[state_dict_name(key, int(layer.strip("(,)")) if layer else None)] = grad
    spec = read_hf_config(hf_dir)
    return {hf: g for m in engine.mappings(spec)
            for hf, g in engine.to_hf(m, by_state_name.pop(m.megatron), spec, torch.float64)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_gradient_matches_transformers(smollm2_megatron, data, hf_grads,  # noqa: F811
                                             layout):
    nproc, extra = LAYOUTS[layout]
    out = data["root"] / layout.replace("=", "")
    result = probe(nproc, out, [
        *smollm2_megatron["flags"], *extra, "--load", smollm2_megatron["mg"], "--finetune",
        "--seq-length", str(SEQ), "--micro-batch-size", "1", "--global-batch-size", "1",
        "--train-iters", "1", "--lr", "1e-5", "--seed", str(SEED), "--data-path", data["prefix"],
        "--split", "100,0,0", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", smollm2_megatron["hf"], "--data-cache-path", data["cache"],
        "--device", "cpu"], timeout=900)
    ours = to_hf_names(result["grads"], smollm2_megatron["hf"])
    assert sorted(ours) == sorted(hf_grads)
    diffs = {name: ((ours[name] - ref).norm() / ref.norm()).item()
             for name, ref in hf_grads.items()}
    worst = max(diffs, key=diffs.get)
    print(f"\n{layout}: {len(diffs)} tensors, largest relative gradient difference "
          f"{diffs[worst]:.2e} ({worst})")
    assert all(ref.norm() > 0 for ref in hf_grads.values())
    assert diffs[worst] <= TOLERANCE, (worst, diffs[worst])
