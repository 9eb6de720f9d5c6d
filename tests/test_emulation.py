"""The in-process link model inside Comm, and the probe measuring it (real gloo)."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from farflung.comm import Comm
from farflung.comm.collectives import set_link_model
from farflung.netlab.link import LinkMatrix, LinkModel
from farflung.netlab.probe import probe, round_robin

BW, DELAY = 80e6, 0.03  # 80 Mbit/s, 30 ms one way


def timed_collectives(rank: int, world: int) -> dict:
    set_link_model(LinkModel(LinkMatrix.uniform(world, BW, DELAY)))
    comm = Comm()
    x = torch.zeros(250_000)  # 1 MB of fp32
    comm.all_reduce(x, kind="dp")  # warm-up (connections)
    t0 = time.perf_counter()
    comm.all_reduce(x, kind="dp")
    t_allreduce = time.perf_counter() - t0
    peer = (rank + 1) % world
    src = (rank - 1) % world
    t0 = time.perf_counter()
    comm.exchange(
        {peer: torch.zeros(100_000, dtype=torch.uint8)},
        {src: torch.empty(100_000, dtype=torch.uint8)},
        kind="dp",
    )
    t_exchange = time.perf_counter() - t0
    snap = comm.meter.snapshot()
    return {"allreduce": t_allreduce, "exchange": t_exchange, "blocked": snap.seconds}


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_take_the_modelled_time(world):
    # ring all-reduce: 2(n-1) steps of delay + (bytes/n) / bandwidth
    expect_ar = 2 * (world - 1) * (DELAY + 8 * 1e6 / world / BW)
    expect_ex = DELAY + 8 * 100_000 / BW
    # The lower bound is the property (a transfer never beats its link). The upper one
    # only catches gross errors, such as the delay paid per message part: it is loose
    # because a loaded 2-core CI machine can make the real transfer itself slow.
    for res in run_distributed(timed_collectives, world):
        assert expect_ar <= res["allreduce"] < expect_ar * 2 + 0.2
        assert expect_ex <= res["exchange"] < expect_ex * 2 + 0.2
        # the emulated waiting counts as time blocked on communication
        assert res["blocked"] >= 2 * expect_ar + expect_ex


def concurrent_all_reduces(rank: int, world: int) -> dict:
    set_link_model(LinkModel(LinkMatrix.uniform(world, "100mbit", 0)))
    comm = Comm()
    side = Comm(dist.new_group(), comm.meter, background=True)  # as cocktail's sync thread
    a, b = torch.ones(1_250_000), torch.ones(1_250_000)  # 5 MB of fp32 each
    comm.barrier()
    t0 = time.perf_counter()
    for h in [comm.all_reduce_async(a, "dp"), comm.all_reduce_async(b, "dp")]:
        h.wait()
    back_to_back = time.perf_counter() - t0
    comm.barrier()
    t0 = time.perf_counter()
    h = comm.all_reduce_async(a, "dp")
    thread = threading.Thread(target=side.all_reduce, args=(b, "dp"))
    thread.start()
    thread.join()
    h.wait()
    two_threads = time.perf_counter() - t0
    return {"back_to_back": back_to_back, "two_threads": two_threads, "a": a[0], "b": b[0]}


def test_concurrent_transfers_share_the_hosts_link():
    # with 2 ranks each all-reduce puts 5 MB on every rank's egress: 0.4 s at 100 Mbit,
    # so two at once take the sum, whether from one Comm or from two in two threads
    for res in run_distributed(concurrent_all_reduces, 2):
        assert res["a"] == 4 and res["b"] == 4  # both reduced twice
        assert 0.8 <= res["back_to_back"] < 3 * 0.8
        assert 0.8 <= res["two_threads"] < 3 * 0.8


def one_host_sends_to_two(rank: int, world: int) -> dict:
    set_link_model(LinkModel(LinkMatrix.uniform(world, "100mbit", "10ms")))
    comm = Comm()
    inp = torch.zeros(world * 2_500_000, dtype=torch.uint8)  # 2.5 MB to every rank
    out = torch.empty_like(inp)
    comm.barrier()
    t0 = time.perf_counter()
    comm.all_to_all(out, inp, kind="dp")
    all_to_all = time.perf_counter() - t0
    comm.barrier()
    t0 = time.perf_counter()
    comm.broadcast(inp[:2_500_000], src=0, kind="init")
    return {"all_to_all": all_to_all, "broadcast": time.perf_counter() - t0}


def test_messages_out_of_one_host_queue_on_its_egress():
    # 2.5 MB chunks at 100 Mbit: 0.2 s each, one after the other, then 10 ms of delay
    one, delay = 8 * 2.5e6 / 100e6, 0.010
    res = run_distributed(one_host_sends_to_two, 3)
    for r in res:  # two chunks out and two in per rank
        assert 2 * one + delay <= r["all_to_all"] < 3 * (2 * one + delay)
    # broadcast as direct sends: rank 0 sends rank 1's copy, then rank 2's
    assert 2 * one + delay <= res[0]["broadcast"] < 3 * (2 * one + delay)
    assert one + delay <= res[1]["broadcast"]
    assert 2 * one + delay <= res[2]["broadcast"]


def delay_after_real_worker(rank: int, world: int, late: float, delay: float) -> dict:
    # unlimited bandwidth with a delay: the model the network lab installs over tc
    matrix = LinkMatrix([[math.inf] * world for _ in range(world)], [[delay] * world] * world)
    set_link_model(LinkModel(matrix))
    comm = Comm()
    x = torch.ones(1000)
    comm.all_reduce(x, kind="dp")  # connections
    comm.barrier()
    if rank == 1:
        time.sleep(late)  # rank 0's real all-reduce cannot finish before this
    t0 = time.perf_counter()
    comm.all_reduce(x, kind="dp")
    slow_real = time.perf_counter() - t0
    comm.barrier()
    h = comm.all_reduce_async(x, kind="dp")
    time.sleep(late + 2 * delay)  # real transfer and its delay are over by now
    t0 = time.perf_counter()
    h.wait()
    return {"slow_real": slow_real, "late_wait": time.perf_counter() - t0}


def test_delay_counts_after_the_real_transfer():
    late, delay = 0.6, 0.3
    res = run_distributed(delay_after_real_worker, 2, late, delay)
    # ring of 2: two steps, a delay each, after the real transfer (not overlapping it);
    # 0.05 s allows for the two ranks leaving the barrier at slightly different times
    assert res[0]["slow_real"] >= late + 2 * delay - 0.05
    assert res[1]["slow_real"] >= 2 * delay
    for r in res:
        # the delay counts from when the transfer ended, not from a late wait()
        assert r["late_wait"] < delay


def probe_worker(rank: int, world: int, matrix: dict) -> dict:
    set_link_model(LinkModel(LinkMatrix.from_dict(matrix)))
    return probe(Comm(), target_s=0.2).to_dict()


def test_probe_recovers_the_link_model():
    # uneven links: host 2 sits behind a slower, farther link
    bw = [[0, 200e6, 50e6], [200e6, 0, 50e6], [50e6, 50e6, 0]]
    delay = [[0, 0.005, 0.04], [0.005, 0, 0.04], [0.04, 0.04, 0]]
    truth = LinkMatrix(bw, delay)
    measured = LinkMatrix.from_dict(run_distributed(probe_worker, 3, truth.to_dict())[0])
    for i, j in truth.pairs():
        assert measured.bandwidth(i, j) == pytest.approx(truth.bandwidth(i, j), rel=0.15)
        assert measured.delay(i, j) == pytest.approx(truth.delay(i, j), rel=0.15, abs=0.002)


def test_round_robin_pairs_are_disjoint_and_complete():
    for n in range(2, 8):
        rounds = round_robin(n)
        seen = [p for r in rounds for p in r]
        assert sorted(seen) == [(a, b) for a in range(n) for b in range(a + 1, n)]
        for r in rounds:
            hosts = [h for p in r for h in p]
            assert len(hosts) == len(set(hosts))
