"""Where this process sits in the job: rank and world from the deepspeed launcher, torchrun, Slurm or nothing."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

_LAUNCHER_KEY = "AMI_DIST_LAUNCHER"  # which launcher an earlier detect_launch() found, in this process's env


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "deepspeed/torchrun", "slurm" or "single"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list (``node[1-4]`` -> ``node1``), via scontrol when it is there."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def detect_launch(environ: dict[str, str] | None = None) -> LaunchInfo:
    """Read the launcher's environment and fill in what torch.distributed expects (RANK, MASTER_ADDR, ...).

    Order: variables set by ``deepspeed``/``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK), then Slurm's
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; master = first host of the job's node list), else a
    single local process.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        # RANK may be ours, filled in by an earlier call from Slurm's variables (or for a single process)
        launcher = env.get(_LAUNCHER_KEY, "deepspeed/torchrun")
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", "0")) or 0)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", "0"))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0)
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
    else:
        launcher = "single"
        rank, world, local_rank, local_world = 0, 1, 0, 1
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    if local_world <= 0:  # unknown: assume every rank is on this host, the safe guess for thread counts
        local_world = world
    for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank),
                       ("LOCAL_WORLD_SIZE", local_world)):
        env[key] = str(value)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    env[_LAUNCHER_KEY] = launcher
    return LaunchInfo(rank, world, local_rank, local_world, env["MASTER_ADDR"], int(env["MASTER_PORT"]), launcher)


def threads_per_rank(requested: int, local_world_size: int) -> int:
    """Intra-op threads for this rank: the request, or the CPU cores this process may use / local ranks."""
    if requested > 0:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))
