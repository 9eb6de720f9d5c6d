"""GCMA, DT-FM's memetic search over partitions, ported from its scheduler.

Source read: GitHub ``DS3Lab/DT-FM`` (commit 69f05e50),
``scheduler/heuristic_evolutionary_solver/scheduler.py``, function ``GCMA`` (after Kim,
Moon et al.'s genetic cyclic-partitioning memetic algorithm). The code is farflung's
own; the algorithm, its parameters and its quirks are DT-FM's:

* an individual is a device order; consecutive chunks of ``dp`` devices are the
  ``pp`` groups. The population is ``population`` random orders (DT-FM: 100), each
  priced once;
* each of ``trails`` trials (DT-FM's main loop: 4900) draws two parents uniformly
  from the first ``population`` slots (with replacement), applies
  :func:`five_point_crossover`, improves the child with one pass of
  :func:`cyclic_partitioning`, and prices it;
* replacement exactly as the code has it, ``if child > max(score1, child > score2)``:
  the child is only recorded (it enters no parent slot); otherwise it takes the slot
  of the worse parent. The result is the cheapest partition ever priced.

The cyclic partitioning's gains use only the pipeline pair cost
(``problem.pp_pair``: DT-FM's ``delay/1e3 + act·8/bw``): a device's gain toward
another group is its mean pair cost to that group, and toward its own group its
cheapest pair cost inside it. The ties are broken as DT-FM's loops break them (first
device, first group) and the sums run in device order, so the same inputs give the
same moves. DT-FM seeds nothing (``random.seed = i`` assigns instead of calling);
here one ``numpy`` generator, seeded, draws everything.

One guard DT-FM lacks: where its cycle would start with no movable device (it
indexes an empty list and raises), the pass stops there."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from farflung.plan.cost import Problem, total_cost

__all__ = ["GcmaResult", "cyclic_partitioning", "five_point_crossover", "gcma"]

CROSSOVER_POINTS = 5


@dataclass(frozen=True)
class GcmaResult:
    """The cheapest partition GCMA priced (``groups`` [pp, dp], unordered), its cost,
    how many partitions it priced, the trials it ran, and whether it ran them all."""

    groups: np.ndarray
    cost: float
    evaluations: int
    trails: int
    complete: bool


def five_point_crossover(
    parent1: np.ndarray, parent2: np.ndarray, pp: int, dp: int, rng: np.random.Generator
) -> np.ndarray:
    """DT-FM's crossover: each parent as a string device → group; five random devices
    take parent 1's group in parent 2's string; then, in device order, a device whose
    group is over ``dp`` moves to the first group under ``dp``. Returns the child's
    string (every group exactly ``dp`` devices)."""
    n = pp * dp
    s1, s2 = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    s1[parent1] = np.arange(n) // dp
    s2[parent2] = np.arange(n) // dp
    points = rng.permutation(n)[:CROSSOVER_POINTS]
    s2[points] = s1[points]
    sizes = np.bincount(s2, minlength=pp).tolist()
    for i in range(n):
        if sizes[s2[i]] > dp:
            j = next(k for k in range(pp) if sizes[k] < dp)
            sizes[j] += 1
            sizes[s2[i]] -= 1
            s2[i] = j
    return s2


def _gains(w: np.ndarray, part: np.ndarray, locked: np.ndarray, pp: int) -> np.ndarray:
    """[n, pp]: a free device's mean pair cost toward each other group (summed in
    device order, as DT-FM's loop adds) and its cheapest pair cost inside its own
    (inf when alone); zero rows for locked devices."""
    n = len(part)
    sizes = np.bincount(part, minlength=pp)
    gain = np.zeros((n, pp))
    for t in range(n):  # DT-FM adds w[v, t] / |group of t| for t = 0, 1, ...
        gain[:, part[t]] += w[:, t] / sizes[part[t]]
    same = part[:, None] == part[None, :]
    np.fill_diagonal(same, False)
    gain[np.arange(n), part] = np.where(same, w, np.inf).min(axis=1)
    gain[locked] = 0.0
    return gain


def _best_moves(
    w: np.ndarray, part: np.ndarray, locked: np.ndarray, pp: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[int | None, int | None]]]:
    """DT-FM's ``calculate_gain``: per group, the free device with the cheapest pair
    inside it, and that device's best target group. Returns (G_ij [pp, pp], G_i [pp],
    trace[p] = (device, target) or (None, None))."""
    gain = _gains(w, part, locked, pp)
    own = gain[np.arange(len(part)), part]
    g_ij = np.full((pp, pp), -np.inf)
    g_i = np.full(pp, -np.inf)
    trace: list[tuple[int | None, int | None]] = [(None, None)] * pp
    for p in range(pp):
        cand = np.flatnonzero((part == p) & ~locked & (own < np.inf))
        if len(cand) == 0:
            continue
        v = int(cand[np.argmin(own[cand])])  # first device with the smallest own gain
        for q in range(pp):
            if q != p:
                g_ij[p, q] = gain[v, q] - gain[v, p]
                if g_ij[p, q] > g_i[p]:
                    g_i[p], trace[p] = g_ij[p, q], (v, q)
    return g_ij, g_i, trace


def _one_cycle(
    w: np.ndarray, cur: np.ndarray, locked: np.ndarray, locked_groups: np.ndarray, pp: int
) -> tuple[np.ndarray, float] | None:
    """One cycle of moves from the group of largest gain, cut at the prefix of best
    cumulative gain and closed back into the start group. None where DT-FM would
    raise (no movable device to start from)."""
    cur = cur.copy()
    g_ij, g_i, trace = _best_moves(w, cur, locked, pp)
    s0 = si = int(np.argmax(g_i))
    moves: list[tuple[int, int, int]] = []
    eps: list[float] = []
    tau: list[float] = []
    for _ in range(len(cur)):
        v, pv = trace[si]
        if v is None or pv is None:
            if not moves:
                return None
            v, pv = moves[-1][0], s0
        cur[v] = pv
        locked[v] = True
        locked_groups[pv] = True
        moves.append((v, si, pv))
        eps.append(float(g_i[si]))
        tau.append(float(g_ij[si, s0]))
        si = pv
        if si == s0:
            break
        g_ij, g_i, trace = _best_moves(w, cur, locked, pp)
    best, cut = 0.0, 0
    for i in range(1, len(eps)):
        gain = sum(eps[:i]) + tau[i]
        if gain > best:
            best, cut = gain, i
    for i in range(len(moves) - 1, cut, -1):
        cur[moves[i][0]] = moves[i][1]
    cur[moves[cut][0]] = s0
    return cur, best


def cyclic_partitioning(w: np.ndarray, part: np.ndarray, pp: int) -> np.ndarray:
    """DT-FM's local search (one pass of ``move_cycles``): up to ``pp`` cycles, each
    locking the devices it moves, until every group has received a device; returns
    the string after the cycles whose running gain sum is largest (DT-FM's choice,
    which never takes the last cycle's result). Group sizes are kept."""
    n = len(part)
    locked, locked_groups = np.zeros(n, dtype=bool), np.zeros(pp, dtype=bool)
    results, sums = [np.asarray(part, dtype=np.int64).copy()], [0.0]
    for _ in range(pp):
        step = _one_cycle(w, results[-1], locked, locked_groups, pp)
        if step is None:
            break
        results.append(step[0])
        sums.append(step[1])
        if locked_groups.all():
            break
    best, pick = 0.0, 0
    for i in range(1, len(sums)):
        if sum(sums[:i]) > best:
            best, pick = sum(sums[:i]), i - 1
    return results[pick]


def _groups(order: np.ndarray, pp: int, dp: int) -> np.ndarray:
    return np.asarray(order, dtype=np.int64).reshape(pp, dp)


def gcma(
    problem: Problem,
    seed: int = 0,
    population: int = 100,
    trails: int = 4900,
    deadline: float = math.inf,
    max_evaluations: int | None = None,
    price: Callable[[np.ndarray], float] | None = None,
) -> GcmaResult:
    """Run GCMA on ``problem``; every partition is priced by ``price`` (default: the
    problem's objective, :func:`~farflung.plan.cost.total_cost`). Stops after
    ``trails`` trials, at ``deadline`` (a ``time.perf_counter()`` value) or after
    ``max_evaluations`` pricings, whichever comes first."""
    pp, dp, n = problem.pp, problem.dp, problem.n
    price = price or (lambda g: total_cost(problem, g).total)
    cap = math.inf if max_evaluations is None else max_evaluations
    rng = np.random.default_rng(seed)
    pop = [rng.permutation(n) for _ in range(population)]
    scores: list[float] = []
    best, best_g = math.inf, pop[0]
    for order in pop:
        if len(scores) >= cap or (scores and time.perf_counter() > deadline):
            break
        scores.append(price(_groups(order, pp, dp)))
        if scores[-1] < best:
            best, best_g = scores[-1], order
    done = 0
    while len(scores) == population and done < trails and pp > 1:
        if done + population >= cap or time.perf_counter() > deadline:
            break
        p1, p2 = (int(x) for x in rng.integers(population, size=2))
        child_str = five_point_crossover(pop[p1], pop[p2], pp, dp, rng)
        child_str = cyclic_partitioning(problem.pp_pair, child_str, pp)
        child = np.argsort(child_str, kind="stable")  # groups in order, devices ascending
        score = price(_groups(child, pp, dp))
        done += 1
        if score < best:
            best, best_g = score, child
        # DT-FM's condition, kept as written (a bool inside the max)
        if not score > max(scores[p1], float(score > scores[p2])):
            r = p1 if scores[p1] > scores[p2] else p2
            pop[r], scores[r] = child, score
    complete = done == trails or pp == 1
    return GcmaResult(_groups(best_g, pp, dp), best, len(scores) + done, done, complete)
