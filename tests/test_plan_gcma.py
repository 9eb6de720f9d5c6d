"""DT-FM's inputs, cost function and GCMA as ported (farflung.plan.dtfm, .gcma), and
farflung's search leaving a plateau that single swaps cannot cross on the cost alone."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from farflung.plan import dtfm
from farflung.plan.cost import Problem, total_cost
from farflung.plan.gcma import cyclic_partitioning, five_point_crossover, gcma
from farflung.plan.search import _Budget, _descend, _State, brute_force, plan_search_traced


def tiny() -> dtfm.DtfmScenario:
    delay = np.array([[0, 10, 5, 50], [10, 0, 40, 5], [5, 40, 0, 20], [50, 5, 20, 0]], float)
    bw = np.ones((4, 4))
    bw[0, 1] = bw[1, 0] = 2.0
    bw[2, 3] = bw[3, 2] = 4.0
    return dtfm.DtfmScenario("tiny", delay, bw, 0.125, 0.25, ("a", "a", "b", "b"))


def test_dtfm_cost_by_hand_on_four_devices():
    """1 Gbit of activations, 2 Gbit of gradients, dp = 2. Groups {0,1}, {2,3}:
    DP = max(2·(10 ms + 2/(2·2)), 2·(20 ms + 2/(4·2))) = 1.02; the edge's matchings
    (0-2, 1-3) → max(5 ms + 1, 5 ms + 1) = 1.005 and (0-3, 1-2) → 1.05, so 1.005;
    total 1.02 + 2·1.005 = 3.03. Groups {0,2}, {1,3}: DP 2·(5 ms + 1) = 2.01, edge
    min(max(0.51, 0.27), max(1.05, 1.04)) = 0.51, total 3.03."""
    sc = tiny()
    total, dp, pp = dtfm.dtfm_cost(sc, [[0, 1], [2, 3]])
    assert (dp, pp, total) == pytest.approx((1.02, 2.01, 3.03))
    assert dtfm.dtfm_cost(sc, [[0, 2], [1, 3]])[:2] == pytest.approx((3.03, 2.01))
    # farflung's objective on the same problem in SI units is the same function
    p = dtfm.problem(sc, pp=2, dp=2)
    assert total_cost(p, [[0, 1], [2, 3]]).total == pytest.approx(3.03)
    assert total_cost(p, [[0, 3], [1, 2]]).total == pytest.approx(
        dtfm.dtfm_cost(sc, [[0, 3], [1, 2]])[0]
    )


@pytest.mark.parametrize("name", dtfm.SCENARIOS)
def test_scenarios_priced_alike(name):
    """DT-FM's cost function (plain loops, its units) and farflung's objective agree
    on random 64-device partitions of every scenario."""
    sc = dtfm.scenario(name)
    p = dtfm.problem(sc)
    rng = np.random.default_rng(0)
    for _ in range(2):
        g = rng.permutation(64).reshape(8, 8)
        assert total_cost(p, g).total == pytest.approx(dtfm.dtfm_cost(sc, g)[0], rel=1e-12)


def test_scenario_inputs_are_dtfms():
    spot = dtfm.scenario("spot")
    assert spot.bw_gbps[0, 3] == 100.0 and spot.bw_gbps[0, 4] == 1.25
    assert spot.bw_gbps[40, 41] == 1.25  # the 32 single devices share no machine
    world = dtfm.scenario("world")
    assert (world.delay_ms[0, 8], world.bw_gbps[0, 8]) == (67.0, 0.79)  # Oregon-Virginia
    assert (world.delay_ms[32, 40], world.bw_gbps[32, 40]) == (238.0, 0.342)  # Seoul-London
    assert (world.delay_ms[0, 1], world.bw_gbps[0, 1]) == (5.0, 2.0)  # inside a region
    regional = dtfm.scenario("regional")
    assert (regional.delay_ms[0, 16], regional.bw_gbps[0, 16]) == (67.0, 1.15)
    assert dtfm.scenario("datacenter").act_gb == pytest.approx(0.47125, abs=1e-4)
    assert dtfm.scenario("world", sizes="config").grad_gb == 0.9


def test_crossover_keeps_a_partition():
    """Every child group holds exactly dp devices, the child differs from parent 2 in
    at most 5 points plus the moves that rebalance them, and identical parents give
    the parent back."""
    rng = np.random.default_rng(1)
    pp, dp = 8, 8
    for _ in range(50):
        a, b = rng.permutation(64), rng.permutation(64)
        child = five_point_crossover(a, b, pp, dp, rng)
        assert np.bincount(child, minlength=pp).tolist() == [dp] * pp
        s2 = np.empty(64, dtype=int)
        s2[b] = np.arange(64) // dp
        assert (child != s2).sum() <= 10
    same = five_point_crossover(a, a, pp, dp, rng)
    s1 = np.empty(64, dtype=int)
    s1[a] = np.arange(64) // dp
    assert same.tolist() == s1.tolist()


def test_cyclic_partitioning_keeps_sizes_and_is_deterministic():
    rng = np.random.default_rng(2)
    w = dtfm.problem(dtfm.scenario("world")).pp_pair
    for _ in range(5):
        part = np.repeat(np.arange(8), 8)[rng.permutation(64)]
        out = cyclic_partitioning(w, part, 8)
        assert np.bincount(out, minlength=8).tolist() == [8] * 8
        assert out.tolist() == cyclic_partitioning(w, part, 8).tolist()


def test_gcma_prices_population_and_trials_and_keeps_the_cheapest():
    p = dtfm.problem(dtfm.scenario("regional"))
    seen = []

    def price(g):
        seen.append(total_cost(p, g).total)
        return seen[-1]

    res = gcma(p, seed=0, population=20, trails=15, price=price)
    assert res.evaluations == len(seen) == 35 and res.trails == 15 and res.complete
    assert res.cost == min(seen)
    assert total_cost(p, res.groups).total == pytest.approx(res.cost)
    assert sorted(res.groups.ravel().tolist()) == list(range(64))


def partner_problem(order: list[int]) -> Problem:
    """8 devices, pp = 2 x dp = 4; device i and i + 4 are partners (a cheap pipeline
    pair, 1 s; any other pair 2 s; uniform delays, no gradient bytes: DP is the same
    for every partition). An edge is cheap only if all four devices of a group have
    their partner in the other group. ``order`` relabels the devices."""
    beta = np.full((8, 8), 1.0)
    for i in range(4):
        beta[i, i + 4] = beta[i + 4, i] = 2.0
    perm = np.asarray(order)
    beta = beta[np.ix_(perm, perm)]
    return Problem(np.full((8, 8), 1e-3), beta, 2, 4, c_dp=0.0, c_pp=2.0)


def test_descent_crosses_a_plateau():
    """From {0,1,4,5} | {2,3,6,7} every single swap leaves the cost unchanged (at most
    two partner pairs get split, so some device still has its partner beside it);
    two swaps reach the optimum. The cost alone stops a descent here at once; the
    surrogate (devices' cheapest partners across the edge) leads it through."""
    p = partner_problem(list(range(8)))
    start = np.array([[0, 1, 4, 5], [2, 3, 6, 7]])
    st = _State(p, start, {}, _Budget(float("inf"), None))
    base = st.cost
    for i, j in itertools.product(range(4), repeat=2):
        assert st.swap(0, i, 1, j)[0] == pytest.approx(base)
        st.undo()
    _descend(st)
    best = brute_force(p).cost.total
    assert st.cost == pytest.approx(best) and best < base - 1.0


def test_search_beats_its_starts_where_a_swap_is_better():
    """Relabelled so that none of the search's starts splits every partner pair; one
    swap does, and the search reports that it improved on its best start."""
    p = partner_problem([0, 1, 2, 4, 3, 5, 6, 7])
    res, trace = plan_search_traced(p, seed=0, budget_s=60)  # ends by itself, load or not
    assert res.complete and trace.improved and trace.final_cost < trace.start_cost
    assert res.cost.total == pytest.approx(brute_force(p).cost.total)
