"""How this process was launched: rank, world size and rendezvous, from torchrun or SLURM.

This is the one place that knows how ranks are discovered. torchrun sets RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_ADDR/MASTER_PORT; `srun` sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and a
compressed SLURM_JOB_NODELIST from which the first host becomes the master. No torch import:
flag validation asks for the world size before anything heavy is loaded.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping


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


def world_size(env: Mapping[str, str] = os.environ) -> int:
    """Ranks the launcher started: WORLD_SIZE (torchrun), SLURM_NTASKS (srun), else 1."""
    return int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
