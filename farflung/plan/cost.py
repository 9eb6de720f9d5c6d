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

Compute (not in DT-FM, whose devices were homogeneous): see :func:`compute_cost`.

Two cost models (``Problem.model``):

* ``"dtfm"``: total = compute + DP + 2·PP, DT-FM's objective with a compute term: no
  overlap of communication with compute or of one boundary with another (what the
  DT-FM scenario benchmark compares under, as the paper does);
* ``"schedule"`` (farflung's, the default of ``farflung plan``): the step is played out
  by :func:`farflung.plan.timeline.step_time` — each boundary's bottleneck pair moves
  one micro-batch's bytes (c_PP / M) per message, the links of different boundaries
  and directions work at once, and the schedule (GPipe or 1F1B) decides what waits for
  what; a tied embedding's gradient is then exchanged between each replica's first
  and last stage (``c_tied``, over the pair the aligned placement gives, see
  :func:`align`); then the data-parallel sync follows (DP added), or, with ``dp_overlap``
  (CocktailSGD's one-step-stale sync in a background thread), runs during the next
  step, so only max(0, DP - pipeline) is added."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from farflung.plan.timeline import step_time

if TYPE_CHECKING:  # import only for types: farflung.comm pulls in torch
    from farflung.netlab.link import LinkMatrix

__all__ = [
    "EXACT_TSP_MAX",
    "Breakdown",
    "Problem",
    "align",
    "as_groups",
    "compute_cost",
    "dp_cost",
    "dp_parts",
    "dp_time",
    "edge_cost",
    "edge_matrix",
    "pp_cost",
    "stage_times",
    "tied_cost",
    "total_cost",
    "tsp_path",
]

EXACT_TSP_MAX = 12  # Held–Karp up to this many groups, heuristics above
SCHEDULES = ("gpipe", "1f1b")
MODELS = ("dtfm", "schedule")


@dataclass
class Problem:
    """One placement problem: the network, the layout and the sizes of what moves.

    ``alpha`` [N, N] one-way delay (s); ``beta`` [N, N] bandwidth (bytes/s, ``inf`` =
    free); the diagonal of both is ignored. ``c_dp`` bytes of one stage's gradients
    (a scalar, or one value per pipeline position: stages differ in size);
    ``c_pp`` activation bytes per batch crossing one stage boundary in one pipeline
    replica. ``speed`` is each device's relative compute speed (default 1);
    ``stage_compute_s`` the forward+backward seconds of one stage on one micro-batch
    at speed 1 (a scalar, or one value per pipeline position; default 0 = pure
    DT-FM); ``micro_batches`` M and ``schedule`` ("gpipe" | "1f1b") set the bubble.
    ``model`` is the cost model ("dtfm" | "schedule", see the module docstring) and
    ``dp_overlap`` whether the data-parallel sync hides behind the next step.
    ``c_tied``: bytes each way between a replica's first and last stage after the
    pipeline (a tied embedding's gradient; the schedule model only, DT-FM has none)."""

    alpha: np.ndarray
    beta: np.ndarray
    pp: int
    dp: int
    c_dp: float | Sequence[float]
    c_pp: float
    speed: np.ndarray | None = None
    stage_compute_s: float | Sequence[float] = 0.0
    micro_batches: int = 1
    schedule: str = "1f1b"
    model: str = "dtfm"
    dp_overlap: bool = False
    c_tied: float = 0.0
    dp_pair: np.ndarray = field(init=False, repr=False)
    dp_alpha: np.ndarray = field(init=False, repr=False)
    dp_inv: np.ndarray = field(init=False, repr=False)
    c_dp_pos: np.ndarray = field(init=False, repr=False)
    pp_pair: np.ndarray = field(init=False, repr=False)
    pp_delay: np.ndarray = field(init=False, repr=False)

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
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        self.speed = np.ones(n) if self.speed is None else np.asarray(self.speed, dtype=float)
        if self.speed.shape != (n,) or np.any(self.speed <= 0):
            raise ValueError("speed must hold one positive value per device")
        sc = np.asarray(self.stage_compute_s, dtype=float)
        if sc.ndim not in (0, 1) or (sc.ndim == 1 and sc.shape != (self.pp,)):
            raise ValueError(f"stage_compute_s must be a scalar or {self.pp} values")
        cd = np.asarray(self.c_dp, dtype=float)
        if cd.ndim not in (0, 1) or (cd.ndim == 1 and cd.shape != (self.pp,)):
            raise ValueError(f"c_dp must be a scalar or {self.pp} values")
        self.c_dp_pos = np.broadcast_to(cd, (self.pp,)).copy()
        off = ~np.eye(n, dtype=bool)
        np.fill_diagonal(self.alpha, 0.0)
        np.fill_diagonal(self.beta, np.inf)
        if np.any(self.alpha < 0) or np.any(self.beta[off] <= 0):
            raise ValueError("delays must be >= 0 and bandwidths > 0")
        with np.errstate(divide="ignore"):
            # DP pair time 2·(α + c/(dp·β)) = dp_alpha + c·dp_inv; dp_pair at the
            # largest stage's c (what the search heuristics group by)
            self.dp_alpha = np.where(off, 2.0 * self.alpha, 0.0)
            self.dp_inv = np.where(off, 2.0 / (self.dp * self.beta), 0.0)
            self.dp_pair = self.dp_alpha + self.c_dp_pos.max() * self.dp_inv
            # DT-FM moves the whole batch per boundary cost; the schedule model one
            # micro-batch per message
            c = self.c_pp if self.model == "dtfm" else self.c_pp / self.micro_batches
            one_way = self.alpha + c / self.beta
        self.pp_pair = np.where(off, 0.5 * (one_way + one_way.T), 0.0)
        self.pp_delay = np.where(off, 0.5 * (self.alpha + self.alpha.T), 0.0)

    @property
    def n(self) -> int:
        return self.alpha.shape[0]

    @classmethod
    def from_link(
        cls, link: LinkMatrix, pp: int, dp: int, c_dp: float, c_pp: float, **kw: Any
    ) -> Problem:
        """From a :class:`~farflung.netlab.link.LinkMatrix` (bits/s → bytes/s; inf stays
        inf; the diagonal is ignored)."""
        bw = np.array(link.bandwidth_bps, dtype=float) / 8.0
        return cls(np.array(link.delay_s, dtype=float), bw, pp, dp, c_dp, c_pp, **kw)


@dataclass(frozen=True)
class Breakdown:
    """The cost of one placement: ``total = compute + pp + dp`` (seconds).

    ``compute``: the pipeline's step with free links (bubble included); ``pp``: what
    the boundary transfers add to it (DT-FM: 2 x the path cost); ``dp``: the
    data-parallel seconds not hidden behind compute. ``order`` is the pipeline order
    of the groups (indices into the groups given); ``bottleneck`` the device pair
    (i, j) of the slowest link in the larger communication term."""

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


def dp_parts(problem: Problem, groups: Any) -> np.ndarray:
    """[groups, dp, 2]: for every device d, Σ_{d'≠d in its group} 2·α_dd' and
    Σ 2/(dp·β_dd'), so that its DP time for a stage of c bytes is part0 + c·part1."""
    g = np.asarray(groups, dtype=np.int64).reshape(-1, problem.dp)
    idx = (g[:, :, None], g[:, None, :])
    return np.stack([problem.dp_alpha[idx].sum(axis=2), problem.dp_inv[idx].sum(axis=2)], axis=-1)


def _device_dp_costs(problem: Problem, parts: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """[groups, dp]: each device's DP time, its group holding the stage of its
    position in ``order``."""
    c = np.empty(len(order))
    c[list(order)] = problem.c_dp_pos
    return parts[..., 0] + c[:, None] * parts[..., 1]


def dp_time(problem: Problem, parts: np.ndarray, order: Sequence[int]) -> float:
    """DT-FM's DP cost, the slowest device of the slowest group, each group syncing
    the stage it holds in ``order``."""
    return float(_device_dp_costs(problem, parts, order).max())


def dp_cost(problem: Problem, groups: Any) -> float:
    """DT-FM's DP cost, groups in pipeline order (position k syncs c_DP[k])."""
    g = as_groups(problem, groups)
    return dp_time(problem, dp_parts(problem, g), range(problem.pp))


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


def _bottleneck_pair(problem: Problem, a: np.ndarray, b: np.ndarray) -> tuple[float, int, int]:
    """(edge cost, device of ``a``, device of ``b``): the bottleneck matching of the
    pair times between two groups, and its slowest matched pair."""
    w = problem.pp_pair[np.ix_(a, b)]
    t, match = bottleneck_matching(w)
    j = max(range(len(b)), key=lambda c: w[match[c], c])
    return t, int(a[match[j]]), int(b[j])


def edge_parts(
    problem: Problem, group_a: Sequence[int], group_b: Sequence[int]
) -> tuple[float, float]:
    """(edge cost, one-way delay of its bottleneck pair) between two groups: the
    bottleneck matching of (α + c/β), c = c_PP (DT-FM) or c_PP / M (schedule)."""
    a, b = np.asarray(group_a, dtype=np.int64), np.asarray(group_b, dtype=np.int64)
    t, i, j = _bottleneck_pair(problem, a, b)
    return t, float(problem.pp_delay[i, j])


def edge_cost(problem: Problem, group_a: Sequence[int], group_b: Sequence[int]) -> float:
    """DT-FM edge cost: the bottleneck matching of (α + c_PP/β) between two groups."""
    return edge_parts(problem, group_a, group_b)[0]


def _edge_matrices(problem: Problem, groups: Any) -> tuple[np.ndarray, np.ndarray]:
    g = np.asarray(groups, dtype=np.int64)
    e, ea = np.zeros((len(g), len(g))), np.zeros((len(g), len(g)))
    for k in range(len(g)):
        for m in range(k + 1, len(g)):
            e[k, m], ea[k, m] = edge_parts(problem, g[k], g[m])
    return e + e.T, ea + ea.T


def edge_matrix(problem: Problem, groups: Any) -> np.ndarray:
    """[pp, pp] symmetric edge costs between all groups (zero diagonal)."""
    return _edge_matrices(problem, groups)[0]


def align(problem: Problem, groups: Any) -> np.ndarray:
    """``groups`` (in pipeline order) with each group's devices reordered so that
    column r is replica r all the way down: device r of group k + 1 is the one the
    bottleneck matching pairs with device r of group k. The pipeline runtime connects
    replica r of adjacent stages, so a placement must be written aligned to get the
    links the cost model priced."""
    g = np.array(groups, dtype=np.int64)
    for k in range(1, len(g)):
        w = problem.pp_pair[np.ix_(g[k - 1], g[k])]
        t, match = bottleneck_matching(w)
        if np.diag(w).max() <= t:
            continue  # already aligned: keep it (so aligning twice changes nothing)
        row = np.empty_like(g[k])
        row[match] = g[k]  # the device of column j goes to the replica of its row
        g[k] = row
    return g


def tied_cost(problem: Problem, groups: Any) -> float:
    """Seconds of the first-last exchange (``c_tied`` each way at once) of the slowest
    replica, the groups (in pipeline order) aligned into replicas by :func:`align`."""
    if problem.c_tied <= 0 or problem.pp < 2:
        return 0.0
    aligned = align(problem, groups)
    a, b = aligned[0], aligned[-1]
    with np.errstate(divide="ignore"):
        there = problem.alpha[a, b] + problem.c_tied / problem.beta[a, b]
        back = problem.alpha[b, a] + problem.c_tied / problem.beta[b, a]
    return float(np.maximum(there, back).max())


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


def stage_times(problem: Problem, groups: Any, order: Sequence[int]) -> tuple[list, list]:
    """Forward and backward seconds per micro-batch at each pipeline position: the
    position's ``stage_compute_s`` at the speed of its group's slowest device (the
    replicas synchronise, so the slowest sets the pace), one third forward and two
    thirds backward."""
    g = np.asarray(groups, dtype=np.int64)[list(order)]
    t = np.broadcast_to(np.asarray(problem.stage_compute_s, dtype=float), (problem.pp,))
    t = t / problem.speed[g].min(axis=1)
    return (t / 3).tolist(), (2 * t / 3).tolist()


def compute_cost(problem: Problem, groups: Any, order: Sequence[int]) -> float:
    """The step's compute with free links: the schedule played out
    (:func:`~farflung.plan.timeline.step_time`) with the positions' stage times. With
    equal stages t this is (M + pp - 1)·t for GPipe and 1F1B alike; with one value
    per position it rewards putting slow devices on light stages."""
    if not np.any(problem.stage_compute_s):
        return 0.0
    fwd, bwd = stage_times(problem, groups, order)
    free = [0.0] * (problem.pp - 1)
    return step_time(fwd, bwd, free, free, problem.micro_batches, problem.schedule)


# ---- total ---------------------------------------------------------------------------


def _bottleneck(
    problem: Problem, g: np.ndarray, e: np.ndarray, order: list[int], dp: float, pp: float
) -> tuple[int, int] | None:
    if problem.n == 1:
        return None
    if dp >= pp and problem.dp > 1:
        dev = _device_dp_costs(problem, dp_parts(problem, g), order)
        k, i = np.unravel_index(np.argmax(dev), dev.shape)
        row = problem.dp_pair[g[k, i], g[k]]
        return int(g[k, i]), int(g[k, int(np.argmax(row))])
    if problem.pp == 1:
        return None
    steps = [(order[s], order[s + 1]) for s in range(len(order) - 1)]
    a, b = max(steps, key=lambda st: e[st])
    return _bottleneck_pair(problem, g[a], g[b])[1:]


def objective(
    problem: Problem, g: np.ndarray, parts: np.ndarray, e: np.ndarray, ea: np.ndarray
) -> tuple[float, float, list[int]]:
    """(total, dp, order) from the groups' DP parts (:func:`dp_parts`), the edge
    matrix and its delays; the search calls it with incrementally updated ``parts``,
    ``e`` and ``ea``. The order is the cheapest path over ``e``, run in whichever
    direction is faster (stages differ in compute and size, so the direction
    matters). ``dp`` is the data-parallel seconds in the total; the compute split is
    left to :func:`total_cost`, off the search's path."""
    path, order = tsp_path(e)
    return min(_priced(problem, g, parts, e, ea, path, o) for o in (order, order[::-1]))


def _priced(
    problem: Problem,
    g: np.ndarray,
    parts: np.ndarray,
    e: np.ndarray,
    ea: np.ndarray,
    path: float,
    order: list[int],
) -> tuple[float, float, list[int]]:
    """(total, dp, order) for one pipeline order under ``problem.model``."""
    dp = dp_time(problem, parts, order)
    if problem.model == "dtfm":
        return compute_cost(problem, g, order) + dp + 2.0 * path, dp, order
    steps = range(problem.pp - 1)
    delay = [float(ea[order[k], order[k + 1]]) for k in steps]
    link = [float(e[order[k], order[k + 1]]) - delay[k] for k in steps]
    fwd, bwd = stage_times(problem, g, order)
    pipe = step_time(fwd, bwd, link, delay, problem.micro_batches, problem.schedule)
    pipe += tied_cost(problem, g[list(order)])  # after the flush
    if problem.dp_overlap:
        dp = max(0.0, dp - pipe)
    return pipe + dp, dp, order


def total_cost(problem: Problem, groups: Any) -> Breakdown:
    """The cost of the placement ``groups`` under ``problem.model`` (any group order:
    the best pipeline order is chosen and returned in ``order``)."""
    g = as_groups(problem, groups)
    parts, (e, ea) = dp_parts(problem, g), _edge_matrices(problem, g)
    total, dp, order = objective(problem, g, parts, e, ea)
    comp = compute_cost(problem, g, order)
    pp = total - comp - dp  # DT-FM: 2 x the path; schedule: what the links add
    neck = _bottleneck(problem, g, e, order, dp, pp)
    return Breakdown(total, comp, pp, dp, tuple(order), neck)
