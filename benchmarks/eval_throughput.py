"""ppl-by-position throughput against a plain transformers forward, measured in one run.

    python benchmarks/eval_throughput.py [--lengths 512,1024,2048] [--windows 2] [--repeats 3]
                                         [--rounds 3] [--threads 2] [--hf-attention sdpa]

SmolLM2-135M-Instruct is converted once to an fp32 Megatron checkpoint. Then, per length, the same
windows (the first L tokens of Austen novels) go through

  transformers  AutoModelForCausalLM(input_ids, labels=input_ids), fp32, no_grad, with the
                attention implementation pinned (--hf-attention; sdpa is what a user gets by
                default and the fastest one transformers has on CPU)
  ours          megatron_ext.evaluate's ppl-by-position (Megatron-Core forward-only schedule,
                vocab-parallel per-token loss, position buckets), single process, gloo, with the
                attention backend pinned (--attention-backend; blockwise is the CPU one)

Both sides run with the same pinned thread count (--threads: torch.set_num_threads and
OMP_NUM_THREADS), each in its own fresh process (imports, model loading and one warm-up pass
excluded; the median of --repeats timed passes over all windows). A round runs one process of
each side back to back, the order alternating between rounds, and gives one paired ratio; the
result is the median of the --rounds paired ratios, so a machine-speed change during one round
moves one pair, not the headline. ratio = our tokens/s / transformers tokens/s (goal >= 0.8),
the headline the smallest per-length median; the mean losses must agree (<= 1e-4 relative), so
both did the same work. Prints a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def _timed(one_pass, repeats: int):
    """(median seconds of `repeats` timed passes after one warm-up, the last pass's result)."""
    one_pass()  # warm-up
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = one_pass()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def child_transformers(hf_dir: str, length: int, count: int, repeats: int, threads: int,
                       attention: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    _, windows = _windows(hf_dir, length, count)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation=attention).eval()
    ran = model.config._attn_implementation
    if ran != attention:
        raise RuntimeError(f"transformers ran attention {ran!r}, not the pinned {attention!r}")
    inputs = [torch.as_tensor(w).view(1, -1) for w in windows]

    def one_pass() -> float:
        with torch.no_grad():
            return sum(model(ids, labels=ids).loss.item() for ids in inputs) / len(inputs)

    seconds, loss = _timed(one_pass, repeats)
    return {"seconds": seconds, "loss": loss, "tokens": length * len(inputs),
            "threads": torch.get_num_threads(), "attention": ran}


def child_ours(hf_dir: str, megatron_dir: str, length: int, count: int, repeats: int,
               threads: int, backend: str) -> dict:
    import torch
    from megatron.core import tensor_parallel

    from megatron_ext import arguments, parallel
    from megatron_ext.evaluate import cli, ppl_by_position
    from megatron_ext.evaluate.model_runner import ModelRunner, load_model

    from megatron_ext.model import attention_backends

    torch.set_num_threads(threads)
    with open(os.path.join(megatron_dir, "megatron_args.txt")) as f:
        flags = f.read().split()
    args = cli.build_parser().parse_args(
        flags + ["--load", megatron_dir, "--tokenizer-type", "HuggingFaceTokenizer",
                 "--tokenizer-model", hf_dir, "--eval-data", "unused", "--output", "unused",
                 "--lengths", str(length), "--device", "cpu", "--attention-backend", backend])
    args.seq_length = length
    model_config, layout = arguments.model_and_layout(args, world_size=1)
    plan = attention_backends.plan_attention(model_config, layout, on_cpu=True, training=False)
    if plan.backend != attention_backends.BACKEND_ALIASES.get(backend, backend):
        raise RuntimeError(f"ours planned attention {plan.backend!r}, not the pinned {backend!r}")
    corpus, windows = _windows(hf_dir, length, count)
    parallel.initialize(1, 1, 1, device="cpu")
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        model_config, model = load_model(megatron_dir, model_config, layout, torch.device("cpu"),
                                         True)
        runner = ModelRunner(model, torch.device("cpu"), model_config.padded_vocab_size)

        def one_pass() -> dict:
            return ppl_by_position.run(runner, corpus, [length], count, max(64, length // 8))

        seconds, result = _timed(one_pass, repeats)
        result = result[str(length)]
        # transformers averages per window; do the same for the comparison.
        loss = sum(result["per_document_loss"]) / len(result["per_document_loss"])
        return {"seconds": seconds, "loss": loss, "tokens": length * len(windows),
                "threads": torch.get_num_threads(), "attention": plan.backend}
    finally:
        parallel.destroy()


def spawn(kind: str, hf_dir: str, megatron_dir: str, length: int, args) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": str(args.threads)}
    if kind == "ours":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(s.getsockname()[1])
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--hf-dir", hf_dir,
                           "--megatron-dir", megatron_dir, "--lengths", str(length),
                           "--windows", str(args.windows), "--repeats", str(args.repeats),
                           "--threads", str(args.threads), "--hf-attention", args.hf_attention,
                           "--attention-backend", args.attention_backend],
                          env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--windows", type=int, default=2, help="windows (documents) per length")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes per process (their median)")
    p.add_argument("--rounds", type=int, default=3,
                   help="paired rounds per length (the median paired ratio)")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16),
                   help="torch threads on both sides")
    p.add_argument("--hf-attention", default="sdpa", choices=("sdpa", "eager"),
                   help="transformers attn_implementation")
    p.add_argument("--attention-backend", default="blockwise", choices=("blockwise", "flex"),
                   help="ours (CPU: blockwise)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--megatron-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.child == "transformers":
        print(json.dumps(child_transformers(args.hf_dir, lengths[0], args.windows, args.repeats,
                                            args.threads, args.hf_attention)))
        return 0
    if args.child == "ours":
        print(json.dumps(child_ours(args.hf_dir, args.megatron_dir, lengths[0], args.windows,
                                    args.repeats, args.threads, args.attention_backend)))
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
        for round_index in range(args.rounds):
            order = ("transformers", "ours") if round_index % 2 == 0 else ("ours", "transformers")
            for kind in order:
                runs[kind].append(spawn(kind, hf_dir, megatron_dir, length, args))
        paired = [hf["seconds"] / ours["seconds"]
                  for hf, ours in zip(runs["transformers"], runs["ours"])]
        hf_s = statistics.median(r["seconds"] for r in runs["transformers"])
        ours_s = statistics.median(r["seconds"] for r in runs["ours"])
        hf, ours = runs["transformers"][0], runs["ours"][0]
        rows.append({
            "length": length, "windows": hf["tokens"] // length, "threads": ours["threads"],
            "attention": {"transformers": hf["attention"], "ours": ours["attention"]},
            "transformers_tokens_per_s": round(hf["tokens"] / hf_s, 1),
            "ours_tokens_per_s": round(ours["tokens"] / ours_s, 1),
            "ratio": round(statistics.median(paired), 3),
            "paired_ratios": [round(r, 3) for r in paired],
            "loss_rel_diff": max(abs(o["loss"] - h["loss"]) / abs(h["loss"])
                                 for o, h in zip(runs["ours"], runs["transformers"])),
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
