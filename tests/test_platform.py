"""The CPU redirections are on for CPU runs only, and make Megatron-Core's CUDA-isms run on CPU."""

import subprocess
import sys
import textwrap

from launch import REPO_ROOT


def _run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_redirections_stay_off_when_cuda_is_used():
    # A fresh interpreter: the redirections are process-global once installed.
    out = _run_python("""
        from unittest import mock
        import torch
        import megatron.core.tensor_parallel.random as tp_random
        from megatron_ext.parallel import device_platform as platform

        originals = (torch.cuda.current_device, torch.cuda.get_rng_state, tp_random._set_cuda_rng_state)
        with mock.patch("torch.cuda.is_available", return_value=True), \\
             mock.patch("torch.cuda.set_device") as set_device:
            plat = platform.activate(platform.detect(), local_rank=3)
        assert (plat.device_type, plat.backend) == ("cuda", "nccl"), plat
        set_device.assert_called_once_with(3)
        assert not platform.cpu_redirections_active()
        assert (torch.cuda.current_device, torch.cuda.get_rng_state, tp_random._set_cuda_rng_state) == originals
        assert torch._C._is_torch_function_mode_enabled() is False
        print("ok")
    """)
    assert out.strip() == "ok"


def test_cpu_platform_redirects_megatron_cuda_assumptions():
    out = _run_python("""
        import torch
        from megatron.core.tensor_parallel import random as tp_random
        from megatron_ext.parallel import device_platform as platform

        plat = platform.activate(platform.detect("cpu"))
        assert (plat.device_type, plat.backend) == ("cpu", "gloo")
        assert platform.cpu_redirections_active()
        # Literal CUDA placements land on the CPU.
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.ones(2).cuda().device.type == "cpu"
        # clip_grads' type assertion holds for CPU fp32 grads.
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"
        # The TP RNG tracker forks the CPU generator and restores it afterwards.
        torch.manual_seed(0)
        tp_random.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
        before = torch.get_rng_state()
        with tp_random.get_cuda_rng_tracker().fork():
            inside = torch.rand(3)
        assert torch.equal(before, torch.get_rng_state())
        with tp_random.get_cuda_rng_tracker().fork():
            again = torch.rand(3)
        assert not torch.equal(inside, again)  # the tracked stream advanced
        # Backward passes (activation recomputation re-runs forward there) are redirected too.
        class AddsCudaBuffers(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x + torch.ones(1, device="cuda")
            @staticmethod
            def backward(ctx, grad):
                return grad * torch.full((1,), 2.0, device="cuda")
        x = torch.ones(2, requires_grad=True)
        AddsCudaBuffers.apply(x).sum().backward()
        assert torch.equal(x.grad, torch.full((2,), 2.0))
        print("ok")
    """)
    assert out.strip() == "ok"


def test_requesting_cuda_without_a_gpu_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-c", "from megatron_ext.parallel import device_platform; device_platform.detect('cuda')"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--device cpu" in proc.stderr
