"""Searches over placements: baselines, an exact brute force for tiny problems, the
reference DT-FM memetic search, and farflung's own search.

All searches move devices between groups of a [pp, dp] array; the pipeline order of
the groups is always the optimal (or heuristic, pp > 12) TSP path of the cost model,
so a result's ``groups`` are listed in pipeline order. Each search is deterministic
for a given seed as long as its budget does not run out (they iterate a fixed number
of steps and stop early only when ``budget_s`` is spent)."""

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

__all__ = [
    "PlanResult",
    "brute_force",
    "clustered_groups",
    "dtfm_search",
    "plan_search",
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


class _State:
    """A placement with cached per-group DP costs and edge matrix, so that a swap of
    two devices re-prices only the two groups involved (2·pp - 3 matchings), and a
    shared cache of edge costs keyed by the two device sets."""

    def __init__(self, problem: Problem, g: np.ndarray, cache: dict) -> None:
        self.p, self.g, self.cache = problem, np.array(g, dtype=np.int64), cache
        self.dpc = dp_parts(problem, self.g)
        self.keys = [tuple(sorted(row.tolist())) for row in self.g]
        self.e = np.zeros((problem.pp, problem.pp))
        self.ea = np.zeros((problem.pp, problem.pp))
        for k in range(problem.pp):
            self._edges(k)
        self.cost = self._price()
        self.evals = 1

    def _price(self) -> float:
        return objective(self.p, self.g, self.dpc, self.e, self.ea)[0]

    def _edge(self, k: int, m: int) -> tuple[float, float]:
        """(edge cost, delay of its bottleneck pair), cached."""
        key = (
            (self.keys[k], self.keys[m])
            if self.keys[k] < self.keys[m]
            else (self.keys[m], self.keys[k])
        )
        v = self.cache.get(key)
        if v is None:
            if len(self.cache) > 500_000:
                self.cache.clear()
            v = self.cache[key] = edge_parts(self.p, self.g[k], self.g[m])
        return v

    def _edges(self, k: int) -> None:
        for m in range(self.p.pp):
            if m != k:
                (self.e[k, m], self.ea[k, m]) = (self.e[m, k], self.ea[m, k]) = self._edge(k, m)

    def swap(self, a: int, i: int, b: int, j: int) -> float:
        """Swap g[a, i] and g[b, j]; return the new cost (``undo`` reverts)."""
        self._saved = (
            a,
            i,
            b,
            j,
            self.dpc.copy(),
            self.e.copy(),
            self.ea.copy(),
            self.cost,
            self.keys[a],
            self.keys[b],
        )
        self.g[a, i], self.g[b, j] = self.g[b, j], self.g[a, i]
        self.keys[a] = tuple(sorted(self.g[a].tolist()))
        self.keys[b] = tuple(sorted(self.g[b].tolist()))
        self.dpc[[a, b]] = dp_parts(self.p, self.g[[a, b]])
        self._edges(a)
        self._edges(b)
        self.cost = self._price()
        self.evals += 1
        return self.cost

    def undo(self) -> None:
        a, i, b, j, self.dpc, self.e, self.ea, self.cost, self.keys[a], self.keys[b] = self._saved
        self.g[a, i], self.g[b, j] = self.g[b, j], self.g[a, i]


def _best_swap(st: _State, a: int, b: int, deadline: float) -> bool:
    """Kernighan–Lin/FM-style step between groups a and b: try every swap, keep the
    best if it lowers the cost. Returns whether it did."""
    best, arg = st.cost, None
    for i, j in itertools.product(range(st.p.dp), repeat=2):
        if time.perf_counter() > deadline:  # one swap of 1,000 devices can take 20 ms
            break
        c = st.swap(a, i, b, j)
        st.undo()
        if c < best - 1e-12:
            best, arg = c, (i, j)
    if arg is None:
        return False
    st.swap(a, arg[0], b, arg[1])
    return True


# ---- DT-FM ---------------------------------------------------------------------------


def _crossover(p: Problem, ga: np.ndarray, gb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half of parent A's groups, the rest from parent B's groups with A's devices
    removed (largest first), then size re-balancing: devices left over go to the
    short group whose members they reach fastest (lowest DP pair time)."""
    keep = [list(ga[k]) for k in rng.choice(p.pp, p.pp // 2, replace=False)]
    used = {d for grp in keep for d in grp}
    rest = sorted(([d for d in grp if d not in used] for grp in gb), key=len, reverse=True)
    child = keep + rest[: p.pp - len(keep)]
    placed = {d for grp in child for d in grp}
    for d in rng.permutation([d for d in range(p.n) if d not in placed]):
        short = [k for k, grp in enumerate(child) if len(grp) < p.dp]
        pull = [p.dp_pair[d, child[k]].mean() if child[k] else 0.0 for k in short]
        child[short[int(np.argmin(pull))]].append(int(d))
    return np.array(child, dtype=np.int64)


def dtfm_search(
    problem: Problem,
    seed: int = 0,
    budget_s: float = 60.0,
    population: int = 100,
    generations: int = 4900,
    kl_rounds: int = 4,
) -> PlanResult:
    """DT-FM's memetic search (reference implementation).

    A population of random partitions; each generation picks two parents by binary
    tournament, crosses them over (:func:`_crossover`, with size re-balancing),
    improves the child by ``kl_rounds`` Kernighan–Lin-style best-swap steps between
    random group pairs, and replaces the worst member if the child is better and new.
    Stops after ``generations`` or when ``budget_s`` is spent."""
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    rng, cache = np.random.default_rng(seed), {}
    pop = [
        _State(problem, rng.permutation(problem.n).reshape(problem.pp, problem.dp), cache)
        for _ in range(population)
    ]
    evals = population
    for _ in range(generations if problem.pp > 1 else 0):
        if time.perf_counter() > deadline:
            break
        pa, pb = (
            min(rng.choice(len(pop), 2, replace=False), key=lambda k: pop[k].cost) for _ in range(2)
        )
        child = _State(problem, _crossover(problem, pop[pa].g, pop[pb].g, rng), cache)
        for _ in range(kl_rounds):
            a, b = rng.choice(problem.pp, 2, replace=False)
            _best_swap(child, int(a), int(b), deadline)
        evals += child.evals
        worst = max(range(len(pop)), key=lambda k: pop[k].cost)
        if child.cost < pop[worst].cost and all(child.keys != s.keys for s in pop):
            pop[worst] = child
    best = min(pop, key=lambda s: s.cost)
    return _result(problem, best.g, t0, "dtfm", evals, time.perf_counter() < deadline)


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


def _starts(problem: Problem, rng: np.random.Generator, n_random: int) -> list[np.ndarray]:
    """Rank order, bandwidth clusters as groups (cheap DP), the clusters dealt round
    robin (one member of each cluster per group: cheap pipeline edges), random, and,
    where near-free links join devices into machines, :func:`_machine_blocks` with
    h = 2 and h = the largest machine (a pipeline edge is cheap only if every matched
    pair is, which single swaps rarely reach from elsewhere)."""
    clusters = clustered_groups(problem)
    dealt = clusters.ravel().reshape(problem.dp, problem.pp).T.copy()
    out = [np.arange(problem.n).reshape(problem.pp, problem.dp), clusters, dealt]
    out += [rng.permutation(problem.n).reshape(problem.pp, problem.dp) for _ in range(n_random)]
    machines = _machines(problem)
    if problem.pp > 1 and 1 < len(machines[0]) < problem.n:
        for h in sorted({2, min(len(machines[0]), problem.pp)}):
            out.append(_machine_blocks(problem, machines, h))
    return out


def _descend(st: _State, deadline: float) -> None:
    """Best-swap steps over all group pairs until none improves (or time is up)."""
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for a, b in itertools.combinations(range(st.p.pp), 2):
            improved |= _best_swap(st, a, b, deadline)


ANNEAL_HEATS = (0.1, 1.0)  # starting temperatures, in mean |Δcost| of a random swap


def _anneal(
    st: _State, rng: np.random.Generator, steps: int, deadline: float, heat: float
) -> np.ndarray:
    """Simulated annealing over random swaps; the temperature falls geometrically from
    ``heat`` x the mean |Δcost| of 20 probe swaps to 1/1000 of that. Returns the best
    groups seen."""
    p, deltas = st.p, []
    for _ in range(20):
        if time.perf_counter() > deadline:  # a swap of 1,000 devices takes ~20 ms
            return st.g.copy()
        a, b = rng.choice(p.pp, 2, replace=False)
        base = st.cost
        deltas.append(
            abs(st.swap(int(a), int(rng.integers(p.dp)), int(b), int(rng.integers(p.dp))) - base)
        )
        st.undo()
    t_hi = max(heat * float(np.mean(deltas)), 1e-12)
    best, best_g = st.cost, st.g.copy()
    for s in range(steps):
        if time.perf_counter() > deadline:
            break
        temp = t_hi * 1e-3 ** (s / max(steps - 1, 1))
        a, b = rng.choice(p.pp, 2, replace=False)
        base = st.cost
        c = st.swap(int(a), int(rng.integers(p.dp)), int(b), int(rng.integers(p.dp)))
        if c > base and rng.random() >= math.exp((base - c) / temp):
            st.undo()
        elif c < best:
            best, best_g = c, st.g.copy()
    return best_g


def plan_search(
    problem: Problem, seed: int = 0, budget_s: float = 10.0, steps: int = 2000, n_random: int = 2
) -> PlanResult:
    """farflung's placement search.

    1. Multi-start: rank order, bandwidth clusters, clusters dealt round robin,
       ``n_random`` random partitions and, on networks of multi-GPU machines,
       machines dealt over blocks of groups (:func:`_starts`); the cheapest is kept
       (one evaluation each).
    2. Simulated annealing from it, ``steps`` random swaps split between a cool chain
       (refines the start's structure) and a hot one (escapes it, which pays on
       unstructured networks); every swap is priced incrementally (two groups' DP
       costs, their 2·pp - 3 edges from a cache of bottleneck matchings, one
       Held–Karp path).
    3. Best-swap descent over all group pairs from the best placement seen, until no
       swap improves: the result is swap-optimal unless the budget ran out.

    The time of the pricings left after the deadline is kept back from ``budget_s``."""
    t0 = time.perf_counter()
    rng, cache = np.random.default_rng(seed), {}
    starts = [
        _State(problem, as_groups(problem, g), cache) for g in _starts(problem, rng, n_random)
    ]
    # keep back the time of what runs after the deadline (the final total_cost prices
    # every edge afresh, about two start pricings), so the search ends within budget_s
    deadline = t0 + budget_s - 2 * (time.perf_counter() - t0) / len(starts)
    best = min(starts, key=lambda st: st.cost)
    evals = len(starts)
    if problem.pp > 1:
        ends = []
        for heat in ANNEAL_HEATS:
            if time.perf_counter() > deadline and ends:
                break
            st = _State(problem, best.g, cache)
            seen = _anneal(st, rng, steps // len(ANNEAL_HEATS), deadline, heat)
            ends.append(_State(problem, seen, cache))
            evals += st.evals
        final = min(ends, key=lambda s: s.cost)
        _descend(final, deadline)
        evals += final.evals
        if final.cost < best.cost:
            best = final
    return _result(problem, best.g, t0, "plan", evals, time.perf_counter() < deadline)
