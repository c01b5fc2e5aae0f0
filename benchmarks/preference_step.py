"""LOGO training step: shared-prefix packing vs separate sequences, and the logit memory.

    PYTHONPATH=. python benchmarks/preference_step.py [--context 4096 --answer 256 --iters 4]

Step time: real preference rows (an Austen passage of --context SmolLM2 tokens as the prompt, a
chosen and 2 rejected answers of --answer tokens each, real sentences) are preprocessed with
tools/preprocess_preference.py and trained with ``megatron_ext.train`` (one process, a 4-layer
Llama with SmolLM2's 49K vocabulary, LOGO loss, logo positions over 4x the context) once with
``--preference-packing separate`` (the context encoded once per answer, as LOGO's released code)
and once with ``shared-prefix``. Runs alternate (separate, shared, separate, shared) so machine-
speed changes hit both; we compare the median step time after the first iteration. Both use
--attention-block-size 512: the separate layout then skips the blocks its document mask hides, so
it costs about what three unpacked sequences cost (with one block per half sequence, its masked
cross-answer attention would be computed and thrown away, flattering shared-prefix).

Logit memory: the peak resident memory of the logit computation alone (output layer + log-softmax
+ backward, in a fresh process each) for our answer positions only vs full-vocabulary logits on
every position of the three sequences (what a Hugging Face trainer materialises).

Last line: the standard JSON, ratio = shared / separate step time (goal <= 0.5), with
logit_memory_ratio as an extra key. DPO with an offline reference vs a reference forward in the
step is benchmarks/dpo_step.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks import cpu_description  # noqa: E402
from dev import assets  # noqa: E402

MODEL = ["--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "704",
         "--num-attention-heads", "8", "--num-query-groups", "4",
         "--untie-embeddings-and-output-weights", "--seed", "1234"]
NUM_REJECTED = 2


def make_rows(hf_dir: str, context: int, answer: int, num_rows: int, path: str) -> None:
    """Rows whose prompt is exactly ``context`` tokens of Austen and answers ``answer`` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    with open(assets.require(assets.corpus_jsonl, "austen")) as f:
        text = json.loads(f.readline())["text"]
    ids = tokenizer.encode(text, add_special_tokens=False)
    span = context + (1 + NUM_REJECTED) * answer
    with open(path, "w") as out:
        for r in range(num_rows):
            piece = ids[r * span:(r + 1) * span]
            prompt = tokenizer.decode(piece[:context])
            answers = [tokenizer.decode(piece[context + k * answer:context + (k + 1) * answer])
                       for k in range(1 + NUM_REJECTED)]
            out.write(json.dumps({"prompt": prompt, "chosen": answers[0],
                                  "rejected": answers[1:]}) + "\n")


def train(prefix: str, hf_dir: str, layout: str, seq_length: int, target: int, iters: int,
          block: int, work: str, tag: str) -> float:
    metrics = os.path.join(work, f"{tag}.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(20000 + os.getpid() % 20000), "-m", "megatron_ext.train",
           *MODEL, "--seq-length", str(seq_length), "--max-position-embeddings", str(target),
           "--position-scheme", "logo", "--target-seq-length", str(target),
           "--preference-packing", layout, "--attention-block-size", str(block),
           "--micro-batch-size", "1", "--global-batch-size", "1",
           "--train-iters", str(iters), "--lr", "1e-5", "--data-path", prefix,
           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir,
           "--split", "100,0,0", "--metrics-jsonl", metrics, "--device", "cpu",
           "--log-interval", str(iters)]
    subprocess.run(cmd, check=True, cwd=_REPO_ROOT, capture_output=True, text=True,
                   env={**os.environ, "PYTHONPATH": _REPO_ROOT})
    with open(metrics) as f:
        steps = [r["step_s"] for r in map(json.loads, f) if "kind" not in r]
    return statistics.median(steps[1:])


_LOGIT_PROBE = """
import resource, sys, torch
rows, hidden, vocab = map(int, sys.argv[1:4])
torch.manual_seed(0)
weight = torch.randn(vocab, hidden, requires_grad=True)
h = torch.randn(rows, hidden, requires_grad=True)
labels = torch.randint(0, vocab, (rows,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
logits = h @ weight.t()
loss = -logits.log_softmax(-1).gather(1, labels.view(-1, 1)).mean()
loss.backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def logit_peak_mb(rows: int, hidden: int, vocab: int) -> float:
    out = subprocess.run([sys.executable, "-c", _LOGIT_PROBE, str(rows), str(hidden), str(vocab)],
                         check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--answer", type=int, default=256)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--attention-block-size", type=int, default=512,
                   help="both runs: blocks this small let the separate layout skip the masked "
                        "cross-answer blocks, so it costs about what 3 unpacked sequences cost")
    args = p.parse_args()

    from megatron_ext.data.preference_samples import PreferenceRows, layout_length
    from megatron_ext.data.preprocess_preference import data_prefix_for, preprocess_preference

    hf_dir = str(assets.require(assets.smollm2_hf_dir))
    with tempfile.TemporaryDirectory() as work:
        jsonl = os.path.join(work, "rows.jsonl")
        make_rows(hf_dir, args.context, args.answer, args.iters, jsonl)
        preprocess_preference([jsonl], os.path.join(work, "pref"), "HuggingFaceTokenizer",
                              hf_dir, max_answer_tokens=4 * args.answer, progress=False)
        prefix = data_prefix_for(os.path.join(work, "pref"))
        rows = PreferenceRows(prefix)
        lengths = [rows.lengths(r, NUM_REJECTED) for r in range(len(rows))]
        seq = {layout: max(layout_length(*l, layout) for l in lengths)
               for layout in ("separate", "shared-prefix")}
        seq = {k: -(-v // 64) * 64 for k, v in seq.items()}
        target = 4 * seq["separate"]
        prompt_tokens = max(l[0] for l in lengths)
        answer_tokens = max(int(l[1].max()) for l in lengths)
        print(f"prompt {prompt_tokens} tokens, answers up to {answer_tokens} tokens; "
              f"--seq-length separate {seq['separate']}, shared-prefix {seq['shared-prefix']}",
              flush=True)
        times = {"separate": [], "shared-prefix": []}
        for repeat in range(args.repeats):
            for layout in times:
                step = train(prefix, hf_dir, layout, seq[layout], target, args.iters,
                             args.attention_block_size, work, f"{layout}-{repeat}")
                times[layout].append(step)
                print(f"  {layout:14s} run {repeat}: {step:.3f} s/step", flush=True)
        separate, shared = (statistics.median(times[k]) for k in ("separate", "shared-prefix"))

        vocab = 49152
        scored = sum(int(l[1].sum()) for l in lengths[:1])
        all_positions = layout_length(*lengths[0], "separate")
        ours_mb = logit_peak_mb(scored, 256, vocab)
        naive_mb = logit_peak_mb(all_positions, 256, vocab)
    print(f"step time: separate {separate:.3f} s, shared-prefix {shared:.3f} s "
          f"-> ratio {shared / separate:.3f} (goal <= 0.5)")
    print(f"logit computation peak: answer positions only ({scored} rows) {ours_mb:.1f} MB vs "
          f"every position of the 3 sequences ({all_positions} rows) {naive_mb:.1f} MB "
          f"-> ratio {ours_mb / naive_mb:.3f}")
    # The headline: shared-prefix step time over the fair baseline a user would otherwise run
    # (each answer with its own prompt copy), measured in this run.
    print(json.dumps({"benchmark": "preference_step", "ratio": round(shared / separate, 4),
                      "goal": "<= 0.5", "device": f"{cpu_description()} (CPU training run)",
                      "baseline": "--preference-packing separate",
                      "separate_step_s": round(separate, 4), "shared_step_s": round(shared, 4),
                      "logit_memory_ratio": round(ours_mb / naive_mb, 4),
                      "logit_peak_mb": {"answers_only": ours_mb, "all_positions": naive_mb},
                      "context": prompt_tokens, "answer": answer_tokens}))


if __name__ == "__main__":
    main()
