"""SmolLM2-135M-Instruct (a real pretrained Llama: GQA 9 heads / 3 groups, tied embeddings, bf16)
through the converter, compared with transformers in fp32:

- logits on Austen text at TP=1 and TP=3 (3 ranks): >= 99.9% identical greedy next tokens,
  max |logit diff| <= 1e-3;
- fine-tune 5 iterations with ``megatron_ext.train`` from the converted checkpoint: the loss at
  iteration 1 equals transformers' loss on the same batch (<= 1e-4 relative);
- export the fine-tuned checkpoint, load it in transformers, and compare logits again.

The command-line tools run in two driver subprocesses (``python tests/test_convert_smollm2.py
{import,export} ...`` calls ``tools/convert_checkpoint.py`` and ``tools/preprocess_data.py``
in-process, to pay for one interpreter start each) plus torchrun for TP=3 and for training.
"""

import json
import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
from launch import run  # noqa: E402

MAX_ABS = 1e-3
MIN_AGREEMENT = 0.999
SEQ, GLOBAL_BATCH, SEED = 64, 1, 1234

pytestmark = pytest.mark.multiprocess




def verify_results(stdout: str) -> list:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"max_abs_diff"')]


def torchrun(nproc: int, args):
    from launch import free_port

    return run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(free_port()), *args])


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 converted to an fp32 Megatron checkpoint, its TP=1 logit check, and a small
    tokenized Austen dataset (one driver process)."""
    from dev import assets

    hf_dir = str(assets.require(assets.smollm2_hf_dir))
    corpus = str(assets.require(assets.corpus_jsonl, "austen"))
    root = tmp_path_factory.mktemp("smollm2")
    proc = run([sys.executable, __file__, "import", hf_dir, str(root), corpus])
    (tp1,) = verify_results(proc.stdout)
    return {"hf": hf_dir, "root": root, "mg": root / "mg", "tp1": tp1,
            "data": str(root / "persuasion_text_document")}


def test_import_records_the_smollm2_flags(smol):
    flags = (smol["mg"] / "megatron_args.txt").read_text().split()
    assert flags[flags.index("--num-query-groups") + 1] == "3"
    assert flags[flags.index("--rotary-base") + 1] == "100000"
    assert "--untie-embeddings-and-output-weights" not in flags  # tied
    saved = json.loads((smol["mg"] / "release" / "model_args.json").read_text())
    assert saved["padded_vocab_size"] == 49152


def test_smollm2_logits_tp1(smol):
    result = smol["tp1"]
    print(result)
    assert result["tokens"] == 512 and result["tp"] == 1
    assert result["next_token_agreement"] >= MIN_AGREEMENT
    assert result["max_abs_diff"] <= MAX_ABS


def test_smollm2_logits_tp3(smol):
    proc = torchrun(3, ["tools/convert_checkpoint.py", "verify", "--hf-dir", smol["hf"],
                        "--megatron-dir", str(smol["mg"]), "--tensor-model-parallel-size", "3"])
    (result,) = verify_results(proc.stdout)
    print(result)
    assert result["tp"] == 3 and result["tokens"] == 512
    assert result["next_token_agreement"] >= MIN_AGREEMENT
    assert result["max_abs_diff"] <= MAX_ABS


def hf_loss_on_first_batch(hf_dir: str, data_prefix: str, cache: str) -> float:
    """transformers' token-averaged loss on the batch megatron_ext.train uses at iteration 1."""
    from transformers import AutoModelForCausalLM

    from hf_reference import first_batches, token_averaged_loss

    batches = first_batches(hf_dir, data_prefix, cache, SEQ, SEED, GLOBAL_BATCH)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return token_averaged_loss(model, batches).item()


def test_finetune_then_export_round_trip(smol):
    root, hf_dir = smol["root"], smol["hf"]
    trained, metrics = root / "ft", root / "ft_metrics.jsonl"
    flags = (smol["mg"] / "megatron_args.txt").read_text().split()
    torchrun(1, ["-m", "megatron_ext.train", *flags, "--seq-length", str(SEQ),
                 "--micro-batch-size", "1", "--global-batch-size", str(GLOBAL_BATCH),
                 "--train-iters", "5", "--lr", "1e-5", "--lr-warmup-iters", "0",
                 "--seed", str(SEED),
                 "--load", str(smol["mg"]), "--finetune", "--save", str(trained),
                 "--metrics-jsonl", str(metrics), "--data-path", smol["data"], "--split", "100,0,0",
                 "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir,
                 "--data-cache-path", str(root / "cache"), "--device", "cpu"])
    records = [r for r in map(json.loads, metrics.read_text().splitlines()) if "kind" not in r]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5]
    hf_loss = hf_loss_on_first_batch(hf_dir, smol["data"], str(root / "cache"))
    rel = abs(records[0]["loss"] - hf_loss) / hf_loss
    print(f"iteration-1 loss: megatron {records[0]['loss']:.7f} transformers {hf_loss:.7f} "
          f"rel diff {rel:.2e}")
    assert rel <= 1e-4

    proc = run([sys.executable, __file__, "export", hf_dir, str(root)])
    (result,) = verify_results(proc.stdout)
    print("exported fine-tuned model vs Megatron:", result)
    assert result["next_token_agreement"] >= MIN_AGREEMENT and result["max_abs_diff"] <= MAX_ABS
    exported = json.loads((root / "ft_hf" / "config.json").read_text())
    with open(os.path.join(hf_dir, "config.json")) as f:
        source = json.load(f)
    assert {k: v for k, v in exported.items() if k != "dtype"} == \
        {k: v for k, v in source.items() if k != "dtype"}
    assert exported["dtype"] == "float32"
    assert (root / "ft_hf" / "tokenizer.json").exists()


# ------------------------------------------------------------------------------------------
# Subprocess driver
# ------------------------------------------------------------------------------------------

def _import(hf_dir: str, root: str, corpus: str) -> None:
    import convert_checkpoint
    import preprocess_data

    mg = os.path.join(root, "mg")
    assert convert_checkpoint.main(["hf-to-megatron", "--hf-dir", hf_dir, "--megatron-dir", mg,
                                    "--dtype", "fp32", "--no-progress"]) == 0
    assert convert_checkpoint.main(["verify", "--hf-dir", hf_dir, "--megatron-dir", mg,
                                    "--max-abs-tol", str(MAX_ABS),
                                    "--min-agreement", str(MIN_AGREEMENT)]) == 0
    # A small real dataset: Persuasion, cut into 4000-character documents.
    with open(corpus) as f:
        novel = next(d for d in map(json.loads, f) if d["id"] == "austen/persuasion")["text"]
    jsonl = os.path.join(root, "persuasion.jsonl")
    with open(jsonl, "w") as f:
        for start in range(2000, 42000, 4000):
            f.write(json.dumps({"text": novel[start:start + 4000]}) + "\n")
    assert preprocess_data.main(["--input", jsonl,
                                 "--output-prefix", os.path.join(root, "persuasion"),
                                 "--tokenizer-type", "HuggingFaceTokenizer",
                                 "--tokenizer-model", hf_dir, "--append-eod"]) == 0


def _export(hf_dir: str, root: str) -> None:
    import convert_checkpoint

    out, trained = os.path.join(root, "ft_hf"), os.path.join(root, "ft")
    assert convert_checkpoint.main(["megatron-to-hf", "--megatron-dir", trained, "--hf-dir", out,
                                    "--reference-hf-dir", hf_dir, "--dtype", "fp32",
                                    "--no-progress"]) == 0
    assert convert_checkpoint.main(["verify", "--hf-dir", out, "--megatron-dir", trained,
                                    "--max-abs-tol", str(MAX_ABS),
                                    "--min-agreement", str(MIN_AGREEMENT)]) == 0


if __name__ == "__main__":
    if sys.argv[1] == "import":
        _import(*sys.argv[2:5])
    else:
        _export(*sys.argv[2:4])
