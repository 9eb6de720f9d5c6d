"""DT-FM's scheduler inputs and cost function, ported (REFERENCES.md §3).

Source read: GitHub ``DS3Lab/DT-FM`` (commit 69f05e50),
``scheduler/heuristic_evolutionary_solver/config.py`` (the five simulated networks the
scheduler imports, and its traffic sizes) and ``.../scheduler.py`` (the cost function
and GCMA, whose port is :mod:`farflung.plan.gcma`), and the earlier GPT-3 XL version
of that scheduler.py which derives the traffic sizes from the model (kept in the
history of forks such as ``gensyn-ai/DT-FM``). The code here is farflung's own;
the figures are DT-FM's, in DT-FM's units:

* delay in ms, used as given: the per-message latency of a transfer is ``delay / 1e3``
  s (no halving: these are the scheduler's inputs, not farflung's one-way netlab
  figures of :mod:`farflung.netlab.scenarios`);
* bandwidth in Gbit/s; activation and gradient sizes in GB (x 8 = Gbit);
* layout: GPT3-XL, 24 layers in 8 stages of 3 (``way`` = pp = 8) and a batch split in
  8 data-parallel parts (``partition_size`` = dp = 8), 64 devices.

The five scenarios as ``config.py`` builds them (``simulate_0`` .. ``simulate_4``):

* datacenter: 8 machines x 8 devices; 3.125 Gbps between any two, + 96.875 inside a
  machine; 0 ms;
* spot: 8 machines x 4 (devices 0-31) and 32 single devices; 1.25 Gbps, + 98.75
  inside a machine; 0 ms;
* multi-university: 0-31 Ohio, 32-63 Virginia; 5 Gbps / 1 ms inside, 1.12 Gbps /
  11 ms across;
* regional: 16 each in Virginia, Oregon, California, Ohio; 2 Gbps / 5 ms inside,
  per-pair figures across (:data:`REGIONAL_PAIRS`);
* world: 8 each in Oregon, Virginia, Ohio, Tokyo, Seoul, London, Frankfurt, Ireland;
  2 Gbps / 5 ms inside, per-pair figures across (:data:`WORLD_PAIRS`).

Traffic sizes, two versions of the scheduler (``sizes=``):

* ``"model"`` (default): the GPT-3 XL block of the scheduler version that derives
  them from the model, the same for every scenario: activations
  2024·2048·2 bytes·(1.25e5/2048 sequences) / 2^30 = 0.4712 GB per boundary, gradients
  1.3e9·4 bytes·3/24 layers = 0.65 GB per stage. DT-FM's own code with these sizes
  finds 3.44 / 49.50 / 16.09 / 34.80 / 49.22 s with GCMA at 300 trials (issue 22):
  :data:`REFERENCE_GCMA_300`;
* ``"config"``: the per-scenario overrides of ``config.py`` at DS3Lab/DT-FM's head:
  288/1024 and 1 GB (datacenter, spot, multi-university), 0.4 and 0.7 (regional),
  0.5 and 0.9 (world).

DT-FM's cost of a partition into ``way`` groups of ``partition_size`` devices
(:func:`dtfm_cost`): DP = max over groups and their devices d of
Σ_{d'≠d} 2·(delay/1e3 + grad·8 / (bw·partition_size)); an edge between two groups is the
bottleneck matching of delay/1e3 + act·8/bw; PP = the cheapest open path over the
groups (exact, from every start); total = DP + 2·PP. :func:`problem` builds the same
problem as a :class:`~farflung.plan.cost.Problem` (model ``"dtfm"``, no compute term),
whose objective is the same function in SI units (tested against :func:`dtfm_cost`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from farflung.plan.cost import Problem

__all__ = [
    "LAYOUT",
    "SCENARIOS",
    "DtfmScenario",
    "REFERENCE_GCMA_300",
    "dtfm_cost",
    "problem",
    "scenario",
]

SCENARIOS = ("datacenter", "spot", "multi-university", "regional", "world")
LAYOUT = (8, 8)  # (way = pp, partition_size = dp): 24 layers / 3, batch / 8 parts
NODES = 64
MODEL_ACT_GB = 2024 * 2048 * 2 * (1.25e5 / 2048) / 2**30  # 0.4712
MODEL_GRAD_GB = 1.3 * 4 * 3 / 24  # 0.65
CONFIG_SIZES = {  # (act GB, grad GB) as config.py sets them per scenario
    "datacenter": (288 / 1024, 1.0),
    "spot": (288 / 1024, 1.0),
    "multi-university": (288 / 1024, 1.0),
    "regional": (0.4, 0.7),
    "world": (0.5, 0.9),
}
# DT-FM's own scheduler, run unchanged on these inputs ("model" sizes), GCMA with
# population 100 and 300 trials: the cheapest cost it found (seconds), issue 22
REFERENCE_GCMA_300 = {
    "datacenter": 3.44,
    "spot": 49.50,
    "multi-university": 16.09,
    "regional": 34.80,
    "world": 49.22,
}

# regional: (ms, Gbps) between two of the four US regions, as config.py sets them
REGIONAL_PAIRS = {
    ("Virginia", "Oregon"): (67.0, 1.15),
    ("Virginia", "California"): (59.0, 1.05),
    ("Virginia", "Ohio"): (11.0, 1.12),
    ("Oregon", "California"): (12.0, 1.25),
    ("Oregon", "Ohio"): (49.0, 1.10),
    ("California", "Ohio"): (52.0, 1.02),
}
REGIONAL_CITIES = ("Virginia", "Oregon", "California", "Ohio")
# world: (ms, Gbps) from config.py's delay_bandwidth_dict, the pairs of the 8 cities used
WORLD_CITIES = ("Oregon", "Virginia", "Ohio", "Tokyo", "Seoul", "London", "Frankfurt", "Ireland")
WORLD_PAIRS = {
    ("Oregon", "Virginia"): (67.0, 0.79),
    ("Oregon", "Ohio"): (49.0, 1.10),
    ("Oregon", "Tokyo"): (96.0, 0.523),
    ("Oregon", "Seoul"): (124.0, 0.46),
    ("Oregon", "London"): (136.0, 0.42),
    ("Oregon", "Frankfurt"): (143.0, 0.404),
    ("Oregon", "Ireland"): (124.0, 0.482),
    ("Virginia", "Ohio"): (11.0, 1.12),
    ("Virginia", "Tokyo"): (143.0, 0.524),
    ("Virginia", "Seoul"): (172.0, 0.500),
    ("Virginia", "London"): (76.0, 1.16),
    ("Virginia", "Frankfurt"): (90.0, 1.02),
    ("Virginia", "Ireland"): (67.0, 1.05),
    ("Ohio", "Tokyo"): (130.0, 0.694),
    ("Ohio", "Seoul"): (159.0, 0.529),
    ("Ohio", "London"): (86.0, 1.05),
    ("Ohio", "Frankfurt"): (99.0, 0.799),
    ("Ohio", "Ireland"): (77.0, 1.14),
    ("Tokyo", "Seoul"): (34.0, 1.10),
    ("Tokyo", "London"): (210.0, 0.366),
    ("Tokyo", "Frankfurt"): (223.0, 0.36),
    ("Tokyo", "Ireland"): (199.0, 0.465),
    ("Seoul", "London"): (238.0, 0.342),
    ("Seoul", "Frankfurt"): (235.0, 0.358),
    ("Seoul", "Ireland"): (228.0, 0.335),
    ("London", "Frankfurt"): (14.0, 1.14),
    ("London", "Ireland"): (12.0, 1.09),
    ("Frankfurt", "Ireland"): (24.0, 1.08),
}
REGION_WITHIN = (5.0, 2.0)  # (ms, Gbps) inside a region, regional and world


@dataclass(frozen=True)
class DtfmScenario:
    """One DT-FM network: ``delay_ms`` and ``bw_gbps`` [n, n] (symmetric; the diagonal
    holds what config.py leaves there and is never used), the bytes that move
    (``act_gb`` per boundary, ``grad_gb`` per stage sync, in GB) and each device's
    machine or region."""

    name: str
    delay_ms: np.ndarray
    bw_gbps: np.ndarray
    act_gb: float
    grad_gb: float
    regions: tuple[str, ...]


def _machines(n: int, per: int, count: int, inside_gbps: float, base_gbps: float):
    """0 ms everywhere; ``base_gbps`` between any two devices, plus ``inside_gbps`` in
    the first ``count`` machines of ``per`` devices (config.py's block_diag sum)."""
    bw = np.full((n, n), base_gbps)
    for m in range(count):
        bw[m * per : (m + 1) * per, m * per : (m + 1) * per] += inside_gbps
    return np.zeros((n, n)), bw


def _regions(cities: Sequence[str], per: int, pairs: dict) -> tuple[np.ndarray, np.ndarray, list]:
    regions = [c for c in cities for _ in range(per)]
    n = len(regions)
    delay, bw = np.full((n, n), REGION_WITHIN[0]), np.full((n, n), REGION_WITHIN[1])
    for i, j in itertools.product(range(n), repeat=2):
        a, b = regions[i], regions[j]
        if a != b:
            delay[i, j], bw[i, j] = pairs.get((a, b)) or pairs[(b, a)]
    return delay, bw, regions


def scenario(name: str, sizes: str = "model", nodes: int = NODES) -> DtfmScenario:
    """One of :data:`SCENARIOS` exactly as DT-FM's ``config.py`` builds it, with the
    traffic sizes ``sizes`` ("model" or "config", see the module docstring). Other
    ``nodes`` keep its formulas and are not DT-FM's."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown DT-FM scenario {name!r} (known: {', '.join(SCENARIOS)})")
    if sizes not in ("model", "config"):
        raise ValueError(f"sizes must be 'model' or 'config', got {sizes!r}")
    act, grad = (MODEL_ACT_GB, MODEL_GRAD_GB) if sizes == "model" else CONFIG_SIZES[name]
    delay, bw, regions = _network(name, nodes)
    return DtfmScenario(name, delay, bw, act, grad, tuple(regions))


def _network(name: str, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(delay ms, bandwidth Gbps, region per device) of one scenario."""
    if name == "datacenter":
        per = min(n // 2, 8)
        delay, bw = _machines(n, per, n // per, 96.875, 3.125)
        return delay, bw, [f"instance_{i // 8}" for i in range(n)]
    if name == "spot":
        delay, bw = _machines(n, 4, 8, 98.75, 1.25)
        return delay, bw, [f"spot_{i // 4}" if i // 4 < 8 else "standalone" for i in range(n)]
    if name == "multi-university":
        side = np.arange(n) < n // 2
        same = side[:, None] == side[None, :]
        regions = ["Ohio" if s else "Virginia" for s in side]
        return np.where(same, 1.0, 11.0), np.where(same, 5.0, 1.12), regions
    if name == "regional":
        return _regions(REGIONAL_CITIES, n // 4, REGIONAL_PAIRS)
    return _regions(WORLD_CITIES, n // 8, WORLD_PAIRS)


def problem(sc: DtfmScenario, pp: int = LAYOUT[0], dp: int = LAYOUT[1]) -> Problem:
    """The scenario as a farflung :class:`Problem` under DT-FM's objective: α = ms /
    1e3, β = Gbps·1e9/8 bytes/s, c_DP = grad GB·1e9, c_PP = act GB·1e9, no compute."""
    return Problem(
        sc.delay_ms / 1e3,
        sc.bw_gbps * 1e9 / 8,
        pp,
        dp,
        c_dp=sc.grad_gb * 1e9,
        c_pp=sc.act_gb * 1e9,
        model="dtfm",
    )


# ---- DT-FM's cost function, in its units and its structure --------------------------


def _dp_cost(sc: DtfmScenario, groups: Sequence[Sequence[int]]) -> float:
    worst = -math.inf
    for grp in groups:
        size = len(grp)
        for d in grp:
            t = sum(
                2 * (sc.delay_ms[d, e] / 1e3 + sc.grad_gb * 8 / (sc.bw_gbps[d, e] * size))
                for e in grp
                if e != d
            )
            worst = max(worst, t)
    return worst


def _perfect(ok: list[list[bool]]) -> bool:
    """Whether the bipartite graph ``ok`` (rows x columns) has a perfect matching."""
    n, match = len(ok), [-1] * len(ok)

    def grow(i: int, seen: set[int]) -> bool:
        for j in range(n):
            if ok[i][j] and j not in seen:
                seen.add(j)
                if match[j] < 0 or grow(match[j], seen):
                    match[j] = i
                    return True
        return False

    return all(grow(i, set()) for i in range(n))


def _edge(sc: DtfmScenario, a: Sequence[int], b: Sequence[int]) -> float:
    """The smallest weight t such that the pairs of weight <= t hold a perfect
    matching (what DT-FM finds by deleting the heaviest pairs one by one)."""
    w = [[sc.delay_ms[i, j] / 1e3 + sc.act_gb * 8 / sc.bw_gbps[i, j] for j in b] for i in a]
    for t in sorted({x for row in w for x in row}):
        if _perfect([[x <= t for x in row] for row in w]):
            return t
    raise AssertionError("a complete bipartite graph always has a perfect matching")


def _open_path(cost: list[list[float]]) -> float:
    """The cheapest path visiting every node once, any start (DT-FM solves the open
    TSP from every start node and keeps the cheapest)."""
    n = len(cost)
    best = math.inf
    for start in range(n):
        f = {(1 << start, start): 0.0}
        for _ in range(n - 1):
            nxt: dict[tuple[int, int], float] = {}
            for (mask, last), c in f.items():
                for k in range(n):
                    if not mask >> k & 1:
                        key = (mask | 1 << k, k)
                        nxt[key] = min(nxt.get(key, math.inf), c + cost[last][k])
            f = nxt
        best = min(best, min(f.values()))
    return best


def dtfm_cost(sc: DtfmScenario, groups: Sequence[Sequence[int]]) -> tuple[float, float, float]:
    """(total, DP, 2·PP) seconds of a partition under DT-FM's cost function, computed
    as its scheduler does (plain loops over its units; slow, for checking)."""
    groups = [list(map(int, g)) for g in groups]
    flat = sorted(d for g in groups for d in g)
    if flat != list(range(len(sc.regions))) or len({len(g) for g in groups}) != 1:
        raise ValueError(f"groups must split devices 0..{len(sc.regions) - 1} into equal parts")
    dp = _dp_cost(sc, groups)
    k = len(groups)
    cost = [[0.0] * k for _ in range(k)]
    for i, j in itertools.combinations(range(k), 2):
        cost[i][j] = cost[j][i] = _edge(sc, groups[i], groups[j])
    pp = _open_path(cost) if k > 1 else 0.0
    return dp + 2 * pp, dp, 2 * pp
