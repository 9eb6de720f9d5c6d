"""Process-group set-up from torchrun-style environment variables.

farflung's own local launcher sets the same variables torchrun does (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so a worker
does not care which of the two started it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose: this module's functions take
# ``group=group.WORLD`` as a default argument, evaluated at import. Imported after
# init_process_group (torch imports it lazily, e.g. when an optimizer is created),
# those defaults hold the default group for good, destroy_process_group() cannot free
# it, and its gloo threads outlive the interpreter: one that drops a finished work's
# last tensor reference during finalization aborts the process ("terminate called
# without an active exception").
import torch.distributed.nn  # noqa: F401

from farflung.comm.binding import BIND_ENV, default_bind, free_port, is_loopback, serve_store


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


class ReleasedGroup:
    """What a :class:`~farflung.comm.Comm` holds instead of a process group it is done
    with: any use is an error saying so.

    torch frees a group (and joins its backend's threads) with its last reference.
    destroy_process_group() drops torch's own; a reference farflung keeps would leave
    the group's gloo threads running into interpreter exit, where one that drops a
    finished work's tensors needs the interpreter and aborts the process. The group
    itself stays registered with torch until then: destroying it earlier would free
    its name for the next group over the same ranks, whose rendezvous would then
    read the old group's keys from the store."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"{self._what}'s process group was released (by close()); it is gone")


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
    counts = all_gather_json(_groups_joined(), group=group)
    if len(set(counts)) > 1:
        raise RuntimeError(
            f"the ranks {dist.get_process_group_ranks(group)} belong to different numbers "
            f"of process groups ({counts}), so torch would name their new group "
            "differently on each: create the same groups on each of them first"
        )


JSON_LIMIT = 1 << 20
"""The most bytes one rank's value may take in :func:`all_gather_json`."""


def all_gather_json(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj`` (JSON-able: dicts with string keys, lists, numbers,
    strings, bools, None), in group rank order; tuples come back as lists.

    torch's ``all_gather_object`` would unpickle what the peers send, i.e. run their
    code; this moves JSON text in two tensor all-gathers (the lengths, then the texts
    padded to the longest) and parses it. Every rank raises the same ValueError when
    any rank's value exceeds :data:`JSON_LIMIT` bytes."""
    mine = json.dumps(obj, allow_nan=False).encode()
    n = dist.get_world_size(group)
    device = _collective_device(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([len(mine)], dtype=torch.int64, device=device), group)
    lengths = [int(t.item()) for t in sizes]
    too_big = [r for r, k in enumerate(lengths) if not 0 < k <= JSON_LIMIT]
    if too_big:  # every rank sees the same lengths, so every rank stops here
        raise ValueError(
            f"all_gather_json: rank(s) {too_big} sent {[lengths[r] for r in too_big]} "
            f"bytes (allowed 1..{JSON_LIMIT})"
        )
    width = max(lengths)
    padded = torch.zeros(width, dtype=torch.uint8, device=device)
    padded[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
    texts = [torch.empty(width, dtype=torch.uint8, device=device) for _ in range(n)]
    dist.all_gather(texts, padded, group)
    return [_parse(t[:k], r) for r, (t, k) in enumerate(zip(texts, lengths, strict=True))]


def _parse(raw: torch.Tensor, rank: int) -> Any:
    text = bytes(raw.cpu().numpy())
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"all_gather_json: rank {rank} sent malformed JSON ({e})") from None


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where ``group``'s collectives take their tensors (NCCL: this rank's GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    device = rank_device(backend, local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
            # NCCL: bind the rank to its GPU now rather than guessing it at first use
            device_id=device if device.type == "cuda" else None,
            store=_rendezvous_store(rank, timedelta(seconds=timeout_s)),
        )
    return DistInfo(rank, world, local_rank, local_world, backend, device)


def rank_device(backend: str, local_rank: int) -> torch.device:
    """The device a rank computes on: ``cuda:LOCAL_RANK`` under NCCL (made the current
    device), the CPU under gloo."""
    if backend != "nccl":
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _rendezvous_store(rank: int, timeout: timedelta) -> dist.Store | None:
    """The job's rendezvous store, listening where it should; None: torch's env://.

    torch's env:// rendezvous has rank 0 listen on every interface, even when every
    rank runs on this machine. So unless torchrun's agent hosts the store (bound where
    torchrun's ``--rdzv-endpoint`` / ``--local-addr`` say), rank 0 serves it on
    :func:`rendezvous_bind` and the other ranks connect to it as clients."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return None
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank == 0:
        return serve_store(rendezvous_bind(addr), port, timeout=timeout)
    return dist.TCPStore(addr, port, None, is_master=False, timeout=timeout, wait_for_workers=False)


def rendezvous_bind(master_addr: str) -> str:
    """Where rank 0's store listens: ``FARFLUNG_BIND`` when set (the local launcher
    sets the master address there); else the master address itself when it is a
    loopback one (nothing else could reach the store anyway); else every interface,
    as torch would (``MASTER_ADDR`` may be a name or a NAT'd address not on any
    interface here)."""
    if os.environ.get(BIND_ENV):
        return default_bind()
    if master_addr == "localhost":
        return "127.0.0.1"
    return master_addr if is_loopback(master_addr) else default_bind()


def shutdown_distributed() -> None:
    """Leave the process group if we are in one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def store_barrier(
    store: dist.Store, name: str, world: int, poll_s: float = 0.2, rank: int | None = None
) -> None:
    """Wait, with no deadline, until all ``world`` ranks have called this with ``name``
    (``rank``: this process's, default its rank in the default group).

    For waits whose length is legitimate but unknown (one rank preparing a corpus): a
    collective barrier would fail at ``parallel.timeout_s``. A dead or frozen rank is
    caught by the heartbeat watchdog instead (:mod:`farflung.comm.watchdog`), which
    ends this process. Polls rather than blocking in C++ so that SIGTERM still
    interrupts it. Each rank sets a key of its own and only their presence is checked:
    no value is parsed (the store's ``add`` on a value someone else wrote would make
    the store drop the connection)."""
    rank = dist.get_rank() if rank is None else rank
    keys = [f"barrier/{name}/{r}" for r in range(world)]
    store.set(keys[rank], "1")
    while not store.check(keys):
        time.sleep(poll_s)
