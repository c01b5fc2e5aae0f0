"""Training compute of LongRecipe (0.3T-token samples, positions spread over T) vs full-length T.

    PYTHONPATH=. python benchmarks/pit_compute.py [--target 8192 --ratio 0.3 --iters 6]

Two real training runs of the same model from the same seed (``megatron_ext.train`` under torchrun,
one process, demo data): one at --seq-length round(ratio*T) with --position-scheme longrecipe
--target-seq-length T, one at --seq-length T with contiguous positions. Each reports the
per-iteration step time in its metrics JSONL; we compare the median step time per sample after
the first (warm-up) iteration. Both runs cover the same position range 0..T-1, which is
LongRecipe's claim: the long context is taught at a fraction of the compute. The runs alternate
(short, long, short, long) so that machine-speed changes hit both. Last line: JSON with
ratio = time per sample(longrecipe at 0.3T) / time per sample(full T) (goal <= 0.35).
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

from dev.demo_data import TOKENIZER_TYPE, prepare_demo_data  # noqa: E402

MODEL = ["--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "704",
         "--num-attention-heads", "8", "--num-query-groups", "4",
         "--untie-embeddings-and-output-weights", "--seed", "1234"]


def run(seq_length: int, target: int, scheme: str, iters: int, work: str, device: str,
        tag: str) -> float:
    """Median seconds per sample (micro-batch 1, global batch 1) after the first iteration."""
    blend, tokenizer_model = prepare_demo_data()
    metrics = os.path.join(work, f"{tag}.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(20000 + os.getpid() % 20000), "-m", "megatron_ext.train",
           *MODEL, "--seq-length", str(seq_length), "--max-position-embeddings", str(target),
           "--position-scheme", scheme, "--target-seq-length", str(target),
           "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", str(iters),
           "--lr", "1e-4", "--data-path", *blend.split(), "--tokenizer-type", TOKENIZER_TYPE,
           "--tokenizer-model", tokenizer_model, "--data-cache-path", os.path.join(work, "cache"),
           "--split", "100,0,0", "--metrics-jsonl", metrics, "--device", device,
           "--log-interval", str(iters)]
    if device == "cuda":
        cmd.append("--bf16")
    subprocess.run(cmd, check=True, cwd=_REPO_ROOT, capture_output=True, text=True,
                   env={**os.environ, "PYTHONPATH": _REPO_ROOT})
    with open(metrics) as f:
        steps = [r["step_s"] for r in map(json.loads, f) if "kind" not in r]
    return statistics.median(steps[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=int, default=8192)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    short = int(round(args.ratio * args.target))
    work = tempfile.mkdtemp(prefix="pit-bench-")
    times = {"longrecipe": [], "full": []}
    for repeat in range(args.repeats):
        times["longrecipe"].append(run(short, args.target, "longrecipe", args.iters, work,
                                       args.device, f"short{repeat}"))
        times["full"].append(run(args.target, args.target, "contiguous", args.iters, work,
                                 args.device, f"full{repeat}"))
    short_s, full_s = min(times["longrecipe"]), min(times["full"])
    print(f"longrecipe at {short} tokens (positions to {args.target}): {short_s:.3f} s/sample | "
          f"full length {args.target}: {full_s:.3f} s/sample (best of {args.repeats} runs' "
          f"medians over {args.iters - 1} iterations)")
    print(json.dumps({"benchmark": "pit_compute", "ratio": round(short_s / full_s, 3),
                      "goal": 0.35, "short_tokens": short, "target": args.target,
                      "longrecipe_s_per_sample": round(short_s, 4),
                      "full_s_per_sample": round(full_s, 4), "device": args.device}))


if __name__ == "__main__":
    main()
