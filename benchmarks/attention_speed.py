"""Attention speed: our flex and blockwise backends vs torch's scaled_dot_product_attention (SDPA).

    PYTHONPATH=. .venv/bin/python benchmarks/attention_speed.py [--device auto|cpu|cuda]
        [--seq-length S] [--heads 8 --groups 2 --head-dim 64] [--iters N]

Every method gets the same q [S, b, heads, d] and k, v [S, b, groups, d] (one sequence per batch
row, CP=1) and computes the same attention:

* flex       ``flex_context_parallel_attention`` (FlexAttention under ``torch.compile``), its
             ``BlockMask`` built once outside the timed region and passed in, as training does
             (one mask per micro-batch, reused by every layer). Its first call (the compile) is
             timed separately and reported as ``compile_seconds``.
* blockwise  ``context_parallel_attention`` (plain torch, blockwise log-sum-exp), default block
             (``min(1024, S/2)`` at CP=1) unless ``--block-size``.
* sdpa       ``torch.nn.functional.scaled_dot_product_attention`` on contiguous [b, h, S, d]
             copies (its natural layout, made outside the timed region): the fair peer.
             - causal, no documents: ``is_causal=True``. GQA via ``enable_gqa=True`` where this
               torch / kernel takes it, else K/V expanded per head with ``repeat_interleave``
               inside the timed call (reported as ``sdpa_gqa``).
             - documents (packed documents, ``--docs`` per sequence, random lengths): a dense
               bool mask [b, 1, S, S] (causal AND same document), built outside the timed region:
               what a user without a block-sparse kernel does.

Timings: every call first makes ``--warmup`` untimed calls (the first of which, the compile for
flex, is reported as ``first_call_seconds``); then the calls are timed interleaved, round after
round, each call once per round in a rotating order (so a change of load on a shared host hits all
methods alike), and each method's time is its median over ``--iters`` rounds (``--blockwise-iters``
for the slow blockwise backend). ``torch.cuda.synchronize`` around each call on CUDA. Forward
timings run under ``torch.no_grad()``; forward + backward times one forward and
``autograd.backward`` with a fixed output gradient, on fresh leaf inputs each call. The headline
is also given as the median of the per-round ratios (``ratio_paired``).

CPU mode (no CUDA, or ``--device cpu``): FlexAttention has no backward on CPU, so the headline is
forward only: ratio = compiled flex forward / SDPA forward (causal), goal <= 1.0. Extra fields:
blockwise forward, forward + backward of blockwise and SDPA, and the document-mask case.
Defaults S=4096, batch 1, 8 heads / 2 groups, head dim 64, fp32.

GPU mode (CUDA): ratio = flex forward + backward / SDPA-flash forward + backward (causal, inside
``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``), goal <= 1.25. Defaults S=32768, batch 1, 32 heads /
8 groups, head dim 128, bf16. Also: SDPA forward, blockwise forward + backward
(``--blockwise-iters``, few: it is slow), the document case forward + backward (flex vs SDPA with
a dense mask, restricted to the cuDNN / memory-efficient kernels: flash takes no mask and the math
fallback would materialise [b, heads, S, S] scores), and peak memory of each call above what was
allocated before it (``torch.cuda.max_memory_allocated``). Flex is not timed forward-only on CUDA
(a second compile for little information).

Prints a table, then as its last stdout line one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from typing import Optional

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402

from benchmarks import cpu_description  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_ext.model.cp_attention import (  # noqa: E402
    context_parallel_attention,
    default_block_size,
    visibility_keys,
)
from megatron_ext.model.flex_attention import (  # noqa: E402
    build_block_mask,
    flex_context_parallel_attention,
)

CPU_GOAL = 1.0
GPU_GOAL = 1.25
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def document_ids(batch: int, seq_len: int, docs: int, generator: torch.Generator) -> torch.Tensor:
    """[b, S] ids of ``docs`` packed documents per row, cut at random distinct positions."""
    rows = []
    for _ in range(batch):
        cuts = (torch.randperm(seq_len - 1, generator=generator)[:docs - 1] + 1).sort().values
        bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([seq_len])])
        rows.append(torch.repeat_interleave(torch.arange(docs), bounds.diff()))
    return torch.stack(rows)


def dense_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, S, S] bool, True = visible: causal and within the document."""
    s = doc_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


class Inputs:
    def __init__(self, args, device, dtype):
        g = torch.Generator().manual_seed(1234)
        s, b, h, ng, d = args.seq_length, args.batch, args.heads, args.groups, args.head_dim

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        # Ours: Megatron's sbhd layout.
        self.q, self.k, self.v = rand(s, b, h, d), rand(s, b, ng, d), rand(s, b, ng, d)
        self.grad = rand(s, b, h * d)
        # SDPA: its own contiguous bhsd layout, copied once, outside every timed region.
        self.qb, self.kb, self.vb = (t.permute(1, 2, 0, 3).contiguous()
                                     for t in (self.q, self.k, self.v))
        self.grad_b = self.grad.view(s, b, h, d).permute(1, 2, 0, 3).contiguous()
        self.docs = document_ids(b, s, args.docs, g).to(device)
        self.scale = 1.0 / math.sqrt(d)


# ------------------------------------------------------------------------------------------------
# The methods: each is fn(q, k, v) in its own layout
# ------------------------------------------------------------------------------------------------

def sdpa_gqa_mode(inputs: Inputs, backend_context, mask=None) -> str:
    """'enable_gqa' if SDPA (under ``backend_context``, with ``mask`` or causal) takes grouped
    K/V in forward and backward, else 'repeat_interleave'. Probed on the first 256 tokens."""
    n = min(256, inputs.qb.shape[2])
    q, k, v = (t[:, :, :n].detach().requires_grad_() for t in (inputs.qb, inputs.kb, inputs.vb))
    if q.shape[1] == k.shape[1]:
        return "none (heads == groups)"
    probe_mask = None if mask is None else mask[..., :n, :n]
    try:
        with backend_context():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=probe_mask,
                                                 is_causal=mask is None, enable_gqa=True)
            out.sum().backward()
        return "enable_gqa"
    except (TypeError, RuntimeError):
        return "repeat_interleave"


def make_sdpa(inputs: Inputs, gqa: str, mask, backend_context):
    repeats = inputs.qb.shape[1] // inputs.kb.shape[1]
    scale = inputs.scale

    def fn(q, k, v):
        kwargs = {}
        if gqa == "enable_gqa":
            kwargs["enable_gqa"] = True
        elif repeats > 1:
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        with backend_context():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  scale=scale, **kwargs)
    return fn


def make_flex(inputs: Inputs, block_mask):
    s = inputs.q.shape[0]

    def fn(q, k, v):
        return flex_context_parallel_attention(q, k, v, seq_len=s, cp_size=1, cp_rank=0,
                                               softmax_scale=inputs.scale, block_mask=block_mask)
    return fn


def make_blockwise(inputs: Inputs, docs, block_size):
    s = inputs.q.shape[0]

    def fn(q, k, v):
        return context_parallel_attention(q, k, v, seq_len=s, cp_size=1, cp_rank=0,
                                          softmax_scale=inputs.scale, query_document_ids=docs,
                                          key_document_ids=docs, max_block_size=block_size)
    return fn


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":  # (a no-op for the CPU tensors of a dry run of the GPU path)
        torch.cuda.synchronize()


def forward_call(fn, tensors):
    def run():
        with torch.no_grad():
            return fn(*tensors)
    return run


def forward_backward_call(fn, tensors, grad):
    def run():
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = fn(*leaves)
        torch.autograd.backward(out, grad)
    return run


class Timer:
    """Times several calls interleaved, so a change of load on a shared host hits all alike.

    ``add`` makes a call's first call (the compile, for flex; timed separately) and its other
    warm-up calls at once; on CUDA the last warm-up call gives its peak memory. ``run`` then times
    round after round, every call once per round (the order rotated each round; a call with fewer
    ``iters`` drops out after them), and keeps each call's median.
    """

    def __init__(self, device, warmup: int, cuda: bool):
        self.device, self.warmup, self.cuda = device, warmup, cuda
        self.calls, self.results, self.errors = {}, {}, {}

    def add(self, name: str, run, iters: int, required: bool = False,
            warmup: Optional[int] = None) -> None:
        print(f"  {name}: first call ...", file=sys.stderr, flush=True)
        warmup = self.warmup if warmup is None else max(1, warmup)
        cuda = self.cuda
        try:
            stats = {}
            for i in range(warmup):
                last = i == warmup - 1
                if cuda and last:  # the peak memory of the last warm-up call
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                _sync(self.device)
                start = time.perf_counter()
                run()
                _sync(self.device)
                if i == 0:
                    stats["first_call_seconds"] = time.perf_counter() - start
                if cuda and last:
                    stats["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / MIB
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if required:
                raise
            self._failed(name, exc)
            return
        self.calls[name] = (run, iters)
        self.results[name] = {**stats, "all_seconds": []}
        print(f"  {name}: first call {stats['first_call_seconds']:.2f} s", file=sys.stderr,
              flush=True)

    def _failed(self, name, exc) -> None:
        self.errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print(f"  {name}: FAILED {self.errors[name]}", file=sys.stderr, flush=True)
        if self.cuda:
            torch.cuda.empty_cache()

    def run(self) -> dict:
        names = list(self.calls)
        rounds = max((iters for _, iters in self.calls.values()), default=0)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                run, iters = self.calls[name]
                if r >= iters:
                    continue
                _sync(self.device)
                start = time.perf_counter()
                run()
                _sync(self.device)
                self.results[name]["all_seconds"].append(round(time.perf_counter() - start, 5))
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
        for name in names:
            stats = self.results[name]
            stats["seconds"] = statistics.median(stats["all_seconds"])
        return self.results


def max_abs_diff(ours_sbh: torch.Tensor, sdpa_bhsd: torch.Tensor) -> float:
    s, b = ours_sbh.shape[:2]
    ref = sdpa_bhsd.permute(2, 0, 1, 3).reshape(s, b, -1)
    return (ours_sbh.float() - ref.float()).abs().max().item()


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

def device_description(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_description()}, {torch.get_num_threads()} torch threads"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seq-length", type=int, default=None, help="default: 4096 CPU, 32768 GPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="default: 8 CPU, 32 GPU")
    p.add_argument("--groups", type=int, default=None, help="KV groups; default: 2 CPU, 8 GPU")
    p.add_argument("--head-dim", type=int, default=None, help="default: 64 CPU, 128 GPU")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 CPU, bfloat16 GPU")
    p.add_argument("--docs", type=int, default=8, help="packed documents per sequence")
    p.add_argument("--iters", type=int, default=None, help="timed calls; default 5 CPU, 10 GPU")
    p.add_argument("--blockwise-iters", type=int, default=None,
                   help="timed calls of the (slow) blockwise backend; default 3 CPU, 2 GPU")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (>= 1)")
    p.add_argument("--block-size", type=int, default=None,
                   help="blockwise max_block_size (default: the backend's, min(1024, S/2))")
    p.add_argument("--no-documents", dest="documents", action="store_false",
                   help="skip the document-mask case")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    defaults = dict(seq_length=32768 if gpu else 4096, heads=32 if gpu else 8,
                    groups=8 if gpu else 2, head_dim=128 if gpu else 64,
                    dtype="bfloat16" if gpu else "float32", iters=10 if gpu else 5,
                    blockwise_iters=2 if gpu else 3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.warmup = max(1, args.warmup)
    if args.heads % args.groups:
        p.error("--heads must be a multiple of --groups")
    if args.docs < 1 or args.docs > args.seq_length:
        p.error("--docs must lie in [1, seq-length]")
    return args


def _device(name: str) -> torch.device:
    return torch.device(name)


def run_benchmark(args) -> dict:
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    gpu = args.device == "cuda"
    inputs = Inputs(args, device, dtype)
    sdpa_tensors = (inputs.qb, inputs.kb, inputs.vb)
    ours_tensors = (inputs.q, inputs.k, inputs.v)
    block = default_block_size(args.seq_length, 1, args.block_size)

    if gpu:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        causal_context = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731
        # Flash takes no mask; keep SDPA off its math fallback, which would materialise
        # [b, heads, S, S] scores (64 GiB at 32K).
        docs_context = lambda: sdpa_kernel(  # noqa: E731
            [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    else:
        causal_context = docs_context = contextlib.nullcontext
    gqa = {"causal": sdpa_gqa_mode(inputs, causal_context)}

    timer = Timer(device, args.warmup, cuda=gpu)
    errors, diffs, mask_seconds = timer.errors, {}, {}
    it, bit = args.iters, args.blockwise_iters
    record = timer.add

    def compare(label, ours_fn, sdpa_fn):
        """Largest |ours - SDPA| of the forward outputs. On CUDA flex runs with grad-enabled inputs:
        the graph its forward + backward timing compiled (no extra forward-only compile)."""
        try:
            with torch.no_grad():
                reference = sdpa_fn(*sdpa_tensors)
            with torch.set_grad_enabled(gpu):
                tensors = [t.detach().requires_grad_(gpu) for t in ours_tensors]
                diffs[label] = max_abs_diff(ours_fn(*tensors).detach(), reference)
        except (RuntimeError, MemoryError) as exc:
            errors[f"compare_{label}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"

    # ---- causal, no documents ----
    start = time.perf_counter()
    causal_mask = build_block_mask(args.seq_length, 1, 0, causal=True, device=device)
    _sync(device)
    mask_seconds["flex_causal_block_mask"] = time.perf_counter() - start
    flex = make_flex(inputs, causal_mask)
    sdpa = make_sdpa(inputs, gqa["causal"], None, causal_context)
    blockwise = make_blockwise(inputs, None, args.block_size)

    if gpu:  # headline: forward + backward (forward-only would cost flex a second compile)
        record("flex_fwd_bwd", forward_backward_call(flex, ours_tensors, inputs.grad), it, True)
        record("sdpa_fwd_bwd", forward_backward_call(sdpa, sdpa_tensors, inputs.grad_b), it, True)
        record("sdpa_fwd", forward_call(sdpa, sdpa_tensors), it)
        record("blockwise_fwd_bwd", forward_backward_call(blockwise, ours_tensors, inputs.grad),
               bit, warmup=1)  # slow at 32K: its first call is its only warm-up
    else:  # headline: forward (FlexAttention has no CPU backward)
        record("flex_fwd", forward_call(flex, ours_tensors), it, True)
        record("sdpa_fwd", forward_call(sdpa, sdpa_tensors), it, True)
        record("blockwise_fwd", forward_call(blockwise, ours_tensors), bit)
        record("sdpa_fwd_bwd", forward_backward_call(sdpa, sdpa_tensors, inputs.grad_b), it)
        record("blockwise_fwd_bwd", forward_backward_call(blockwise, ours_tensors, inputs.grad),
               bit)
    compare("flex_causal", flex, sdpa)
    compare("blockwise_causal", blockwise, sdpa)

    # ---- packed documents ----
    if args.documents:
        keys = visibility_keys(inputs.docs)
        start = time.perf_counter()
        doc_block_mask = build_block_mask(args.seq_length, 1, 0, causal=True, query_keys=keys,
                                          key_keys=keys, branches=False, device=device)
        _sync(device)
        mask_seconds["flex_docs_block_mask"] = time.perf_counter() - start
        start = time.perf_counter()
        bool_mask = dense_mask(inputs.docs)
        _sync(device)
        mask_seconds["sdpa_docs_dense_mask"] = time.perf_counter() - start
        gqa["docs"] = sdpa_gqa_mode(inputs, docs_context, bool_mask)
        flex_d = make_flex(inputs, doc_block_mask)
        sdpa_d = make_sdpa(inputs, gqa["docs"], bool_mask, docs_context)
        blockwise_d = make_blockwise(inputs, inputs.docs, args.block_size)

        if gpu:
            record("flex_docs_fwd_bwd", forward_backward_call(flex_d, ours_tensors, inputs.grad),
                   it)
            record("sdpa_docs_fwd_bwd",
                   forward_backward_call(sdpa_d, sdpa_tensors, inputs.grad_b), it)
        else:
            record("flex_docs_fwd", forward_call(flex_d, ours_tensors), it)
            record("sdpa_docs_fwd", forward_call(sdpa_d, sdpa_tensors), it)
            record("blockwise_docs_fwd", forward_call(blockwise_d, ours_tensors), bit)
            record("sdpa_docs_fwd_bwd",
                   forward_backward_call(sdpa_d, sdpa_tensors, inputs.grad_b), it)
            record("blockwise_docs_fwd_bwd",
                   forward_backward_call(blockwise_d, ours_tensors, inputs.grad), bit)
        compare("flex_docs", flex_d, sdpa_d)
        if not gpu:
            compare("blockwise_docs", blockwise_d, sdpa_d)
        del bool_mask

    results = timer.run()
    return {"results": results, "errors": errors, "diffs": diffs, "mask_seconds": mask_seconds,
            "block": block, "gqa": gqa}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = _device(args.device)
    gpu = args.device == "cuda"
    description = device_description(device)
    shape = {"seq_length": args.seq_length, "batch": args.batch, "heads": args.heads,
             "groups": args.groups, "head_dim": args.head_dim, "dtype": args.dtype,
             "docs_per_sequence": args.docs if args.documents else None}
    print(f"attention_speed on {description}: {json.dumps(shape)}", file=sys.stderr, flush=True)
    wall = time.perf_counter()
    out = run_benchmark(args)
    wall = time.perf_counter() - wall
    r = out["results"]
    sec = {name: round(stats["seconds"], 5) for name, stats in r.items()}

    def ratio(a, b):
        return round(r[a]["seconds"] / r[b]["seconds"], 4) if a in r and b in r else None

    if gpu:
        headline, goal, mode = ratio("flex_fwd_bwd", "sdpa_fwd_bwd"), GPU_GOAL, "gpu-fwd-bwd"
        baseline = "SDPA flash attention (sdpa_kernel(FLASH_ATTENTION)), is_causal=True"
    else:
        headline, goal, mode = ratio("flex_fwd", "sdpa_fwd"), CPU_GOAL, "cpu-forward"
        baseline = "SDPA is_causal=True, forward under no_grad"
    ratios = {
        "blockwise_fwd / sdpa_fwd": ratio("blockwise_fwd", "sdpa_fwd"),
        "flex_fwd / sdpa_fwd": ratio("flex_fwd", "sdpa_fwd"),
        "flex_fwd_bwd / sdpa_fwd_bwd": ratio("flex_fwd_bwd", "sdpa_fwd_bwd"),
        "blockwise_fwd_bwd / sdpa_fwd_bwd": ratio("blockwise_fwd_bwd", "sdpa_fwd_bwd"),
        "flex_docs_fwd / sdpa_docs_fwd": ratio("flex_docs_fwd", "sdpa_docs_fwd"),
        "blockwise_docs_fwd / sdpa_docs_fwd": ratio("blockwise_docs_fwd", "sdpa_docs_fwd"),
        "flex_docs_fwd_bwd / sdpa_docs_fwd_bwd": ratio("flex_docs_fwd_bwd", "sdpa_docs_fwd_bwd"),
        "blockwise_docs_fwd_bwd / sdpa_docs_fwd_bwd": ratio("blockwise_docs_fwd_bwd",
                                                            "sdpa_docs_fwd_bwd"),
    }
    ratios = {k: v for k, v in ratios.items() if v is not None}
    pair = ("flex_fwd_bwd", "sdpa_fwd_bwd") if gpu else ("flex_fwd", "sdpa_fwd")
    paired = statistics.median(a / b for a, b in zip(r[pair[0]]["all_seconds"],
                                                     r[pair[1]]["all_seconds"]))

    print(f"\n| call | median s | first call s{' | peak MiB' if gpu else ''} |", flush=True)
    print(f"|---|---|---{'|---' if gpu else ''}|")
    for name, stats in r.items():
        peak = f" | {stats.get('peak_mib', float('nan')):.1f}" if gpu else ""
        print(f"| {name} | {stats['seconds']:.4f} | {stats['first_call_seconds']:.2f}{peak} |")
    print(f"\nratios: {json.dumps(ratios)}")
    print(f"max |ours - SDPA| of the forward outputs: {json.dumps(out['diffs'])}")
    print(f"headline ({mode}): {headline} (goal <= {goal}: "
          f"{'met' if headline is not None and headline <= goal else 'NOT met'})\n", flush=True)

    summary = {
        "benchmark": "attention_speed", "ratio": headline, "goal": f"<= {goal}",
        "ratio_paired": round(paired, 4), "device": description, "mode": mode,
        "baseline": baseline, "shape": shape,
        "blockwise_block": out["block"], "sdpa_gqa": out["gqa"],
        "seconds": sec, "ratios": ratios, "errors": out["errors"] or None,
        "compile_seconds": {name: round(r[name]["first_call_seconds"], 2)
                            for name in r if name.startswith("flex")},
        "mask_build_seconds": {k: round(v, 4) for k, v in out["mask_seconds"].items()},
        "max_abs_diff_vs_sdpa": {k: float(f"{v:.3g}") for k, v in out["diffs"].items()},
        "iters": {"flex_sdpa": args.iters, "blockwise": args.blockwise_iters,
                  "warmup": args.warmup},
        "all_seconds": {name: stats["all_seconds"] for name, stats in r.items()},
        "wall_seconds": round(wall, 1), "torch": torch.__version__,
    }
    if gpu:
        summary["peak_mib"] = {name: round(stats["peak_mib"], 1) for name, stats in r.items()
                               if "peak_mib" in stats}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
