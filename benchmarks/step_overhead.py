"""Per-iteration cost of megatron_ext's training loop against a bare Megatron-Core loop.

    torchrun --nproc-per-node 2 benchmarks/step_overhead.py [training flags ...]

Both loops train the same model (built by ``build_model_and_optimizer`` from the same seed, so the
weights are identical) on the same global batches with the same layout, in one process group:

* "ours": ``megatron_ext.train.setup()`` and the real ``train()`` function - our MicroBatchIterator
  reading from the dataset, ``train_step()``, the loss reduction for logging, a log line and a
  MetricsWriter record to a temporary JSONL file per iteration (``--log-interval 1``).
* "bare": the loop written directly against Megatron-Core: batches fetched up front into a list of
  tensors, a minimal forward step and masked-sum loss (the calculate_per_token_loss contract),
  ``get_forward_backward_func()``, ``optimizer.step()``, ``scheduler.step(1)`` and nothing else.

After a warm-up of each, the loops alternate every iteration (bare, ours, ours, bare, ...) so
that changes in machine speed - other jobs on a shared host - hit both alike. Each timed iteration
starts from a barrier and is timed with perf_counter on rank 0; for ours that is one whole
``train()`` call of one iteration (``--exit-interval``), so train()'s per-call bookkeeping counts
against us. We report medians; the last stdout line (rank 0) is one JSON object with
ratio = median(ours) / median(bare).

``--mfu`` switches the defaults to a ~1B Llama-style model at 8K sequence length in bf16 and adds
model FLOPs utilisation against the GPU's dense bf16 peak (meant for a GPU run).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `torchrun benchmarks/step_overhead.py` puts benchmarks/ on sys.path, not the repository.
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from megatron_ext import arguments, parallel  # noqa: E402
from megatron_ext.parallel import device_platform as platform  # noqa: E402
from megatron_ext import train as train_mod  # noqa: E402
from dev.demo_data import prepare_demo_data  # noqa: E402
from megatron_ext.data.gpt_data import MicroBatchIterator  # noqa: E402
from megatron_ext.metrics import MetricsWriter  # noqa: E402

# Small enough that ~36 iterations plus setup fit in a few minutes on 2 CPU cores.
CPU_DEFAULTS = dict(num_layers=4, hidden_size=256, num_attention_heads=8, seq_length=512,
                    micro_batch_size=2, global_batch_size=4)
# ~1.0B parameters with the 32k demo vocabulary (Llama-3.2-1B shape), 8K context, bf16.
MFU_DEFAULTS = dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                    num_query_groups=8, seq_length=8192, micro_batch_size=1, global_batch_size=4,
                    bf16=True)
# Dense bf16 tensor-core peaks (TFLOP/s) of the SXM parts; override with --peak-tflops.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


# ----------------------------------------------------------------------------------------------
# Arguments and data
# ----------------------------------------------------------------------------------------------

def build_parser(mfu: bool):
    p = arguments.build_parser(prog="benchmarks/step_overhead.py")
    g = p.add_argument_group("benchmark")
    g.add_argument("--warmup-iters", type=int, default=3,
                   help="untimed iterations of each loop before timing")
    g.add_argument("--timed-iters", type=int, default=15,
                   help="timed iterations of each loop (--train-iters is set to warm-up + this)")
    g.add_argument("--mfu", action="store_true",
                   help="~1B model at 8K sequence in bf16; report MFU (GPU)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s per device for MFU (default: known H100/H200 value)")
    # None means "decide from the world size" (see default_tensor_parallel_size).
    p.set_defaults(tensor_model_parallel_size=None, **(MFU_DEFAULTS if mfu else CPU_DEFAULTS))
    return p


def parse_args(argv: Optional[Sequence[str]], world_size: int):
    """Parse flags (not yet validated: the demo data may still have to be prepared)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(mfu="--mfu" in argv)
    args = parser.parse_args(argv)
    if args.tensor_model_parallel_size is None:
        args.tensor_model_parallel_size = default_tensor_parallel_size(args, world_size)
    if args.warmup_iters < 1 or args.timed_iters < 1:
        parser.error("need --warmup-iters >= 1 and --timed-iters >= 1")
    if args.pipeline_model_parallel_size != 1:
        # The bare loop feeds one iterator; interleaved/pipelined schedules would need per-stage
        # iterators, which this overhead comparison does not need.
        parser.error("this benchmark compares PP=1 loops; use --pipeline-model-parallel-size 1")
    if args.mfu and platform.detect(args.device).is_cpu and args.peak_tflops is None:
        parser.error("--mfu compares against a GPU's peak; on CPU also pass --peak-tflops")
    # The LR schedule and the dataset length span exactly what both loops consume.
    args.train_iters = args.warmup_iters + args.timed_iters
    args.lr_decay_iters = None
    args.log_interval = 1  # log every iteration, as the overhead we want to see includes it
    args.eval_interval, args.save, args.load = None, None, None
    return args, parser


def default_tensor_parallel_size(args, world_size: int) -> int:
    """TP=2 on two (or any even number of) ranks, else TP=1; --mfu defaults to pure DP."""
    if args.mfu or world_size % 2 or args.num_attention_heads % 2:
        return 1
    return 2


def resolve_demo_data(args) -> None:
    """Fill --data-path/--tokenizer-* with the demo blend, preparing it once on rank 0.

    Rank 0 prepares (others would only wait on its lock) and broadcasts the paths.
    """
    if args.data_path and args.tokenizer_model:
        return
    result = [None]
    if parallel.is_rank0():
        result[0] = prepare_demo_data(workers=min(2, os.cpu_count() or 1))
    torch.distributed.broadcast_object_list(result, src=0)
    data_path, tokenizer_model = result[0]
    args.data_path = args.data_path or data_path.split()
    if args.tokenizer_model is None:
        args.tokenizer_model = tokenizer_model
        args.tokenizer_type = args.tokenizer_type or "SentencePieceTokenizer"


# ----------------------------------------------------------------------------------------------
# The bare Megatron-Core loop
# ----------------------------------------------------------------------------------------------

def masked_sum_loss(loss_mask, per_token_loss):
    """(sum, count, report) - Megatron-Core's calculate_per_token_loss contract."""
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(per_token_loss.reshape(-1).float() * mask)
    count = mask.sum()
    return loss, count.to(torch.int), {"lm loss": torch.stack([loss.detach(), count.detach()])}


def bare_forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, functools.partial(masked_sum_loss, batch["loss_mask"])


class BareLoop:
    """The same model, optimizer and schedule, driven with nothing but Megatron-Core calls."""

    def __init__(self, cfg, plat, dataset, device):
        self.cfg = cfg
        self.device = device
        # Same seed and builder as setup(): the weights start identical to ours.
        train_mod.set_seeds(cfg.training.seed)
        self.model, self.optimizer, self.scheduler = train_mod.build_model_and_optimizer(
            cfg, device, plat.is_cpu)
        self.batches = iter(self.prefetch(dataset))
        self.forward_backward = get_forward_backward_func()
        self.losses: List[float] = []

    def prefetch(self, dataset) -> List[Dict[str, torch.Tensor]]:
        """This rank's micro-batches for every iteration, in Megatron-LM's sampler order."""
        a = self.cfg.training
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        batches = []
        for iteration in range(a.train_iters):
            for micro in range(a.num_microbatches):
                first = (iteration * a.global_batch_size + micro * a.micro_batch_size * dp_size
                         + dp_rank * a.micro_batch_size)
                samples = [dataset[i] for i in range(first, first + a.micro_batch_size)]
                batches.append({k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(self.device)
                                for k in BATCH_KEYS})
        return batches

    def step(self):
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self.forward_backward(
            forward_step_func=bare_forward_step, data_iterator=self.batches, model=self.model,
            num_microbatches=self.cfg.training.num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size, forward_only=False)
        self.optimizer.step()
        self.scheduler.step(1)
        return reports

    def record_loss(self, reports) -> None:
        """For the loss check only; called outside the timed region."""
        self.losses.append(global_loss(reports))


def global_loss(reports) -> float:
    total = torch.stack([r["lm loss"] for r in reports]).sum(dim=0).double()
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()


def sync(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Our loop: the real train(), one iteration per call
# ----------------------------------------------------------------------------------------------

class OursLoop:
    def __init__(self, s, jsonl_path: Optional[str]):
        self.s = s
        self.jsonl_path = jsonl_path
        self.writer = MetricsWriter(parallel.is_rank0(), jsonl_path, None)

    def run_one(self) -> None:
        # train() stops at --exit-interval; the LR schedule still spans --train-iters.
        training = dataclasses.replace(self.s.cfg.training, exit_interval=self.s.iteration + 1)
        self.s.cfg = dataclasses.replace(self.s.cfg, training=training)
        train_mod.train(self.s, self.writer)

    def losses(self) -> Dict[int, float]:
        """Loss per iteration, read back from the JSONL that train() wrote (rank 0)."""
        self.writer.close()
        with open(self.jsonl_path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return {r["iteration"]: r["loss"] for r in rows if "kind" not in r}


def time_data_iterator(s, iterations: int) -> float:
    """Median seconds our MicroBatchIterator takes to produce one iteration's micro-batches."""
    data = MicroBatchIterator(s.train_data, s.layout, start_iteration=0)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        for _ in range(s.cfg.training.num_microbatches):
            next(data)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# Measurement plan, MFU and report
# ----------------------------------------------------------------------------------------------

def timed(run_one, on_gpu: bool):
    """(seconds, result) of one iteration, started together on all ranks, finished on the device."""
    torch.distributed.barrier()
    sync(on_gpu)
    start = time.perf_counter()
    result = run_one()
    sync(on_gpu)
    return time.perf_counter() - start, result


def timed_bare(bare: BareLoop, on_gpu: bool) -> float:
    seconds, reports = timed(bare.step, on_gpu)
    bare.record_loss(reports)
    return seconds


def measure(args, ours: OursLoop, bare: BareLoop, on_gpu: bool):
    """Warm both loops up, then alternate them; returns (ours, bare) per-iteration seconds."""
    for _ in range(args.warmup_iters):
        timed_bare(bare, on_gpu)
        ours.run_one()
    ours_times, bare_times = [], []
    for index in range(args.timed_iters):
        # ABBA order, so neither loop always runs right after the other.
        if index % 2 == 0:
            bare_times.append(timed_bare(bare, on_gpu))
            ours_times.append(timed(ours.run_one, on_gpu)[0])
        else:
            ours_times.append(timed(ours.run_one, on_gpu)[0])
            bare_times.append(timed_bare(bare, on_gpu))
    return ours_times, bare_times


def megatron_flops_per_iteration(cfg) -> float:
    """Model FLOPs of one global batch: Megatron-LM's num_floating_point_operations (dense GPT).

    12 = 3 (forward, weight-grad, data-grad GEMMs) x 2 (multiply-add) x 2 (GEMM pairs in a
    layer). The s/h attention term is the QK^T and AV products over the full (not causal-halved)
    score matrix, i.e. 12*L*h*s FLOPs per token, as in the classic formula; the last term is the
    output-layer logits.
    """
    m = cfg.model
    b, s, L, h = cfg.training.global_batch_size, m.seq_length, m.num_layers, m.hidden_size
    query_ratio = m.kv_channels * m.num_attention_heads / h
    gated = 1.5 if m.swiglu else 1.0
    return 12 * b * s * L * h * h * (
        (1 + m.num_query_groups / m.num_attention_heads + s / h) * query_ratio
        + (m.ffn_hidden_size / h) * gated
        + m.padded_vocab_size / (2 * L * h))


def peak_tflops(args, device_name: str) -> Optional[float]:
    if args.peak_tflops:
        return args.peak_tflops
    for key, value in GPU_PEAK_TFLOPS.items():
        if key in device_name and "PCIe" not in device_name:
            return value
    return None


def attention_backend(model) -> str:
    """Which attention implementation ran: Megatron's local one or TE's flash/fused/unfused."""
    names = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("DotProductAttention")}
    if "TEDotProductAttention" not in names:
        return "megatron-core local DotProductAttention (unfused)" if names else "unknown"
    # TE records its choice in a module-level dict whose home moved between TE releases.
    for module_name in ("transformer_engine.pytorch.attention.dot_product_attention.dot_product_attention",
                        "transformer_engine.pytorch.attention.dot_product_attention.utils",
                        "transformer_engine.pytorch.attention"):
        try:
            state = getattr(importlib.import_module(module_name), "_attention_backends", None)
        except ImportError:
            continue
        if not isinstance(state, dict):
            continue
        if state.get("use_flash_attention"):
            version = state.get("flash_attention_backend")
            return "TE FlashAttention" + (f" ({version})" if version else "")
        if state.get("use_fused_attention"):
            sub = state.get("fused_attention_backend")
            return f"TE FusedAttention ({getattr(sub, 'name', sub)})"
        if state.get("use_unfused_attention"):
            return "TE UnfusedDotProductAttention"
    return "TEDotProductAttention (backend not reported)"


def device_name(plat) -> str:
    if not plat.is_cpu:
        return torch.cuda.get_device_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} x{cores} cores"


def layout(cfg) -> str:
    text = f"TP={cfg.layout.tp} PP={cfg.layout.pp}"
    if cfg.layout.cp > 1:
        text += f" CP={cfg.layout.cp}"
    return text + f" DP={cfg.layout.dp}"


def report(args, plat, s, ours_times, bare_times, loss_gap, data_s) -> dict:
    """``args``: the benchmark's own flags; the run's configuration is ``s.cfg``."""
    cfg, m, t = s.cfg, s.cfg.model, s.cfg.training
    ours_ms = 1000 * statistics.median(ours_times)
    bare_ms = 1000 * statistics.median(bare_times)
    result = {"benchmark": "step_overhead", "ratio": round(ours_ms / bare_ms, 4), "goal": "<= 1.03",
              "device": device_name(plat), "ours_ms": round(ours_ms, 2), "bare_ms": round(bare_ms, 2),
              "layout": layout(cfg), "iterations": args.timed_iters}
    flops = megatron_flops_per_iteration(cfg)
    backend = attention_backend(s.model[0])
    peak = peak_tflops(args, result["device"])
    if args.mfu:
        result["attention_backend"] = backend
        result["model_tflop_per_iteration"] = round(flops / 1e12, 3)
        result["peak_tflops"] = peak
        for name, ms in (("mfu", ours_ms), ("mfu_bare", bare_ms)):
            result[name] = (round(flops / (ms / 1000) / (cfg.layout.world_size * peak * 1e12), 4)
                            if peak else None)

    params = sum(p.numel() for p in s.model[0].parameters())
    print(f"\nstep_overhead: {result['device']} | {plat.device_type}/{plat.backend} | {layout(cfg)} | "
          f"{torch.get_num_threads()} torch threads per rank")
    print(f"  model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} "
          f"heads, seq {m.seq_length}, mbs {t.micro_batch_size}, gbs {t.global_batch_size} "
          f"({t.num_microbatches} micro-batches/rank), {params / 1e6:.2f}M params on rank 0, "
          f"{m.dtype_name}, attention: {backend}")
    print(f"  {args.timed_iters} timed iterations each (after {args.warmup_iters} warm-up), "
          f"alternating every iteration")
    for name, times in (("ours", ours_times), ("bare", bare_times)):
        ms = sorted(1000 * t for t in times)
        print(f"  {name}: median {1000 * statistics.median(times):8.1f} ms | mean "
              f"{1000 * statistics.mean(times):8.1f} | min {ms[0]:8.1f} | max {ms[-1]:8.1f}")
    print(f"  ratio ours/bare (medians): {result['ratio']:.4f} (goal <= 1.03) -> "
          f"{'met' if result['ratio'] <= 1.03 else 'NOT met'}; difference {ours_ms - bare_ms:+.1f} ms")
    # Adjacent iterations share the machine's state, so their ratio is less sensitive to other
    # load than the ratio of medians; a large gap between the two means a noisy host.
    paired = statistics.median(o / b for o, b in zip(ours_times, bare_times))
    spread = statistics.pstdev(bare_times) / statistics.mean(bare_times)
    print(f"  median of paired ratios (adjacent iterations): {paired:.4f}; bare iteration-time "
          f"spread (std/mean) {100 * spread:.1f}%")
    print(f"  our MicroBatchIterator alone: {1000 * data_s:.2f} ms per iteration "
          f"(bare reads pre-fetched tensors)")
    print(f"  achieved {flops / (ours_ms / 1000) / 1e12:.4f} TFLOP/s (ours, Megatron formula, all ranks)")
    print(f"  loss check: largest |ours - bare| over matching iterations = {loss_gap:.2e}")
    if args.mfu:
        print(f"  MFU: ours {result['mfu']} bare {result['mfu_bare']} (peak {peak} TFLOP/s per device)")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    args, parser = parse_args(argv, world_size)
    _, plat = parallel.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                  args.context_parallel_size, device=args.device,
                                  timeout_minutes=args.distributed_timeout_minutes)
    try:
        resolve_demo_data(args)
        try:
            cfg = arguments.finalize(args, world_size)
        except arguments.ArgumentError as err:
            if parallel.is_rank0():
                print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
        on_gpu = not plat.is_cpu
        with tempfile.TemporaryDirectory(prefix="step_overhead_") as tmp:
            s = train_mod.setup(cfg, plat)
            bare = BareLoop(s.cfg, plat, s.train_data, s.objective.device)
            ours = OursLoop(s, os.path.join(tmp, "metrics.jsonl") if parallel.is_rank0() else None)
            ours_times, bare_times = measure(args, ours, bare, on_gpu)
            data_s = time_data_iterator(s, min(cfg.training.train_iters, 10))
            torch.distributed.barrier()
            if parallel.is_rank0():
                ours_losses = ours.losses()
                loss_gap = max(abs(ours_losses[i + 1] - loss) for i, loss in enumerate(bare.losses))
                result = report(args, plat, s, ours_times, bare_times, loss_gap, data_s)
                print(json.dumps(result), flush=True)
            torch.distributed.barrier()
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
