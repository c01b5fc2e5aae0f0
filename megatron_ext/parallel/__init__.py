"""Parallelism: how this process was launched, the layout's rules, process groups, the platform.

    launch.py           torchrun / srun / single process: rank and world size (no torch import)
    layout.py           Layout: TP x PP x CP x DP and every rule tying it to a model and a sequence
    groups.py           torch.distributed and Megatron-Core process groups for a launch
    device_platform.py  device and backend; the only module that patches Megatron-Core (CPU only)
    collectives.py      autograd-correct collectives (gloo's all_gather backward is wrong)
    cp_layout.py        Megatron's load-balanced context-parallel token layout and per-rank slices

``from megatron_ext import parallel; parallel.initialize(...)`` reaches the process-group
functions of ``groups.py``; they are loaded on first use, so the light modules above (flag
parsing asks ``layout`` and ``launch``) import without torch or Megatron-Core.
"""

_GROUP_FUNCTIONS = ("initialize", "destroy", "is_rank0", "ensure_torch_distributed",
                    "check_layout", "launch_info")


def __getattr__(name):
    if name in _GROUP_FUNCTIONS:
        from megatron_ext.parallel import groups

        return getattr(groups, name)
    raise AttributeError(f"module 'megatron_ext.parallel' has no attribute {name!r}")
