"""Metered torch.distributed collectives, optionally slowed to an emulated network.

:class:`Comm` wraps a process group; every call records the bytes this rank puts on
and takes off its links (from the real tensor sizes and the collective's algorithm)
and the seconds the caller was blocked. Higher layers communicate only through it,
so no byte escapes the meter.

With a link model installed (:func:`set_link_model`), every call also lasts at least
as long as it would on the emulated links: the real transfer runs, then the caller
waits out the rest of the modelled time (see :func:`collective_seconds`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from farflung.comm.link import LinkModel
from farflung.comm.meter import Meter

_link_model: LinkModel | None = None


def set_link_model(model: LinkModel | None) -> None:
    """Emulate ``model``'s links in every :class:`Comm` of this process (None: off).
    Host ``i`` of the model is global rank ``i``."""
    global _link_model
    _link_model = model


def get_link_model() -> LinkModel | None:
    return _link_model


def nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies on the wire."""
    return t.numel() * t.element_size()


class Handle:
    """An in-flight asynchronous collective; :meth:`wait` accounts the blocked time,
    including what is left of the emulated link time."""

    def __init__(self, work: dist.Work | None, comm: Comm, kind: str, deadline: float = 0.0):
        self._work, self._comm, self._kind, self._deadline = work, comm, kind, deadline
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        t0 = time.perf_counter()
        if self._work is not None:
            self._work.wait()
        while (left := self._deadline - time.perf_counter()) > 0:
            time.sleep(left)
        self._comm.account(self._kind, time.perf_counter() - t0)
        self._done = True


class Comm:
    """A process group plus a :class:`Meter` (and the process's link model, if any).

    A ``background`` Comm is used from a helper thread whose communication overlaps
    compute: its bytes count as usual, its seconds as hidden rather than blocking."""

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        meter: Meter | None = None,
        background: bool = False,
    ) -> None:
        self.group = group
        self.meter = meter or Meter()
        self.background = background
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.link = _link_model
        self.hosts = [self._global(r) for r in range(self.size)]  # link-model host ids

    # -- collectives -------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, kind: str, op=dist.ReduceOp.SUM) -> None:
        self.all_reduce_async(t, kind, op).wait()

    def all_reduce_async(self, t: torch.Tensor, kind: str, op=dist.ReduceOp.SUM) -> Handle:
        """Ring all-reduce: each rank sends and receives 2(n-1)/n of the payload."""
        n = self.size
        if n == 1:
            return Handle(None, self, kind)
        share = 2 * (n - 1) * nbytes(t) // n
        self.meter.record(kind, sent=share, recv=share)
        ring = self._ring_seconds(nbytes(t) / n) * 2 * (n - 1)
        return self._start(
            kind, ring, lambda: dist.all_reduce(t, op=op, group=self.group, async_op=True)
        )

    def broadcast(self, t: torch.Tensor, src: int, kind: str) -> None:
        """Counted as the source sending the tensor to every other rank."""
        n = self.size
        if n == 1:
            return
        b = nbytes(t)
        if self.rank == src:
            self.meter.record(kind, sent=b * (n - 1))
        else:
            self.meter.record(kind, recv=b)
        seconds = max(self._seconds(src, j, b) for j in range(n) if j != src)
        self._start(
            kind,
            seconds,
            lambda: dist.broadcast(t, src=self._global(src), group=self.group, async_op=True),
        ).wait()

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, kind: str) -> None:
        """``out`` holds ``size`` copies of ``inp``'s shape (stacked on a new first dim);
        ring: each rank sends and receives (n-1) chunks."""
        n = self.size
        if n == 1:
            out.copy_(inp.reshape(out.shape))
            return
        share = (n - 1) * nbytes(inp)
        self.meter.record(kind, sent=share, recv=share)
        flat_out, flat_in = out.view(-1), inp.reshape(-1)
        seconds = self._ring_seconds(nbytes(inp)) * (n - 1)
        self._start(
            kind,
            seconds,
            lambda: dist.all_gather_single(flat_out, flat_in, group=self.group, async_op=True),
        ).wait()

    def all_to_all(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        kind: str,
        out_splits: Sequence[int] | None = None,
        in_splits: Sequence[int] | None = None,
    ) -> None:
        """Every rank keeps its own chunk and sends the others theirs."""
        n = self.size
        if n == 1:
            out.copy_(inp)
            return
        elt = inp.element_size()
        in_splits = list(in_splits) if in_splits else [inp.numel() // n] * n
        out_splits = list(out_splits) if out_splits else [out.numel() // n] * n
        r = self.rank
        self.meter.record(
            kind,
            sent=(sum(in_splits) - in_splits[r]) * elt,
            recv=(sum(out_splits) - out_splits[r]) * elt,
        )
        seconds = max(
            max(self._seconds(r, j, in_splits[j] * elt), self._seconds(j, r, out_splits[j] * elt))
            for j in range(n)
            if j != r
        )
        self._start(
            kind,
            seconds,
            lambda: dist.all_to_all_single(
                out, inp, out_splits, in_splits, group=self.group, async_op=True
            ),
        ).wait()

    def exchange(
        self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], kind: str
    ) -> None:
        """Point-to-point: send ``sends[peer]`` to each peer and fill ``recvs[peer]`` from
        each peer, all at once (``batch_isend_irecv``), then wait for all of them."""
        ops, seconds = [], 0.0
        for peer, t in sends.items():
            self.meter.record(kind, sent=nbytes(t))
            ops.append(dist.P2POp(dist.isend, t, self._global(peer), self.group))
            seconds = max(seconds, self._seconds(self.rank, peer, nbytes(t)))
        for peer, t in recvs.items():
            self.meter.record(kind, recv=nbytes(t))
            ops.append(dist.P2POp(dist.irecv, t, self._global(peer), self.group))
            seconds = max(seconds, self._seconds(peer, self.rank, nbytes(t)))
        if ops:
            self._start(kind, seconds, lambda: _Works(dist.batch_isend_irecv(ops))).wait()

    def send(self, t: torch.Tensor, dst: int, kind: str) -> None:
        self.exchange({dst: t}, {}, kind)

    def recv(self, t: torch.Tensor, src: int, kind: str) -> None:
        self.exchange({}, {src: t}, kind)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)

    def account(self, kind: str, seconds: float) -> None:
        """Record time spent waiting on communication of ``kind``."""
        self.meter.add_seconds(kind, seconds, hidden=self.background)

    # -- helpers ---------------------------------------------------------------
    def _start(self, kind: str, link_seconds: float, start: Callable[[], object]) -> Handle:
        t0 = time.perf_counter()
        work = start()
        self.account(kind, time.perf_counter() - t0)
        return Handle(work, self, kind, deadline=t0 + link_seconds if self.link else 0.0)

    def _seconds(self, src: int, dst: int, nbytes_: float) -> float:
        """Emulated time of one message between group ranks (0 without a link model)."""
        if self.link is None:
            return 0.0
        return self.link.transfer_time(self.hosts[src], self.hosts[dst], nbytes_)

    def _ring_seconds(self, chunk: float) -> float:
        """One ring step: every rank passes ``chunk`` bytes on; the slowest edge sets
        the pace."""
        n = self.size
        return max(self._seconds(i, (i + 1) % n, chunk) for i in range(n))

    def _global(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)


class _Works:
    """Several p2p works waited on as one."""

    def __init__(self, works: list) -> None:
        self.works = works

    def wait(self) -> None:
        for w in self.works:
            w.wait()
