"""Peak memory and time per rank under context parallelism, CP=1 vs CP=2 (vs ...), same block size.

    PYTHONPATH=. .venv/bin/python benchmarks/cp_attention.py [--seq-length 4096 --heads 8
        --head-dim 64 --block-size 512 --layers 4 --vocab 8192 --cp-sizes 1 2 --iters 3]

For every CP size the script launches ``torchrun --nproc-per-node CP`` on this same file
(``--worker``). Every CP size gets the same attention block (``--block-size``, passed as
``max_block_size``; it must not exceed one CP chunk S/(2*CP) of the largest CP size, so no CP
size gets smaller blocks than another). Every rank measures, on its slice of one sequence of
``--seq-length`` tokens (causal, GQA as configured):

* the whole model: a small real Megatron ``GPTModel`` (``PositionIdsGPTModel``, local layer spec
  with our blockwise core attention ``TorchContextParallelAttention`` at that block size; RoPE,
  RMSNorm, ``--layers`` layers, hidden = heads * head dim, FFN 4 x hidden, ``--vocab`` tokens)
  running forward + backward of the summed per-token loss on the rank's tokens. Its activation
  peak = the high-water mark of tensor bytes allocated during one forward + backward (activations
  saved for backward, logits, attention temporaries, gathered keys/values, transient weight
  gradients), plus the rank's token / label / position tensors. Parameters and their ``.grad``
  buffers are allocated before (by a warm-up step, as a DDP grad buffer would be) and are not
  counted: they do not depend on CP.
* attention alone: ``TorchContextParallelAttention`` forward + backward; its peak = this rank's
  inputs (q, k, v, output gradient) plus the high-water mark of tensor bytes allocated during one
  forward + backward (gathered keys/values, saved tensors, block temporaries, gradients).

Tensor bytes: on CPU a TorchDispatchMode follows every tensor storage to its release (exact and
allocator-independent); on CUDA, ``torch.cuda.max_memory_allocated``. Also the process's
resident-memory high-water mark over the same call (CPU cross-check; includes allocator and gloo
buffers), with glibc told to return large blocks at once. Time: median wall time of a forward +
backward after a warm-up, started from a barrier.

At CP=1 it also measures a naive full-matrix attention (one [b, heads, S, S] score matrix, what
Megatron's local DotProductAttention does) for reference. Headline: ratio = whole-model activation
peak per rank at CP=2 / at CP=1, goal <= 0.6; the attention-only ratio is reported beside it. The
last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import weakref

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # `torchrun benchmarks/cp_attention.py` puts benchmarks/ first
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402

from benchmarks import cpu_description  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from megatron_ext.model.cp_attention import default_block_size  # noqa: E402

MIB = 1024 * 1024
GOAL = 0.6  # whole-model activation peak per rank, CP=2 / CP=1


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------

class LiveTensorBytes(TorchDispatchMode):
    """High-water mark of bytes held by tensor storages created while the mode is active.

    Each new storage is counted once (views share it) and uncounted when its Python storage object
    dies, which PyTorch ties to the storage's real lifetime.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage.data_ptr()
        if key in self._tracked or storage.nbytes() == 0:
            return
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        release = lambda _ref, key=key, n=nbytes: self._release(key, n)  # noqa: E731
        self._tracked[key] = weakref.ref(storage, release)

    def _release(self, key, nbytes) -> None:
        self.live -= nbytes
        self._tracked.pop(key, None)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def resident_peak_bytes(run) -> int:
    """Resident-memory high-water mark of ``run()`` above the resident size before it (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _proc_status_kib("VmRSS")
    run()
    return (_proc_status_kib("VmHWM") - before) * 1024


def peak_tensor_bytes(run, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    tracker = LiveTensorBytes()
    with tracker:
        run()
    return tracker.peak


def median_seconds(run, iters: int, device: torch.device) -> float:
    times = []
    for _ in range(iters):
        torch.distributed.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# Worker: one rank
# ------------------------------------------------------------------------------------------------

def naive_full_attention(q, k, v):
    """One [b, heads, S, S] score matrix: the memory CP exists to avoid."""
    s, b, heads, d = q.shape
    k = k.repeat_interleave(heads // k.shape[2], dim=2)
    v = v.repeat_interleave(heads // v.shape[2], dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(d)
    hidden = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(s, b, heads * d)


def forward_backward(attention, q, k, v, grad_out):
    def run():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attention(*inputs)
        torch.autograd.backward(out, grad_out)
    return run


def model_config(args, cp: int):
    from megatron.core.transformer import TransformerConfig

    hidden = args.heads * args.head_dim
    return TransformerConfig(
        num_layers=max(1, args.layers), hidden_size=hidden, num_attention_heads=args.heads,
        num_query_groups=args.groups, kv_channels=args.head_dim, ffn_hidden_size=4 * hidden,
        attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
        normalization="RMSNorm", context_parallel_size=cp, params_dtype=getattr(torch, args.dtype),
        bf16=args.dtype == "bfloat16", fp16=args.dtype == "float16",
        bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False)


def build_gpt(args, cp: int, device):
    """A small real GPTModel: local spec, our blockwise core attention at ``--block-size``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_ext.model.cp_attention import TorchContextParallelAttention
    from megatron_ext.model.rotary import PositionIdsGPTModel

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=TorchContextParallelAttention, params={"max_block_size": args.block_size})
    torch.manual_seed(2)  # the same weights at every CP size
    model = PositionIdsGPTModel(config=model_config(args, cp), transformer_layer_spec=spec,
                                vocab_size=args.vocab, max_sequence_length=args.seq_length,
                                position_embedding_type="rope", rotary_base=10000,
                                share_embeddings_and_output_weights=False)
    return model.to(device)


def model_forward_backward(model, batch):
    def run():
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        loss.sum().backward()
    return run


def worker(args) -> None:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ext import parallel
    from megatron_ext.parallel.cp_layout import cp_token_indices, slice_for_cp
    from megatron_ext.model.cp_attention import TorchContextParallelAttention

    world = int(os.environ["WORLD_SIZE"])
    _, plat = parallel.initialize(cp=world)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    cp = parallel_state.get_context_parallel_world_size()
    rank = parallel_state.get_context_parallel_rank()
    device = plat.device(int(os.environ.get("LOCAL_RANK", "0")))
    dtype = getattr(torch, args.dtype)
    results = {}

    # ---- the whole model ----
    if args.layers > 0:
        model = build_gpt(args, cp, device)
        generator = torch.Generator().manual_seed(4321)
        full = {"tokens": torch.randint(0, args.vocab, (args.batch, args.seq_length),
                                        generator=generator),
                "labels": torch.randint(0, args.vocab, (args.batch, args.seq_length),
                                        generator=generator),
                "position_ids": torch.arange(args.seq_length).repeat(args.batch, 1)}
        batch = {k: v.to(device) for k, v in slice_for_cp(full, cp, rank).items()}
        run = model_forward_backward(model, batch)
        # Warm-up: lazy initialisation, and every parameter's .grad allocated (as a DDP grad
        # buffer would be), so the measured step counts activations, not parameter gradients.
        run()
        batch_bytes = sum(t.untyped_storage().nbytes() for t in batch.values())
        stats = {"peak_tensor_bytes": batch_bytes + peak_tensor_bytes(run, device),
                 "seconds": median_seconds(run, args.model_iters, device),
                 "parameter_bytes": sum(p.numel() * p.element_size()
                                        for p in model.parameters())}
        if device.type == "cpu":
            stats["peak_resident_bytes"] = resident_peak_bytes(run)
        results["model"] = stats
        del model, run, batch

    # ---- attention alone ----
    config = model_config(args, cp)
    module = TorchContextParallelAttention(config, 1, AttnMaskType.causal, "self",
                                           max_block_size=args.block_size)
    attention = lambda q, k, v: module(q, k, v, None)  # noqa: E731

    # Only this rank's slice is created, so the full sequence never sits on one rank.
    generator = torch.Generator().manual_seed(1234)
    local = cp_token_indices(args.seq_length, cp, rank)
    def local_slice(heads):
        full = torch.randn(args.seq_length, args.batch, heads, args.head_dim, generator=generator)
        return full[local].to(device=device, dtype=dtype)
    q, k, v = local_slice(args.heads), local_slice(args.groups), local_slice(args.groups)
    grad_out = torch.randn(len(local), args.batch, args.heads * args.head_dim,
                           generator=generator).to(device=device, dtype=dtype)

    results["torch_cp"] = measure(attention, (q, k, v, grad_out), args, device)
    if cp == 1 and args.naive:
        results["naive_full"] = measure(naive_full_attention, (q, k, v, grad_out), args, device)

    # Report the worst rank (they should be equal: the layout balances the causal work).
    for stats in results.values():
        for key in list(stats):
            value = torch.tensor([stats[key]], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
            stats[key] = value.item()
    if rank == 0:
        print("RESULT " + json.dumps({"cp": cp, "block": default_block_size(args.seq_length, cp,
                                                                            args.block_size),
                                      **results}), flush=True)
    parallel.destroy()


def measure(attention, tensors, args, device) -> dict:
    run = forward_backward(attention, *tensors)
    run()  # warm-up: lazy initialisation, allocator growth
    # The inputs (this rank's q, k, v and output gradient) count too: they shrink with CP as well.
    input_bytes = sum(t.untyped_storage().nbytes() for t in tensors)
    stats = {"peak_tensor_bytes": input_bytes + peak_tensor_bytes(run, device),
             "seconds": median_seconds(run, args.iters, device)}
    if device.type == "cpu":
        stats["peak_resident_bytes"] = resident_peak_bytes(run)
    return stats


# ------------------------------------------------------------------------------------------------
# Driver: one torchrun per CP size, then the report
# ------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cp_size(cp: int, argv) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cp),
           "--master-port", str(_free_port()), os.path.abspath(__file__), "--worker", *argv]
    env = {**os.environ, "PYTHONPATH": _REPO_ROOT,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           # Large blocks straight from / back to the OS, so resident memory follows live memory.
           "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, cwd=_REPO_ROOT, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"CP={cp} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def device_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (1 GPU per rank)"
    return f"{cpu_description()}, 1 torch thread per rank"


def report(args, runs: dict) -> dict:
    rows = []
    ratios = {}
    for kind, label in (("model", f"GPT model ({args.layers} layers), activations"),
                        ("torch_cp", "torch CP attention")):
        if kind not in runs[1]:
            continue
        baseline = runs[1][kind]["peak_tensor_bytes"]
        for cp, result in sorted(runs.items()):
            stats = result[kind]
            rows.append((f"{label}, CP={cp}", result["block"], stats,
                         stats["peak_tensor_bytes"] / baseline))
        if 2 in runs:
            ratios[kind] = runs[2][kind]["peak_tensor_bytes"] / baseline
    if "naive_full" in runs[1]:
        stats = runs[1]["naive_full"]
        rows.append(("naive full-matrix attention, 1 rank", None, stats,
                     stats["peak_tensor_bytes"] / runs[1]["torch_cp"]["peak_tensor_bytes"]))
    return {"rows": rows, "ratio": ratios.get("model"), "attention_ratio": ratios.get("torch_cp")}


def markdown(args, summary, device: str) -> str:
    hidden = args.heads * args.head_dim
    config = (f"S={args.seq_length}, batch {args.batch}, {args.heads} heads "
              f"({args.groups} KV groups), head dim {args.head_dim}, {args.dtype}, causal, "
              f"attention block {args.block_size} at every CP size; model: {args.layers} layers, "
              f"hidden {hidden}, FFN {4 * hidden}, vocabulary {args.vocab}")
    lines = [
        "",
        "## cp_attention: context-parallel peak memory and time per rank, same block size",
        "",
        f"`benchmarks/cp_attention.py` ({datetime.date.today().isoformat()}, {device}). {config}.",
        "Forward + backward on each rank's slice; CP ranks are separate gloo processes. Model",
        "activation peak = high-water mark of tensor bytes allocated during one forward + backward",
        "of a real GPTModel (our blockwise core attention) + the rank's token tensors; parameters",
        "and their .grad buffers exist before and are not counted. Attention peak = the rank's",
        "inputs (q, k, v, output gradient) + the high-water mark during one forward + backward of",
        "`TorchContextParallelAttention`. Counted per storage by a TorchDispatchMode. Resident = the",
        "process's RSS high-water mark over the same call, above the RSS before it.",
        f"Times = median of {args.model_iters} (model) / {args.iters} (attention) runs. Headline "
        f"ratio = model activation peak per rank at CP=2 / CP=1, goal <= {GOAL}.",
        "",
        "| what | block | peak tensor MiB / rank | vs CP=1 | peak resident MiB / rank "
        "| fwd+bwd s / rank |",
        "|---|---|---|---|---|---|",
    ]
    for name, block, stats, relative in summary["rows"]:
        resident = stats.get("peak_resident_bytes")
        resident_mib = "n/a" if resident is None else f"{resident / MIB:.1f}"
        lines.append(f"| {name} | {block if block is not None else '-'} | "
                     f"{stats['peak_tensor_bytes'] / MIB:.1f} | {relative:.3f} | "
                     f"{resident_mib} | {stats['seconds']:.3f} |")
    if summary["ratio"] is not None:
        met = "met" if summary["ratio"] <= GOAL else "NOT met"
        lines += ["", f"Headline: ratio = {summary['ratio']:.3f} (goal <= {GOAL}: {met}); "
                      f"attention alone {summary['attention_ratio']:.3f}."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=None, help="KV groups (default: --heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--block-size", "--max-block-size", dest="block_size", type=int, default=512,
                   help="attention block (max_block_size) for every CP size; at most one CP "
                        "chunk S/(2*CP) of the largest CP size")
    p.add_argument("--layers", type=int, default=4,
                   help="layers of the GPT model measured (0: attention only)")
    p.add_argument("--vocab", type=int, default=8192, help="the GPT model's vocabulary")
    p.add_argument("--cp-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--iters", type=int, default=3, help="timed attention runs")
    p.add_argument("--model-iters", type=int, default=2, help="timed model steps")
    p.add_argument("--no-naive", dest="naive", action="store_false",
                   help="skip the naive full-matrix reference at CP=1")
    p.add_argument("--append-results", action="store_true",
                   help="append a section to benchmarks/RESULTS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.groups = args.groups or args.heads
    if 1 not in args.cp_sizes:
        p.error("--cp-sizes must include 1 (the baseline)")
    smallest_chunk = args.seq_length // (2 * max(args.cp_sizes))
    if args.block_size < 1 or args.block_size > smallest_chunk:
        p.error(f"--block-size must lie in [1, {smallest_chunk}] (one CP chunk at CP="
                f"{max(args.cp_sizes)}), so every CP size uses the same block")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    worker_argv = [a for a in argv if a != "--append-results"]
    runs = {}
    for cp in args.cp_sizes:
        runs[cp] = run_cp_size(cp, worker_argv)
        print(f"CP={cp}: {json.dumps(runs[cp])}", flush=True)
    device = device_description()
    summary = report(args, runs)
    text = markdown(args, summary, device)
    print(text)
    if args.append_results:
        with open(os.path.join(_REPO_ROOT, "benchmarks", "RESULTS.md"), "a") as f:
            f.write(text)
    print(json.dumps({"benchmark": "cp_attention", "ratio": summary["ratio"],
                      "goal": f"<= {GOAL}", "device": device,
                      "measure": "whole-model activation peak per rank, CP=2 / CP=1",
                      "attention_only_ratio": summary["attention_ratio"],
                      "block_size": args.block_size,
                      "model": {"layers": args.layers, "hidden": args.heads * args.head_dim,
                                "heads": args.heads, "groups": args.groups,
                                "vocab": args.vocab, "seq_length": args.seq_length,
                                "dtype": args.dtype},
                      "model_peak_mib_per_rank": {
                          str(cp): runs[cp]["model"]["peak_tensor_bytes"] / MIB
                          for cp in sorted(runs) if "model" in runs[cp]},
                      "model_seconds_per_rank": {
                          str(cp): runs[cp]["model"]["seconds"]
                          for cp in sorted(runs) if "model" in runs[cp]},
                      "attention_peak_mib_per_rank": {
                          str(cp): runs[cp]["torch_cp"]["peak_tensor_bytes"] / MIB
                          for cp in sorted(runs)},
                      "attention_seconds_per_rank": {str(cp): runs[cp]["torch_cp"]["seconds"]
                                                     for cp in sorted(runs)}}), flush=True)

if __name__ == "__main__":
    main()
