"""Run `megatron_ext.train` under torchrun on gloo for tests, and read back its metrics."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from typing import List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny Llama-style model: GQA (4 heads, 2 groups), SwiGLU, RMSNorm, untied output layer.
TINY_MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64",
    "--untie-embeddings-and-output-weights", "--micro-batch-size", "1", "--global-batch-size", "4",
    "--lr", "1e-3", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--seed", "1234",
    "--log-interval", "1", "--device", "cpu",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: Sequence, timeout: int = 600, check: bool = True,
        env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root with one thread per process; fail loudly."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT, **(env or {})}
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def torchrun(nproc: int, args: Sequence[str], timeout: int = 600, check: bool = True,
             env: Optional[dict] = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", "megatron_ext.train", *args]
    return run(cmd, timeout=timeout, check=check, env=env)


def probe(nproc: int, out, args: Sequence[str], timeout: int = 600) -> dict:
    """Train under torchrun through ``megatron_ext.verify.probe`` (the trainer's setup and loop):
    returns {"metrics": per-iteration records, "grads": iteration-1 gradients by global name}."""
    import torch

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", "megatron_ext.verify.probe", str(out), *args]
    run(cmd, timeout=timeout)
    return {"metrics": read_metrics(os.path.join(str(out), "metrics.jsonl")),
            "grads": torch.load(os.path.join(str(out), "grads.pt"))}


def data_args(data_path: str, tokenizer_model: str, cache: str) -> List[str]:
    return ["--data-path", *data_path.split(), "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", tokenizer_model, "--data-cache-path", cache]


def save_initial_checkpoint(root, args: Sequence[str]) -> str:
    """An iteration-0 checkpoint of the model ``args`` describe: the common start of layout runs."""
    init = os.path.join(str(root), "init")
    torchrun(1, [*args, "--train-iters", "0", "--lr-warmup-iters", "0", "--save", init])
    return init


def run_from(init: str, root, name: str, nproc: int, args: Sequence[str], iters: int = 3
             ) -> List[dict]:
    """Train ``iters`` iterations from ``init`` (--finetune reshards it for any layout); returns
    the per-iteration metrics."""
    metrics = os.path.join(str(root), f"{name}.jsonl")
    torchrun(nproc, [*args, "--train-iters", str(iters), "--load", init, "--finetune",
                     "--metrics-jsonl", metrics])
    return read_metrics(metrics)


def read_metrics(path: str) -> List[dict]:
    """The per-iteration training records of a --metrics-jsonl file."""
    return [r for r in read_metrics_file(path) if "kind" not in r]


def read_metrics_file(path: str) -> List[dict]:
    """Every record, evaluation entries ("kind": "eval") included."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@contextlib.contextmanager
def training_setup(flags: Sequence[str]):
    """In a worker process: the run ``flags`` describe, built as ``megatron_ext.train`` builds it
    (configuration, process groups, data, model, optimizer); groups destroyed afterwards."""
    from megatron_ext import arguments, parallel, train

    cfg = arguments.parse(flags)
    _, plat = parallel.initialize(cfg.layout.tp, cfg.layout.pp, cfg.layout.cp,
                                  device=cfg.distributed.device)
    try:
        yield train.setup(cfg, plat)
    finally:
        parallel.destroy()
