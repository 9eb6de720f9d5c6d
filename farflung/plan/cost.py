"""DT-FM's communication cost of a placement, plus a pipeline compute term.

A placement splits the N = pp * dp devices into ``pp`` stage groups C_1..C_pp of ``dp``
devices each; the devices of one group data-parallel one pipeline stage, and the
groups are chained, in some order, into pipelines. With one-way delay α (s) and
bandwidth β (bytes/s) per ordered pair of devices (DT-FM, NeurIPS 2022, §3 of
REFERENCES.md):

* DP cost = max over groups, max over devices d of the group, of
  Σ_{d' ≠ d in group} 2·(α_dd' + c_DP / (dp·β_dd')), with c_DP the bytes of one
  stage's gradients (a ring-free "everyone talks to everyone" all-reduce estimate in
  which each device moves 1/dp of the gradient to and from every peer);
* edge cost between groups k, l = min over bijections of the devices of k onto those
  of l of the max over matched pairs of (α + c_PP/β): each replica's pipeline crosses
  the boundary through one pair, and the slowest pair gates the step (a bottleneck
  assignment problem, solved exactly here);
* PP cost = the cheapest open path visiting every group once in the coarsened group
  graph (an open-loop travelling-salesman path), which also fixes the stage order;
* objective = DP cost + 2·PP cost (activations forward, gradients backward).

Directed links: the pair cost used for pipeline edges is the mean of the two
directions, (w_ij + w_ji)/2 with w = α + c_PP/β, so 2·edge is exactly one forward plus
one backward transfer and the group graph is undirected. DP sums use d's outgoing
links α_dd', β_dd' as written in the paper.

Compute (not in DT-FM, whose devices were homogeneous): see :func:`compute_cost`. The
total is compute + DP + 2·PP, i.e. no overlap of communication with compute is
assumed (a pessimistic, placement-comparable estimate)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # import only for types: farflung.comm pulls in torch
    from farflung.comm.link import LinkMatrix

__all__ = [
    "EXACT_TSP_MAX",
    "Breakdown",
    "Problem",
    "as_groups",
    "compute_cost",
    "dp_cost",
    "edge_cost",
    "edge_matrix",
    "group_dp_costs",
    "pp_cost",
    "total_cost",
    "tsp_path",
]

EXACT_TSP_MAX = 12  # Held–Karp up to this many groups, heuristics above
SCHEDULES = ("gpipe", "1f1b")


@dataclass
class Problem:
    """One placement problem: the network, the layout and the sizes of what moves.

    ``alpha`` [N, N] one-way delay (s); ``beta`` [N, N] bandwidth (bytes/s, ``inf`` =
    free); the diagonal of both is ignored. ``c_dp`` bytes of one stage's gradients;
    ``c_pp`` activation bytes per batch crossing one stage boundary in one pipeline
    replica. ``speed`` is each device's relative compute speed (default 1);
    ``stage_compute_s`` the forward+backward seconds of one stage on one micro-batch
    at speed 1 (a scalar, or one value per pipeline position; default 0 = pure
    DT-FM); ``micro_batches`` M and ``schedule`` ("gpipe" | "1f1b") set the bubble."""

    alpha: np.ndarray
    beta: np.ndarray
    pp: int
    dp: int
    c_dp: float
    c_pp: float
    speed: np.ndarray | None = None
    stage_compute_s: float | Sequence[float] = 0.0
    micro_batches: int = 1
    schedule: str = "1f1b"
    dp_pair: np.ndarray = field(init=False, repr=False)
    pp_pair: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.alpha = np.array(self.alpha, dtype=float)
        self.beta = np.array(self.beta, dtype=float)
        n = self.alpha.shape[0]
        if self.alpha.shape != (n, n) or self.beta.shape != (n, n):
            raise ValueError(
                f"alpha and beta must be N x N, got {self.alpha.shape}, {self.beta.shape}"
            )
        if self.pp < 1 or self.dp < 1 or self.pp * self.dp != n:
            raise ValueError(f"pp * dp must equal N = {n}, got pp={self.pp}, dp={self.dp}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        self.speed = np.ones(n) if self.speed is None else np.asarray(self.speed, dtype=float)
        if self.speed.shape != (n,) or np.any(self.speed <= 0):
            raise ValueError("speed must hold one positive value per device")
        sc = np.asarray(self.stage_compute_s, dtype=float)
        if sc.ndim not in (0, 1) or (sc.ndim == 1 and sc.shape != (self.pp,)):
            raise ValueError(f"stage_compute_s must be a scalar or {self.pp} values")
        off = ~np.eye(n, dtype=bool)
        np.fill_diagonal(self.alpha, 0.0)
        np.fill_diagonal(self.beta, np.inf)
        if np.any(self.alpha < 0) or np.any(self.beta[off] <= 0):
            raise ValueError("delays must be >= 0 and bandwidths > 0")
        with np.errstate(divide="ignore"):
            self.dp_pair = np.where(
                off, 2.0 * (self.alpha + self.c_dp / (self.dp * self.beta)), 0.0
            )
            one_way = self.alpha + self.c_pp / self.beta
        self.pp_pair = np.where(off, 0.5 * (one_way + one_way.T), 0.0)

    @property
    def n(self) -> int:
        return self.alpha.shape[0]

    @classmethod
    def from_link(
        cls, link: LinkMatrix, pp: int, dp: int, c_dp: float, c_pp: float, **kw: Any
    ) -> Problem:
        """From a :class:`~farflung.comm.link.LinkMatrix` (bits/s → bytes/s; inf stays
        inf; the diagonal is ignored)."""
        bw = np.array(link.bandwidth_bps, dtype=float) / 8.0
        return cls(np.array(link.delay_s, dtype=float), bw, pp, dp, c_dp, c_pp, **kw)


@dataclass(frozen=True)
class Breakdown:
    """The cost of one placement: ``total = compute + dp + 2 * pp`` (seconds).

    ``order`` is the pipeline order of the groups (indices into the groups given);
    ``bottleneck`` the device pair (i, j) of the slowest link in the dominant
    communication term (DP if dp >= 2·pp, else the pipeline edges)."""

    total: float
    compute: float
    pp: float
    dp: float
    order: tuple[int, ...]
    bottleneck: tuple[int, int] | None


def as_groups(problem: Problem, groups: Any) -> np.ndarray:
    """``groups`` as a [pp, dp] int array, checked to be a partition of 0..N-1."""
    g = np.asarray(groups, dtype=np.int64)
    if g.shape != (problem.pp, problem.dp):
        raise ValueError(f"need {problem.pp} groups of {problem.dp} devices, got shape {g.shape}")
    if not np.array_equal(np.sort(g.ravel()), np.arange(problem.n)):
        raise ValueError("groups must partition the devices 0..N-1")
    return g


# ---- data parallel -----------------------------------------------------------------


def _device_dp_costs(problem: Problem, g: np.ndarray) -> np.ndarray:
    """[pp, dp]: Σ_{d'≠d in group} 2·(α_dd' + c_DP/(dp·β_dd')) for every device d."""
    return problem.dp_pair[g[:, :, None], g[:, None, :]].sum(axis=2)


def group_dp_costs(problem: Problem, groups: Any) -> np.ndarray:
    """[pp]: each group's DP time, the max over its devices (vectorised)."""
    g = np.asarray(groups, dtype=np.int64).reshape(-1, problem.dp)
    return _device_dp_costs(problem, g).max(axis=1)


def dp_cost(problem: Problem, groups: Any) -> float:
    """DT-FM's DP cost: the slowest device of the slowest group."""
    return float(group_dp_costs(problem, as_groups(problem, groups)).max())


# ---- pipeline edges: bottleneck assignment ------------------------------------------


def _augment(i: int, adj: list[int], match: list[int], seen: list[int]) -> bool:
    """Kuhn's augmenting path from left vertex i; adjacency rows are bit masks."""
    cand = adj[i] & ~seen[0]
    while cand:
        low = cand & -cand
        j = low.bit_length() - 1
        seen[0] |= low
        if match[j] < 0 or _augment(match[j], adj, match, seen):
            match[j] = i
            return True
        cand = adj[i] & ~seen[0]
    return False


def _adjacency(ok: np.ndarray) -> list[int]:
    """Rows of the bool matrix ``ok`` as Python-int bit masks (bit j = column j)."""
    n = ok.shape[1]
    if n <= 64:
        bits = np.left_shift(np.uint64(1), np.arange(n, dtype=np.uint64))
        return np.bitwise_or.reduce(np.where(ok, bits, np.uint64(0)), axis=1).tolist()
    packed = np.packbits(ok, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def bottleneck_matching(w: np.ndarray) -> tuple[float, list[int]]:
    """min over bijections of the max matched weight of the square matrix ``w``;
    returns (value, match) with match[j] = the row matched to column j.

    Threshold algorithm: start at the lower bound t = max(max row-min, max column-min)
    that every bijection pays, and match rows one by one with Kuhn's augmenting paths
    in the graph {w <= t} (bit-mask DFS). When row i cannot be augmented, no perfect
    matching exists at t (the current matching is maximum on the rows tried so far),
    and only an edge leaving the alternating tree of i can help, so t jumps to the
    cheapest edge from a tree row to a column outside the tree. The matching stays
    valid as t grows, so every row is augmented once; the final t is optimal."""
    n = w.shape[0]
    t = float(max(w.min(axis=1).max(), w.min(axis=0).max()))
    small = n <= 16  # plain lists beat numpy's per-call overhead on small groups
    wl = w.tolist() if small else None
    adj, match = _adjacency_at(w, wl, t), [-1] * n
    for i in range(n):
        while True:
            seen = [0]
            if _augment(i, adj, match, seen):
                break
            rows = [i] + [match[j] for j in range(n) if (seen[0] >> j) & 1]
            cols = [j for j in range(n) if not (seen[0] >> j) & 1]
            if small:
                t = min(wl[r][c] for r in rows for c in cols)
            else:
                t = float(w[np.ix_(rows, cols)].min())
            adj = _adjacency_at(w, wl, t)
    return t, match


def _adjacency_at(w: np.ndarray, wl: list[list[float]] | None, t: float) -> list[int]:
    if wl is None:
        return _adjacency(w <= t)
    return [sum(1 << j for j, x in enumerate(row) if x <= t) for row in wl]


def edge_cost(problem: Problem, group_a: Sequence[int], group_b: Sequence[int]) -> float:
    """DT-FM edge cost: the bottleneck matching of (α + c_PP/β) between two groups."""
    a, b = np.asarray(group_a, dtype=np.int64), np.asarray(group_b, dtype=np.int64)
    return bottleneck_matching(problem.pp_pair[np.ix_(a, b)])[0]


def edge_matrix(problem: Problem, groups: Any) -> np.ndarray:
    """[pp, pp] symmetric edge costs between all groups (zero diagonal)."""
    g = np.asarray(groups, dtype=np.int64)
    e = np.zeros((len(g), len(g)))
    for k in range(len(g)):
        for m in range(k + 1, len(g)):
            e[k, m] = e[m, k] = edge_cost(problem, g[k], g[m])
    return e


# ---- open-loop TSP path ----------------------------------------------------------------


@cache
def _masks_by_size(n: int) -> tuple[np.ndarray, ...]:
    masks = np.arange(1 << n, dtype=np.int64)
    pop = np.zeros(1 << n, dtype=np.int64)
    for k in range(n):
        pop += (masks >> k) & 1
    return tuple(masks[pop == s] for s in range(n + 1))


def _held_karp(d: np.ndarray) -> tuple[float, list[int]]:
    """Exact cheapest Hamiltonian path (any start, any end); O(2^n·n^2), layer-vectorised.

    f[S, j] = cheapest path visiting exactly S and ending at j; the path is rebuilt
    backwards by re-deriving each argmin, so no parent table is stored."""
    n = len(d)
    idx = np.arange(n)
    bits = np.int64(1) << idx
    f = np.full((1 << n, n), np.inf)
    f[bits, idx] = 0.0
    for masks in _masks_by_size(n)[1:n]:
        cand = (f[masks][:, :, None] + d[None]).min(axis=1)  # (m, n): extend to k
        out = (masks[:, None] & bits[None]) == 0
        rows = (masks[:, None] | bits[None])[out]
        np.minimum.at(f, (rows, np.broadcast_to(idx, out.shape)[out]), cand[out])
    full = (1 << n) - 1
    j = int(np.argmin(f[full]))
    cost, path, mask = float(f[full, j]), [j], full
    while mask != (1 << j):
        mask ^= 1 << j
        j = int(np.argmin(f[mask] + d[:, j]))
        path.append(j)
    return cost, path[::-1]


def _path_len(d: np.ndarray, path: Sequence[int]) -> float:
    return float(sum(d[path[k], path[k + 1]] for k in range(len(path) - 1)))


def _two_opt(d: np.ndarray, path: list[int]) -> list[int]:
    """2-opt for an open path: reverse path[i..j] when that shortens it (the ends may
    move, so a missing neighbour costs nothing)."""
    n, improved = len(path), True
    while improved:
        improved = False
        for i in range(n - 1):
            for j in range(i + 1, n):
                before = (d[path[i - 1], path[i]] if i else 0.0) + (
                    d[path[j], path[j + 1]] if j < n - 1 else 0.0
                )
                after = (d[path[i - 1], path[j]] if i else 0.0) + (
                    d[path[i], path[j + 1]] if j < n - 1 else 0.0
                )
                if after < before - 1e-12:
                    path[i : j + 1] = path[i : j + 1][::-1]
                    improved = True
    return path


def _nearest_neighbour(d: np.ndarray, start: int) -> list[int]:
    path, left = [start], set(range(len(d))) - {start}
    while left:
        nxt = min(left, key=lambda k: (d[path[-1], k], k))
        path.append(nxt)
        left.remove(nxt)
    return path


def tsp_path(d: np.ndarray) -> tuple[float, list[int]]:
    """Cheapest open path through all nodes of the symmetric matrix ``d``: exact
    (Held–Karp) up to :data:`EXACT_TSP_MAX` nodes, else nearest neighbour from every
    start followed by 2-opt (the best of those)."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n == 1:
        return 0.0, [0]
    if n <= EXACT_TSP_MAX:
        return _held_karp(d)
    best: tuple[float, list[int]] = (math.inf, [])
    for s in range(n):
        path = _two_opt(d, _nearest_neighbour(d, s))
        best = min(best, (_path_len(d, path), path))
    return best


def pp_cost(problem: Problem, groups: Any) -> tuple[float, list[int]]:
    """DT-FM's PP cost and the stage order: the open TSP path over the edge costs."""
    return tsp_path(edge_matrix(problem, as_groups(problem, groups)))


# ---- compute -------------------------------------------------------------------------


def compute_cost(problem: Problem, groups: Any, order: Sequence[int]) -> float:
    """Pipeline compute time of one step.

    A stage's time per micro-batch is t_k = stage_compute_s[k] / (min speed in the
    group at pipeline position k): the data-parallel replicas of a stage synchronise,
    so the slowest one sets the pace. With M micro-batches both GPipe (all forwards,
    then all backwards) and 1F1B have the same bubble of pp - 1 slots; assuming the
    slowest stage sets a steady rate, one step takes

        compute = (M + pp - 1) · max_k t_k .

    (1F1B only lowers activation memory, not time.) With a scalar stage_compute_s
    this depends on the placement only through the slowest device overall; with one
    value per position it rewards putting slow devices on light stages."""
    g = np.asarray(groups, dtype=np.int64)[list(order)]
    slowest = problem.speed[g].min(axis=1)
    t = np.broadcast_to(np.asarray(problem.stage_compute_s, dtype=float), (problem.pp,))
    return float((problem.micro_batches + problem.pp - 1) * (t / slowest).max())


# ---- total ---------------------------------------------------------------------------


def _bottleneck(
    problem: Problem, g: np.ndarray, e: np.ndarray, order: list[int], dp: float, pp: float
) -> tuple[int, int] | None:
    if problem.n == 1:
        return None
    if dp >= 2 * pp and problem.dp > 1:
        dev = _device_dp_costs(problem, g)
        k, i = np.unravel_index(np.argmax(dev), dev.shape)
        row = problem.dp_pair[g[k, i], g[k]]
        return int(g[k, i]), int(g[k, int(np.argmax(row))])
    if problem.pp == 1:
        return None
    steps = [(order[s], order[s + 1]) for s in range(len(order) - 1)]
    a, b = max(steps, key=lambda st: e[st])
    w = problem.pp_pair[np.ix_(g[a], g[b])]
    _, match = bottleneck_matching(w)
    j = max(range(problem.dp), key=lambda c: w[match[c], c])
    return int(g[a, match[j]]), int(g[b, j])


def objective(
    problem: Problem, g: np.ndarray, dpc: np.ndarray, e: np.ndarray
) -> tuple[float, float, float, list[int]]:
    """(total, compute, pp, order) from per-group DP costs and the edge matrix; the
    search uses it with incrementally updated ``dpc`` and ``e``."""
    pp, order = tsp_path(e)
    comp = compute_cost(problem, g, order)
    return comp + float(dpc.max()) + 2.0 * pp, comp, pp, order


def total_cost(problem: Problem, groups: Any) -> Breakdown:
    """compute + DP + 2·PP for the placement ``groups`` (any group order: the best
    pipeline order is chosen and returned in ``order``)."""
    g = as_groups(problem, groups)
    dpc, e = group_dp_costs(problem, g), edge_matrix(problem, g)
    total, comp, pp, order = objective(problem, g, dpc, e)
    dp = float(dpc.max())
    neck = _bottleneck(problem, g, e, order, dp, pp)
    return Breakdown(total, comp, pp, dp, tuple(order), neck)
