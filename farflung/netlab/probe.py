"""Measure bandwidth and latency between every pair of ranks of a running group.

Pairs are measured in rounds of a round-robin tournament, so every round's pairs are
disjoint and run at the same time. For a pair (a, b):

* latency: small ping-pongs; one-way delay = fastest round trip / 2 (a busy host only
  ever adds to a round trip, so the fastest is the closest to the link's own);
* bandwidth a→b: a sends messages of growing size (doubling) and b acknowledges each;
  once a transfer takes long enough to dwarf the round trip, its rate
  ``8·size / (elapsed − round trip)`` is the estimate. Then the same from b to a.

Transfers go through :class:`Comm`, so they are metered (kind ``probe``) and slowed
by an installed link model like any other traffic. The result is a
:class:`LinkMatrix`, written in the file format the netlab and the planner read.

Worker entry (also under torchrun across machines)::

    python -m farflung.netlab.probe --out links.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from farflung.comm.collectives import Comm
from farflung.netlab.link import LinkMatrix, format_bandwidth, format_delay
from farflung.netlab.probe_args import add_probe_args

KIND = "probe"


def round_robin(n: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint pairs covering every pair once (circle method)."""
    players = list(range(n)) + ([None] if n % 2 else [])
    m = len(players)
    rounds = []
    for _ in range(m - 1):
        pairs = []
        for i in range(m // 2):
            a, b = players[i], players[m - 1 - i]
            if a is not None and b is not None:
                pairs.append((min(a, b), max(a, b)))
        rounds.append(pairs)
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


class _Pair:
    """One side of a pair's measurements."""

    def __init__(self, comm: Comm, peer: int) -> None:
        self.comm, self.peer = comm, peer
        self.tiny = torch.zeros(8, dtype=torch.uint8)

    def send(self, t: torch.Tensor) -> None:
        self.comm.exchange({self.peer: t}, {}, KIND)

    def recv(self, t: torch.Tensor) -> None:
        self.comm.exchange({}, {self.peer: t}, KIND)

    def round_trip(self, leader: bool, reps: int) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            if leader:
                self.send(self.tiny)
                self.recv(self.tiny)
            else:
                self.recv(self.tiny)
                self.send(self.tiny)
            times.append(time.perf_counter() - t0)
        return min(times)

    def stream(self, sender: bool, rtt: float, target_s: float, max_bytes: int) -> float:
        """Bits/s from the sender to the receiver. Sizes double until a transfer takes
        ``target_s``; that size is then sent once more and the faster of the two counts
        (a one-off stall should not decide the figure). Both sides call this and agree
        on the sizes because the sender tells the receiver when to stop."""
        size, rates, flag = 1 << 14, [], torch.zeros(1, dtype=torch.uint8)
        while True:
            buf = torch.empty(size, dtype=torch.uint8)
            if sender:
                t0 = time.perf_counter()
                self.send(buf)
                self.recv(self.tiny)
                elapsed = time.perf_counter() - t0
                rates.append(8 * size / max(elapsed - rtt, 1e-9))
                long_enough = elapsed >= target_s or size >= max_bytes
                flag[0] = 2 if rates and flag[0] == 1 else (1 if long_enough else 0)
                self.send(flag)
            else:
                self.recv(buf)
                self.send(self.tiny)
                self.recv(flag)
            if flag[0] == 2:
                return max(rates[-2:]) if sender else 0.0
            if flag[0] == 0:
                size *= 2


def probe(
    comm: Comm, target_s: float = 0.3, max_bytes: int = 1 << 26, pings: int = 9
) -> LinkMatrix:
    """Measure every ordered pair of ``comm``'s ranks; every rank gets the matrix."""
    n, me = comm.size, comm.rank
    bw = torch.zeros(n, n, dtype=torch.float64)
    delay = torch.zeros(n, n, dtype=torch.float64)
    for pairs in round_robin(n):
        for a, b in pairs:
            if me not in (a, b):
                continue
            peer = b if me == a else a
            pair = _Pair(comm, peer)
            pair.round_trip(me == a, 2)  # warm the connection up
            rtt = pair.round_trip(me == a, pings)
            delay[me, peer] = rtt / 2
            for sender in (a, b):
                rate = pair.stream(me == sender, rtt, target_s, max_bytes)
                if me == sender:
                    bw[me, peer] = rate
        comm.barrier()
    comm.all_reduce(bw, kind="ctrl")
    comm.all_reduce(delay, kind="ctrl")
    for i in range(n):
        bw[i, i] = float("inf")
    return LinkMatrix(bw.tolist(), delay.tolist())


def describe(matrix: LinkMatrix) -> str:
    lines = []
    for i in range(matrix.n):
        for j in range(matrix.n):
            if i != j:
                lines.append(
                    f"  {i} -> {j}: {format_bandwidth(matrix.bandwidth(i, j)):>10}"
                    f"  {format_delay(matrix.delay(i, j)):>8}"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from farflung.comm.dist import init_distributed, shutdown_distributed
    from farflung.netlab.emulation import install_link_model_from_env

    p = argparse.ArgumentParser(prog="python -m farflung.netlab.probe", description=__doc__)
    add_probe_args(p)
    args = p.parse_args(argv)
    info = init_distributed("gloo", timeout_s=120)
    install_link_model_from_env()
    matrix = probe(Comm(), target_s=args.seconds)
    if info.rank == 0:
        matrix.to_file(args.out)
        print(f"measured {info.world_size} ranks:\n{describe(matrix)}\nwrote {args.out}")
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
