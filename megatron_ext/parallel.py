"""torch.distributed and Megatron-Core process groups, from torchrun or SLURM variables.

This is the one place that knows how ranks are discovered. torchrun sets RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_ADDR/MASTER_PORT; `srun` sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and a
compressed SLURM_JOB_NODELIST from which the first host becomes the master.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import re
import socket
from typing import Mapping, Optional, Sequence

import torch
from megatron.core import parallel_state

from megatron_ext import platform as platform_mod


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def first_host_in_nodelist(nodelist: str) -> str:
    """First hostname of a SLURM nodelist such as ``gpu[003-007,010],cpu1`` -> ``gpu003``."""
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def launch_info(env: Mapping[str, str] = os.environ) -> LaunchInfo:
    """Read rank layout from torchrun (preferred) or SLURM variables; single process otherwise."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", 0))
        master = env.get("MASTER_ADDR") or first_host_in_nodelist(
            env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        )
        return LaunchInfo(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=master,
            # Distinct jobs sharing a node must not collide on the rendezvous port.
            master_port=int(env.get("MASTER_PORT", 29500 + job_id % 1000)),
            launcher="slurm",
        )
    return LaunchInfo(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"),
                      int(env.get("MASTER_PORT", 29500)), "single")


def check_layout(world_size: int, tp: int, pp: int, cp: int) -> int:
    """Data-parallel size for the layout, or a ValueError naming the flags to change."""
    model_parallel = tp * pp * cp
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}) x --context-parallel-size ({cp}) = "
            f"{model_parallel}; launch a multiple of {model_parallel} processes or change those flags"
        )
    return world_size // model_parallel


def initialize(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    device: Optional[str] = None,
    timeout_minutes: int = 30,
    hierarchical_cp_sizes: Optional[Sequence[int]] = None,
) -> tuple[LaunchInfo, platform_mod.Platform]:
    """Initialise torch.distributed and Megatron-Core's TP/PP/CP/DP groups.

    ``hierarchical_cp_sizes``: Transformer Engine's a2a+p2p exchange needs Megatron's
    hierarchical context-parallel groups (a2a size, p2p size); without them TE gets no CP group.
    """
    info = launch_info()
    check_layout(info.world_size, tp, pp, cp)
    plat = platform_mod.activate(platform_mod.detect(device), info.local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=plat.backend,
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        hierarchical_context_parallel_sizes=list(hierarchical_cp_sizes) if hierarchical_cp_sizes
        else None,
    )
    return info, plat


def ensure_torch_distributed() -> None:
    """torch.distributed for a tool run outside training, once (re-initialising it under
    torchrun would reuse the launcher's store); a lone process gets a gloo group of one on a free
    port. Megatron-Core's dataset builders and checkpointing ask for ranks even in one process."""
    if torch.distributed.is_initialized():
        return
    info = launch_info()
    if info.launcher == "single":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address, port = "127.0.0.1", s.getsockname()[1]
    else:
        address, port = info.master_addr, info.master_port
    torch.distributed.init_process_group("gloo", init_method=f"tcp://{address}:{port}",
                                         rank=info.rank, world_size=info.world_size)
    atexit.register(destroy)


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
