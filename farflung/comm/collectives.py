"""Metered torch.distributed collectives.

:class:`Comm` wraps a process group; every call records the bytes this rank puts on
and takes off its links (from the real tensor sizes and the collective's algorithm)
and the seconds the caller was blocked. Higher layers communicate only through it,
so no byte escapes the meter."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from farflung.comm.meter import Meter


def nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies on the wire."""
    return t.numel() * t.element_size()


class Handle:
    """An in-flight asynchronous collective; :meth:`wait` accounts the blocked time."""

    def __init__(self, work: dist.Work | None, comm: Comm, kind: str) -> None:
        self._work, self._comm, self._kind = work, comm, kind

    def wait(self) -> None:
        if self._work is None:
            return
        t0 = time.perf_counter()
        self._work.wait()
        self._comm.account(self._kind, time.perf_counter() - t0)
        self._work = None


class Comm:
    """A process group plus a :class:`Meter`.

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
        return self._timed(kind, lambda: dist.all_reduce(t, op=op, group=self.group, async_op=True))

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
        self._timed(
            kind, lambda: dist.broadcast(t, src=self._global(src), group=self.group, async_op=True)
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
        self._timed(
            kind,
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
        sent = (sum(in_splits) - in_splits[self.rank]) * elt
        recv = (sum(out_splits) - out_splits[self.rank]) * elt
        self.meter.record(kind, sent=sent, recv=recv)
        self._timed(
            kind,
            lambda: dist.all_to_all_single(
                out, inp, out_splits, in_splits, group=self.group, async_op=True
            ),
        ).wait()

    def send(self, t: torch.Tensor, dst: int, kind: str) -> None:
        self.meter.record(kind, sent=nbytes(t))
        t0 = time.perf_counter()
        dist.send(t, dst=self._global(dst), group=self.group)
        self.account(kind, time.perf_counter() - t0)

    def recv(self, t: torch.Tensor, src: int, kind: str) -> None:
        self.meter.record(kind, recv=nbytes(t))
        t0 = time.perf_counter()
        dist.recv(t, src=self._global(src), group=self.group)
        self.account(kind, time.perf_counter() - t0)

    def exchange(
        self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], kind: str
    ) -> None:
        """Point-to-point: send ``sends[peer]`` to each peer and fill ``recvs[peer]`` from
        each peer, all at once (``batch_isend_irecv``), then wait for all of them."""
        ops = []
        for peer, t in sends.items():
            self.meter.record(kind, sent=nbytes(t))
            ops.append(dist.P2POp(dist.isend, t, self._global(peer), self.group))
        for peer, t in recvs.items():
            self.meter.record(kind, recv=nbytes(t))
            ops.append(dist.P2POp(dist.irecv, t, self._global(peer), self.group))
        if not ops:
            return
        t0 = time.perf_counter()
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        self.account(kind, time.perf_counter() - t0)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)

    def account(self, kind: str, seconds: float) -> None:
        """Record time spent waiting on communication of ``kind``."""
        self.meter.add_seconds(kind, seconds, hidden=self.background)

    # -- helpers ---------------------------------------------------------------
    def _timed(self, kind: str, start) -> Handle:
        t0 = time.perf_counter()
        work = start()
        self.account(kind, time.perf_counter() - t0)
        return Handle(work, self, kind)

    def _global(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)
