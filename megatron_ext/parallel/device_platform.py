"""Device and collective backend selection: CUDA + NCCL on GPUs, CPU + gloo elsewhere.

Megatron-Core assumes CUDA in a handful of places:
``torch.cuda.current_device()`` used as a device, literal ``device='cuda'`` buffers in the
optimizer and grad clipping, a type-string assertion in ``clip_grads`` and CUDA RNG state in the
tensor-parallel RNG tracker. On CPU we redirect exactly those to the CPU, and replace the fp32
fallback of the gradient norm (apex/TE's fused kernel on GPUs) by an fp64 sum.

This is the only module in the project allowed to patch Megatron-Core, and it only does so when
the platform is CPU, plus one scoped fix: loading the distributed optimizer's state into plain
torch Adam (no Apex / Transformer Engine, as always on CPU) is broken in Megatron-Core 0.16, and
``torch_adam_keeps_its_step`` repairs it for the duration of one load.
``cpu_redirections_active()`` tells whether the redirections are installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode


@dataclasses.dataclass(frozen=True)
class Platform:
    device_type: str  # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"

    @property
    def is_cpu(self) -> bool:
        return self.device_type == "cpu"

    def device(self, local_rank: int = 0) -> torch.device:
        if self.is_cpu:
            return torch.device("cpu")
        return torch.device("cuda", local_rank)


def detect(requested: Optional[str] = None) -> Platform:
    """Pick the platform: ``requested`` ("cuda"/"cpu") or env ``MEGATRON_EXT_DEVICE``, else CUDA if present."""
    choice = requested or os.environ.get("MEGATRON_EXT_DEVICE") or (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "--device cuda was requested but torch.cuda.is_available() is False; "
                "use --device cpu (gloo) or install a CUDA build of torch."
            )
        return Platform("cuda", "nccl")
    if choice == "cpu":
        return Platform("cpu", "gloo")
    raise ValueError(f"unknown device {choice!r}: expected 'cuda' or 'cpu'")


def activate(platform: Platform, local_rank: int = 0) -> Platform:
    """Make the process ready to run Megatron-Core on ``platform``."""
    if platform.is_cpu:
        _install_cpu_redirections()
    else:
        torch.cuda.set_device(local_rank)
    return platform


# --------------------------------------------------------------------------------------------
# CPU redirections
# --------------------------------------------------------------------------------------------

_ACTIVE_MODE: Optional["_CudaToCpuMode"] = None


def cpu_redirections_active() -> bool:
    return _ACTIVE_MODE is not None


def _is_cuda_device(device) -> bool:
    # A bare int device means "CUDA device N" to torch factories; on the CPU platform it can only
    # come from Megatron's `torch.cuda.current_device()`.
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuMode(TorchFunctionMode):
    """Sends every tensor Megatron-Core asks to place on CUDA to the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # clip_grads asserts `grad.type() == 'torch.cuda.FloatTensor'`.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        return func(*args, **kwargs)


def _l2_norm_fp64(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm``: the norm of all tensors, accumulated in fp64."""
    squares = sum((t.double().square().sum() for t in tensor_lists[0]),
                  torch.zeros((), dtype=torch.float64))
    return squares.sqrt().reshape(1), None


def _install_cpu_redirections() -> None:
    global _ACTIVE_MODE
    if _ACTIVE_MODE is not None:
        return
    import megatron.core.tensor_parallel.random as tp_random

    # The "device" RNG is the CPU generator; Megatron's tracker forks it for TP regions.
    torch.cuda.current_device = lambda: 0
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed)) and None
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    tp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    # Megatron's CPU fallback for the gradient norm is torch.norm per tensor in fp32, which is off
    # by up to ~1e-4 on a 2M-element gradient (measured on the tiny model's output layer) and by
    # a different amount for each way the tensors are split, so TP or the distributed optimizer
    # reported (and clipped with) a norm 5e-5 away from one process's. Summed in fp64 instead.
    import megatron.core.optimizer.clip_grads as clip_grads

    clip_grads.l2_norm_impl = _l2_norm_fp64

    _ACTIVE_MODE = _CudaToCpuMode()
    _ACTIVE_MODE.__enter__()

    # `torch.autograd.backward` is itself dispatched through the mode, and a mode is switched off
    # while it handles a call - so without this the whole backward pass (including activation
    # recomputation, which re-runs forward code) would run without the redirections.
    import torch.autograd as autograd

    run_backward = autograd._engine_run_backward

    def run_backward_with_redirections(*args, **kwargs):
        if torch._C._is_torch_function_mode_enabled():
            return run_backward(*args, **kwargs)
        with _ACTIVE_MODE:
            return run_backward(*args, **kwargs)

    autograd._engine_run_backward = run_backward_with_redirections


# --------------------------------------------------------------------------------------------
# Distributed optimizer state into torch Adam
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def torch_adam_keeps_its_step(optimizer):
    """Load a 'fully_reshardable' distributed-optimizer state into torch Adam (used around
    ``DistributedOptimizer.load_state_dict`` by the checkpoint loader).

    Megatron-Core 0.16 restores the step count from the param groups (into every per-parameter
    state), then copies each saved per-parameter tensor into the state, but leaves "step" out of
    what it copies while still copying into every state key: a KeyError for torch Adam (no Apex /
    Transformer Engine). Here "step" keeps the value just restored, one tensor per parameter.
    """
    from megatron.core.optimizer import distrib_optimizer

    patched = []
    if not distrib_optimizer.HAVE_APEX_OR_TE:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            if isinstance(opt, distrib_optimizer.DistributedOptimizer):
                patched.append(opt)
                opt._set_main_param_and_optimizer_states = _step_keeping_setter(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class's method


def _step_keeping_setter(opt):
    original = type(opt)._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        group_index, group_order = opt.model_param_group_index_map[model_param]
        main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
        state = opt.optimizer.state[main_param]
        if "step" in state and "step" not in tensors:
            # The restored step is one tensor shared by every parameter's state, and torch Adam
            # increments it in place: each parameter needs its own copy.
            state["step"] = state["step"].clone()
            tensors = {**tensors, "step": state["step"]}
        original(opt, model_param, tensors)

    return set_states
