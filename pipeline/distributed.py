"""The cycle on many processes, started by an external launcher (`torchrun`, or SLURM's `srun`), as Lightning's
cluster environments read them.

Rank 0 verifies, screens, gates, signs and writes the state; the other ranks only train. They meet once before
training, when rank 0 shares the plan or the reason it stopped, as JSON (`trainguard.ranks`: nothing crossing ranks
is unpickled): the digests of the manifests it verified, the allow-list, the rows to skip. Each rank re-opens and
verifies those manifests and the held-out shards itself, answers whether it could, then trains through
verify-on-read of its own share. Every wait is bounded by the configured rank timeout (`training.rank_timeout`:
the job's process group, so Lightning's collectives in the DDP fit too), except the wait for rank 0's plan, which
may take hours; at the answers and at the start of training the ranks take a roll call, so a rank that does not
arrive is named on every rank that did.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import torch
from lightning_fabric.plugins.environments.cluster_environment import ClusterEnvironment
from lightning_fabric.plugins.environments.slurm import SLURMEnvironment
from lightning_fabric.plugins.environments.torchelastic import TorchElasticEnvironment

from trainguard.pipeline.errors import CycleAbortedError, LaunchError
from trainguard.ranks import TIMEOUT, RankError, RankWaitError, arrive, broadcast_json, gather_json

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """This process's place in a launched job, as the launcher's Lightning cluster environment reads it: its rank,
    the job's size, its rank on its node and its node's rank, the processes per node (the Trainer's `devices`) and
    the nodes (`num_nodes`), and where rank 0's store listens (`address`, `port`). `environment` is the Lightning
    `ClusterEnvironment` itself, for the Trainer."""

    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    devices: int
    num_nodes: int
    address: str
    port: int
    environment: ClusterEnvironment = field(compare=False, repr=False)

    @property
    def leader(self) -> bool:
        """Whether this process is rank 0, which leads the cycle."""
        return self.rank == 0


SRUN_HINT = "run `srun trainguard cycle …`"
"""What to run instead, in a refusal under SLURM: `srun` starts one task per rank, each with its step's variables."""


def launch_from_env() -> Launch | None:
    """The job this process belongs to, from Lightning's cluster environments in Lightning's own order: torchrun
    (`TorchElasticEnvironment`, first: it runs inside SLURM allocations too), then SLURM (`SLURMEnvironment`:
    ranks from SLURM_PROCID/LOCALID/NODEID, rank 0's address from SLURM_NODELIST and its port from the job id, where
    MASTER_ADDR/MASTER_PORT do not say).

    Returns:
        This process's place in the job; None when it runs alone (a world of one is alone too).

    Raises:
        LaunchError: The batch step of a SLURM allocation of many tasks (only `srun` starts the ranks), tasks spread
            unevenly over the nodes, a size the cluster contradicts, or WORLD_SIZE > 1 with neither launcher.
    """
    if TorchElasticEnvironment.detect():
        environment: ClusterEnvironment = TorchElasticEnvironment()
        devices = int(os.environ.get("LOCAL_WORLD_SIZE", environment.world_size()))
    elif SLURMEnvironment.detect():
        per_node = _slurm_step_tasks_per_node()
        if per_node is None:
            return None
        environment, devices = SLURMEnvironment(), per_node
    else:
        world = os.environ.get("WORLD_SIZE", "1")
        if world.isdigit() and int(world) > 1:
            raise LaunchError(
                f"WORLD_SIZE={world} but neither torchrun nor SLURM's srun started this process: run "
                "`torchrun --nproc-per-node N -m trainguard.pipeline.cli cycle …` or `srun trainguard cycle …`"
            )
        return None
    world_size = environment.world_size()
    if world_size < 2:
        return None
    num_nodes, spare = divmod(world_size, devices)
    if spare or num_nodes < 1:
        raise LaunchError(f"{world_size} ranks do not make whole nodes of {devices}: start as many on every node")
    try:
        environment.validate_settings(num_devices=devices, num_nodes=num_nodes)
    except ValueError as error:
        raise LaunchError(" ".join(str(error).split())) from None
    return Launch(
        rank=environment.global_rank(),
        world_size=world_size,
        local_rank=environment.local_rank(),
        node_rank=environment.node_rank(),
        devices=devices,
        num_nodes=num_nodes,
        address=environment.main_address,
        port=environment.main_port,
        environment=environment,
    )


def _slurm_step_tasks_per_node() -> int | None:
    """The tasks per node of the SLURM step this process is a task of; None for a job of one task. Lightning's
    `SLURMEnvironment` wants them stated as `--ntasks-per-node` does (SLURM_NTASKS_PER_NODE): an `sbatch --ntasks=N`
    job leaves it unset, so it is set here from the step's own spread (SLURM_STEP_TASKS_PER_NODE, e.g. `2(x3)`)
    when that is even, which every Trainer Lightning builds in this process then reads.

    Raises:
        LaunchError: The batch step of an allocation of many tasks, or a step spread unevenly over its nodes.
    """
    tasks = os.environ["SLURM_NTASKS"]
    if not tasks.isdigit() or int(tasks) < 2:
        return None
    step = os.environ.get("SLURM_STEP_NUM_TASKS")  # set by srun for each task of a step, never in the batch step
    if step is None:
        raise LaunchError(f"SLURM allocated {tasks} tasks but this is the batch step: {SRUN_HINT}")
    if step != tasks:
        raise LaunchError(f"this SLURM step runs {step} tasks, not the job's {tasks}: {SRUN_HINT}")
    stated = os.environ.get("SLURM_NTASKS_PER_NODE")
    if stated is not None and stated.isdigit():
        return int(stated)
    spread = os.environ.get("SLURM_STEP_TASKS_PER_NODE", tasks)
    counts = {int(part.split("(")[0]) for part in spread.split(",") if part.split("(")[0].isdigit()}
    if len(counts) != 1:
        raise LaunchError(
            f"SLURM spread the step's {tasks} tasks unevenly over its nodes ({spread}) and Lightning's DDP runs as "
            "many on each: ask for `--ntasks-per-node`"
        )
    per_node = counts.pop()
    os.environ["SLURM_NTASKS_PER_NODE"] = str(per_node)
    return per_node


def check_gpus(launch: Launch, visible: int) -> None:
    """Refuses, in one line, a task that cannot have its own GPU under Lightning's DDP, which gives local rank r the
    node's GPU r: each task must see its node's `devices` GPUs (`--gpus-per-node`, `--gres=gpu:N`), not only its own
    (`--gpus-per-task`, which hides the others from it).

    Args:
        launch: This process's place in the job.
        visible: How many GPUs this process sees.

    Raises:
        LaunchError: The task sees fewer GPUs than tasks run on its node.
    """
    if visible < launch.devices:
        raise LaunchError(
            f"rank {launch.rank} sees {visible} GPU(s) but {launch.devices} tasks share its node and Lightning's DDP "
            f"gives each the node's GPU of its local rank: ask for `--gpus-per-node={launch.devices}` (or "
            f"`--gres=gpu:{launch.devices}`) instead of `--gpus-per-task`"
        )


MEETING_TIMEOUT = timedelta(hours=12)
"""How long the other ranks wait for rank 0's plan, at least: rank 0 verifies and screens first, which takes hours
on large data; bounded all the same, so a rank 0 that died is noticed."""


@dataclass(frozen=True)
class _Joined:
    """The gloo group the meeting runs on (CPU tensors, whatever the training backend), how long a rank waits for
    the others, and the job's store with this process's count of roll calls (every rank calls them in order)."""

    group: Any
    timeout: timedelta
    store: Any
    calls: Iterator[int] = field(default_factory=itertools.count)


_JOINED: list[_Joined] = []
"""This process's place in the job, once `join` made it."""


def join(launch: Launch, timeout: timedelta) -> None:
    """Joins the job's process group (Lightning finds it initialised and uses it), every collective bounded by
    `timeout`, so a rank that died or hangs stops the others rather than leaving them waiting; and the meeting's
    group, whose wait for rank 0's plan is bounded by `MEETING_TIMEOUT` or `timeout`, the longer."""
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            check_gpus(launch, torch.cuda.device_count())
            torch.cuda.set_device(launch.local_rank)
        os.environ.update(MASTER_ADDR=launch.address, MASTER_PORT=str(launch.port))  # as Lightning's own join does
        torch.distributed.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, timeout=timeout)
    group = torch.distributed.new_group(backend="gloo", timeout=max(MEETING_TIMEOUT, timeout))
    job_store = torch.distributed.distributed_c10d._get_default_store()  # the process group's own; no public getter
    store = torch.distributed.distributed_c10d.PrefixStore("trainguard/arrive", job_store)
    _JOINED[:] = [_Joined(group, timeout, store)]


def arrive_at(where: str) -> None:
    """Waits for every rank at `where` (a place all ranks reach, in the same order); a rank that does not arrive
    within the timeout stops the cycle on every rank that did, named (`rank-wait`). Nothing to wait for when this
    process runs alone."""
    if not _JOINED:
        return
    joined = _JOINED[0]
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        arrive(joined.store, str(next(joined.calls)), rank, world, joined.timeout)
    except RankError as error:
        raise CycleAbortedError(f"at {where}, {error}", check=error.reason) from None


def _share(document: Any = None) -> Any:
    """Rank 0's `document` on every rank, over the meeting's group."""
    group, timeout = _meeting()
    return broadcast_json(document, group=group, timeout=max(MEETING_TIMEOUT, timeout))


def _answers(document: Any) -> list[Any]:
    """Every rank's answer, over the meeting's group, once every rank has arrived to answer."""
    arrive_at("the answers to rank 0's plan")
    group, timeout = _meeting()
    return gather_json(document, group=group, timeout=timeout)


def _meeting() -> tuple[Any, timedelta]:
    """The meeting's group and timeout; the job's default group and `TIMEOUT` when this process never joined one."""
    return (_JOINED[0].group, _JOINED[0].timeout) if _JOINED else (None, TIMEOUT)


class Message(Protocol):
    """What rank 0 shares: a plan the other ranks rebuild, as JSON, from what they verify themselves."""

    def message(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Stopped:
    """What rank 0 shares instead of a plan when the cycle stopped before training."""

    reason: str


READY = {"ready": True}


@dataclass
class Meeting:
    """Rank 0's one message to the other ranks before training, as JSON: the plan, or why none comes; then each
    rank's answer, ready or its one-line refusal (a plan a rank cannot rebuild from what it verified stops the
    cycle on rank 0 too). Sent at most once; nothing to send when the cycle runs alone."""

    launch: Launch | None
    held: bool = False

    def send(self, value: Message | Stopped) -> None:
        if self.launch is None or self.held:
            return
        self.held = True
        stopped = isinstance(value, Stopped)
        try:
            _share({"stopped": value.reason} if isinstance(value, Stopped) else {"plan": value.message()})
        except RankError as error:
            if not isinstance(error, RankWaitError):  # the others got a failed message and answer it: hear them out
                _answer({"refused": str(error)})
            raise
        try:
            answers = _answers(READY)
        except RankError as error:
            raise CycleAbortedError(str(error), check=error.reason) from None
        if stopped:
            return
        for rank, answer in enumerate(answers[1:], start=1):
            if answer != READY:
                raise CycleAbortedError(f"rank {rank} refused the plan: {_refusal(answer)}", check="rank-plan")


def follow(rebuild: Callable[[Any], T]) -> T:
    """A rank other than 0: rank 0's plan, rebuilt by `rebuild` from its JSON and what this rank verifies itself;
    rank 0 hears whether that worked, so no rank trains alone and none waits forever."""
    try:
        message = _share()
    except RankError as error:
        if not isinstance(error, RankWaitError):  # the broadcast itself completed: rank 0 waits for the answer
            _answer({"refused": str(error)})
        raise CycleAbortedError(str(error), check=error.reason) from None
    try:
        if isinstance(message, dict) and set(message) == {"stopped"}:
            raise CycleAbortedError(f"rank 0 stopped the cycle: {_refusal(message['stopped'])}", check="rank-0")
        if not (isinstance(message, dict) and set(message) == {"plan"}):
            raise CycleAbortedError("rank 0's message is neither a plan nor a stop", check="rank-message")
        plan = rebuild(message["plan"])
    except Exception as error:
        _answer({"refused": " ".join(str(error).split()) or type(error).__name__})
        raise
    try:
        _answers(READY)
    except RankError as error:
        raise CycleAbortedError(str(error), check=error.reason) from None
    return plan


def _answer(document: dict[str, Any]) -> None:
    """A refusal sent back to rank 0 on the way out: this rank's own error is what it reports, not the answer's."""
    with contextlib.suppress(RankError, CycleAbortedError):
        _answers(document)


def _refusal(answer: Any) -> str:
    """A rank's refusal as one line, whatever it sent."""
    text = answer.get("refused") if isinstance(answer, dict) else answer
    return " ".join(str(text).split())[:1000]
