"""The cost models of farflung.plan.cost (DT-FM's and the schedule model), against
hand arithmetic and exhaustive enumeration (never against themselves)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from farflung.plan.cost import (
    Problem,
    align,
    bottleneck_matching,
    compute_cost,
    dp_cost,
    edge_cost,
    pp_cost,
    tied_cost,
    total_cost,
    tsp_path,
)


def sym(n: int, entries: dict[tuple[int, int], float], default: float) -> np.ndarray:
    m = np.full((n, n), default)
    for (i, j), v in entries.items():
        m[i, j] = m[j, i] = v
    return m


def two_by_two(**kw) -> Problem:
    """4 devices, groups {0,1} and {2,3}; c_dp = c_pp = 1e6 bytes."""
    alpha = sym(4, {(0, 1): 0.01, (2, 3): 0.02}, 0.0)
    beta = sym(
        4,
        {(0, 1): 1e6, (2, 3): 5e5, (0, 2): 1e6, (0, 3): 4e6, (1, 2): 2e6, (1, 3): 1e6},
        1e6,
    )
    return Problem(alpha, beta, pp=2, dp=2, c_dp=1e6, c_pp=1e6, **kw)


def test_dp_cost_2x2():
    # group {0,1}: each device 2·(0.01 + 1e6/(2·1e6)) = 2·0.51 = 1.02
    # group {2,3}: each device 2·(0.02 + 1e6/(2·5e5)) = 2·1.02 = 2.04 -> max 2.04
    assert dp_cost(two_by_two(), [[0, 1], [2, 3]]) == pytest.approx(2.04)


def test_dp_cost_3x2():
    # dp = 3, c_dp = 3e6, α = 0: pair time 2·1e6/β
    # group {0,1,2}: β01 = 1e6 (1 s), β02 = 2e6 (0.5 s), β12 = 4e6 (0.25 s)
    #   dev0 2·(1 + 0.5) = 3.0, dev1 2·(1 + 0.25) = 2.5, dev2 2·(0.5 + 0.25) = 1.5
    # group {3,4,5}: β = 1e7 (0.1 s) -> 2·(0.1 + 0.1) = 0.4; DP = 3.0
    beta = sym(6, {(0, 1): 1e6, (0, 2): 2e6, (1, 2): 4e6}, 1e7)
    p = Problem(np.zeros((6, 6)), beta, pp=2, dp=3, c_dp=3e6, c_pp=1.0)
    assert dp_cost(p, [[0, 1, 2], [3, 4, 5]]) == pytest.approx(3.0)
    # group order and member order do not matter
    assert dp_cost(p, [[5, 3, 4], [2, 0, 1]]) == pytest.approx(3.0)


def test_dp_cost_uses_outgoing_links():
    # only 0 -> 1 is slow (β = 1e6, 1e6/(2·1e6) = 0.5 s); 1 -> 0 is free
    beta = np.full((2, 2), np.inf)
    beta[0, 1] = 1e6
    p = Problem(np.zeros((2, 2)), beta, pp=1, dp=2, c_dp=1e6, c_pp=0.0)
    # device 0: 2·0.5 = 1.0; device 1: 0
    assert dp_cost(p, [[0, 1]]) == pytest.approx(1.0)


def test_edge_cost_2x2():
    # w = c_pp/β: 0-2 1 s, 0-3 0.25 s, 1-2 0.5 s, 1-3 1 s
    # {0-2, 1-3}: max(1, 1) = 1; {0-3, 1-2}: max(0.25, 0.5) = 0.5 -> 0.5
    p = two_by_two()
    assert edge_cost(p, [0, 1], [2, 3]) == pytest.approx(0.5)
    assert edge_cost(p, [2, 3], [1, 0]) == pytest.approx(0.5)


def test_edge_cost_mean_of_directions():
    # 0 -> 1 takes 1 s, 1 -> 0 takes 3 s: forward + backward = 4 s, edge = 2 s
    beta = np.full((2, 2), np.inf)
    beta[0, 1], beta[1, 0] = 1e6, 1e6 / 3
    p = Problem(np.zeros((2, 2)), beta, pp=2, dp=1, c_dp=0.0, c_pp=1e6)
    assert edge_cost(p, [0], [1]) == pytest.approx(2.0)


MINSUM_VS_MINMAX = [[0.0, 5.0, 5.0], [5.0, 0.0, 5.0], [5.0, 5.0, 9.0]]


def test_bottleneck_differs_from_min_sum():
    w = np.array(MINSUM_VS_MINMAX)
    perms = list(itertools.permutations(range(3)))
    # min-sum: identity 0 + 0 + 9 = 9, whose largest pair is 9
    sums = {s: sum(w[i, s[i]] for i in range(3)) for s in perms}
    best_sum = min(perms, key=sums.get)
    assert sums[best_sum] == 9 and max(w[i, best_sum[i]] for i in range(3)) == 9
    # min-max: e.g. 0->1, 1->2, 2->0 pays 5 everywhere
    value, match = bottleneck_matching(w)
    assert value == 5.0
    assert sorted(match) == [0, 1, 2] and max(w[match[j], j] for j in range(3)) == 5.0
    # the same through edge_cost: α carries w between groups {0,1,2} and {3,4,5}
    alpha = np.zeros((6, 6))
    for i, j in itertools.product(range(3), range(3)):
        alpha[i, 3 + j] = alpha[3 + j, i] = w[i, j]
    p = Problem(alpha, np.full((6, 6), np.inf), pp=2, dp=3, c_dp=0.0, c_pp=1.0)
    assert edge_cost(p, [0, 1, 2], [3, 4, 5]) == 5.0


@pytest.mark.parametrize("seed", range(5))
def test_bottleneck_matches_exhaustive(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 7))
    w = rng.integers(0, 20, size=(n, n)).astype(float)  # ties on purpose
    expect = min(max(w[i, s[i]] for i in range(n)) for s in itertools.permutations(range(n)))
    value, match = bottleneck_matching(w)
    assert value == expect
    assert sorted(match) == list(range(n)) and max(w[match[j], j] for j in range(n)) == expect


def path_len(d, path):
    return sum(d[path[k], path[k + 1]] for k in range(len(path) - 1))


@pytest.mark.parametrize("seed", range(12))
def test_tsp_path_is_optimal(seed):
    rng = np.random.default_rng(seed)
    n = 2 + seed % 6  # 2..7 nodes
    d = rng.uniform(0, 10, size=(n, n))
    d = d + d.T
    np.fill_diagonal(d, 0)
    expect = min(path_len(d, p) for p in itertools.permutations(range(n)))
    cost, path = tsp_path(d)
    assert sorted(path) == list(range(n))
    assert cost == pytest.approx(expect)
    assert path_len(d, path) == pytest.approx(expect)


def test_tsp_heuristic_above_exact_limit():
    # points on a line, shuffled: the best open path walks the line, length = span
    rng = np.random.default_rng(0)
    x = rng.permutation(np.arange(15, dtype=float))
    d = np.abs(x[:, None] - x[None, :])
    cost, path = tsp_path(d)
    assert sorted(path) == list(range(15))
    assert cost == pytest.approx(14.0) and path_len(d, path) == pytest.approx(14.0)


def test_pp_cost_order():
    # 3 groups of 1 on a line 0 - 1 - 2 (α 1 s between neighbours, 5 s for 0-2):
    # the best path is 0,1,2 (or reversed) of cost 2
    alpha = sym(3, {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 5.0}, 0.0)
    p = Problem(alpha, np.full((3, 3), np.inf), pp=3, dp=1, c_dp=0.0, c_pp=0.0)
    cost, order = pp_cost(p, [[2], [0], [1]])  # group 0 holds device 2, ...
    assert cost == pytest.approx(2.0)
    assert order in ([1, 2, 0], [0, 2, 1])


def test_compute_term():
    # equal stages: (M + pp - 1)·t for both schedules, 0.1 s per stage, M = 4 -> 0.5
    for sched in ("1f1b", "gpipe"):
        eq = two_by_two(stage_compute_s=0.1, micro_batches=4, schedule=sched)
        assert compute_cost(eq, [[0, 1], [2, 3]], [0, 1]) == pytest.approx(0.5)
    # speeds 1, 0.5 | 1, 1: group {0,1} runs at 0.5 -> 0.2 s per micro-batch (f 1/15,
    # b 2/15), group {2,3} 0.1 s (f 1/30, b 1/15). GPipe, flow shop with identical jobs:
    # Σf + 3·max f + Σb + 3·max b = 0.1 + 0.2 + 0.2 + 0.4 = 0.9
    g = two_by_two(speed=[1, 0.5, 1, 1], stage_compute_s=0.1, micro_batches=4, schedule="gpipe")
    assert compute_cost(g, [[0, 1], [2, 3]], [0, 1]) == pytest.approx(0.9)
    # 1F1B played out by hand (stage 0: F0 F1 B0 F2 B1 F3 B2 B3; its backward waits for
    # stage 1's gradient each time): stage 0's last backward ends at 0.7 + 2/15 = 5/6
    p = two_by_two(speed=[1, 0.5, 1, 1], stage_compute_s=0.1, micro_batches=4)
    assert compute_cost(p, [[0, 1], [2, 3]], [0, 1]) == pytest.approx(5 / 6)
    # per-position stage times 0.1, 0.3 under GPipe: slow group first -> t = (0.2, 0.3):
    # 1/15+0.1 + 3·0.1 + 2/15+0.2 + 3·0.2 = 1.4; slow group last -> t = (0.1, 0.6):
    # 1/30+0.2 + 3·0.2 + 1/15+0.4 + 3·0.4 = 2.5
    q = two_by_two(
        speed=[1, 0.5, 1, 1], stage_compute_s=[0.1, 0.3], micro_batches=4, schedule="gpipe"
    )
    assert compute_cost(q, [[0, 1], [2, 3]], [0, 1]) == pytest.approx(1.4)
    assert compute_cost(q, [[0, 1], [2, 3]], [1, 0]) == pytest.approx(2.5)


def test_total_cost_breakdown():
    # DP 2.04 (test_dp_cost_2x2), path 0.5 (test_edge_cost_2x2): 2.04 + 2·0.5 = 3.04
    b = total_cost(two_by_two(), [[0, 1], [2, 3]])
    assert (b.dp, b.pp, b.compute) == pytest.approx((2.04, 1.0, 0.0))
    assert b.total == pytest.approx(3.04)
    assert b.bottleneck in ((2, 3), (3, 2))  # DP dominates; the 2-3 link is slowest
    # compute 5/6 (test_compute_term, 1F1B) is added on top
    c = total_cost(
        two_by_two(speed=[1, 0.5, 1, 1], stage_compute_s=0.1, micro_batches=4), [[0, 1], [2, 3]]
    )
    assert c.total == pytest.approx(3.04 + 5 / 6)


def test_schedule_model_charges_the_slowest_boundary_not_the_sum():
    # 3 stages in a row, 1 MB/s everywhere, no delay, no compute; 4 MB of activations
    # per step in 4 micro-batches -> 1 s per message. DT-FM: 2·(4 + 4) = 16 s. GPipe
    # overlaps boundaries and micro-batches: forward Σ links + 3·1 = 5, backward 5 -> 10
    kw = dict(pp=3, dp=1, c_dp=0.0, c_pp=4e6, micro_batches=4, schedule="gpipe")
    alpha, beta = np.zeros((3, 3)), np.full((3, 3), 1e6)
    assert total_cost(Problem(alpha, beta, **kw), [[0], [1], [2]]).total == pytest.approx(16)
    sched = total_cost(Problem(alpha, beta, model="schedule", **kw), [[0], [1], [2]])
    assert (sched.total, sched.pp, sched.compute) == pytest.approx((10.0, 10.0, 0.0))


def test_schedule_model_latency_and_duplex():
    # one boundary, 0.5 s one way, 1 MB/s; 6 MB in 2 micro-batches -> 3 s a message;
    # 3 s of compute per micro-batch (forward 1, backward 2). 1F1B by hand
    # (tests/test_plan_timeline.py): 16 s, of which (M + pp - 1)·3 = 9 compute
    alpha, beta = np.full((2, 2), 0.5), np.full((2, 2), 1e6)
    kw = dict(pp=2, dp=1, c_dp=0.0, c_pp=6e6, stage_compute_s=3.0, micro_batches=2)
    b = total_cost(Problem(alpha, beta, model="schedule", **kw), [[0], [1]])
    assert (b.total, b.compute, b.pp, b.dp) == pytest.approx((16.0, 9.0, 7.0, 0.0))


def test_dp_overlap_hides_the_sync_behind_the_next_step():
    # no pipeline (pp = 1), 2 replicas: compute 0.3 s a step; DP 2·(0 + 1e6/(2·1e6)) = 1 s
    alpha, beta = np.zeros((2, 2)), np.full((2, 2), 1e6)
    kw = dict(pp=1, dp=2, c_dp=1e6, c_pp=0.0, stage_compute_s=0.3, model="schedule")
    plain = total_cost(Problem(alpha, beta, **kw), [[0, 1]])
    assert (plain.total, plain.dp) == pytest.approx((1.3, 1.0))
    hidden = total_cost(Problem(alpha, beta, dp_overlap=True, **kw), [[0, 1]])
    assert (hidden.total, hidden.dp) == pytest.approx((1.0, 0.7))


def test_bottleneck_on_pipeline_edge():
    # DP free (c_dp = 0), edge as in test_edge_cost_2x2: matched 0-3 (0.25), 1-2 (0.5)
    p = Problem(two_by_two().alpha, two_by_two().beta, 2, 2, c_dp=0.0, c_pp=1e6)
    # (DP is 2·(0.01 + 0) = 0.02 < 2·0.5, so the pipeline edge is the bottleneck;
    # the path may run either way, so the pair may come in either order)
    assert total_cost(p, [[0, 1], [2, 3]]).bottleneck in ((1, 2), (2, 1))


def test_from_link_units():
    from farflung.netlab.link import LinkMatrix

    link = LinkMatrix([[None, "8mbit"], ["16mbit", None]], [[0, "10ms"], ["20ms", 0]])
    p = Problem.from_link(link, pp=2, dp=1, c_dp=0.0, c_pp=1e6)
    # 8 Mbit/s = 1e6 bytes/s; the diagonal is free
    assert p.beta[0, 1] == 1e6 and p.beta[1, 0] == 2e6
    assert math.isinf(p.beta[0, 0]) and p.alpha[0, 0] == 0
    # edge = mean(0.01 + 1 s, 0.02 + 0.5 s) = 0.765
    assert edge_cost(p, [0], [1]) == pytest.approx(0.765)
    unshaped = Problem.from_link(LinkMatrix.uniform(2, "unlimited"), 2, 1, 1e9, 1e9)
    assert edge_cost(unshaped, [0], [1]) == 0.0


def test_rejects_bad_layouts():
    with pytest.raises(ValueError):
        Problem(np.zeros((4, 4)), np.ones((4, 4)), pp=3, dp=2, c_dp=1, c_pp=1)
    p = two_by_two()
    with pytest.raises(ValueError):
        dp_cost(p, [[0, 1], [1, 3]])
    with pytest.raises(ValueError):
        two_by_two(schedule="zb")
    with pytest.raises(ValueError, match="model"):
        two_by_two(model="alpa")


def test_align_follows_the_bottleneck_matching():
    # edge {0,1} -> {2,3} (test_edge_cost_2x2): the bottleneck matching pairs 0-3 and
    # 1-2, so replica 0 is 0 -> 3 and replica 1 is 1 -> 2, whatever order came in
    p = two_by_two()
    assert align(p, [[0, 1], [2, 3]]).tolist() == [[0, 1], [3, 2]]
    assert align(p, [[1, 0], [2, 3]]).tolist() == [[1, 0], [2, 3]]


def test_tied_exchange_uses_the_replica_pairs():
    # 3 stages x 1, devices 0 -> 1 -> 2 in order; the tied exchange is 0 <-> 2: 2e6 bytes
    # at 1e6 B/s one way and 4e6 B/s back, 0.1 s delay -> max(0.1 + 2, 0.1 + 0.5) = 2.1
    alpha = np.full((3, 3), 0.1)
    beta = sym(3, {(0, 1): 1e9, (1, 2): 1e9}, 1e6)
    beta[2, 0] = 4e6
    kw = dict(pp=3, dp=1, c_dp=0.0, c_pp=0.0, c_tied=2e6, model="schedule")
    p = Problem(alpha, beta, **kw)
    assert tied_cost(p, [[0], [1], [2]]) == pytest.approx(2.1)
    # in the schedule model it follows the (free) pipeline: links 0.1 s each way and
    # stage, no compute: 4 x 0.1 of pipeline + 2.1
    b = total_cost(p, [[0], [1], [2]])
    assert b.total == pytest.approx(0.4 + 2.1)
    # DT-FM's model has no such term
    assert total_cost(Problem(alpha, beta, **{**kw, "model": "dtfm"}), [[0], [1], [2]]).total == (
        pytest.approx(4 * 0.1)
    )


def test_dp_cost_per_stage_size():
    # 2 x 2 of test_dp_cost_2x2 with stages of 1e6 and 0.25e6 bytes: group {0,1} syncs
    # in 2·(0.01 + c/(2·1e6)), {2,3} in 2·(0.02 + c/(2·5e5)). Big stage on {0,1}:
    # max(1.02, 0.54) = 1.02; on {2,3}: max(2.04, 0.27) = 2.04
    p = Problem(two_by_two().alpha, two_by_two().beta, 2, 2, c_dp=[1e6, 0.25e6], c_pp=0.0)
    assert dp_cost(p, [[0, 1], [2, 3]]) == pytest.approx(1.02)
    assert dp_cost(p, [[2, 3], [0, 1]]) == pytest.approx(2.04)
    # the search's order puts the big stage on the fast group
    assert total_cost(p, [[2, 3], [0, 1]]).dp == pytest.approx(1.02)
    with pytest.raises(ValueError, match="c_dp"):
        Problem(p.alpha, p.beta, 2, 2, c_dp=[1.0, 2.0, 3.0], c_pp=0.0)
