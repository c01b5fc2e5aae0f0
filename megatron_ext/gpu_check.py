"""One-command GPU acceptance check: environment, model build, attention correctness, speed and
memory, packed-document training, MFU. Written to run once on a fresh GPU machine with no network.

On the GPU machine (Python 3.12, torch with CUDA and Triton, no Transformer Engine, flash-attn or
megatron-core), with the wheels that ``tools/prepare_gpu_wheels.sh`` put into ``.whl/``::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site:. python3 tools/gpu_check.py --output $OUT/gpu_check.json

Here (CPU, tiny shapes; GPU-only stages are SKIP)::

    python tools/gpu_check.py --device cpu --tiny --output /tmp/gpu_check.json

Every stage prints exactly one line ``PASS|FAIL|SKIP <stage> key=value ...``; the last line is
``gpu_check: N passed, M failed, K skipped``; the exit status is 1 when any stage failed. With
``--output FILE`` every stage's numbers, per-case details and tracebacks are written as JSON
(rewritten after each stage, so a killed run keeps what finished); the stages' own output (compile
warnings, the training run's log) goes to ``--log`` (default: FILE with ``.log``).

Stages (``--stages a,b`` runs a subset, e.g. to rerun one that failed):

1. ``environment``: torch / CUDA / device / Triton / megatron.core / FlexAttention versions and
   availability. FAIL without megatron.core or FlexAttention (or ``--device cuda`` without CUDA).
2. ``model_builds``: a tiny Llama-style GPTModel through ``megatron_ext.model.build_model`` with
   the planned backend (flex; on CPU planned forward-only), one forward (and backward on GPU);
   reports ``what_ran`` read from the built modules.
3. ``correctness_2k``: S=2048 (GPU, bf16; ``--tiny`` GPU 1024; CPU 256, fp32). FlexAttention, the
   blockwise backend and SDPA (flash for plain causal, a dense boolean mask otherwise) against a
   naive full-softmax reference in fp64 computed from the same (rounded) inputs: outputs and
   dq / dk / dv for causal, packed documents, shared-prefix branches, GQA 8/2 and 8/1, and CP=2 /
   CP=4 emulated in one process (each rank's queries against all-gathered keys; key gradients
   summed over ranks by autograd). Error = max|x - ref| / max|ref| (per tensor). A backend passes
   when every error <= max(2 x SDPA's error on the same case and tensor, FLOOR) with FLOOR 2e-2 for
   bf16 (bf16 has an 8-bit significand: rounding the output alone costs ~4e-3), 2e-3 for fp32 on
   GPU (TF32 allowed for), 1e-4 for fp32 on CPU. On GPU one extra fp32 case (branches, CP=2) runs
   when time allows. On CPU FlexAttention has no backward: its gradients are not compared there,
   and only two cases compile it (~10 s each), the others run it eagerly (same masks, unfused).
4. ``speed_memory`` (GPU only): causal fwd+bwd at ``--sizes`` (8K/16K/32K), batch 1, 32 heads /
   8 groups, head dim 128, bf16: flex (compiled; warm-up excluded), blockwise, SDPA flash. Reports
   ms per fwd+bwd, peak GB (``torch.cuda.max_memory_allocated``, inputs and gradients included) and
   flex/SDPA at the largest size (goal <= 1.25: reported, never a failure). A size / backend that
   would overrun the time budget is skipped, one that runs out of memory is reported as ``oom``;
   only other errors FAIL.
5. ``packed_training_smoke``: (a) per-token losses (and logits) of real-text documents packed into
   one sequence (document mask, positions restarting) equal each document run alone, under flex,
   same weights, forward only: max relative loss difference <= 1e-2 in bf16 (1e-5 in fp32 on CPU)
   and logits within 5e-2 (1e-5) of max|logits|; the same packing *without* the document mask must
   give logits differing by more than 4x that tolerance (proves the check can see a leak).
   Text: docstrings of this Python's standard library (read with ``ast``, nothing imported),
   byte-level tokens. (b) GPU: ``python -m megatron_ext.train --device cuda --bf16
   --attention-backend flex --packed-documents`` for a few iterations on a dataset built here (a
   SentencePiece model trained on the same docstrings, ``megatron_ext.data.preprocess``): exit 0,
   finite losses, the run reports flex, the loss goes down. On CPU part (b) is skipped.
6. ``mfu_8k`` (GPU only): the largest of a few Llama-like presets (3B / 1B / 0.5B-ish, hidden
   2048-3072, vocab 32000) that runs fwd+bwd at 8K tokens in bf16 under flex; tokens/s and MFU =
   tokens/s x (6 N + 6 L d S) / peak, with N the parameters except the input embedding (the output
   layer counts), L layers, d = heads x head dim, S the sequence length: 6 L d S is the causal
   attention's QK^T and PV matmuls (the 12 L d S of the PaLM appendix, halved for the causal mask),
   fwd+bwd. No optimizer step. Peak dense bf16: from the device name (H100 SXM / H200 989 TFLOP/s,
   H100 PCIe 756, A100 312; default 989).

Robustness: the stages run in a child process that the parent watches. A stage that raises is a
FAIL with its traceback; a stage that exceeds its time cap is interrupted (SIGALRM) or, if it does
not return, killed with its process group; a child that dies (e.g. a CUDA fault) costs only the
running stage: a new child takes the remaining ones. ``--budget-s`` (default 420) bounds the whole
run: stages that would start without their minimum time left are SKIP, and each stage keeps the
minimum of the later ones in reserve.

Testing the script itself (``tests/test_gpu_check.py``): hidden flags ``--inject-failure STAGE``
(correctness_2k: FlexAttention's output x 1.1; other stages raise; ``crash:STAGE`` /
``hang:STAGE`` kill or stall the process) and ``--exercise-gpu-stages`` (runs the GPU-only stages
and the training run on CPU at toy sizes, training with the blockwise backend).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional

STAGES = ("environment", "model_builds", "correctness_2k", "speed_memory",
          "packed_training_smoke", "mfu_8k")
GPU_ONLY = ("speed_memory", "mfu_8k")
# Longest a stage may run (seconds) before it is interrupted.
STAGE_CAP_S = {"environment": 90, "model_builds": 150, "correctness_2k": 210, "speed_memory": 150,
               "packed_training_smoke": 200, "mfu_8k": 120}
# A stage is SKIP when less than this is left of the budget; later stages keep theirs in reserve.
MIN_LEFT_S = {"environment": 0, "model_builds": 15, "correctness_2k": 45, "speed_memory": 45,
              "packed_training_smoke": 90, "mfu_8k": 40}
# A stage may overrun the budget by this much; the parent kills a child this long after a cap.
OVERRUN_S = 20
HARD_GRACE_S = 30

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ================================================================================================
# Options and output
# ================================================================================================

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--tiny", action="store_true",
                   help="CPU-size shapes (implied on CPU)")
    p.add_argument("--sizes", default="8192,16384,32768",
                   help="sequence lengths of speed_memory (comma separated)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="time budget of the whole run; stages that would start past it are SKIP")
    p.add_argument("--output", default=None, help="write all stage results as JSON here")
    p.add_argument("--log", default=None,
                   help="the stages' own output (default: --output with .log, else a temp file)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated subset of: " + ",".join(STAGES))
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary working folder")
    # Hidden: prove the checks can fail / exercise GPU code paths on CPU.
    p.add_argument("--inject-failure", default="", help=argparse.SUPPRESS)
    p.add_argument("--exercise-gpu-stages", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage-cap-s", type=float, default=None, help=argparse.SUPPRESS)
    # Internal: the child process.
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_events", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_workdir", default=None, help=argparse.SUPPRESS)
    return p


def _fmt(value) -> str:
    if value is None:
        return "na"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return "_".join(str(value).split()) or "''"


def stage_line(result: dict) -> str:
    parts = [result["status"], result["stage"]]
    parts += [f"{k}={_fmt(v)}" for k, v in result.get("numbers", {}).items()]
    parts.append(f"time_s={_fmt(float(result.get('seconds', 0.0)))}")
    if result.get("error"):
        parts.append("error=" + _fmt(result["error"])[:300])
    return " ".join(parts)


def _result(stage: str, status: str, numbers: Optional[dict] = None, *, seconds: float = 0.0,
            error: Optional[str] = None, details: Optional[dict] = None,
            tb: Optional[str] = None) -> dict:
    return {"stage": stage, "status": status, "numbers": numbers or {}, "seconds": round(seconds, 2),
            "error": error, "details": details or {}, "traceback": tb}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Optional[str], lines: int = 25) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 20000))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


# ================================================================================================
# The parent: runs the stages in a child process, prints one line per stage, writes the JSON
# ================================================================================================

class _Parent:
    def __init__(self, opts: argparse.Namespace, stages: List[str]):
        self.opts = opts
        self.stages = stages
        self.start = time.time()
        self.deadline = self.start + opts.budget_s
        self.results: Dict[str, dict] = {}
        self.workdir = tempfile.mkdtemp(prefix="gpu_check_")
        self.events = os.path.join(self.workdir, "events.jsonl")
        if opts.log:
            self.log = opts.log
        elif opts.output:
            self.log = os.path.splitext(opts.output)[0] + ".log"
        else:
            fd, self.log = tempfile.mkstemp(prefix="gpu_check_", suffix=".log")
            os.close(fd)
        os.makedirs(os.path.dirname(os.path.abspath(self.log)), exist_ok=True)
        open(self.log, "w").close()
        self._offset = 0
        self._partial = ""

    # ---- reporting ----
    def record(self, result: dict) -> None:
        self.results[result["stage"]] = result
        print(stage_line(result), flush=True)
        if result["status"] == "FAIL" and result.get("traceback"):
            for line in result["traceback"].rstrip().splitlines()[-12:]:
                print("    " + line, flush=True)
        self.write_json()

    def write_json(self, final: bool = False) -> None:
        if not self.opts.output:
            return
        counts = self.counts()
        doc = {"tool": "megatron_ext.gpu_check", "argv": sys.argv[1:], "budget_s": self.opts.budget_s,
               "elapsed_s": round(time.time() - self.start, 2), "finished": final,
               "log": os.path.abspath(self.log), "summary": counts,
               "stages": {s: self.results[s] for s in self.stages if s in self.results}}
        os.makedirs(os.path.dirname(os.path.abspath(self.opts.output)), exist_ok=True)
        tmp = self.opts.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        os.replace(tmp, self.opts.output)

    def counts(self) -> dict:
        statuses = [r["status"] for r in self.results.values()]
        return {"passed": statuses.count("PASS"), "failed": statuses.count("FAIL"),
                "skipped": statuses.count("SKIP")}

    # ---- the child ----
    def _read_events(self) -> List[dict]:
        if not os.path.exists(self.events):
            return []
        with open(self.events, "r", encoding="utf-8") as f:
            f.seek(self._offset)
            chunk = f.read()
            self._offset = f.tell()
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def _spawn(self, stages: List[str]) -> subprocess.Popen:
        o = self.opts
        cmd = [sys.executable, "-m", "megatron_ext.gpu_check", "--_child", "--_events", self.events,
               "--_deadline", repr(self.deadline), "--_workdir", self.workdir,
               "--stages", ",".join(stages), "--device", o.device, "--sizes", o.sizes,
               "--budget-s", str(o.budget_s)]
        if o.tiny:
            cmd.append("--tiny")
        if o.inject_failure:
            cmd += ["--inject-failure", o.inject_failure]
        if o.exercise_gpu_stages:
            cmd.append("--exercise-gpu-stages")
        if o.stage_cap_s is not None:
            cmd += ["--stage-cap-s", str(o.stage_cap_s)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        log = open(self.log, "ab")
        try:
            return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()

    @staticmethod
    def _kill(child: subprocess.Popen) -> None:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # the child and what it started (training, compile workers)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def run(self) -> int:
        print(f"gpu_check: {len(self.stages)} stages, budget {self.opts.budget_s:.0f}s, "
              f"log {self.log}", flush=True)
        pending = list(self.stages)
        fruitless = 0
        while pending:
            hard_end = self.deadline + OVERRUN_S + HARD_GRACE_S
            if time.time() > self.deadline:
                for stage in pending:
                    self.record(_result(stage, "SKIP", {"reason": "over_budget"}))
                break
            child = self._spawn(pending)
            current, started, cap, progressed, killed = None, 0.0, 0.0, False, None
            while True:
                for ev in self._read_events():
                    if ev.get("event") == "start":
                        current, started, cap = ev["stage"], time.time(), float(ev["cap_s"])
                        progressed = True
                    elif ev.get("event") == "result":
                        result = ev["result"]
                        if result["stage"] in pending:
                            pending.remove(result["stage"])
                        self.record(result)
                        current = None
                if child.poll() is not None:
                    break
                now = time.time()
                if current is not None and now - started > cap + HARD_GRACE_S:
                    killed = f"killed after {now - started:.0f}s (stage cap {cap:.0f}s)"
                elif now > hard_end:
                    killed = f"killed at the run's hard limit ({now - self.start:.0f}s)"
                if killed:
                    self._kill(child)
                    break
                time.sleep(0.2)
            for ev in self._read_events():  # what the child wrote before it ended
                if ev.get("event") == "result":
                    result = ev["result"]
                    if result["stage"] in pending:
                        pending.remove(result["stage"])
                    self.record(result)
                    if result["stage"] == current:
                        current = None
                elif ev.get("event") == "start":
                    current, started, progressed = ev["stage"], time.time(), True
            if current is not None:
                why = killed or f"the stage's process died (exit status {child.returncode})"
                self.record(_result(current, "FAIL", seconds=time.time() - started, error=why,
                                    tb=_tail(self.log)))
                pending.remove(current)
            elif not progressed and pending:
                # The child died before starting a stage (e.g. torch cannot be imported).
                fruitless += 1
                stage = pending.pop(0)
                self.record(_result(stage, "FAIL", error=f"the check process exited with status "
                                    f"{child.returncode} before the stage started", tb=_tail(self.log)))
                if fruitless >= 2:
                    for stage in list(pending):
                        pending.remove(stage)
                        self.record(_result(stage, "FAIL", error="the check process cannot start "
                                            "(see the previous stage's error)"))
        counts = self.counts()
        self.write_json(final=True)
        if not self.opts.keep_tmp:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            print(f"gpu_check: kept {self.workdir}", flush=True)
        print(f"gpu_check: {counts['passed']} passed, {counts['failed']} failed, "
              f"{counts['skipped']} skipped", flush=True)
        return 1 if counts["failed"] else 0


def main(argv: Optional[List[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    stages = [s.strip() for s in opts.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"gpu_check: unknown stage(s) {','.join(unknown)}; choose from {','.join(STAGES)}",
              file=sys.stderr)
        return 2
    stages = [s for s in STAGES if s in stages]
    if opts._child:
        return _child_main(opts, stages)
    return _Parent(opts, stages).run()


# ================================================================================================
# The child: runs the stages in order, appending start/result events for the parent
# ================================================================================================

class StageTimeout(Exception):
    pass


class SkipStage(Exception):
    """Raised by a stage to report SKIP with numbers."""

    def __init__(self, numbers: dict):
        super().__init__(str(numbers))
        self.numbers = numbers


class Context:
    """What the stages share inside one child process."""

    def __init__(self, opts: argparse.Namespace, stages: List[str]):
        import torch

        self.opts = opts
        self.stages = stages
        self.deadline = opts._deadline or (time.time() + opts.budget_s)
        self.workdir = opts._workdir or tempfile.mkdtemp(prefix="gpu_check_")
        want = opts.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        self.requested = opts.device
        self.device = torch.device("cuda", 0) if want == "cuda" else torch.device("cpu")
        self.cuda_ok = want != "cuda" or torch.cuda.is_available()
        self.on_cpu = self.device.type == "cpu"
        self.tiny = bool(opts.tiny or self.on_cpu)
        self.dtype = torch.float32 if self.on_cpu else torch.bfloat16
        self.sizes = [int(s) for s in opts.sizes.split(",") if s.strip()]
        self.inject = {s.strip() for s in opts.inject_failure.split(",") if s.strip()}
        self.exercise = bool(opts.exercise_gpu_stages)
        self.stage_deadline = self.deadline
        self._parallel = False

    # ---- time ----
    def time_left(self) -> float:
        return self.deadline - time.time()

    def stage_time_left(self) -> float:
        return self.stage_deadline - time.time()

    def runs_here(self, stage: str) -> bool:
        return not (stage in GPU_ONLY and self.on_cpu and not self.exercise)

    # ---- Megatron ----
    def ensure_parallel(self) -> None:
        if self._parallel:
            return
        if not self.cuda_ok:
            raise RuntimeError("--device cuda was requested but CUDA is not available")
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                    "SLURM_LOCALID"):
            os.environ.pop(var, None)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
        from megatron_ext import parallel

        parallel.initialize(1, 1, 1, device=self.device.type, timeout_minutes=5)
        self._parallel = True

    def seed(self, seed: int = 1234) -> None:
        import torch
        from megatron.core import tensor_parallel

        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    def close(self) -> None:
        if self._parallel:
            from megatron_ext import parallel

            try:
                parallel.destroy()
            except Exception:  # the process ends anyway
                pass
            self._parallel = False

    def free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


# Errors after which this process's CUDA context is unusable.
CUDA_FATAL_MESSAGES = ("CUDA error", "illegal memory access", "device-side assert", "CUBLAS_STATUS",
                       "cudaError", "unspecified launch failure", "NCCL error")


def _emit(path: str, event: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, default=str) + "\n")
        f.flush()


def _on_alarm(signum, frame):
    raise StageTimeout("stage time cap reached")


def _child_main(opts: argparse.Namespace, stages: List[str]) -> int:
    events = opts._events or os.devnull
    try:
        import torch
        import torch._dynamo.config as dynamo_config

        # One compiled FlexAttention serves every shape and mask kind here: many more than
        # dynamo's default 8 recompilations, past which it would silently fall back to eager.
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dynamo_config, name):
                try:
                    setattr(dynamo_config, name, max(256, int(getattr(dynamo_config, name))))
                except Exception:
                    pass
        del torch
    except Exception:  # reported by the environment stage (or by every stage that needs torch)
        pass
    ctx = Context(opts, stages)
    signal.signal(signal.SIGALRM, _on_alarm)
    exit_code = 0
    try:
        for i, stage in enumerate(stages):
            later = [s for s in stages[i + 1:] if ctx.runs_here(s)]
            reserve = sum(MIN_LEFT_S[s] for s in later)
            cap = opts.stage_cap_s or STAGE_CAP_S[stage]
            cap = max(5.0, min(cap, ctx.time_left() + OVERRUN_S))
            _emit(events, {"event": "start", "stage": stage, "cap_s": cap, "t": time.time()})
            print(f"===== gpu_check stage {stage} (cap {cap:.0f}s, {ctx.time_left():.0f}s of "
                  f"budget left) =====", flush=True)
            start = time.time()
            ctx.stage_deadline = min(start + cap, ctx.deadline - reserve)
            timed_out = poisoned = False
            try:
                if not ctx.runs_here(stage):
                    result = _result(stage, "SKIP", {"reason": "needs_cuda", "device": "cpu"})
                elif ctx.time_left() < MIN_LEFT_S[stage]:
                    result = _result(stage, "SKIP", {"reason": "over_budget",
                                                     "left_s": round(ctx.time_left(), 1)})
                else:
                    _maybe_inject(ctx, stage)
                    signal.setitimer(signal.ITIMER_REAL, cap)
                    try:
                        status, numbers, details = STAGE_FUNCS[stage](ctx)
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                    problems = [str(p) for key in ("failures", "problems", "errors")
                                for p in (details or {}).get(key) or []]
                    result = _result(stage, status, numbers, details=details,
                                     error="; ".join(problems[:2]) if status == "FAIL" else None)
            except SkipStage as skip:
                result = _result(stage, "SKIP", skip.numbers)
            except StageTimeout:
                timed_out = True
                result = _result(stage, "FAIL", error=f"timed out after {time.time() - start:.0f}s "
                                 f"(cap {cap:.0f}s)", tb=traceback.format_exc())
            except BaseException as err:  # noqa: BLE001  (one stage must never stop the others)
                if isinstance(err, KeyboardInterrupt):
                    raise
                result = _result(stage, "FAIL", error=f"{type(err).__name__}: {err}",
                                 tb=traceback.format_exc())
                poisoned = any(m in str(err) for m in CUDA_FATAL_MESSAGES)
            result["seconds"] = round(time.time() - start, 2)
            if result["status"] == "FAIL" and result.get("traceback"):
                print(result["traceback"], flush=True)
            print(stage_line(result), flush=True)
            _emit(events, {"event": "result", "result": result})
            try:
                ctx.free_memory()
            except Exception:
                pass
            if timed_out or poisoned:
                # Interrupted somewhere inside torch, or a CUDA error that leaves the context
                # unusable: a fresh process takes the remaining stages.
                exit_code = 3
                break
    finally:
        ctx.close()
    return exit_code


def _maybe_inject(ctx: Context, stage: str) -> None:
    """Hidden --inject-failure: STAGE raises (correctness_2k perturbs the flex output instead),
    crash:STAGE kills the process, hang:STAGE sleeps past the cap."""
    if f"crash:{stage}" in ctx.inject:
        os._exit(7)
    if f"hang:{stage}" in ctx.inject:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        time.sleep(10 ** 6)
    if stage in ctx.inject and stage != "correctness_2k":
        raise RuntimeError(f"failure injected into {stage} (--inject-failure)")


# ================================================================================================
# Shared helpers
# ================================================================================================

def _model_config(ctx: Context, *, layers: int, hidden: int, heads: int, groups: int, ffn: int,
                seq: int, vocab: int, backend: str = "flex", bf16: Optional[bool] = None,
                init_std: float = 0.02):
    """The model config the training entry point would build for these sizes."""
    from megatron_ext.config import ModelConfig

    return ModelConfig(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        num_query_groups=groups, kv_channels=hidden // heads, seq_length=seq,
        max_position_embeddings=seq, attention_backend=backend, init_method_std=init_std,
        untie_embeddings_and_output_weights=True, padded_vocab_size=vocab,
        bf16=(not ctx.on_cpu) if bf16 is None else bf16)


def _build(ctx: Context, model_config, training: bool, gpu_init: bool = False):
    """(model on ctx.device, plan) via the project's builder, as ``megatron_ext.train`` builds it
    (one process: TP = PP = CP = 1)."""
    import dataclasses

    from megatron_ext.parallel.layout import Layout
    from megatron_ext.model import build_model, transformer_config
    from megatron_ext.model.attention_backends import plan_attention

    ctx.ensure_parallel()
    ctx.seed()
    layout = Layout()
    plan = plan_attention(model_config, layout, ctx.on_cpu, training=training)
    config = transformer_config(model_config, layout, ctx.on_cpu)
    if gpu_init and not ctx.on_cpu:
        # Billions of parameters initialise in seconds on the GPU, minutes on the CPU.
        config = dataclasses.replace(config, use_cpu_initialization=False)
    model = build_model(model_config, layout, config, ctx.on_cpu, plan).to(ctx.device)
    return model, plan


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel_err(x, ref) -> float:
    """max |x - ref| / max |ref| (in fp64)."""
    ref = ref.detach().double()
    scale = ref.abs().max().item()
    return (x.detach().double() - ref).abs().max().item() / max(scale, 1e-30)


def _is_oom(err: BaseException) -> bool:
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    return isinstance(err, oom_types) or "out of memory" in str(err).lower()


def _stdlib_docstrings(max_chars: int, min_len: int = 400) -> List[str]:
    """Real English text available offline: docstrings of this Python's standard library, one
    string per module (parsed with ``ast``; nothing is imported)."""
    import ast
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    texts, total = [], 0
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = [ast.get_docstring(node) for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                      ast.AsyncFunctionDef))]
        text = "\n\n".join(p for p in parts if p)
        if len(text) >= min_len:
            texts.append(text)
            total += len(text)
        if total >= max_chars:
            break
    if not texts:
        raise RuntimeError(f"found no docstrings in the standard library at {root}")
    return texts


# ================================================================================================
# Stage 1: environment
# ================================================================================================

def stage_environment(ctx: Context):
    import platform as py_platform

    import torch

    n: dict = {"python": py_platform.python_version(), "torch": torch.__version__,
               "torch_cuda": torch.version.cuda, "cuda": torch.cuda.is_available(),
               "device": ctx.device.type}
    problems = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        n["device_name"] = props.name
        n["capability"] = f"{props.major}.{props.minor}"
        n["gpu_mem_gb"] = round(props.total_memory / 2 ** 30, 1)
        n["gpus"] = torch.cuda.device_count()
    if not ctx.cuda_ok:
        problems.append("--device cuda but torch.cuda.is_available() is False")
    try:
        import triton

        n["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001
        n["triton"] = None
        if not ctx.on_cpu:
            problems.append(f"triton: {type(err).__name__}: {err}")
    try:
        import megatron.core
        from megatron.core import package_info

        n["megatron_core"] = getattr(package_info, "__version__", None) or getattr(
            megatron.core, "__version__", "unknown")
    except Exception as err:  # noqa: BLE001
        n["megatron_core"] = None
        problems.append(f"megatron.core: {type(err).__name__}: {err}")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401

        n["flex_attention"] = True
    except Exception as err:  # noqa: BLE001
        n["flex_attention"] = False
        problems.append(f"flex_attention: {type(err).__name__}: {err}")
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401

        n["sdpa_kernel"] = True
    except Exception:  # noqa: BLE001
        n["sdpa_kernel"] = False
    if not ctx.on_cpu:
        import shutil

        # Triton builds its launchers with a C compiler at the first kernel.
        n["c_compiler"] = os.environ.get("CC") or next(
            (shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
        if not n["c_compiler"]:
            problems.append("no C compiler (cc/gcc/clang) for Triton's launchers: FlexAttention "
                            "cannot compile")
        n["flash_sdp"] = torch.backends.cuda.flash_sdp_enabled()
    for module in ("numpy", "sentencepiece"):
        try:
            n[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001
            n[module] = None
    if n.get("megatron_core"):
        try:
            from megatron_ext.model import builder  # noqa: F401  (the model code imports)
            from megatron_ext.model.attention_backends import te_available

            n["megatron_ext_model"] = True
            n["transformer_engine"] = te_available()
        except Exception as err:  # noqa: BLE001
            n["megatron_ext_model"] = False
            problems.append(f"megatron_ext.model: {type(err).__name__}: {err}")
    return ("FAIL" if problems else "PASS"), n, {"problems": problems}


# ================================================================================================
# Stage 2: model_builds
# ================================================================================================

def stage_model_builds(ctx: Context):
    import torch

    from megatron_ext.model.attention_backends import what_ran

    seq = 256 if ctx.tiny and ctx.on_cpu else 1024
    hidden = 64 if ctx.on_cpu else 256
    args = _model_config(ctx, layers=2, hidden=hidden, heads=4, groups=2, ffn=3 * hidden, seq=seq,
                       vocab=512, backend="flex")
    training = not ctx.on_cpu
    t0 = time.time()
    model, plan = _build(ctx, args, training=training)
    build_s = time.time() - t0
    ran = what_ran(model, ctx.device.type, 1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, seq), generator=g).to(ctx.device)
    positions = torch.arange(seq).expand(2, seq).contiguous().to(ctx.device)
    labels = torch.roll(tokens, -1, dims=1)
    t0 = time.time()
    grad_norm = None
    if training:
        loss = model(tokens, positions, None, labels=labels).float().mean()
        loss.backward()
        grads = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
        grad_norm = torch.stack(grads).norm().item() if grads else float("nan")
    else:
        with torch.no_grad():
            loss = model(tokens, positions, None, labels=labels).float().mean()
    _sync(ctx.device)
    fwd_s = time.time() - t0
    n = {"layer_spec": ran["layer_spec"], "attention": ran["attention_backend"],
         "planned": plan.backend, "params_dtype": ran["params_dtype"],
         "layers": len(ran["attention_per_layer"]),
         "params": sum(p.numel() for p in model.parameters()), "seq": seq,
         "loss": round(loss.item(), 5), "grad_norm": grad_norm,
         "backward": "yes" if training else "skipped_cpu", "build_s": round(build_s, 2),
         "first_step_s": round(fwd_s, 2)}
    problems = []
    if ran["attention_backend"] != plan.backend or plan.backend != "flex":
        problems.append(f"attention ran as {ran['attention_backend']}, planned {plan.backend}")
    if not math.isfinite(loss.item()):
        problems.append("loss not finite")
    if training and not (grad_norm is not None and math.isfinite(grad_norm) and grad_norm > 0):
        problems.append(f"bad gradient norm {grad_norm}")
    del model
    return ("FAIL" if problems else "PASS"), n, {"what_ran": ran, "problems": problems}


# ================================================================================================
# Stage 3: correctness_2k
# ================================================================================================

def _segment_layouts(seq: int):
    """Per-row (document lengths, branch ids) for the mask kinds, scaled to ``seq`` (a multiple of
    64): uneven documents (a 1-token one, others crossing 128-token tiles and CP chunks)."""
    u = seq // 64
    documents = [[1, 3 * u - 1, 9 * u + 5, 5 * u - 5, 17 * u + 7, 30 * u - 7], [20 * u + 1, 44 * u - 1]]
    # Shared-prefix rows: a prompt (branch 0) then answers (branches 1..3) per document.
    branch_rows = [
        [[(0, 10 * u + 3), (1, 7 * u), (2, 11 * u - 5), (3, 4 * u + 2)], [(0, 6 * u), (1, 26 * u)]],
        [[(0, 30 * u), (1, 34 * u)]],
    ]
    return documents, branch_rows


def _mask_ids(kind: str, seq: int, device):
    """(document ids [2, seq] or None, branch ids [2, seq] or None)."""
    import torch

    if kind == "causal":
        return None, None
    documents, branch_rows = _segment_layouts(seq)
    if kind == "documents":
        rows = [torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]) for lengths in documents]
        assert all(len(r) == seq for r in rows), [len(r) for r in rows]
        return torch.stack(rows).to(device), None
    doc_rows, br_rows = [], []
    for row in branch_rows:
        docs, branches = [], []
        for doc_index, doc in enumerate(row):
            for branch, n in doc:
                docs.append(torch.full((n,), doc_index))
                branches.append(torch.full((n,), branch))
        doc_rows.append(torch.cat(docs))
        br_rows.append(torch.cat(branches))
    assert all(len(r) == seq for r in doc_rows), [len(r) for r in doc_rows]
    return torch.stack(doc_rows).to(device), torch.stack(br_rows).to(device)


def _visible(seq: int, docs, branches, device):
    """[b, seq, seq] bool: causal, same document, key shared (branch 0) or in the query's branch."""
    import torch

    visible = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None]
    if docs is not None:
        visible = visible & (docs[:, :, None] == docs[:, None, :])
    if branches is not None:
        visible = visible & ((branches[:, None, :] == 0) | (branches[:, None, :] == branches[:, :, None]))
    return visible


def _naive_attention(q, k, v, visible, scale):
    """Full softmax attention in Megatron's shapes: q [s, b, h, d], k/v [s, b, g, d] -> [s, b, h*d]."""
    s, b, h, d = q.shape
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    v = v.repeat_interleave(h // v.shape[2], dim=2)
    scores = (q.permute(1, 2, 0, 3) @ k.permute(1, 2, 3, 0)) * scale  # [b, h, s, s]
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return (probs @ v.permute(1, 2, 0, 3)).permute(2, 0, 1, 3).reshape(s, b, h * v.shape[-1])


def _sdpa_attention(q, k, v, visible, scale, flash: bool, notes: dict):
    """SDPA in Megatron's shapes. Plain causal (visible None): is_causal, flash where asked; with
    documents: the dense boolean mask (SDPA picks its kernel)."""
    import torch.nn.functional as F

    s, b, h, d = q.shape
    qh = q.permute(1, 2, 0, 3)
    kh = k.repeat_interleave(h // k.shape[2], dim=2).permute(1, 2, 0, 3)
    vh = v.repeat_interleave(h // v.shape[2], dim=2).permute(1, 2, 0, 3)
    if visible is None:
        if flash:
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
                notes["sdpa_kernel"] = "flash"
                return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
            except RuntimeError as err:
                notes["sdpa_flash_error"] = str(err)[:200]
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
        notes.setdefault("sdpa_kernel", "default")
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=visible[:, None], scale=scale)
        notes.setdefault("sdpa_kernel_masked", "default(dense_bool_mask)")
    return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


def _emulate_cp(fn, q, k, v, docs, branches, cp: int, scale: float, **extra):
    """Every CP rank's output (each rank: its queries, the all-gathered keys), back in global
    order [s, b, h*d]. Autograd sums each key's gradient over the ranks, as the all-gather's
    backward (a reduce-scatter) does."""
    import torch

    from megatron_ext.parallel.cp_layout import cp_gathered_indices, cp_token_indices

    seq, device = q.shape[0], q.device
    gathered = cp_gathered_indices(seq, cp).to(device)
    locals_ = [cp_token_indices(seq, cp, r).to(device) for r in range(cp)]
    k_all, v_all = k.index_select(0, gathered), v.index_select(0, gathered)
    outs = []
    for rank, local in enumerate(locals_):
        ids = {}
        if docs is not None:
            ids = dict(query_document_ids=docs[:, local], key_document_ids=docs[:, gathered])
        if branches is not None:
            ids.update(query_branch_ids=branches[:, local], key_branch_ids=branches[:, gathered])
        outs.append(fn(q.index_select(0, local), k_all, v_all, seq_len=seq, cp_size=cp,
                       cp_rank=rank, softmax_scale=scale, **ids, **extra))
    order = torch.cat(locals_)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seq, device=device)
    return torch.cat(outs, 0).index_select(0, inverse)


def _correctness_case(ctx: Context, name: str, kind: str, heads: int, groups: int, cp: int,
                      dtype, seq: int, head_dim: int, seed: int, compiled: bool = True) -> dict:
    import torch

    from megatron_ext.model.cp_attention import context_parallel_attention
    from megatron_ext.model.flex_attention import flex_context_parallel_attention

    device = ctx.device
    batch = 2
    scale = 1.0 / math.sqrt(head_dim)
    g = torch.Generator().manual_seed(seed)

    def make(n):
        return torch.randn(seq, batch, n, head_dim, generator=g).to(device=device, dtype=dtype)

    q, k, v = make(heads), make(groups), make(groups)
    dout = torch.randn(seq, batch, heads * head_dim, generator=g).to(device=device, dtype=dtype)
    docs, branches = _mask_ids(kind, seq, device)
    visible = _visible(seq, docs, branches, device)
    errors: Dict[str, Dict[str, float]] = {}
    notes: dict = {}
    t0 = time.time()

    # The reference: fp64, full matrix, from the same (rounded) inputs and output gradient.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out = _naive_attention(q64, k64, v64, visible, scale)
    ref = dict(zip(("out", "dq", "dk", "dv"),
                   (ref_out, *torch.autograd.grad(ref_out, (q64, k64, v64), dout.double()))))
    del ref_out

    def compare(label, out, grads):
        errors[label] = {"out": _rel_err(out, ref["out"])}
        if grads is not None:
            for key, grad in zip(("dq", "dk", "dv"), grads):
                errors[label][key] = _rel_err(grad, ref[key])

    def leaves():
        return [t.detach().clone().requires_grad_() for t in (q, k, v)]

    # FlexAttention (compiled), emulated CP ranks. Forward-only on CPU, where compiling costs
    # ~10 s per mask kind and shape: there only some cases compile, the others run FlexAttention
    # eagerly (the same masks through its unfused reference path).
    inject = "correctness_2k" in ctx.inject
    if device.type == "cpu":
        with torch.no_grad():
            out = _emulate_cp(flex_context_parallel_attention, q, k, v, docs, branches, cp, scale,
                              compiled=compiled)
            if inject:
                out = out * 1.1
        compare("flex", out, None)
    else:
        ql, kl, vl = leaves()
        out = _emulate_cp(flex_context_parallel_attention, ql, kl, vl, docs, branches, cp, scale)
        if inject:
            out = out * 1.1
        compare("flex", out, torch.autograd.grad(out, (ql, kl, vl), dout))
    flex_s = time.time() - t0

    # The blockwise backend (fwd + bwd everywhere).
    ql, kl, vl = leaves()
    out = _emulate_cp(context_parallel_attention, ql, kl, vl, docs, branches, cp, scale)
    compare("blockwise", out, torch.autograd.grad(out, (ql, kl, vl), dout))

    # SDPA on the whole sequence: the baseline error of a production kernel at this precision.
    try:
        ql, kl, vl = leaves()
        out = _sdpa_attention(ql, kl, vl, None if kind == "causal" else visible, scale,
                              flash=device.type == "cuda" and dtype != torch.float32, notes=notes)
        compare("sdpa", out, torch.autograd.grad(out, (ql, kl, vl), dout))
    except Exception as err:  # noqa: BLE001  (no baseline: the floor alone decides)
        notes["sdpa_error"] = f"{type(err).__name__}: {err}"[:300]
    floor = (2e-2 if dtype != torch.float32 else 2e-3 if device.type == "cuda" else 1e-4)
    limits, worst, failures = {}, 0.0, []
    for backend in ("flex", "blockwise"):
        for key, err in errors[backend].items():
            baseline = errors.get("sdpa", {}).get(key)
            limit = max(2.0 * baseline, floor) if baseline is not None else floor
            limits[f"{backend}_{key}"] = limit
            worst = max(worst, err / limit)
            if not err <= limit:
                failures.append(f"{name}: {backend} {key} error {err:.3g} > {limit:.3g}")
    return {"case": name, "kind": kind, "heads": heads, "groups": groups, "cp": cp,
            "flex_compiled": compiled,
            "dtype": str(dtype).replace("torch.", ""), "seq": seq, "head_dim": head_dim,
            "errors": errors, "limits": limits, "worst_ratio": worst, "failures": failures,
            "notes": notes, "flex_s": round(flex_s, 2), "seconds": round(time.time() - t0, 2)}


CPU_COMPILED_CASES = ("causal", "branches_cp4_gqa8to1")


def stage_correctness(ctx: Context):
    import torch

    if ctx.on_cpu:
        seq, head_dim = 256, 16
    else:
        seq, head_dim = (1024 if ctx.tiny else 2048), 128
    cases = [("causal", "causal", 8, 2, 1), ("documents", "documents", 8, 2, 1),
             ("branches_gqa8to1", "branches", 8, 1, 1), ("documents_cp2", "documents", 8, 2, 2),
             ("branches_cp4_gqa8to1", "branches", 8, 1, 4)]
    plan = [(c, ctx.dtype) for c in cases]
    if not ctx.on_cpu:
        plan.append((("branches_cp2_fp32", "branches", 8, 2, 2), torch.float32))
    done, skipped = [], []
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for i, ((name, kind, heads, groups, cp), dtype) in enumerate(plan):
            # The last (optional fp32) case only with a comfortable margin; the others while time
            # is left (a case costs a FlexAttention compilation, tens of seconds on a GPU).
            need = 60 if i == len(cases) else 25
            if done and ctx.stage_time_left() < need:
                skipped.append(name)
                continue
            compiled = not ctx.on_cpu or name in CPU_COMPILED_CASES
            done.append(_correctness_case(ctx, name, kind, heads, groups, cp, dtype, seq,
                                          head_dim, seed=i, compiled=compiled))
            print(f"  correctness {name}: worst error/limit {done[-1]['worst_ratio']:.3g} "
                  f"({done[-1]['seconds']:.1f}s) {json.dumps(done[-1]['errors'])}", flush=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    n: dict = {"seq": seq, "dtype": str(ctx.dtype).replace("torch.", ""), "head_dim": head_dim,
               "cases": len(done), "cases_skipped": len(skipped)}
    main_cases = [c for c in done if c["dtype"] == n["dtype"]]
    for backend in ("flex", "blockwise", "sdpa"):
        for key in ("out", "dq", "dk", "dv"):
            values = [c["errors"][backend][key] for c in main_cases
                      if key in c["errors"].get(backend, {})]
            if values:
                n[f"{backend}_{key}"] = max(values)
    if ctx.on_cpu:
        n["flex_bwd"] = "SKIP_cpu_forward_only"
    n["flex_compiled_cases"] = sum(1 for c in done if c["flex_compiled"])
    fp32 = [c for c in done if c["dtype"] == "float32" and c["dtype"] != n["dtype"]]
    for c in fp32:
        n["fp32_flex_out"] = c["errors"]["flex"]["out"]
        if "dq" in c["errors"]["flex"]:
            n["fp32_flex_dq"] = c["errors"]["flex"]["dq"]
    n["worst_ratio"] = max((c["worst_ratio"] for c in done), default=float("nan"))
    n["floor"] = 2e-2 if not ctx.on_cpu else 1e-4
    failures = [f for c in done for f in c["failures"]]
    details = {"cases": done, "skipped": skipped, "failures": failures,
               "criterion": "error = max|x-ref|/max|ref| vs fp64 naive; pass when error <= "
                            "max(2 x SDPA error, floor): floor 2e-2 bf16, 2e-3 fp32 GPU, 1e-4 fp32 CPU"}
    status = "PASS" if done and not failures else "FAIL"
    return status, n, details


# ================================================================================================
# Stage 4: speed_memory
# ================================================================================================

def _size_key(seq: int) -> str:
    return f"{seq // 1024}k" if seq % 1024 == 0 else str(seq)


def _bench_attention(ctx: Context, backend: str, seq: int, heads: int, groups: int, head_dim: int,
                     notes: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from megatron_ext.model.cp_attention import context_parallel_attention
    from megatron_ext.model.flex_attention import build_block_mask, flex_context_parallel_attention

    device, dtype = ctx.device, ctx.dtype
    scale = 1.0 / math.sqrt(head_dim)
    cuda = device.type == "cuda"
    backward = not (backend == "flex" and not cuda)  # FlexAttention on CPU: forward only
    q = torch.randn(seq, 1, heads, head_dim, device=device, dtype=dtype, requires_grad=backward)
    k = torch.randn(seq, 1, groups, head_dim, device=device, dtype=dtype, requires_grad=backward)
    v = torch.randn(seq, 1, groups, head_dim, device=device, dtype=dtype, requires_grad=backward)
    dout = torch.randn(seq, 1, heads * head_dim, device=device, dtype=dtype)
    info: dict = {}
    if backend == "flex":
        t0 = time.time()
        mask = build_block_mask(seq, 1, 0, causal=True, device=device)
        _sync(device)
        info["mask_first_s"] = round(time.time() - t0, 3)
        t0 = time.time()
        mask = build_block_mask(seq, 1, 0, causal=True, device=device)
        _sync(device)
        info["mask_ms"] = round(1000 * (time.time() - t0), 3)

        def forward():
            return flex_context_parallel_attention(q, k, v, seq_len=seq, cp_size=1, cp_rank=0,
                                                   softmax_scale=scale, block_mask=mask)
    elif backend == "blockwise":
        def forward():
            return context_parallel_attention(q, k, v, seq_len=seq, cp_size=1, cp_rank=0,
                                              softmax_scale=scale)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels = [SDPBackend.FLASH_ATTENTION] if cuda else [SDPBackend.FLASH_ATTENTION,
                                                             SDPBackend.MATH]
        mode = notes.get("sdpa_gqa", "native")

        def forward():
            qh = q.permute(1, 2, 0, 3)
            if mode == "native":
                kh, vh = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
                with sdpa_kernel(kernels):
                    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                                         enable_gqa=True)
            else:
                kh = k.repeat_interleave(heads // groups, dim=2).permute(1, 2, 0, 3)
                vh = v.repeat_interleave(heads // groups, dim=2).permute(1, 2, 0, 3)
                with sdpa_kernel(kernels):
                    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
            return out.permute(2, 0, 1, 3).reshape(seq, 1, heads * head_dim)

        if "sdpa_gqa" not in notes:
            try:
                with torch.no_grad():
                    forward()
                notes["sdpa_gqa"] = "native"
            except RuntimeError as err:
                notes["sdpa_gqa"] = "repeat_interleave"
                notes["sdpa_gqa_native_error"] = str(err)[:200]
            mode = notes["sdpa_gqa"]

    def step():
        if backward:
            out = forward()
            out.backward(dout)
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                forward()

    t0 = time.time()
    step()  # warm-up: compilation, autotuning, allocator
    _sync(device)
    info["warmup_s"] = round(time.time() - t0, 3)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    while len(times) < 3:
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if sum(times) > 5.0 or ctx.stage_time_left() < 15:
            break
    info["ms"] = round(1000 * sorted(times)[len(times) // 2], 3)
    info["iters"] = len(times)
    info["backward"] = backward
    if cuda:
        info["gb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
    return info


def stage_speed(ctx: Context):
    if ctx.on_cpu:
        sizes, heads, groups, head_dim = [256, 512], 4, 2, 16
    else:
        sizes = [2048, 4096] if ctx.tiny else ctx.sizes
        heads, groups, head_dim = 32, 8, 128
    # Largest first: the flex / SDPA ratio there is the number that matters, and what the time
    # budget cuts is then the smaller sizes.
    sizes = sorted(sizes, reverse=True)
    backends = ("flex", "sdpa", "blockwise")
    n: dict = {"heads": heads, "groups": groups, "head_dim": head_dim,
               "dtype": str(ctx.dtype).replace("torch.", "")}
    runs: Dict[str, dict] = {}
    notes: dict = {}
    errors = []
    last: Dict[str, tuple] = {}  # backend -> (seq, warm-up s, s per fwd+bwd) at the last size
    for seq in sizes:
        for backend in backends:
            key = f"{backend}_{_size_key(seq)}"
            if backend in last:  # skip what would overrun the stage's time
                prev_seq, warmup_s, step_s = last[backend]
                grow = (seq / prev_seq) ** 2  # causal attention: quadratic in the length
                # flex's warm-up is mostly compilation (a new one per length), not compute.
                estimate = (warmup_s if backend == "flex" else warmup_s * grow) + 3 * step_s * grow
                if estimate > ctx.stage_time_left() - 5:
                    runs[key] = {"skipped": f"budget (estimate {estimate:.0f}s)"}
                    n[key + "_ms"] = "skipped_budget"
                    continue
            elif ctx.stage_time_left() < 20:
                runs[key] = {"skipped": "budget"}
                n[key + "_ms"] = "skipped_budget"
                continue
            try:
                info = _bench_attention(ctx, backend, seq, heads, groups, head_dim, notes)
                runs[key] = info
                n[key + "_ms"] = info["ms"]
                if "gb" in info:
                    n[key + "_gb"] = info["gb"]
                last[backend] = (seq, info["warmup_s"], info["ms"] / 1000)
            except StageTimeout:
                raise
            except Exception as err:  # noqa: BLE001
                if _is_oom(err):
                    runs[key] = {"oom": str(err)[:200]}
                    n[key + "_ms"] = "oom"
                else:
                    runs[key] = {"error": f"{type(err).__name__}: {err}"[:500],
                                 "traceback": traceback.format_exc()}
                    n[key + "_ms"] = "error"
                    errors.append(f"{key}: {type(err).__name__}: {err}"[:300])
            ctx.free_memory()
            print(f"  speed {key}: {json.dumps(runs[key], default=str)[:400]}", flush=True)
    both = [s for s in sizes if isinstance(runs.get(f"flex_{_size_key(s)}", {}).get("ms"), float)
            and isinstance(runs.get(f"sdpa_{_size_key(s)}", {}).get("ms"), float)]
    if both:
        seq = max(both)
        ratio = runs[f"flex_{_size_key(seq)}"]["ms"] / runs[f"sdpa_{_size_key(seq)}"]["ms"]
        n[f"flex_over_sdpa_{_size_key(seq)}"] = round(ratio, 3)
        n["goal_le_1.25_met"] = ratio <= 1.25 if seq == max(sizes) else f"not_at_{_size_key(max(sizes))}"
    n.update({k: v for k, v in notes.items() if k == "sdpa_gqa"})
    status = "FAIL" if errors else "PASS"
    return status, n, {"runs": runs, "notes": notes, "errors": errors,
                       "timing": "median of up to 3 fwd+bwd after one warm-up; peak = "
                                 "torch.cuda.max_memory_allocated (inputs and grads included)"}


# ================================================================================================
# Stage 5: packed_training_smoke
# ================================================================================================

EOD_BYTE_TOKEN = 256  # byte-level tokens 0..255, then the end-of-document token


def _packed_vs_alone(ctx: Context) -> dict:
    import torch

    from megatron_ext.parallel.cp_layout import document_ids_from_eod
    from megatron_ext.model.cp_attention import DocumentMaskParams

    seq = 256 if ctx.on_cpu else 1024
    hidden = 64 if ctx.on_cpu else 256
    vocab = 512
    args = _model_config(ctx, layers=2, hidden=hidden, heads=4, groups=2, ffn=3 * hidden, seq=seq,
                       vocab=vocab, backend="flex")
    model, plan = _build(ctx, args, training=False)
    model.eval()
    u = seq // 64
    rows = [[17 * u + 3, 8 * u - 3, 25 * u + 1, 14 * u - 1], [33 * u + 5, 31 * u - 5]]
    texts = _stdlib_docstrings(max_chars=40_000)
    docs, cursor = [], 0
    for lengths in rows:
        for n_tokens in lengths:
            text = texts[cursor % len(texts)].encode("utf-8")
            cursor += 1
            body = list(text[:n_tokens - 1])
            body += [32] * (n_tokens - 1 - len(body))  # (docstrings here are longer than needed)
            docs.append(body + [EOD_BYTE_TOKEN])
    packed, start = [], 0
    for lengths in rows:
        row = docs[start:start + len(lengths)]
        start += len(lengths)
        packed.append(torch.tensor(sum(row, [])))
    packed = torch.stack(packed).to(ctx.device)
    labels = torch.roll(packed, -1, dims=1)
    document_ids = document_ids_from_eod(packed, EOD_BYTE_TOKEN)
    positions = torch.cat([torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
                           for lengths in rows]).to(ctx.device)

    def run(tokens, pos, lab, ids=None):
        params = None if ids is None else DocumentMaskParams.for_tokens(ids, tokens.shape[1])
        with torch.no_grad():
            loss = model(tokens, pos, None, labels=lab, packed_seq_params=params).float()
            params = None if ids is None else DocumentMaskParams.for_tokens(ids, tokens.shape[1])
            logits = model(tokens, pos, None, packed_seq_params=params).float()
        return loss, logits

    together_loss, together_logits = run(packed, positions, labels, document_ids)
    leak_loss, leak_logits = run(packed, positions, labels)  # no document mask: must differ

    # Each document alone, two per batch (the packed batch's shape), padded after its end with
    # EOD tokens: causal attention keeps the padding out of the document's own tokens.
    alone_loss, alone_logits = [], []
    for first in range(0, len(docs), 2):
        pair = docs[first:first + 2]
        while len(pair) < 2:
            pair = pair + [docs[0]]
        batch = torch.tensor([d + [EOD_BYTE_TOKEN] * (seq - len(d)) for d in pair]).to(ctx.device)
        loss, logits = run(batch, torch.arange(seq).expand(2, seq).contiguous().to(ctx.device),
                           torch.roll(batch, -1, dims=1))
        for i in range(min(2, len(docs) - first)):
            alone_loss.append(loss[i])
            alone_logits.append(logits[i])

    def diffs(loss_all, logits_all):
        worst_loss, worst_doc, logit_num, logit_den, means = 0.0, 0.0, 0.0, 0.0, []
        index = 0
        for r, lengths in enumerate(rows):
            offset = 0
            for n_tokens in lengths:
                # The last token of a document predicts the next one: not scored (loss mask).
                got = loss_all[r, offset:offset + n_tokens - 1]
                want = alone_loss[index][:n_tokens - 1]
                worst_loss = max(worst_loss, ((got - want).abs() / want.abs()).max().item())
                worst_doc = max(worst_doc, abs(got.mean().item() - want.mean().item())
                                / abs(want.mean().item()))
                means.append(want.mean().item())
                got_l = logits_all[r, offset:offset + n_tokens - 1]
                want_l = alone_logits[index][:n_tokens - 1]
                logit_num = max(logit_num, (got_l - want_l).abs().max().item())
                logit_den = max(logit_den, want_l.abs().max().item())
                offset += n_tokens
                index += 1
        return worst_loss, worst_doc, logit_num / max(logit_den, 1e-30), means

    loss_rel, doc_rel, logits_err, means = diffs(together_loss, together_logits)
    leak_rel, _, leak_logits_err, _ = diffs(leak_loss, leak_logits)
    bf16 = ctx.dtype != torch.float32
    tol_loss, tol_logits = (1e-2, 5e-2) if bf16 else (1e-5, 1e-5)
    problems = []
    if not loss_rel <= tol_loss:
        problems.append(f"packed vs alone per-token loss differs by {loss_rel:.3g} > {tol_loss:g}")
    if not logits_err <= tol_logits:
        problems.append(f"packed vs alone logits differ by {logits_err:.3g} > {tol_logits:g}")
    if not leak_logits_err > 4 * tol_logits:
        problems.append(f"without the document mask the logits differ by only {leak_logits_err:.3g}"
                        f": the check could not see a leak")
    return {"attention": plan.backend, "dtype": str(ctx.dtype).replace("torch.", ""),
            "documents": sum(len(r) for r in rows), "doc_tokens": [len(d) for d in docs],
            "seq": seq, "loss_rel": loss_rel, "doc_mean_loss_rel": doc_rel, "logits_err": logits_err,
            "leak_loss_rel": leak_rel, "leak_logits_err": leak_logits_err, "tol_loss": tol_loss,
            "tol_logits": tol_logits, "doc_mean_losses": means, "problems": problems}


def _training_run(ctx: Context) -> dict:
    """A few bf16 iterations of ``python -m megatron_ext.train`` under flex with packed documents
    (on CPU, with --exercise-gpu-stages only: fp32 and the blockwise backend)."""
    import sentencepiece

    from megatron_ext.data.preprocess import output_prefix_for, preprocess

    work = os.path.join(ctx.workdir, "train_smoke")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    texts = _stdlib_docstrings(max_chars=400_000)
    corpus = os.path.join(work, "docs.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    plain = os.path.join(work, "spm_input.txt")
    with open(plain, "w", encoding="utf-8") as f:
        f.write("\n".join(texts))
    spm_prefix = os.path.join(work, "spm")
    sentencepiece.SentencePieceTrainer.train(
        input=plain, model_prefix=spm_prefix, vocab_size=1000, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=min(8, os.cpu_count() or 1), minloglevel=2)
    tokenizer_model = spm_prefix + ".model"
    prefix = os.path.join(work, "docstrings")
    preprocess([corpus], prefix, "SentencePieceTokenizer", tokenizer_model, append_eod=True,
               workers=1, progress=False)
    data_prefix = output_prefix_for(prefix, "text")
    data_s = time.time() - t0

    cpu = ctx.on_cpu
    seq, iters = (256, 6) if cpu else (1024, 8)
    metrics = os.path.join(work, "metrics.jsonl")
    cmd = [sys.executable, "-m", "megatron_ext.train",
           "--num-layers", "2", "--hidden-size", "256", "--ffn-hidden-size", "704",
           "--num-attention-heads", "4", "--num-query-groups", "2",
           "--seq-length", str(seq), "--max-position-embeddings", str(seq),
           "--untie-embeddings-and-output-weights", "--micro-batch-size", "2",
           "--global-batch-size", "4", "--train-iters", str(iters), "--lr", "3e-3",
           "--lr-warmup-iters", "1", "--lr-decay-style", "constant", "--seed", "1234",
           "--log-interval", "1", "--packed-documents",
           "--data-path", data_prefix, "--tokenizer-type", "SentencePieceTokenizer",
           "--tokenizer-model", tokenizer_model, "--data-cache-path", os.path.join(work, "cache"),
           "--metrics-jsonl", metrics]
    if cpu:
        cmd += ["--device", "cpu", "--attention-backend", "blockwise"]
    else:
        cmd += ["--device", "cuda", "--bf16", "--attention-backend", "flex"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")}
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                "PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH"))
                                              if p)})
    if cpu:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    log_path = os.path.join(work, "train.log")
    timeout = max(10.0, ctx.stage_time_left() - 5)
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    train_s = time.time() - t0
    log_tail = _tail(log_path, 40)
    print("  training run log (tail):\n" + "\n".join("    " + l for l in log_tail.splitlines()),
          flush=True)
    records = []
    if os.path.exists(metrics):
        with open(metrics) as f:
            records = [json.loads(line) for line in f if line.strip()]
    run_record = next((r for r in records if r.get("kind") == "run"), {})
    losses = [r["loss"] for r in records if "loss" in r and r.get("kind") is None]
    problems = []
    if rc != 0:
        problems.append(f"training exited with {rc}")
    if len(losses) != iters:
        problems.append(f"{len(losses)} of {iters} iterations logged")
    if not all(math.isfinite(x) for x in losses):
        problems.append("non-finite loss")
    want_backend = "blockwise" if cpu else "flex"
    if run_record.get("attention_backend") != want_backend:
        problems.append(f"the run reports attention {run_record.get('attention_backend')}, "
                        f"expected {want_backend}")
    if len(losses) >= 2 and not losses[-1] < losses[0]:
        problems.append(f"loss did not go down: {losses[0]:.4f} -> {losses[-1]:.4f}")
    tokens_per_s = [r.get("tokens_per_s") for r in records if "tokens_per_s" in r]
    return {"rc": rc, "iters": len(losses), "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "train_s": round(train_s, 1),
            "data_s": round(data_s, 1), "tokens_per_s_last": tokens_per_s[-1] if tokens_per_s else None,
            "run": run_record, "losses": losses, "command": cmd, "log_tail": log_tail,
            "problems": problems}


def stage_packed(ctx: Context):
    check = _packed_vs_alone(ctx)
    n = {"attention": check["attention"], "dtype": check["dtype"], "docs": check["documents"],
         "loss_max_rel": check["loss_rel"], "doc_mean_rel": check["doc_mean_loss_rel"],
         "logits_err": check["logits_err"], "leak_logits_err": check["leak_logits_err"],
         "leak_loss_max_rel": check["leak_loss_rel"], "tol": check["tol_loss"]}
    details = {"packed_vs_alone": check}
    problems = list(check["problems"])
    if ctx.on_cpu and not ctx.exercise:
        n["train"] = "SKIP_cpu"
    elif ctx.stage_time_left() < 30:
        n["train"] = "SKIP_budget"
    else:
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            sentencepiece = None
        if sentencepiece is None:
            n["train"] = "SKIP_no_sentencepiece"
        else:
            train = _training_run(ctx)
            details["training"] = train
            problems += train["problems"]
            n.update({"train": "ran", "train_rc": train["rc"], "train_iters": train["iters"],
                      "loss_first": train["loss_first"], "loss_last": train["loss_last"],
                      "train_attention": train["run"].get("attention_backend"),
                      "train_dtype": train["run"].get("params_dtype"), "train_s": train["train_s"]})
    details["problems"] = problems
    return ("FAIL" if problems else "PASS"), n, details


# ================================================================================================
# Stage 6: mfu_8k
# ================================================================================================

# name, layers, hidden, heads, query groups, ffn (Llama-3.2-3B / -1B shapes, and a half-size one)
MFU_PRESETS = [("3b", 28, 3072, 24, 8, 8192), ("1b", 16, 2048, 32, 8, 8192),
               ("0.5b", 8, 2048, 16, 4, 5632)]
TINY_PRESETS = [("tiny", 2, 128, 4, 2, 384)]
PEAK_BF16 = [("GH200", 989e12), ("H200", 989e12), ("H100 PCIE", 756e12), ("H100 NVL", 835e12),
             ("H100", 989e12), ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12),
             ("L40S", 362e12)]


def peak_bf16_flops(device_name: str) -> float:
    name = device_name.upper()
    for key, flops in PEAK_BF16:
        if key in name:
            return flops
    return 989e12


def stage_mfu(ctx: Context):
    import torch

    cpu = ctx.on_cpu
    if ctx.tiny:
        presets, seq, vocab = TINY_PRESETS, (256 if cpu else 2048), 512
    else:
        presets, seq, vocab = MFU_PRESETS, 8192, 32000
    if not ctx.tiny and ctx.stage_time_left() < 60:
        presets = presets[1:]  # not enough time to try the largest first
    device_name = torch.cuda.get_device_name(ctx.device) if not cpu else "cpu"
    peak = peak_bf16_flops(device_name)
    tried = []
    for name, layers, hidden, heads, groups, ffn in presets:
        if tried and ctx.stage_time_left() < 25:
            tried.append({"preset": name, "skipped": "budget"})
            continue
        model = None
        try:
            args = _model_config(ctx, layers=layers, hidden=hidden, heads=heads, groups=groups,
                               ffn=ffn, seq=seq, vocab=vocab,
                               backend="blockwise" if cpu else "flex")
            t0 = time.time()
            model, plan = _build(ctx, args, training=True, gpu_init=True)
            build_s = time.time() - t0
            params = sum(p.numel() for p in model.parameters())
            embedding = model.embedding.word_embeddings.weight.numel()
            tokens = torch.randint(0, vocab, (1, seq), device=ctx.device)
            positions = torch.arange(seq, device=ctx.device).unsqueeze(0)
            labels = torch.roll(tokens, -1, dims=1)

            def step():
                loss = model(tokens, positions, None, labels=labels).float().mean()
                loss.backward()
                for p in model.parameters():
                    p.grad = None
                return loss

            t0 = time.time()
            loss = step()
            _sync(ctx.device)
            warmup_s = time.time() - t0
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(ctx.device)
            times = []
            while len(times) < 3 and (not times or ctx.stage_time_left() > 3 * times[-1] + 5):
                t0 = time.perf_counter()
                loss = step()
                _sync(ctx.device)
                times.append(time.perf_counter() - t0)
            step_s = sorted(times)[len(times) // 2]
            tokens_per_s = seq / step_s
            attention_width = heads * args.kv_channels
            flops_per_token = 6 * (params - embedding) + 6 * layers * attention_width * seq
            mfu = tokens_per_s * flops_per_token / peak
            result = {"preset": name, "layers": layers, "hidden": hidden, "heads": heads,
                      "groups": groups, "ffn": ffn, "seq": seq, "params": params,
                      "params_b": round(params / 1e9, 3), "attention": plan.backend,
                      "build_s": round(build_s, 1), "warmup_s": round(warmup_s, 1),
                      "step_ms": round(1000 * step_s, 1), "steps": len(times),
                      "tokens_per_s": round(tokens_per_s, 1), "mfu": mfu,
                      "peak_tflops": peak / 1e12, "loss": loss.item(),
                      "flops_per_token": flops_per_token}
            if ctx.device.type == "cuda":
                result["mem_gb"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30, 2)
            tried.append(result)
            break
        except StageTimeout:
            raise
        except Exception as err:  # noqa: BLE001
            if not _is_oom(err):
                raise
            tried.append({"preset": name, "oom": str(err)[:200]})
        finally:
            model = None
            ctx.free_memory()
    done = [t for t in tried if "mfu" in t]
    if not done:
        raise RuntimeError(f"no preset ran: {tried}")
    r = done[0]
    n = {"preset": r["preset"], "params_b": r["params_b"], "seq": r["seq"],
         "attention": r["attention"], "step_ms": r["step_ms"], "tokens_per_s": r["tokens_per_s"],
         "mfu": r["mfu"], "peak_tflops": r["peak_tflops"], "device_name": device_name,
         "warmup_s": r["warmup_s"], "mem_gb": r.get("mem_gb")}
    return "PASS", n, {"tried": tried,
                       "flops": "per token: 6 x (params - input embedding) + 6 x layers x "
                                "(heads x head_dim) x seq (causal attention matmuls, fwd+bwd); "
                                "no optimizer step"}


STAGE_FUNCS = {"environment": stage_environment, "model_builds": stage_model_builds,
               "correctness_2k": stage_correctness, "speed_memory": stage_speed,
               "packed_training_smoke": stage_packed, "mfu_8k": stage_mfu}


if __name__ == "__main__":
    sys.exit(main())
