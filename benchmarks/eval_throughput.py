"""ppl-by-position throughput against a plain transformers forward, measured in one run.

    python benchmarks/eval_throughput.py [--lengths 512,1024,2048] [--windows 2] [--repeats 3]

SmolLM2-135M-Instruct is converted once to an fp32 Megatron checkpoint. Then, per length, the same
windows (the first L tokens of Austen novels) go through

  transformers  AutoModelForCausalLM(input_ids, labels=input_ids), fp32, no_grad
  ours          megatron_ext.evaluate's ppl-by-position (Megatron-Core forward-only schedule,
                vocab-parallel per-token loss, position buckets), single process, gloo

each in its own fresh process (imports, model loading and one warm-up pass excluded; best of
--repeats passes over all windows), the two alternating for --rounds rounds. Both use torch's
default thread count. ratio = our tokens/s / transformers tokens/s (goal >= 0.8); the mean losses
must agree (<= 1e-4 relative), so both did the same work. Prints a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import cpu_description  # noqa: E402

GOAL = 0.8


def _windows(hf_dir: str, length: int, count: int):
    from dev import assets
    from megatron_ext.data.tokenizer import build_tokenizer
    from megatron_ext.evaluate.corpus import EvalCorpus
    from megatron_ext.evaluate.ppl_by_position import select_windows

    tokenizer = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    corpus = EvalCorpus(str(assets.corpus_jsonl("austen")), tokenizer)
    windows, _, _ = select_windows(corpus, length, count)
    return corpus, windows


def child_transformers(hf_dir: str, length: int, count: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    _, windows = _windows(hf_dir, length, count)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    inputs = [torch.as_tensor(w).view(1, -1) for w in windows]

    def one_pass() -> float:
        with torch.no_grad():
            return sum(model(ids, labels=ids).loss.item() for ids in inputs) / len(inputs)

    one_pass()  # warm-up
    best, loss = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        loss = one_pass()
        best = min(best, time.perf_counter() - start)
    return {"seconds": best, "loss": loss, "tokens": length * len(inputs),
            "threads": torch.get_num_threads()}


def child_ours(hf_dir: str, megatron_dir: str, length: int, count: int, repeats: int) -> dict:
    import torch
    from megatron.core import tensor_parallel

    from megatron_ext import arguments, parallel
    from megatron_ext.evaluate import cli, ppl_by_position
    from megatron_ext.evaluate.model_runner import ModelRunner, load_model

    with open(os.path.join(megatron_dir, "megatron_args.txt")) as f:
        flags = f.read().split()
    args = cli.build_parser().parse_args(
        flags + ["--load", megatron_dir, "--tokenizer-type", "HuggingFaceTokenizer",
                 "--tokenizer-model", hf_dir, "--eval-data", "unused", "--output", "unused",
                 "--lengths", str(length), "--device", "cpu"])
    args.seq_length = length
    model_config, layout = arguments.model_and_layout(args, world_size=1)
    corpus, windows = _windows(hf_dir, length, count)
    parallel.initialize(1, 1, 1, device="cpu")
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        model_config, model = load_model(megatron_dir, model_config, layout, torch.device("cpu"),
                                         True)
        runner = ModelRunner(model, torch.device("cpu"), model_config.padded_vocab_size)

        def one_pass() -> dict:
            return ppl_by_position.run(runner, corpus, [length], count, max(64, length // 8))

        one_pass()  # warm-up
        best, result = float("inf"), None
        for _ in range(repeats):
            start = time.perf_counter()
            result = one_pass()[str(length)]
            best = min(best, time.perf_counter() - start)
        # transformers averages per window; do the same for the comparison.
        loss = sum(result["per_document_loss"]) / len(result["per_document_loss"])
        return {"seconds": best, "loss": loss, "tokens": length * len(windows),
                "threads": torch.get_num_threads()}
    finally:
        parallel.destroy()


def spawn(kind: str, hf_dir: str, megatron_dir: str, length: int, count: int, repeats: int
          ) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    if kind == "ours":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(s.getsockname()[1])
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--hf-dir", hf_dir,
                           "--megatron-dir", megatron_dir, "--lengths", str(length),
                           "--windows", str(count), "--repeats", str(repeats)],
                          env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--windows", type=int, default=2, help="windows (documents) per length")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per process; best")
    p.add_argument("--rounds", type=int, default=2, help="alternating process pairs; best")
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--megatron-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.child == "transformers":
        print(json.dumps(child_transformers(args.hf_dir, lengths[0], args.windows, args.repeats)))
        return 0
    if args.child == "ours":
        print(json.dumps(child_ours(args.hf_dir, args.megatron_dir, lengths[0], args.windows,
                                    args.repeats)))
        return 0

    from dev import assets

    hf_dir = str(assets.smollm2_hf_dir())
    work = args.work or tempfile.mkdtemp(prefix="eval_throughput_")
    megatron_dir = os.path.join(work, "smollm2-fp32")
    if not os.path.exists(os.path.join(megatron_dir, "megatron_args.txt")):
        subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py"),
                        "hf-to-megatron", "--hf-dir", hf_dir, "--megatron-dir", megatron_dir,
                        "--dtype", "fp32", "--no-progress"], check=True, capture_output=True)
    rows = []
    for length in lengths:
        runs = {"transformers": [], "ours": []}
        for _ in range(args.rounds):
            for kind in ("transformers", "ours"):
                runs[kind].append(spawn(kind, hf_dir, megatron_dir, length, args.windows,
                                        args.repeats))
        hf = min(runs["transformers"], key=lambda r: r["seconds"])
        ours = min(runs["ours"], key=lambda r: r["seconds"])
        rows.append({
            "length": length, "windows": hf["tokens"] // length, "threads": ours["threads"],
            "transformers_tokens_per_s": round(hf["tokens"] / hf["seconds"], 1),
            "ours_tokens_per_s": round(ours["tokens"] / ours["seconds"], 1),
            "ratio": round(hf["seconds"] / ours["seconds"], 3),
            "loss_rel_diff": abs(ours["loss"] - hf["loss"]) / abs(hf["loss"]),
            "all_seconds": {k: [round(r["seconds"], 3) for r in v] for k, v in runs.items()},
        })
    cols = ["length", "windows", "transformers_tokens_per_s", "ours_tokens_per_s", "ratio",
            "loss_rel_diff"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{row[c]:.2e}" if c == "loss_rel_diff" else str(row[c]) for c in cols))
    ratio = min(r["ratio"] for r in rows)
    print(json.dumps({"benchmark": "eval_throughput", "ratio": ratio, "goal": GOAL,
                      "losses_agree": all(r["loss_rel_diff"] <= 1e-4 for r in rows),
                      "device": cpu_description(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
