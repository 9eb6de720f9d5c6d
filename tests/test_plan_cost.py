"""The DT-FM cost model of farflung.plan.cost, against hand arithmetic and exhaustive
enumeration (never against itself)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from farflung.plan.cost import (
    Problem,
    bottleneck_matching,
    compute_cost,
    dp_cost,
    edge_cost,
    pp_cost,
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
    # speeds 1, 0.5 | 1, 1; 0.1 s per stage per micro-batch at speed 1, M = 4
    # group {0,1} runs at 0.5 -> 0.2 s, group {2,3} 0.1 s; (M + pp - 1)·max = 5·0.2 = 1.0
    p = two_by_two(speed=[1, 0.5, 1, 1], stage_compute_s=0.1, micro_batches=4)
    assert compute_cost(p, [[0, 1], [2, 3]], [0, 1]) == pytest.approx(1.0)
    g = p.__class__(p.alpha, p.beta, 2, 2, 1e6, 1e6, p.speed, 0.1, 4, "gpipe")
    assert compute_cost(g, [[0, 1], [2, 3]], [0, 1]) == pytest.approx(1.0)  # same bubble
    # per-position stage times 0.1, 0.3: slow group first -> max(0.2, 0.3) = 0.3 -> 1.5;
    # slow group last -> max(0.1, 0.6) = 0.6 -> 3.0
    q = two_by_two(speed=[1, 0.5, 1, 1], stage_compute_s=[0.1, 0.3], micro_batches=4)
    assert compute_cost(q, [[0, 1], [2, 3]], [0, 1]) == pytest.approx(1.5)
    assert compute_cost(q, [[0, 1], [2, 3]], [1, 0]) == pytest.approx(3.0)


def test_total_cost_breakdown():
    # DP 2.04 (test_dp_cost_2x2), PP 0.5 (test_edge_cost_2x2): 2.04 + 2·0.5 = 3.04
    b = total_cost(two_by_two(), [[0, 1], [2, 3]])
    assert (b.dp, b.pp, b.compute) == pytest.approx((2.04, 0.5, 0.0))
    assert b.total == pytest.approx(3.04)
    assert b.bottleneck in ((2, 3), (3, 2))  # DP dominates; the 2-3 link is slowest
    # compute 1.0 (test_compute_term) is added on top
    c = total_cost(
        two_by_two(speed=[1, 0.5, 1, 1], stage_compute_s=0.1, micro_batches=4), [[0, 1], [2, 3]]
    )
    assert c.total == pytest.approx(4.04)


def test_bottleneck_on_pipeline_edge():
    # DP free (c_dp = 0), edge as in test_edge_cost_2x2: matched 0-3 (0.25), 1-2 (0.5)
    p = Problem(two_by_two().alpha, two_by_two().beta, 2, 2, c_dp=0.0, c_pp=1e6)
    # (DP is 2·(0.01 + 0) = 0.02 < 2·0.5, so the pipeline edge is the bottleneck;
    # the path may run either way, so the pair may come in either order)
    assert total_cost(p, [[0, 1], [2, 3]]).bottleneck in ((1, 2), (2, 1))


def test_from_link_units():
    from farflung.comm.link import LinkMatrix

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
