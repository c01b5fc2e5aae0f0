"""One-screen summary of a training run directory (metrics.jsonl, checkpoints, TensorBoard)."""

import argparse
import os

from megatron_ext import jsonl
from megatron_ext.errors import UserError


def summarize(run_dir: str) -> str:
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(metrics_path):
        return f"no metrics at {metrics_path}"
    train, evals, runs = [], [], []
    for _, record in jsonl.read_rows(metrics_path, lambda message, kind: UserError(message)):
        kind = record.get("kind")
        if kind is None:
            train.append(record)
        elif kind == "eval":
            evals.append(record)
        elif kind == "run":  # what ran: layer spec, attention backend, dtype, CP exchange
            runs.append(record)
    if not train:
        return f"{metrics_path} holds no training iterations"
    first, last = train[0], train[-1]
    rates = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    lines = [
        "=" * 72,
        f"run: {os.path.abspath(run_dir)}",
        f"iterations: {first['iteration']}..{last['iteration']}  "
        f"tokens: {last['tokens']:,}  time: {last['elapsed_s']:.1f}s",
        f"loss: first {first['loss']:.4f} -> last {last['loss']:.4f}",
    ]
    if runs:
        ran = runs[-1]
        lines.append(f"ran: {ran.get('device')} | layer spec {ran.get('layer_spec')} | attention "
                     f"{ran.get('attention_backend')} | params {ran.get('params_dtype')} | CP "
                     f"exchange {ran.get('cp_comm_type') or 'none'}")
    if rates:
        lines.append(f"throughput: {sorted(rates)[len(rates) // 2]:.0f} tokens/s (median)")
    for record in evals:
        lines.append(f"validation loss at iteration {record['iteration']}: {record['eval_loss']:.4f}")
    tracker = os.path.join(run_dir, "checkpoints", "latest_checkpointed_iteration.txt")
    if os.path.exists(tracker):
        with open(tracker) as f:
            tag = f.read().strip()
        lines.append(f"checkpoint: {os.path.abspath(os.path.join(run_dir, 'checkpoints'))} "
                     f"(latest: iteration {tag})")
    tb = os.path.join(run_dir, "tensorboard")
    if os.path.isdir(tb):
        lines.append(f"tensorboard: tensorboard --logdir {os.path.abspath(tb)}")
    lines.append(f"metrics: {os.path.abspath(metrics_path)}")
    lines.append("=" * 72)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="summarize_run.py", description=__doc__)
    p.add_argument("run_dir")
    try:
        print(summarize(p.parse_args(argv).run_dir))
    except UserError as err:  # a damaged metrics file: one line naming FILE:LINE
        p.error(str(err))
    return 0
