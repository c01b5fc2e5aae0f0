"""Two layouts of the same training flags, run side by side and compared.

A layout is ``tp=2,cp=2`` (keys tp, pp, cp, dp; missing keys are 1); its world size is
tp*pp*cp*dp. Each layout's run is one ``probe`` under ``torch.distributed.run`` on this machine, so
both start from the same weights (layout-invariant initialisation from ``--seed``, or the
``--load`` checkpoint both read) and see the same global batches. The comparison is per iteration
(loss, gradient norm) and per parameter (iteration 1's gradient, in global shape).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from typing import Dict, List, Sequence

from megatron_ext.errors import UserError

LAYOUT_KEYS = ("tp", "pp", "cp", "dp")
LAYOUT_FLAGS = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
                "cp": "--context-parallel-size"}
# Flags the tool sets itself (--device is always cpu: the runs share this machine's CPUs).
OWNED_FLAGS = (*LAYOUT_FLAGS.values(), "--train-iters")


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def flags(self) -> List[str]:
        return [f for key, flag in LAYOUT_FLAGS.items() for f in (flag, str(getattr(self, key)))]

    def __str__(self) -> str:
        return ",".join(f"{key}={getattr(self, key)}" for key in LAYOUT_KEYS)


def parse_layout(text: str, flag: str) -> LayoutSpec:
    """``tp=2,cp=2`` -> LayoutSpec(tp=2, cp=2); errors name ``flag``."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in LAYOUT_KEYS or not value.strip().isdigit() \
                or int(value) < 1 or key in sizes:
            raise UserError(f"{flag} {text!r}: expected comma-separated sizes like 'tp=2,cp=2' "
                            f"with keys {', '.join(LAYOUT_KEYS)} (each once, >= 1)")
        sizes[key] = int(value)
    return LayoutSpec(**sizes)


def check_training_flags(flags: Sequence[str]) -> None:
    for flag in flags:
        if flag.split("=", 1)[0] in OWNED_FLAGS:
            raise UserError(f"{flag.split('=', 1)[0]} is set by verify_layout: give the sizes with "
                            "--layout-a/--layout-b and the length with --iterations")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_probe(layout: LayoutSpec, flags: Sequence[str], iterations: int, out: str) -> dict:
    """Train ``iterations`` iterations of ``flags`` under ``layout`` on CPU/gloo; returns the
    metrics and iteration-1 gradients (raises UserError with the run's last output if it fails)."""
    import torch

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
           str(layout.world_size), "--master-port", str(_free_port()),
           "-m", "megatron_ext.verify.probe", out, *flags, *layout.flags(),
           "--train-iters", str(iterations), "--device", "cpu"]
    # The ranks import megatron_ext from where this process did (a source checkout included),
    # with one thread each: they share this machine's cores.
    source = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env={
        **os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise UserError(f"the run under layout {layout} failed (exit {proc.returncode}):\n{tail}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [r for r in map(json.loads, f) if "kind" not in r]
    return {"metrics": metrics, "grads": torch.load(os.path.join(out, "grads.pt"))}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def compare(a: dict, b: dict, tolerance: float) -> dict:
    """Per-iteration loss / grad-norm differences and per-parameter gradient differences of
    layout b relative to layout a, each with its verdict."""
    iterations = []
    for ra, rb in zip(a["metrics"], b["metrics"]):
        loss, norm = rel(rb["loss"], ra["loss"]), rel(rb["grad_norm"], ra["grad_norm"])
        iterations.append({"iteration": ra["iteration"], "loss_a": ra["loss"], "loss_b": rb["loss"],
                           "loss_rel_diff": loss, "grad_norm_a": ra["grad_norm"],
                           "grad_norm_b": rb["grad_norm"], "grad_norm_rel_diff": norm,
                           "ok": loss <= tolerance and norm <= tolerance})
    same_count = len(a["metrics"]) == len(b["metrics"])
    params: Dict[str, float] = {}
    for name, ga in a["grads"].items():
        gb = b["grads"].get(name)
        if gb is None or gb.shape != ga.shape:
            params[name] = float("inf")  # a different model: a parameter is missing or reshaped
        else:
            ga, gb = ga.double(), gb.double()
            params[name] = ((gb - ga).norm() / ga.norm().clamp(min=1e-30)).item()
    for name in b["grads"].keys() - a["grads"].keys():
        params[name] = float("inf")
    worst = max(params, key=params.get) if params else None
    grads_ok = bool(params) and params[worst] <= tolerance
    return {"iterations": iterations, "params": params, "worst_param": worst,
            "worst_param_rel_diff": params[worst] if worst else None, "grads_ok": grads_ok,
            "passed": same_count and grads_ok and all(r["ok"] for r in iterations)}
