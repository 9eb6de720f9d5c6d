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


def new_group(ranks: list[int] | None = None) -> dist.ProcessGroup:
    """A process group over ``ranks`` (default: all) on the default group's backend,
    with the run's timeout: torch's default (30 min on gloo) would let a frozen peer
    hang the run."""
    return dist.new_group(ranks=ranks, timeout=_timeout, backend=dist.get_backend())


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
