"""The cycle on many processes, started by an external launcher (`torchrun`, or SLURM with MASTER_ADDR/PORT set).

Rank 0 verifies, screens, gates, signs and writes the state; the other ranks only train. They meet once before
training, when rank 0 shares the plan (the verified statements, the allow-list, the held-out set) or the reason it
stopped, so every rank trains through verify-on-read of its own share and no rank waits forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Launch:
    """This process's place in a launched job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def launch_from_env(environ: dict[str, str] | None = None) -> Launch | None:
    """The job this process belongs to, from torchrun's (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM's variables; None
    when it runs alone (a world of one is alone too)."""
    env = os.environ if environ is None else environ
    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in env and world in env and int(env[world]) > 1:
            return Launch(int(env[rank]), int(env[world]), int(env.get(local, "0")))
    return None


def join(launch: Launch) -> None:
    """Joins the job's process group (Lightning finds it initialised and uses it)."""
    if torch.distributed.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    torch.distributed.init_process_group(backend, rank=launch.rank, world_size=launch.world_size)


def share(value: Any = None) -> Any:
    """Rank 0's `value`, on every rank (the others pass nothing)."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@dataclass(frozen=True)
class Stopped:
    """What rank 0 shares instead of a plan when the cycle stopped before training."""

    reason: str


@dataclass
class Meeting:
    """Rank 0's one message to the other ranks before training: the plan, or why none comes. Sent at most once;
    nothing to send when the cycle runs alone."""

    launch: Launch | None
    held: bool = False

    def send(self, value: Any) -> None:
        if self.launch is not None and not self.held:
            self.held = True
            share(value)
