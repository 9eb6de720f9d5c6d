"""Metered torch.distributed collectives, optionally slowed to an emulated network.

:class:`Comm` wraps a process group; every call records the bytes this rank puts on
and takes off its links, and the seconds the caller was blocked. Higher layers
communicate only through it, so no call escapes the meter.

Which byte counts are real and which are computed:

- :meth:`Comm.all_to_all` and :meth:`Comm.exchange` count the real sizes of the
  tensors handed to the backend (for all-to-all, the split sizes times the element
  size, this rank's own chunk left out: it crosses no link);
- :meth:`Comm.all_reduce`, :meth:`Comm.all_gather` and :meth:`Comm.broadcast` count
  what the collective's textbook algorithm moves for a tensor of that size: ring
  all-reduce 2(n-1)/n of the payload each way, ring all-gather (n-1) input chunks
  each way, broadcast as gloo's binomial tree (NCCL's as a chain). The network lab's
  interface counters agree with these for gloo at 2, 3 and 4 ranks within the
  headers (tests/test_netlab_bytes.py); on NCCL, which picks its own algorithms, they
  are the textbook figures.

No count includes protocol overhead (TCP/IP headers, the backend's framing).

With a link model installed (:func:`set_link_model`), every call also lasts at least
as long as it would on the emulated links: the real transfer runs, and the caller
then waits until the model says the data has arrived. Each call puts the bytes this
rank sends through its host's egress queue and the bytes it receives through its
ingress queue (see :class:`~farflung.netlab.link.LinkModel`), so concurrent calls share
the links. The one-way delay counts from the later of the modelled serialization and
the real transfer's completion, so over a real shaped link and a delay-only model
(the network lab) a call takes the shaped time plus the delay."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
import torch.distributed as dist

from farflung.comm.errors import Reconfigure
from farflung.comm.meter import Meter


class LinkDelays(Protocol):
    """Pairwise one-way delays (seconds) between link-model hosts."""

    def delay(self, src: int, dst: int) -> float: ...


class LinkEmulator(Protocol):
    """What a :class:`Comm` asks of an installed link model. The lab's
    :class:`~farflung.netlab.link.LinkModel` is the one farflung ships; the transport
    names only this interface, so ``comm`` never imports the lab above it."""

    matrix: LinkDelays

    def now(self) -> float: ...
    def sleep_until(self, deadline: float) -> float: ...
    def egress(self, src: int, dst: int, nbytes: int | float, not_before: float) -> float: ...
    def ingress(self, src: int, dst: int, nbytes: int | float, not_before: float) -> float: ...
    def transfer_time(self, src: int, dst: int, nbytes: int | float) -> float: ...
    def serialization_time(self, src: int, dst: int, nbytes: int | float) -> float: ...


_link_model: LinkEmulator | None = None

_epoch: Callable[[], int] | None = None
POLL_S = 0.0005  # how often an elastic wait looks at the membership (and the work)


def set_epoch_source(source: Callable[[], int] | None) -> None:
    """Elastic training: ``source()`` is the membership's epoch, which moves on when the
    coordinator re-forms the group. A :class:`Comm` created in an older epoch stops
    waiting for its collectives (they may wait on a dead or frozen peer) and raises
    :class:`~farflung.comm.errors.Reconfigure`. None: waits block (gloo's own timeout
    is the bound)."""
    global _epoch
    _epoch = source


_pinned: int | None = None


def current_epoch() -> int | None:
    if _pinned is not None:
        return _pinned
    return _epoch() if _epoch is not None else None


@contextlib.contextmanager
def pinned_epoch(epoch: int) -> Iterator[None]:
    """Comms created in this block belong to membership epoch ``epoch`` (the
    generation being entered), even if a newer one has arrived meanwhile: their
    waits must abort then, not wait on a group its peers have left."""
    global _pinned
    _pinned = epoch
    try:
        yield
    finally:
        _pinned = None


# A part of a collective's modelled time: (when its last byte has left the queue, the
# delay its arrival still takes after that)
Leg = tuple[float, float]


def set_link_model(model: LinkEmulator | None) -> None:
    """Emulate ``model``'s links in every :class:`Comm` this process creates from now
    on (None: off). Process-global: host ``i`` of the model is global rank ``i`` unless
    :func:`set_rank_hosts` says otherwise, and all of this process's Comms, in every
    thread, share the model's queues, as the traffic of one host shares its links."""
    global _link_model
    _link_model = model


_rank_hosts: list[int] | None = None


def set_rank_hosts(hosts: Sequence[int] | None) -> None:
    """Which link-model host each global rank runs on (``hosts[rank]``), for every
    :class:`Comm` this process creates from now on; None: each rank its own host
    (rank ``i`` on host ``i``). Ranks on one host exchange data for free: the model's
    diagonal has no delay and no bandwidth limit, and such traffic takes no place in
    the host's queues (two GPUs in one machine)."""
    global _rank_hosts
    if hosts is not None:
        hosts = [int(h) for h in hosts]
        if any(h < 0 for h in hosts):
            raise ValueError(f"rank hosts must be host indexes >= 0, got {hosts}")
    _rank_hosts = hosts


def host_of(rank: int) -> int:
    """The link-model host of global ``rank`` (see :func:`set_rank_hosts`)."""
    if _rank_hosts is None:
        return rank
    if not 0 <= rank < len(_rank_hosts):
        raise ValueError(
            f"global rank {rank} has no host: the rank-host map names {len(_rank_hosts)} "
            f"ranks ({_rank_hosts})"
        )
    return _rank_hosts[rank]


def nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies on the wire."""
    return t.numel() * t.element_size()


class Handle:
    """An in-flight asynchronous collective; :meth:`wait` accounts the blocked time,
    including what is left of the emulated link time."""

    def __init__(
        self,
        work: dist.Work | None,
        comm: Comm,
        kind: str,
        legs: Sequence[Leg] = (),
        since: float | None = None,
    ) -> None:
        self._work, self._comm, self._kind, self._legs = work, comm, kind, legs
        self._since = since  # a blocking call's launch: its blocked time counts from there
        self._done = False
        self._real_end: list[float] = []
        if legs and work is not None and hasattr(work, "get_future"):
            self._stamp_completion(work)

    def _stamp_completion(self, work: dist.Work) -> None:
        """Record when the real transfer finishes: an async handle may be waited on
        long after, and the delay must count from the transfer, not from the wait."""
        clock = self._comm.link.now
        try:
            work.get_future().add_done_callback(lambda _: self._real_end.append(clock()))
        except RuntimeError:  # gloo's p2p works have no future; wait() time stands in
            pass

    def wait(self) -> None:
        if self._done:
            return
        t0 = time.perf_counter() if self._since is None else self._since
        if self._work is not None:
            if self._comm.epoch is not None:
                self._comm.wait_or_abort(self._work)
            else:
                self._work.wait()
        if self._legs:
            link = self._comm.link
            # the callback may still be running right after wait(): then it is now
            real_end = self._real_end[0] if self._real_end else link.now()
            link.sleep_until(max(max(s, real_end) + d for s, d in self._legs))
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
        # link-model host ids: ranks sharing a host cross no emulated link between them
        self.hosts = [host_of(self._global(r)) for r in range(self.size)]
        self._nccl = dist.get_backend(group) == "nccl"
        self.epoch = current_epoch()

    def wait_or_abort(self, work: object) -> None:
        """Wait for ``work``, or raise Reconfigure once the membership has moved past
        this Comm's epoch (the peer it waits on may never answer).

        Collectives are polled. gloo's point-to-point works report completion only
        from inside ``wait()``, so those are waited on by a helper thread, which is
        left behind if the membership changes first."""
        if isinstance(work, _Works):
            done, failure = threading.Event(), []

            def waiter() -> None:
                try:
                    work.wait()
                except Exception as e:  # handed to the caller
                    failure.append(e)
                done.set()

            threading.Thread(target=waiter, daemon=True).start()
            while not done.wait(POLL_S * 4):
                self._check_epoch()
            if failure:
                raise failure[0]
            return
        while not work.is_completed():
            self._check_epoch()
            time.sleep(POLL_S)
        work.wait()

    def _check_epoch(self) -> None:
        if _epoch is not None and _epoch() != self.epoch:
            raise Reconfigure(f"membership changed (epoch {self.epoch} -> {_epoch()})")

    # -- collectives -------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, kind: str, op=dist.ReduceOp.SUM) -> None:
        self._all_reduce(t, kind, op, blocking=True).wait()

    def all_reduce_async(self, t: torch.Tensor, kind: str, op=dist.ReduceOp.SUM) -> Handle:
        """Counted (not measured) as a ring all-reduce: each rank sends and receives
        2(n-1) chunks of 1/n of the payload, whatever algorithm the backend runs."""
        return self._all_reduce(t, kind, op, blocking=False)

    def _all_reduce(self, t: torch.Tensor, kind: str, op, blocking: bool) -> Handle:
        n = self.size
        if n == 1:
            return Handle(None, self, kind)
        share = 2 * (n - 1) * nbytes(t) // n
        self.meter.record(kind, sent=share, recv=share)
        return self._start(
            kind,
            lambda t0: self._ring_legs(nbytes(t) / n, 2 * (n - 1), t0),
            lambda: dist.all_reduce(t, op=op, group=self.group, async_op=True),
            blocking,
        )

    def broadcast(self, t: torch.Tensor, src: int, kind: str) -> None:
        """Counted (not measured) as gloo's binomial tree, which the lab's interface
        counters confirm: every rank but the source receives the payload once, and a
        rank sends one copy to each of its children (the source ``ceil(log2 n)`` at
        most, a leaf none). NCCL's ring is counted as a chain: every rank but the last
        sends one copy."""
        n = self.size
        if n == 1:
            return
        b = nbytes(t)
        v = (self.rank - src) % n  # position in the tree rooted at the source
        copies = 1 if self._nccl and v < n - 1 else len(tree_children(v, n))
        self.meter.record(kind, sent=b * copies, recv=0 if v == 0 else b)
        self._start(
            kind,
            lambda t0: self._broadcast_legs(src, b, t0),
            lambda: dist.broadcast(t, src=self._global(src), group=self.group, async_op=True),
        ).wait()

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, kind: str) -> None:
        """``out`` holds ``size`` copies of ``inp``'s shape (stacked on a new first dim).
        Counted (not measured) as a ring: each rank sends and receives (n-1) chunks of
        ``inp``'s size."""
        self._all_gather(out, inp, kind, blocking=True).wait()

    def all_gather_async(self, out: torch.Tensor, inp: torch.Tensor, kind: str) -> Handle:
        """:meth:`all_gather` in flight: ``out`` is filled once the handle is waited on."""
        return self._all_gather(out, inp, kind, blocking=False)

    def _all_gather(
        self, out: torch.Tensor, inp: torch.Tensor, kind: str, blocking: bool
    ) -> Handle:
        n = self.size
        if n == 1:
            out.copy_(inp.reshape(out.shape))
            return Handle(None, self, kind)
        share = (n - 1) * nbytes(inp)
        self.meter.record(kind, sent=share, recv=share)
        flat_out, flat_in = out.view(-1), inp.reshape(-1)
        return self._start(
            kind,
            lambda t0: self._ring_legs(nbytes(inp), n - 1, t0),
            lambda: dist.all_gather_single(flat_out, flat_in, group=self.group, async_op=True),
            blocking,
        )

    def all_to_all(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        kind: str,
        out_splits: Sequence[int] | None = None,
        in_splits: Sequence[int] | None = None,
    ) -> None:
        """Every rank keeps its own chunk and sends the others theirs. Counts the real
        sizes of the chunks handed to the backend, this rank's own left out."""
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
        peers = [(r + k) % n for k in range(1, n)]  # the order a ring of sends would take
        self._start(
            kind,
            lambda t0: self._p2p_legs(
                {j: in_splits[j] * elt for j in peers},
                {j: out_splits[j] * elt for j in peers},
                t0,
            ),
            lambda: self._all_to_all(out, inp, out_splits, in_splits, peers),
        ).wait()

    def _all_to_all(
        self, out: torch.Tensor, inp: torch.Tensor, out_splits: list, in_splits: list, peers: list
    ) -> object:
        """On gloo, as point-to-point with every receive posted before any send: gloo
        sends a payload only once its peer has announced the receive, and that notice
        queues behind data in the same stream, so its own send-then-receive all-to-all
        made the two directions take turns (half the rate each way, measured in the
        lab: tests/test_netlab.py)."""
        if self._nccl:
            return dist.all_to_all_single(
                out, inp, out_splits, in_splits, group=self.group, async_op=True
            )
        outs, ins = torch.split(out, out_splits), torch.split(inp, in_splits)
        outs[self.rank].copy_(ins[self.rank])
        # an empty chunk is skipped on both ends: the sender's size is the receiver's
        ops = [
            dist.P2POp(dist.irecv, outs[j], self._global(j), self.group)
            for j in peers
            if outs[j].numel()
        ]
        ops += [
            dist.P2POp(dist.isend, ins[j], self._global(j), self.group)
            for j in peers
            if ins[j].numel()
        ]
        if not ops:
            return None
        return _Works(dist.batch_isend_irecv(ops))

    def exchange(
        self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], kind: str
    ) -> None:
        """Point-to-point: send ``sends[peer]`` to each peer and fill ``recvs[peer]`` from
        each peer, all at once (``batch_isend_irecv``, receives posted first), then wait
        for all of them.
        Counts the real sizes of the tensors sent and received."""
        ops = []  # receives first: see _all_to_all
        for peer, t in recvs.items():
            self.meter.record(kind, recv=nbytes(t))
            ops.append(dist.P2POp(dist.irecv, t, self._global(peer), self.group))
        for peer, t in sends.items():
            self.meter.record(kind, sent=nbytes(t))
            ops.append(dist.P2POp(dist.isend, t, self._global(peer), self.group))
        if ops:
            out = {p: nbytes(t) for p, t in sends.items()}
            into = {p: nbytes(t) for p, t in recvs.items()}
            self._start(
                kind,
                lambda t0: self._p2p_legs(out, into, t0),
                lambda: _Works(dist.batch_isend_irecv(ops)),
            ).wait()

    def send_async(self, t: torch.Tensor, peer: int, kind: str, tag: int = 0) -> Handle:
        """Point-to-point send of ``t`` to group rank ``peer`` (``isend``); the handle's
        :meth:`Handle.wait` returns once the peer has it (on gloo: once it left). Counts
        the real size of ``t``. Messages between two ranks with the same ``tag`` arrive
        in the order they were sent."""
        self.meter.record(kind, sent=nbytes(t))
        return self._start(
            kind,
            lambda t0: [self._send(peer, nbytes(t), t0)],
            lambda: _Works([dist.isend(t, self._global(peer), group=self.group, tag=tag)]),
            blocking=False,
        )

    def recv_async(self, t: torch.Tensor, peer: int, kind: str, tag: int = 0) -> Handle:
        """Post the receive of ``t`` from group rank ``peer`` (``irecv``) ahead of use;
        ``t`` is filled once the handle is waited on. Counts the real size of ``t``."""
        self.meter.record(kind, recv=nbytes(t))
        return self._start(
            kind,
            lambda t0: [self._recv(peer, nbytes(t), t0)],
            lambda: _Works([dist.irecv(t, self._global(peer), group=self.group, tag=tag)]),
            blocking=False,
        )

    def barrier(self) -> None:
        if self.size > 1:
            work = dist.barrier(group=self.group, async_op=True)
            if self.epoch is not None:
                self.wait_or_abort(work)
            else:
                work.wait()

    def account(self, kind: str, seconds: float) -> None:
        """Record time spent waiting on communication of ``kind``."""
        self.meter.add_seconds(kind, seconds, hidden=self.background)

    # -- helpers ---------------------------------------------------------------
    def _start(
        self,
        kind: str,
        legs: Callable[[float], list[Leg]],
        start: Callable[[], object],
        blocking: bool = True,
    ) -> Handle:
        """Launch the real operation; with a link model, queue its modelled transfers
        as of now (``legs(launch time)``). A blocking call is waited on at once and its
        whole duration counts as blocked time, in one piece."""
        t0 = time.perf_counter()
        planned = legs(self.link.now()) if self.link is not None else []
        handle = Handle(start(), self, kind, planned, since=t0 if blocking else None)
        if not blocking:
            self.account(kind, time.perf_counter() - t0)
        return handle

    def _send(self, peer: int, nbytes_: float, t0: float, hops: int = 1) -> Leg:
        """``nbytes_`` through this host's egress to ``peer``, then ``hops`` delays."""
        src, dst = self.hosts[self.rank], self.hosts[peer]
        return self.link.egress(src, dst, nbytes_, t0), hops * self.link.matrix.delay(src, dst)

    def _recv(self, peer: int, nbytes_: float, t0: float, hops: int = 1) -> Leg:
        """``nbytes_`` from ``peer`` through this host's ingress, then ``hops`` delays."""
        src, dst = self.hosts[peer], self.hosts[self.rank]
        return self.link.ingress(src, dst, nbytes_, t0), hops * self.link.matrix.delay(src, dst)

    def _p2p_legs(self, out: dict[int, float], into: dict[int, float], t0: float) -> list[Leg]:
        """Messages to and from peers, queued one after another on each link."""
        legs = [self._send(p, b, t0) for p, b in out.items() if p != self.rank]
        return legs + [self._recv(p, b, t0) for p, b in into.items() if p != self.rank]

    def _ring_legs(self, chunk: float, steps: int, t0: float) -> list[Leg]:
        """``steps`` ring steps of ``chunk`` bytes: this rank's share goes through its
        own links, and each step also waits for the slowest edge of the ring, since
        every rank forwards what its predecessor sent."""
        n, r = self.size, self.rank
        h = self.hosts
        slowest = max(self.link.transfer_time(h[i], h[(i + 1) % n], chunk) for i in range(n))
        return [
            self._send((r + 1) % n, steps * chunk, t0, hops=steps),
            self._recv((r - 1) % n, steps * chunk, t0, hops=steps),
            (t0 + steps * slowest, 0.0),
        ]

    def _broadcast_legs(self, src: int, b: float, t0: float) -> list[Leg]:
        """The binomial tree: a rank's copy leaves its parent once the parent has its
        own and has sent the copies queued before it; then it forwards to its
        children in turn."""
        n = self.size
        v = (self.rank - src) % n
        rank_of = [(src + u) % n for u in range(n)]
        arrival, ready = t0, t0  # ready: when our copy is complete here
        path = tree_path(v, n)
        for parent, child in zip(path, path[1:], strict=False):
            p, c = self.hosts[rank_of[parent]], self.hosts[rank_of[child]]
            siblings = tree_children(parent, n)
            queued = sum(
                self.link.serialization_time(p, self.hosts[rank_of[k]], b)
                for k in siblings[: siblings.index(child) + 1]
            )
            arrival = ready + queued
            ready = arrival + self.link.matrix.delay(p, c)
        legs = [] if v == 0 else [(arrival, ready - arrival)]
        return legs + [self._send(rank_of[c], b, ready) for c in tree_children(v, n)]

    def global_rank(self, group_rank: int) -> int:
        """The world rank of ``group_rank`` in this Comm's group."""
        return self._global(group_rank)

    def _global(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)


def tree_children(v: int, n: int) -> list[int]:
    """Children of position ``v`` in gloo's binomial broadcast tree over ``n`` ranks
    (positions counted from the root): ``v + 2**i`` for ``bit_length(v) <= i <
    ceil(log2 n)``."""
    dim = (n - 1).bit_length()
    return [v + (1 << i) for i in range(v.bit_length(), dim) if v + (1 << i) < n]


def tree_path(v: int, n: int) -> list[int]:
    """Positions from the root down to ``v`` (each parent clears the top bit)."""
    path = [v]
    while path[-1]:
        path.append(path[-1] - (1 << (path[-1].bit_length() - 1)))
    return path[::-1]


class _Works:
    """Several p2p works waited on as one."""

    def __init__(self, works: list) -> None:
        self.works = works

    def wait(self) -> None:
        for w in self.works:
            w.wait()

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)
