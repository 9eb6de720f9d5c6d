"""A deterministic synthetic wide-area network of N devices, for planner benchmarks at
sizes beyond DT-FM's 64-device scenarios.

Layout (all draws from ``numpy.random.default_rng(seed)``, so a given
``(n, regions, per_machine, seed)`` always yields the same matrix):

* devices are packed ``per_machine`` to a machine (the last machine may be partial);
  machines are dealt to ``regions`` regions with Dirichlet(2)-weighted sizes, every
  region getting at least one machine; device ids are contiguous per machine and per
  region (region 0 first), as in :meth:`farflung.netlab.link.LinkMatrix.scenario`;
* within a machine: 100 Gbps, 5 µs one-way (NVLink/PCIe-class, "~0 ms");
* within a region, between two machines: bandwidth uniform in 2-10 Gbps and one-way
  delay uniform in 1-5 ms, drawn once per machine pair (symmetric);
* across regions: regions sit at uniform random points of a unit square; with
  ``f = distance / largest distance`` in [0, 1], one-way delay = 10 + 130·f ms (plus
  ±5 ms jitter, clipped to 10-140 ms) and bandwidth = 1.3 - 1.0·f Gbps (plus ±0.1
  Gbps jitter, clipped to 0.3-1.3 Gbps), drawn once per region pair (symmetric).

:func:`synthetic_arrays` returns numpy matrices (fast at N = 1000);
:func:`synthetic_link` wraps them in a :class:`~farflung.netlab.link.LinkMatrix`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # farflung.comm pulls in torch
    from farflung.netlab.link import LinkMatrix

__all__ = ["synthetic_arrays", "synthetic_link"]

MACHINE_GBPS = 100.0
MACHINE_DELAY_S = 5e-6
REGION_GBPS = (2.0, 10.0)
REGION_MS = (1.0, 5.0)
WAN_GBPS = (0.3, 1.3)
WAN_MS = (10.0, 140.0)


def _symmetric(rng: np.random.Generator, m: int, lo: float, hi: float) -> np.ndarray:
    x = rng.uniform(lo, hi, size=(m, m))
    return np.triu(x, 1) + np.triu(x, 1).T


def synthetic_arrays(
    n: int, regions: int = 10, per_machine: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(bandwidth bits/s [n, n], one-way delay s [n, n], region name per device); the
    diagonal is inf / 0. See the module docstring for the figures."""
    if n < 1 or regions < 1 or per_machine < 1:
        raise ValueError(f"need n, regions, per_machine >= 1, got {n}, {regions}, {per_machine}")
    rng = np.random.default_rng(seed)
    machines = -(-n // per_machine)
    regions = min(regions, machines)
    # machines per region: one each, the rest by Dirichlet-weighted multinomial
    weights = rng.dirichlet(np.full(regions, 2.0))
    per_region = 1 + rng.multinomial(machines - regions, weights)
    machine_region = np.repeat(np.arange(regions), per_region)
    dev_machine = np.arange(n) // per_machine
    dev_region = machine_region[dev_machine]

    # region-level (WAN) figures from positions on a plane
    pos = rng.uniform(0.0, 1.0, size=(regions, 2))
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=2)
    f = dist / dist.max() if dist.max() > 0 else dist
    jit_ms = _symmetric(rng, regions, -5.0, 5.0)
    jit_gbps = _symmetric(rng, regions, -0.1, 0.1)
    wan_ms = np.clip(WAN_MS[0] + (WAN_MS[1] - WAN_MS[0]) * f + jit_ms, *WAN_MS)
    wan_gbps = np.clip(WAN_GBPS[1] - (WAN_GBPS[1] - WAN_GBPS[0]) * f + jit_gbps, *WAN_GBPS)

    # machine-level (in-region) figures
    lan_gbps = _symmetric(rng, machines, *REGION_GBPS)
    lan_ms = _symmetric(rng, machines, *REGION_MS)

    same_machine = dev_machine[:, None] == dev_machine[None]
    same_region = dev_region[:, None] == dev_region[None]
    mi, mj = np.ix_(dev_machine, dev_machine)
    ri, rj = np.ix_(dev_region, dev_region)
    gbps = np.where(same_machine, MACHINE_GBPS, np.where(same_region, lan_gbps[mi, mj], 0.0))
    gbps = np.where(same_region, gbps, wan_gbps[ri, rj])
    delay = np.where(
        same_machine, MACHINE_DELAY_S, np.where(same_region, lan_ms[mi, mj] * 1e-3, 0.0)
    )
    delay = np.where(same_region, delay, wan_ms[ri, rj] * 1e-3)
    bw = gbps * 1e9
    np.fill_diagonal(bw, np.inf)
    np.fill_diagonal(delay, 0.0)
    return bw, delay, [f"r{r}" for r in dev_region]


def synthetic_link(n: int, regions: int = 10, per_machine: int = 8, seed: int = 0) -> LinkMatrix:
    """:func:`synthetic_arrays` as a :class:`~farflung.netlab.link.LinkMatrix`."""
    from farflung.netlab.link import LinkMatrix

    bw, delay, names = synthetic_arrays(n, regions, per_machine, seed)
    return LinkMatrix(bw, delay, regions=names)
