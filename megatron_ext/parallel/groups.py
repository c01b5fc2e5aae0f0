"""torch.distributed and Megatron-Core process groups, from torchrun or SLURM variables.

How ranks are discovered lives in ``launch.py`` (no torch import, so flag parsing can ask for the
world size cheaply); this module turns that into process groups.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state

from megatron_ext.parallel import device_platform as platform_mod
from megatron_ext.parallel.launch import LaunchInfo, first_host_in_nodelist, launch_info  # noqa: F401
from megatron_ext.parallel.layout import Layout


def check_layout(world_size: int, tp: int, pp: int, cp: int) -> int:
    """Data-parallel size for the layout, or an error naming the flags to change."""
    return Layout(tp, pp, cp, world_size).dp


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
            init_method=_rendezvous(info),
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
    torch.distributed.init_process_group("gloo", init_method=_rendezvous(info),
                                         rank=info.rank, world_size=info.world_size)
    atexit.register(destroy)


def _rendezvous(info) -> str:
    """The process group's init address. A lone process started without a launcher (and without
    MASTER_PORT) has no peer to agree with, so it takes a free port: two single-process runs on
    one machine (a training run and an evaluation, say) must not collide on 29500."""
    if info.launcher == "single" and "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{s.getsockname()[1]}"
    return f"tcp://{info.master_addr}:{info.master_port}"


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
