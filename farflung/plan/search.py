"""Searches over placements: baselines, an exact brute force for tiny problems,
DT-FM's own search (GCMA, ported in :mod:`farflung.plan.gcma`), and farflung's own
search.

All searches move devices between groups of a [pp, dp] array; the pipeline order of
the groups is always the optimal (or heuristic, pp > 12) TSP path of the cost model,
so a result's ``groups`` are listed in pipeline order. Each search is deterministic
for a given seed as long as its time budget does not run out: they iterate a fixed
number of steps and stop early when ``budget_s`` is spent or, where given, after
``max_evaluations`` pricings (a budget that does not depend on the machine's load)."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from farflung.plan.cost import (
    Breakdown,
    Problem,
    align,
    as_groups,
    dp_parts,
    edge_parts,
    objective,
    total_cost,
)
from farflung.plan.gcma import gcma

__all__ = [
    "PlanResult",
    "SearchTrace",
    "brute_force",
    "clustered_groups",
    "dtfm_search",
    "plan_search",
    "plan_search_traced",
    "random_placement",
    "rank_order",
]


@dataclass(frozen=True)
class PlanResult:
    """A placement: ``groups[k]`` holds the devices of pipeline stage k (data-parallel
    replicas in replica order), its cost (``cost.order`` is then 0..pp-1), the seconds
    the search took, how many placements it priced, and whether it ran to its end
    (False: the time budget cut it short)."""

    groups: list[list[int]]
    cost: Breakdown
    seconds: float
    method: str
    evaluations: int = 1
    complete: bool = True


def _result(
    problem: Problem, g: np.ndarray, t0: float, method: str, evals: int, complete: bool = True
) -> PlanResult:
    """The placement in pipeline order, aligned into replicas (:func:`align`)."""
    b = total_cost(problem, g)
    ordered = align(problem, np.asarray(g)[list(b.order)])
    b = replace(b, order=tuple(range(problem.pp)))
    groups = [[int(d) for d in row] for row in ordered]
    return PlanResult(groups, b, time.perf_counter() - t0, method, evals, complete)


# ---- baselines -----------------------------------------------------------------------


def rank_order(problem: Problem) -> PlanResult:
    """What a Megatron-style launch does: group k = devices k·dp .. k·dp + dp - 1 (the
    group order is still the cost model's best path, a generous baseline)."""
    t0 = time.perf_counter()
    return _result(problem, np.arange(problem.n).reshape(problem.pp, problem.dp), t0, "rank", 1)


def random_placement(problem: Problem, rng: np.random.Generator) -> PlanResult:
    """A uniformly random partition into groups."""
    t0 = time.perf_counter()
    g = rng.permutation(problem.n).reshape(problem.pp, problem.dp)
    return _result(problem, g, t0, "random", 1)


def _partitions(items: tuple[int, ...], size: int) -> Iterator[list[tuple[int, ...]]]:
    """Every partition of ``items`` into unlabelled blocks of ``size`` (the first item
    always opens the next block, so no partition is produced twice)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        left = tuple(x for x in rest if x not in others)
        for tail in _partitions(left, size):
            yield [(first, *others), *tail]


def brute_force(problem: Problem) -> PlanResult:
    """The exact optimum by pricing every partition (N <= 8: at most 105 of them;
    the order of each is exact via Held–Karp)."""
    if problem.n > 8:
        raise ValueError(f"brute force is for N <= 8 devices, got {problem.n}")
    t0 = time.perf_counter()
    best, best_g, evals = math.inf, None, 0
    for part in _partitions(tuple(range(problem.n)), problem.dp):
        evals += 1
        c = total_cost(problem, part).total
        if c < best:
            best, best_g = c, np.array(part)
    return _result(problem, best_g, t0, "brute", evals)


# ---- incremental state ---------------------------------------------------------------


class _Budget:
    """What a search may still spend: a wall-clock deadline and a number of pricings
    (every placement priced, incrementally or not, counts one)."""

    def __init__(self, deadline: float, max_evaluations: int | None) -> None:
        self.deadline, self.cap, self.used = deadline, max_evaluations or math.inf, 0

    def out(self) -> bool:
        return self.used >= self.cap or time.perf_counter() > self.deadline


class _State:
    """A placement with cached per-group DP costs and edge matrices, so that a swap of
    two devices re-prices only the two groups involved (2·pp - 3 matchings), and a
    shared cache of edge costs keyed by the two device sets.

    Besides its cost it keeps ``soft``, a surrogate that moves where the cost is flat:
    the cost is a max of maxima (slowest device, bottleneck pair, bottleneck edge),
    so most swaps leave it unchanged and a descent on it alone stops at once. ``soft``
    is the mean device DP time plus 2 x the path's edges priced by each device's
    cheapest partner (mean of row and column minima), which falls as groups gather
    devices that reach each other fast, before the maxima do."""

    def __init__(self, problem: Problem, g: np.ndarray, cache: dict, budget: _Budget) -> None:
        self.p, self.cache, self.budget = problem, cache, budget
        self.g = np.array(g, dtype=np.int64)
        self.dpc = dp_parts(problem, self.g)
        self.keys = [tuple(sorted(row.tolist())) for row in self.g]
        self.e = np.zeros((problem.pp, problem.pp))
        self.ea = np.zeros((problem.pp, problem.pp))
        self.es = np.zeros((problem.pp, problem.pp))
        for k in range(problem.pp):
            self._edges(k)
        self.cost, self.soft = self._price()
        budget.used += 1

    def _price(self) -> tuple[float, float]:
        total, _, order = objective(self.p, self.g, self.dpc, self.e, self.ea)
        dev = self.dpc[..., 0] + self.p.c_dp_pos.max() * self.dpc[..., 1]
        path = sum(self.es[order[k], order[k + 1]] for k in range(len(order) - 1))
        return total, float(dev.mean()) + 2.0 * float(path)

    def key(self) -> tuple[float, float]:
        return self.cost, self.soft

    def _edge(self, k: int, m: int) -> tuple[float, float, float]:
        """(edge cost, delay of its bottleneck pair, soft edge), cached."""
        key = (
            (self.keys[k], self.keys[m])
            if self.keys[k] < self.keys[m]
            else (self.keys[m], self.keys[k])
        )
        v = self.cache.get(key)
        if v is None:
            if len(self.cache) > 500_000:
                self.cache.clear()
            w = self.p.pp_pair[np.ix_(self.g[k], self.g[m])]
            soft = 0.5 * (float(w.min(axis=1).mean()) + float(w.min(axis=0).mean()))
            v = self.cache[key] = (*edge_parts(self.p, self.g[k], self.g[m]), soft)
        return v

    def _edges(self, k: int) -> None:
        for m in range(self.p.pp):
            if m != k:
                v = self._edge(k, m)
                self.e[k, m], self.ea[k, m], self.es[k, m] = v
                self.e[m, k], self.ea[m, k], self.es[m, k] = v

    def swap(self, a: int, i: int, b: int, j: int) -> tuple[float, float]:
        """Swap g[a, i] and g[b, j]; return the new (cost, soft) (``undo`` reverts)."""
        self._saved = (
            a,
            i,
            b,
            j,
            self.dpc.copy(),
            self.e.copy(),
            self.ea.copy(),
            self.es.copy(),
            self.cost,
            self.soft,
            self.keys[a],
            self.keys[b],
        )
        self.g[a, i], self.g[b, j] = self.g[b, j], self.g[a, i]
        self.keys[a] = tuple(sorted(self.g[a].tolist()))
        self.keys[b] = tuple(sorted(self.g[b].tolist()))
        self.dpc[[a, b]] = dp_parts(self.p, self.g[[a, b]])
        self._edges(a)
        self._edges(b)
        self.cost, self.soft = self._price()
        self.budget.used += 1
        return self.cost, self.soft

    def undo(self) -> None:
        (a, i, b, j, self.dpc, self.e, self.ea, self.es, self.cost, self.soft) = self._saved[:10]
        self.keys[a], self.keys[b] = self._saved[10:]
        self.g[a, i], self.g[b, j] = self.g[b, j], self.g[a, i]


def _better(new: tuple[float, float], old: tuple[float, float]) -> bool:
    """Lexicographic: a lower cost, or the same cost (to 1e-9) and a lower surrogate."""
    tol = 1e-9 * max(abs(old[0]), 1e-30)
    return new[0] < old[0] - tol or (new[0] <= old[0] + tol and new[1] < old[1] - tol * 0.1)


def _best_swap(st: _State, a: int, b: int) -> bool:
    """Kernighan–Lin/FM-style step between groups a and b: try every swap, keep the
    best (lexicographic cost, surrogate) if it improves. Returns whether it did."""
    best, arg = st.key(), None
    for i, j in itertools.product(range(st.p.dp), repeat=2):
        if st.budget.out():  # one swap of 1,000 devices can take 20 ms
            break
        c = st.swap(a, i, b, j)
        st.undo()
        if _better(c, best):
            best, arg = c, (i, j)
    if arg is None:
        return False
    st.swap(a, arg[0], b, arg[1])
    return True


# ---- DT-FM ---------------------------------------------------------------------------


def dtfm_search(
    problem: Problem,
    seed: int = 0,
    budget_s: float = 60.0,
    population: int = 100,
    trails: int = 4900,
    max_evaluations: int | None = None,
) -> PlanResult:
    """DT-FM's own search, GCMA (:func:`farflung.plan.gcma.gcma`, a port of DT-FM's
    scheduler: population 100, five-point crossover, one cyclic-partitioning pass,
    4900 trials in its main loop), priced by the problem's cost model. Stops after
    ``trails`` trials, ``budget_s`` seconds or ``max_evaluations`` pricings."""
    t0 = time.perf_counter()
    res = gcma(
        problem,
        seed=seed,
        population=population,
        trails=trails,
        deadline=t0 + budget_s,
        max_evaluations=max_evaluations,
    )
    return _result(problem, res.groups, t0, "dtfm", res.evaluations, res.complete)


# ---- farflung's search ---------------------------------------------------------------


def clustered_groups(problem: Problem) -> np.ndarray:
    """Greedy bandwidth clustering: the first free device seeds a group, which takes
    the dp - 1 free devices with the lowest symmetric DP pair time to the seed."""
    sym = problem.dp_pair + problem.dp_pair.T
    free, groups = list(range(problem.n)), []
    while free:
        seed = free.pop(0)
        near = sorted(free, key=lambda d: (sym[seed, d], d))[: problem.dp - 1]
        groups.append([seed, *near])
        free = [d for d in free if d not in near]
    return np.array(groups, dtype=np.int64)


NEAR_FREE = 0.1  # a link this fraction of the median pair cost or less joins a machine


def _machines(problem: Problem) -> list[np.ndarray]:
    """Devices joined by near-free pipeline links (pair cost <= :data:`NEAR_FREE` x the
    median pair cost), as connected components: the multi-GPU machines of a network,
    largest first."""
    n = problem.n
    off = problem.pp_pair[~np.eye(n, dtype=bool)]
    near = problem.pp_pair <= NEAR_FREE * float(np.median(off)) if n > 1 else np.eye(n) > 0
    label = np.arange(n)
    while True:
        new = np.where(near, label[None, :], n).min(axis=1)
        new = np.minimum(new, label)[new]  # jump to the neighbour's label too
        if np.array_equal(new, label):
            break
        label = new
    parts = [np.flatnonzero(label == c) for c in np.unique(label)]
    return sorted(parts, key=len, reverse=True)


def _machine_blocks(problem: Problem, machines: list[np.ndarray], h: int) -> np.ndarray:
    """Machines dealt over blocks of h consecutive groups (largest machine first, one
    device per group in turn, then the next block): a machine's devices land in
    neighbouring groups, so whole groups of such devices can be matched pair by pair
    over near-free links (h = 2: pairs of groups; h = machine size: a chain)."""
    order, pos = np.concatenate(machines), 0
    g = np.empty((problem.pp, problem.dp), dtype=np.int64)
    for b in range(0, problem.pp, h):
        hh = min(h, problem.pp - b)
        g[b : b + hh] = order[pos : pos + hh * problem.dp].reshape(problem.dp, hh).T
        pos += hh * problem.dp
    return g


def _starts(
    problem: Problem, rng: np.random.Generator, n_random: int
) -> list[tuple[str, np.ndarray]]:
    """(kind, groups): rank order, bandwidth clusters as groups (cheap DP), the
    clusters dealt round robin (one member of each cluster per group: cheap pipeline
    edges), random, and, where near-free links join devices into machines,
    :func:`_machine_blocks` with h = 2 and h = the largest machine (a pipeline edge is
    cheap only if every matched pair is, which single swaps rarely reach from
    elsewhere)."""
    clusters = clustered_groups(problem)
    dealt = clusters.ravel().reshape(problem.dp, problem.pp).T.copy()
    out = [
        ("rank order", np.arange(problem.n).reshape(problem.pp, problem.dp)),
        ("clusters", clusters),
        ("clusters dealt", dealt),
    ]
    out += [
        ("random", rng.permutation(problem.n).reshape(problem.pp, problem.dp))
        for _ in range(n_random)
    ]
    machines = _machines(problem)
    if problem.pp > 1 and 1 < len(machines[0]) < problem.n:
        for h in sorted({2, min(len(machines[0]), problem.pp)}):
            out.append((f"machine blocks h={h}", _machine_blocks(problem, machines, h)))
    return out


def _descend(st: _State, rng: np.random.Generator | None = None) -> None:
    """Swap descent on the (cost, surrogate) pair until no swap between any two groups
    improves it (or the budget is spent): sideways moves on a flat cost are taken when
    they lower the surrogate. Without ``rng``: best swap per group pair, pairs in
    order. With it: first improvement, pairs and swaps in random order, which spends
    far fewer pricings per step on 64 devices; both end swap-optimal."""
    improved = True
    while improved and not st.budget.out():
        improved = False
        pairs = list(itertools.combinations(range(st.p.pp), 2))
        if rng is None:
            for a, b in pairs:
                improved |= _best_swap(st, a, b)
            continue
        swaps = list(itertools.product(range(st.p.dp), repeat=2))
        for k in rng.permutation(len(pairs)):
            a, b = pairs[k]
            for m in rng.permutation(len(swaps)):
                if st.budget.out():
                    return
                old, (i, j) = st.key(), swaps[m]
                if _better(st.swap(a, i, b, j), old):
                    improved = True
                    break
                st.undo()


DESCENT = "first"  # "first": random first-improvement; "best": best swap per group pair

# the annealing chains: (starting temperature in mean |Δenergy| of a random swap,
# weight of the plateau surrogate in the energy)
ANNEAL_CHAINS = ((0.1, 0.0), (0.1, 0.1), (1.0, 0.0))


def _anneal(
    st: _State, rng: np.random.Generator, steps: int, heat: float, soft: float
) -> np.ndarray:
    """Simulated annealing over random swaps on the energy cost + ``soft`` x surrogate
    (the cost alone is flat under most swaps, so a walk on it is blind there); the
    temperature falls geometrically from ``heat`` x the mean |Δenergy| of 20 probe
    swaps to 1/1000 of that. Returns the groups of the lowest (cost, surrogate)
    seen."""

    def _energy(key: tuple[float, float]) -> float:
        return key[0] + soft * key[1]

    p, deltas = st.p, []
    for _ in range(20):
        if st.budget.out():
            return st.g.copy()
        a, b = rng.choice(p.pp, 2, replace=False)
        base = _energy(st.key())
        new = st.swap(int(a), int(rng.integers(p.dp)), int(b), int(rng.integers(p.dp)))
        deltas.append(abs(_energy(new) - base))
        st.undo()
    t_hi = max(heat * float(np.mean(deltas)), 1e-12)
    best, best_g = st.key(), st.g.copy()
    for s in range(steps):
        if st.budget.out():
            break
        temp = t_hi * 1e-3 ** (s / max(steps - 1, 1))
        a, b = rng.choice(p.pp, 2, replace=False)
        base = _energy(st.key())
        new = st.swap(int(a), int(rng.integers(p.dp)), int(b), int(rng.integers(p.dp)))
        up = _energy(new) - base
        if up > 0 and rng.random() >= math.exp(-up / temp):
            st.undo()
        elif _better(new, best):
            best, best_g = new, st.g.copy()
    return best_g


@dataclass(frozen=True)
class SearchTrace:
    """How :func:`plan_search` got its result: the cheapest start's cost and which
    start it was, the cost after the search, and whether the search beat the start."""

    start_cost: float
    start_kind: str
    final_cost: float

    @property
    def improved(self) -> bool:
        return self.final_cost < self.start_cost * (1 - 1e-9)


def plan_search(
    problem: Problem,
    seed: int = 0,
    budget_s: float = 10.0,
    steps: int = 2000,
    n_random: int = 2,
    max_evaluations: int | None = None,
) -> PlanResult:
    """farflung's placement search (:func:`plan_search_traced` without the trace)."""
    return plan_search_traced(problem, seed, budget_s, steps, n_random, max_evaluations)[0]


def plan_search_traced(
    problem: Problem,
    seed: int = 0,
    budget_s: float = 10.0,
    steps: int = 2000,
    n_random: int = 2,
    max_evaluations: int | None = None,
) -> tuple[PlanResult, SearchTrace]:
    """farflung's placement search, and how much the search added to its starts.

    1. Multi-start: rank order, bandwidth clusters, clusters dealt round robin,
       ``n_random`` random partitions and, on networks of multi-GPU machines,
       machines dealt over blocks of groups (:func:`_starts`); the cheapest is kept
       (one evaluation each).
    2. Simulated annealing from it, ``steps`` random swaps split between the chains
       of :data:`ANNEAL_CHAINS`: one on the cost alone, one on the cost plus 0.1 x a
       plateau surrogate (:class:`_State`), so that it keeps moving where the cost
       is flat. Every swap is priced incrementally (two groups' DP costs, their
       2·pp - 3 edges from a cache of bottleneck matchings, one Held–Karp path).
    3. A first-improvement swap descent (random order) from the best placement the
       chains saw, on (cost, surrogate) lexicographically, until no swap improves:
       the result is swap-optimal unless the budget ran out.

    Stops at ``budget_s`` seconds or ``max_evaluations`` pricings; the time of the
    pricings left after the deadline is kept back from ``budget_s``."""
    t0 = time.perf_counter()
    rng, cache = np.random.default_rng(seed), {}
    budget = _Budget(math.inf, max_evaluations)
    kinds, layouts = zip(*_starts(problem, rng, n_random), strict=True)
    starts = [_State(problem, as_groups(problem, g), cache, budget) for g in layouts]
    # keep back the time of what runs after the deadline (the final total_cost prices
    # every edge afresh, about two start pricings), so the search ends within budget_s
    budget.deadline = t0 + budget_s - 2 * (time.perf_counter() - t0) / len(starts)
    first = min(range(len(starts)), key=lambda k: starts[k].key())
    best = starts[first]
    if problem.pp > 1:
        # a portfolio of chains that differ in heat and in how much the surrogate
        # steers them (which one wins depends on the network); then a descent from
        # the best end
        ends = []
        for heat, soft in ANNEAL_CHAINS:
            if budget.out() and ends:
                break
            st = _State(problem, best.g, cache, budget)
            seen = _anneal(st, rng, steps // len(ANNEAL_CHAINS), heat, soft)
            ends.append(_State(problem, seen, cache, budget))
        final = min(ends, key=lambda s: s.key())
        _descend(final, rng if DESCENT == "first" else None)
        if _better(final.key(), best.key()):
            best = final
    res = _result(problem, best.g, t0, "plan", budget.used, not budget.out())
    return res, SearchTrace(starts[first].cost, kinds[first], res.cost.total)
