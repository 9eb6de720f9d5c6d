"""Bytes metered by :class:`Comm` against the bytes the network interface carried.

``Comm`` records most collectives from a formula (ring all-reduce, all-gather,
broadcast); a formula can be wrong about what gloo really moves. Here each collective
runs between ranks placed in network-lab namespaces, and every rank reads its own veth
counters (``/sys/class/net/<iface>/statistics``, private to the namespace) right
before and after the call, with a barrier on both sides so no other traffic of the
group falls in the window. The interface carries the payload plus TCP/IP/Ethernet
headers, gloo's message preambles, the closing barrier and ACKs of what the rank
received, so for each rank and direction::

    metered <= interface <= 1.10 * metered + 0.05 * other direction + constant

The constant is twice the barrier-only window (case ``none``) plus 16 KiB. A formula
that counts a copy too many fails the lower bound, one that misses a copy (a relay)
fails the upper one. Needs root and iproute2 (skipped otherwise); each world size is
one run of a few seconds, shared by its test cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from farflung.netlab import Lab, available
from farflung.netlab.link import LinkMatrix

OK, WHY = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"network lab unavailable: {WHY}")

HEADERS = 1.10  # headers at MTU 1500 are ~4.6%; with GSO on the veth much less
ACKS = 0.05  # pure ACKs for what the rank received (one 66-byte frame per 1-2 segments)
SLACK = 16 * 1024
KB, MB = 1024, 1 << 20

# (case name, collective, payload bytes); the worker builds each from these
CASES = [
    ("all_reduce", 64 * KB),
    ("all_reduce", 4 * MB),
    ("broadcast", 4 * MB),
    ("all_gather", 1 * MB),
    ("all_to_all", 4 * MB),
    ("exchange", 1 * MB),
]

_WORKER = textwrap.dedent(
    """
    import json, sys
    from datetime import timedelta
    import torch, torch.distributed as dist
    from farflung.comm import Comm

    rank, world, master, iface = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    cases = json.loads(sys.argv[5])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{master}:29500", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )
    comm = Comm()
    peers = [p for p in range(world) if p != rank]

    def counters():
        stats = f"/sys/class/net/{iface}/statistics"
        return [int(open(f"{stats}/{k}_bytes").read()) for k in ("tx", "rx")]

    def make(name, nbytes):
        n = nbytes // 4  # fp32 elements
        if name == "none":
            return lambda: None
        if name == "all_reduce":
            return lambda: comm.all_reduce(torch.ones(n), "t")
        if name == "broadcast":
            return lambda: comm.broadcast(torch.ones(n), 0, "t")
        if name == "all_gather":
            return lambda: comm.all_gather(torch.empty(world, n), torch.ones(n), "t")
        if name == "all_to_all":
            k = world * (n // world)
            return lambda: comm.all_to_all(torch.empty(k), torch.ones(k), "t")
        if name == "exchange":
            return lambda: comm.exchange(
                {p: torch.ones(n) for p in peers}, {p: torch.empty(n) for p in peers}, "t"
            )
        raise ValueError(name)

    calls = [(name, nbytes, make(name, nbytes)) for name, nbytes in [["none", 0], *cases]]
    for *_, fn in calls:  # warm-up: every connection and code path once
        fn()
    comm.meter.snapshot(reset=True)
    rows = []
    for name, nbytes, fn in calls:
        dist.barrier()
        tx0, rx0 = counters()
        fn()
        metered = comm.meter.snapshot(reset=True)
        dist.barrier()  # every rank is done: nothing of this call is still in flight
        tx1, rx1 = counters()
        rows.append([name, nbytes, metered.sent, metered.recv, tx1 - tx0, rx1 - rx0])
    print(json.dumps(rows), flush=True)
    dist.destroy_process_group()
    """
)


def run_collectives(world: int, cases: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Run ``cases`` once on ``world`` ranks in a 1 gbit lab; one row per rank and
    case: what the meter recorded and what the rank's interface counted."""
    with Lab(LinkMatrix.uniform(world, "1gbit")) as lab:
        procs = [
            lab.run(
                i,
                [sys.executable, "-c", _WORKER, str(i), str(world), lab.address(0)]
                + [lab.iface(i), json.dumps(cases)],
                env={**os.environ, **lab.env(i)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(world)
        ]
        outs = [p.communicate(timeout=120) for p in procs]
    rows = []
    for rank, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"rank {rank}: {err[-3000:]}"
        for name, nbytes, sent, recv, tx, rx in json.loads(out):
            rows.append(
                dict(rank=rank, case=name, nbytes=nbytes, sent=sent, recv=recv, tx=tx, rx=rx)
            )
    return rows


@pytest.fixture(scope="module")
def measured() -> Callable[[int], list[dict[str, Any]]]:
    """Rows per world size, each world run once for all its cases."""
    cache: dict[int, list[dict[str, Any]]] = {}

    def get(world: int) -> list[dict[str, Any]]:
        if world not in cache:
            cache[world] = run_collectives(world, CASES)
        return cache[world]

    return get


def check(rows: list[dict[str, Any]], case: str, nbytes: int) -> None:
    """Every rank's meter against its interface, both directions (bounds above)."""
    base = {r["rank"]: max(r["tx"], r["rx"]) for r in rows if r["case"] == "none"}
    mine = [r for r in rows if (r["case"], r["nbytes"]) == (case, nbytes)]
    assert mine, f"no rows for {case} {nbytes}"
    problems = []
    for r in mine:
        const = 2 * base[r["rank"]] + SLACK
        for meter, iface, other, way in (
            (r["sent"], r["tx"], r["recv"], "sent"),
            (r["recv"], r["rx"], r["sent"], "received"),
        ):
            upper = HEADERS * meter + ACKS * other + const
            if not meter <= iface <= upper:
                problems.append(
                    f"rank {r['rank']} {way}: metered {meter}, interface {iface} "
                    f"(expected {meter}..{upper:.0f})"
                )
    assert not problems, f"{case} of {nbytes} bytes:\n" + "\n".join(problems)


def _params() -> list[Any]:
    params = []
    for world in (2, 3, 4):
        for case, nbytes in CASES:
            params.append(pytest.param(world, case, nbytes, id=f"{case}-{nbytes}-{world}ranks"))
    return params


@pytest.mark.parametrize(("world", "case", "nbytes"), _params())
def test_meter_agrees_with_the_interface(measured, world: int, case: str, nbytes: int) -> None:
    check(measured(world), case, nbytes)


def test_barrier_window_is_small(measured) -> None:
    """The constant the bounds allow is really small: a window with no collective in
    it (two barriers' worth) carries a few hundred bytes, so it cannot hide a copy."""
    for world in (2, 3):
        for r in measured(world):
            if r["case"] == "none":
                assert r["sent"] == r["recv"] == 0
                assert 0 < r["tx"] < 4 * KB and 0 < r["rx"] < 4 * KB, r
