"""DPO step with an offline reference vs DPO computing the reference in the same step.

    PYTHONPATH=. python benchmarks/dpo_step.py [--context 512 --answer 64 --iters 4 --repeats 2]

Rows: real preference rows (an Austen passage of --context SmolLM2 tokens as the prompt, a chosen
and 2 rejected answers of --answer tokens each, built as in benchmarks/preference_step.py),
preprocessed with tools/preprocess_preference.py. Model: a 4-layer Llama (hidden 256, SmolLM2's
49K vocabulary, untied output layer), fp32, contiguous positions, shared-prefix packing, 2 rows per
global batch (2 micro-batches of 1 row). Its initial weights are saved once; both the policy and
the reference start from them.

What each step measures (fresh torchrun process per run, one rank, the same global batches;
``--device cuda`` runs the same on one GPU, not yet run there):

- ``offline`` (what megatron_ext does): ``megatron_ext.train.train_step`` of a ``--preference-loss
  dpo --reference-logps FILE`` run: one forward + backward of the policy per micro-batch and the
  optimizer step; the reference's answer sums are read from the file (written once, before
  training, by tools/reference_logps.py; that one-off pass is timed separately and reported as
  ``reference_pass_s``).
- ``two-forward`` (what a user would otherwise run, e.g. TRL's default with a reference model):
  the trainer has no in-step reference mode, so the baseline times, in the same loop, the same
  ``train_step`` plus a ``torch.no_grad`` forward of a second model instance (same size, the same
  initial weights, in eval mode) over the same micro-batches. That forward is the reference pass
  of tools/reference_logps.py (the preference step's forward with masks and answer-only logits,
  summing the answer log-probs); its sums are not fed to the loss (the policy step still reads the
  file), which changes no work done.

Step time: median over runs of the median step after the first (warm-up) step; runs alternate
(offline, two-forward, offline, ...) so machine-speed changes hit both. ``paired_ratio``: the
median, over the two-forward steps, of their train_step part over the whole step (the same
ratio with both parts timed back to back, steadier on a shared host). Memory: the peak resident
set (VmHWM) of each run's process, and its growth above the resident size after the imports (on
CUDA: torch.cuda.max_memory_allocated over the steps); the second model's weights (and its
forward's transient activations) are what the baseline adds.

Last line: JSON with ratio = offline / two-forward step time (goal <= 0.6) and memory_ratio
(offline / two-forward peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks import cpu_description  # noqa: E402

MODES = ("offline", "two-forward")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


# ------------------------------------------------------------------------------------------------
# One run (a torchrun worker: ``dpo_step.py --worker MODE OUT.json TRAINING FLAGS...``)
# ------------------------------------------------------------------------------------------------

def build_reference(s, plat):
    """A second, frozen model instance built and loaded as tools/reference_logps.py builds it."""
    from megatron_ext.checkpoints import checkpointing
    from megatron_ext.model import build_model, transformer_config
    from megatron_ext.model.attention_backends import plan_attention

    cfg = s.cfg
    config = transformer_config(cfg.model, cfg.layout, plat.is_cpu)
    config.perform_initialization = False  # every weight comes from the checkpoint
    plan = plan_attention(cfg.model, cfg.layout, plat.is_cpu, training=False,
                          document_masks=cfg.document_masking_source)
    model = build_model(cfg.model, cfg.layout, config, plat.is_cpu, plan)
    model = model.to(s.objective.device).eval()
    checkpointing.load(cfg.checkpoint.load, [model], None, None, cfg.model,
                       checkpointing.WEIGHTS_ONLY)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def worker(mode: str, output: str, flags) -> None:
    start_rss = _status_mb("VmRSS")
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ext import arguments, parallel, train
    from megatron_ext.data.gpt_data import MicroBatchIterator
    from megatron_ext.objectives.preference_loss import PreferenceLossConfig
    from megatron_ext.objectives.reference_logps import _scorer_class

    imported_rss = _status_mb("VmRSS")
    cfg = arguments.parse(flags)
    _, plat = parallel.initialize(cfg.layout.tp, cfg.layout.pp, cfg.layout.cp,
                                  device=cfg.distributed.device)
    try:
        s = train.setup(cfg, plat)
        training = s.cfg.training
        reference = scorer = None
        if mode == "two-forward":
            reference = build_reference(s, plat)
            scorer = _scorer_class()(s.objective.device,
                                     PreferenceLossConfig.from_options(s.cfg.objective.options))
            scorer.collected = {}
        policy_batches = MicroBatchIterator(s.train_data, s.layout, start_iteration=0)
        reference_batches = MicroBatchIterator(s.train_data, s.layout, start_iteration=0)
        on_cuda = s.objective.device.type == "cuda"
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        steps, reference_steps, losses = [], [], []
        for _ in range(training.train_iters):
            begin = time.perf_counter()
            if reference is not None:
                with torch.no_grad():
                    get_forward_backward_func()(
                        forward_step_func=scorer.forward_step, data_iterator=reference_batches,
                        model=[reference], num_microbatches=training.num_microbatches,
                        seq_length=s.cfg.model.seq_length,
                        micro_batch_size=training.micro_batch_size, forward_only=True)
                if on_cuda:
                    torch.cuda.synchronize()
                reference_steps.append(time.perf_counter() - begin)
            out = train.train_step(s, policy_batches)
            if on_cuda:
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - begin)
            losses.append(out[s.objective.loss_key])
        if reference is not None and len(scorer.collected) != training.train_iters * \
                training.global_batch_size:
            raise RuntimeError("the reference forward did not score every row of the steps")
        peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None
    finally:
        parallel.destroy()
    with open(output, "w") as f:
        json.dump({"mode": mode, "step_s": steps, "reference_s": reference_steps, "losses": losses,
                   "peak_rss_mb": _status_mb("VmHWM"), "peak_gpu_mb": peak_gpu_mb,
                   "start_rss_mb": start_rss,
                   "imported_rss_mb": imported_rss}, f)


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, tag: str):
    """Run ``args`` (a script and its flags) under a one-rank torchrun with one torch thread."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(_free_port()), *args]
    proc = subprocess.run(cmd, cwd=_REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": _REPO_ROOT, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--answer", type=int, default=64)
    p.add_argument("--iters", type=int, default=4, help="steps per run (the first is warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: memory is torch.cuda.max_memory_allocated instead of peak RSS")
    args = p.parse_args()
    if args.iters < 2 or args.repeats < 1:
        p.error("--iters must be >= 2 (the first step is warm-up) and --repeats >= 1")

    from benchmarks.preference_step import MODEL, make_rows
    from dev import assets
    from megatron_ext.data.preference_samples import PreferenceRows, layout_length
    from megatron_ext.data.preprocess_preference import data_prefix_for, preprocess_preference

    hf_dir = str(assets.require(assets.smollm2_hf_dir))
    batch = 2
    with tempfile.TemporaryDirectory() as work:
        jsonl = os.path.join(work, "rows.jsonl")
        make_rows(hf_dir, args.context, args.answer, args.iters * batch, jsonl)
        preprocess_preference([jsonl], os.path.join(work, "pref"), "HuggingFaceTokenizer",
                              hf_dir, max_answer_tokens=4 * args.answer, progress=False)
        prefix = data_prefix_for(os.path.join(work, "pref"))
        rows = PreferenceRows(prefix)
        seq = max(layout_length(*rows.lengths(r, 2), "shared-prefix") for r in range(len(rows)))
        seq = -(-seq // 64) * 64
        common = [*MODEL, "--seq-length", str(seq), "--max-position-embeddings", str(seq),
                  "--position-scheme", "contiguous", "--preference-packing", "shared-prefix",
                  "--micro-batch-size", "1", "--global-batch-size", str(batch),
                  "--data-path", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                  "--tokenizer-model", hf_dir, "--split", "100,0,0", "--device", args.device,
                  "--lr", "1e-5", "--lr-warmup-iters", "0", "--log-interval", "1"]
        init = os.path.join(work, "init")
        _torchrun(["-m", "megatron_ext.train", *common, "--train-iters", "0", "--save", init],
                  "init")
        reference_file = os.path.join(work, "reference.npz")
        begin = time.perf_counter()
        _torchrun(["tools/reference_logps.py", *common, "--load", init, "--output",
                   reference_file, "--no-progress"], "reference")
        reference_pass_s = time.perf_counter() - begin
        dpo = [*common, "--preference-loss", "dpo", "--beta", "0.1", "--reference-logps",
               reference_file, "--load", init, "--finetune", "--train-iters", str(args.iters)]
        print(f"rows of {seq} tokens (shared-prefix), {batch} rows per step; reference pass "
              f"over {len(rows)} rows: {reference_pass_s:.1f} s (process included)", flush=True)
        runs = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):
            for mode in MODES:
                out = os.path.join(work, f"{mode}-{repeat}.json")
                _torchrun([os.path.abspath(__file__), "--worker", mode, out, *dpo],
                          f"{mode}-{repeat}")
                with open(out) as f:
                    result = json.load(f)
                result["median_step_s"] = statistics.median(result["step_s"][1:])
                runs[mode].append(result)
                print(f"  {mode:12s} run {repeat}: {result['median_step_s']:.3f} s/step, peak RSS "
                      f"{result['peak_rss_mb']:.0f} MB, losses {result['losses']}", flush=True)
    step = {m: statistics.median(r["median_step_s"] for r in runs[m]) for m in MODES}
    peak = {m: max(r["peak_rss_mb"] for r in runs[m]) for m in MODES}
    gpu = {m: max(r["peak_gpu_mb"] for r in runs[m]) for m in MODES} if args.device == "cuda" \
        else None
    memory = gpu or peak
    growth = {m: max(r["peak_rss_mb"] - r["imported_rss_mb"] for r in runs[m]) for m in MODES}
    ratio = step["offline"] / step["two-forward"]
    # The same ratio inside each two-forward step (its train_step part over the whole step): both
    # parts run back to back, so a shared host's speed changes between runs cancel out.
    paired = statistics.median((total - ref) / total for r in runs["two-forward"]
                               for total, ref in zip(r["step_s"][1:], r["reference_s"][1:]))
    print(f"step time: offline reference {step['offline']:.3f} s, two forwards "
          f"{step['two-forward']:.3f} s -> ratio {ratio:.3f} (goal <= 0.6); inside the "
          f"two-forward steps, train_step / whole step: {paired:.3f}")
    print(f"peak RSS: offline {peak['offline']:.0f} MB, two forwards {peak['two-forward']:.0f} MB "
          f"(growth after imports {growth['offline']:.0f} vs {growth['two-forward']:.0f} MB)")
    if gpu:
        print(f"peak GPU memory allocated: offline {gpu['offline']:.0f} MB, two forwards "
              f"{gpu['two-forward']:.0f} MB")
    import torch

    device = (f"GPU {torch.cuda.get_device_name()}" if args.device == "cuda"
              else f"{cpu_description()} (CPU training run)")
    print(json.dumps({"benchmark": "dpo_step", "ratio": round(ratio, 4), "goal": "<= 0.6",
                      "device": device,
                      "baseline": "train_step + no-grad forward of a second model instance",
                      "offline_step_s": round(step["offline"], 4),
                      "two_forward_step_s": round(step["two-forward"], 4),
                      "paired_ratio": round(paired, 4),
                      "memory_ratio": round(memory["offline"] / memory["two-forward"], 4),
                      "memory": "peak GPU allocated" if gpu else "peak RSS",
                      "peak_rss_mb": {m: round(v, 1) for m, v in peak.items()},
                      **({"peak_gpu_mb": {m: round(v, 1) for m, v in gpu.items()}} if gpu else {}),
                      "rss_growth_mb": {m: round(v, 1) for m, v in growth.items()},
                      "reference_pass_s": round(reference_pass_s, 2),
                      "seq_length": seq, "rows_per_step": batch, "iters": args.iters,
                      "repeats": args.repeats}))


if __name__ == "__main__":
    main()
