"""Process-group set-up from torchrun-style environment variables.

farflung's own local launcher sets the same variables torchrun does (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so a worker
does not care which of the two started it."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device


def pick_backend(requested: str = "auto") -> str:
    """``auto`` means NCCL when CUDA is usable, gloo otherwise."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("parallel.backend = 'nccl' needs CUDA; use 'gloo' or 'auto'")
    return requested


_timeout = timedelta(seconds=120.0)


def group_timeout() -> timedelta:
    """How long any collective of this run may wait for a peer (``parallel.timeout_s``)."""
    return _timeout


def new_group(
    ranks: list[int] | None = None,
    members_only: bool = False,
    timeout: timedelta | None = None,
) -> dist.ProcessGroup:
    """A process group over ``ranks`` (default: all) on the default group's backend,
    with the run's timeout (or ``timeout``): torch's default (30 min on gloo) would let
    a frozen peer hang the run.

    By default every rank of the world must call this, in the same order, members or
    not (torch's rule). ``members_only``: only the members call it, so that groups over
    disjoint ranks (one per pipeline stage) can be created at once, each by its own
    members; a non-member gets a ``ValueError`` (not torch's None, which means the
    world here). The members must each belong to the same number of groups so far:
    torch names such a group after its ranks and that count. Not on NCCL with a bound
    device (``init_distributed``'s), where torch would split the world's communicator
    without the non-members and hang: use :func:`subgroup_like` there."""
    timeout = timeout or _timeout
    if not members_only:
        return dist.new_group(ranks=ranks, timeout=timeout, backend=dist.get_backend())
    if dist.group.WORLD.bound_device_id is not None:
        raise ValueError(
            "new_group(members_only=True) would hang on a device-bound (NCCL) world: "
            "use subgroup_like(parent group)"
        )
    ranks = sorted(ranks if ranks is not None else range(dist.get_world_size()))
    return _members_only(ranks, timeout, dist.get_backend())


def subgroup_like(
    group: dist.ProcessGroup | None, timeout: timedelta | None = None
) -> dist.ProcessGroup:
    """A second process group over exactly ``group``'s ranks, in the same order (group
    rank ``i`` is the same process in both), created by those ranks only: e.g. a
    helper thread's own communicator. ``group`` None: the world, created by all ranks,
    as :func:`new_group` does. Every member must call this, at the same point."""
    timeout = timeout or _timeout
    if group is None:
        return new_group(timeout=timeout)
    if dist.get_rank(group) < 0:
        raise ValueError(f"rank {dist.get_rank()} is not a member of the group")
    if dist.group.WORLD.bound_device_id is not None:
        # NCCL splits an eagerly connected communicator (ncclCommSplit), which every
        # rank of the parent must join: splitting ``group`` itself asks only members
        everyone = [list(range(dist.get_world_size(group)))]  # ranks in the parent
        return dist.split_group(parent_pg=group, split_ranks=everyone, timeout=timeout)
    _check_group_counts(group)
    ranks = dist.get_process_group_ranks(group)
    return _members_only(ranks, timeout, dist.get_backend(group))


def _members_only(ranks: list[int], timeout: timedelta, backend: str) -> dist.ProcessGroup:
    """``dist.new_group`` joined by the members alone, keeping ``ranks``' order."""
    if dist.get_rank() not in ranks:
        raise ValueError(f"rank {dist.get_rank()} is not among the group's ranks {ranks}")
    return dist.new_group(
        ranks=ranks,
        timeout=timeout,
        backend=backend,
        use_local_synchronization=True,
        sort_ranks=False,
    )


def _groups_joined() -> int:
    """How many process groups this process belongs to (-1: torch no longer says)."""
    world = getattr(dist.distributed_c10d, "_world", None)
    return len(world.pg_names) if world is not None else -1


def _check_group_counts(group: dist.ProcessGroup) -> None:
    """Fail now, not after the timeout, if the members of ``group`` would name a
    members-only group differently: torch hashes the ranks with this count, and
    members that disagree wait for each other's keys until the timeout."""
    counts: list[int | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(counts, _groups_joined(), group=group)
    if len(set(counts)) > 1:
        raise RuntimeError(
            f"the ranks {dist.get_process_group_ranks(group)} belong to different numbers "
            f"of process groups ({counts}), so torch would name their new group "
            "differently on each: create the same groups on each of them first"
        )


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", timeout_s: float = 120.0) -> DistInfo:
    """Join (or create) the default process group described by the environment.

    Without torchrun variables the process becomes a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    backend = pick_backend(backend)
    global _timeout
    _timeout = timedelta(seconds=timeout_s)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
            # NCCL: bind the rank to its GPU now rather than guessing it at first use
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank, world, local_rank, local_world, backend, device)


def shutdown_distributed() -> None:
    """Leave the process group if we are in one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def store_barrier(store: dist.Store, name: str, world: int, poll_s: float = 0.2) -> None:
    """Wait, with no deadline, until all ``world`` ranks have called this with ``name``.

    For waits whose length is legitimate but unknown (one rank preparing a corpus): a
    collective barrier would fail at ``parallel.timeout_s``. A dead or frozen rank is
    caught by the heartbeat watchdog instead (:mod:`farflung.comm.watchdog`), which
    ends this process. Polls rather than blocking in C++ so that SIGTERM still
    interrupts it."""
    key = f"barrier/{name}"
    store.add(key, 1)
    while store.add(key, 0) < world:
        time.sleep(poll_s)
