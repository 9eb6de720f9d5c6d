"""The in-process link model inside Comm, and the probe measuring it (real gloo)."""

from __future__ import annotations

import time

import pytest
import torch
from distributed import run_distributed

from farflung.comm import Comm
from farflung.comm.collectives import set_link_model
from farflung.comm.link import LinkMatrix, LinkModel
from farflung.comm.probe import probe, round_robin

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
