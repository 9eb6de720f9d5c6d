"""The DT-FM network scenarios (REFERENCES.md §3) as data, and how their regions
are scaled to N hosts. :meth:`farflung.netlab.link.LinkMatrix.scenario` builds matrices
from them.

Source of the figures: DT-FM's public repository, GitHub ``DS3Lab/DT-FM``, file
``scheduler/generate_sim_com_matrices.py`` (commit 69f05e50), which holds bandwidth
(Gbps) and delay (ms) for every pair of machines/regions in all five scenarios. The
tables below copy its numbers; the code is farflung's own.

Delays there are ROUND-TRIP times; farflung's link matrices hold ONE-WAY delay (the
netlab adds it once per direction, the link model once per message after
serialization), so every delay is halved here (:func:`_one_way`). Why round-trip: the
per-pair figures are those of AWS inter-region ping measurements (Oregon–Virginia 67 ms,
Virginia–Ohio 11 ms, London–Frankfurt 14 ms, Sydney–London 262 ms), which are
round-trip times; one-way times that large are physically implausible (Oregon–Virginia
is ~4,000 km, ~20 ms one-way in fibre; Virginia–Ohio ~500 km). DT-FM's scheduler adds
the figure once per message (``delay/1e3 + bytes*8/bandwidth``), i.e. it charges a
full round trip as the per-message latency; farflung models the one-way half, so a
ping across a netlab link shows the repository's figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    """One DT-FM scenario: its machines or regions and the link figures (Gbps, one-way
    ms) inside a group and across two groups."""

    title: str
    groups: tuple[tuple[str, int], ...]  # (region/machine name, devices in the paper)
    within: tuple[float, float]
    across: Callable[[str, str], tuple[float, float]]


def _one_way(figure: tuple[float, float]) -> tuple[float, float]:
    """(Gbps, round-trip ms) as in the repository → (Gbps, one-way ms)."""
    gbps, rtt_ms = figure
    return gbps, rtt_ms / 2


def _table(pairs: dict[tuple[str, str], tuple[float, float]]) -> Callable[[str, str], tuple]:
    """Per-pair lookup over (Gbps, round-trip ms) figures, answering one-way ms."""
    lookup = {frozenset(k): _one_way(v) for k, v in pairs.items()}

    def across(a: str, b: str) -> tuple[float, float]:
        return lookup[frozenset((a, b))]

    return across


# All figures below: (Gbps, ROUND-TRIP ms) exactly as in DS3Lab/DT-FM
# scheduler/generate_sim_com_matrices.py; halved to one-way where used.

# data centre: 8 machines x 8 GPUs; 3.125 Gbps between machines plus 96.875 Gbps
# inside one (= 100 Gbps); no delay.
_DATACENTER_WITHIN = (100.0, 0.0)
_DATACENTER_ACROSS = (3.125, 0.0)
# spot: 8 x 4-GPU machines (1.25 + 98.75 = 100 Gbps inside) and 32 single GPUs;
# 1.25 Gbps between any two machines; no delay.
_SPOT_WITHIN = (100.0, 0.0)
_SPOT_ACROSS = (1.25, 0.0)
# multi-university: Ohio and Virginia, 32 GPUs each.
_UNIVERSITY_WITHIN = (5.0, 1.0)
_UNIVERSITY_ACROSS = (1.12, 11.0)
# regional and world-wide: inside a region 2 Gbps, 10 ms (the repository's code uses
# 10 ms; a comment beside it says 5 ms).
_REGION_WITHIN = (2.0, 10.0)

# regional: Virginia, Oregon, California, Ohio, 16 GPUs each.
_REGIONAL = {
    ("Virginia", "Oregon"): (1.15, 67.0),
    ("Virginia", "California"): (1.05, 59.0),
    ("Virginia", "Ohio"): (1.12, 11.0),
    ("Oregon", "California"): (1.25, 12.0),
    ("Oregon", "Ohio"): (1.10, 49.0),
    ("California", "Ohio"): (1.02, 52.0),
}

# world-wide: 8 regions, 8 GPUs each. The repository's pair table also lists Singapore
# and Sydney, which its world-wide scenario does not use; they are left out here.
_WORLD = {
    ("Oregon", "Virginia"): (0.79, 67.0),
    ("Oregon", "Ohio"): (1.10, 49.0),
    ("Oregon", "Tokyo"): (0.523, 96.0),
    ("Oregon", "Seoul"): (0.46, 124.0),
    ("Oregon", "London"): (0.42, 136.0),
    ("Oregon", "Frankfurt"): (0.404, 143.0),
    ("Oregon", "Ireland"): (0.482, 124.0),
    ("Virginia", "Ohio"): (1.12, 11.0),
    ("Virginia", "Tokyo"): (0.524, 143.0),
    ("Virginia", "Seoul"): (0.500, 172.0),
    ("Virginia", "London"): (1.16, 76.0),
    ("Virginia", "Frankfurt"): (1.02, 90.0),
    ("Virginia", "Ireland"): (1.05, 67.0),
    ("Ohio", "Tokyo"): (0.694, 130.0),
    ("Ohio", "Seoul"): (0.529, 159.0),
    ("Ohio", "London"): (1.05, 86.0),
    ("Ohio", "Frankfurt"): (0.799, 99.0),
    ("Ohio", "Ireland"): (1.14, 77.0),
    ("Tokyo", "Seoul"): (1.10, 34.0),
    ("Tokyo", "London"): (0.366, 210.0),
    ("Tokyo", "Frankfurt"): (0.36, 223.0),
    ("Tokyo", "Ireland"): (0.465, 199.0),
    ("Seoul", "London"): (0.342, 238.0),
    ("Seoul", "Frankfurt"): (0.358, 235.0),
    ("Seoul", "Ireland"): (0.335, 228.0),
    ("London", "Frankfurt"): (1.14, 14.0),
    ("London", "Ireland"): (1.09, 12.0),
    ("Frankfurt", "Ireland"): (1.08, 24.0),
}

SCENARIO_TABLE: dict[str, Scenario] = {
    "datacenter": Scenario(
        "data centre: 8 machines x 8 GPUs, 100 Gbps inside a machine, 3.125 Gbps between",
        tuple((f"machine{k}", 8) for k in range(8)),
        _one_way(_DATACENTER_WITHIN),
        lambda a, b: _one_way(_DATACENTER_ACROSS),
    ),
    "spot": Scenario(
        "spot instances: 8 x 4-GPU + 32 x 1-GPU machines, 100 Gbps inside, 1.25 Gbps between",
        tuple((f"machine{k}", 4) for k in range(8)) + tuple((f"single{k}", 1) for k in range(32)),
        _one_way(_SPOT_WITHIN),
        lambda a, b: _one_way(_SPOT_ACROSS),
    ),
    "multi-university": Scenario(
        "multi-university: Ohio + Virginia, 5 Gbps/1 ms RTT inside a site, "
        "1.12 Gbps/11 ms RTT across",
        (("Ohio", 32), ("Virginia", 32)),
        _one_way(_UNIVERSITY_WITHIN),
        lambda a, b: _one_way(_UNIVERSITY_ACROSS),
    ),
    "regional": Scenario(
        "regional: Virginia, Oregon, California, Ohio; 2 Gbps/10 ms RTT inside a region",
        (("Virginia", 16), ("Oregon", 16), ("California", 16), ("Ohio", 16)),
        _one_way(_REGION_WITHIN),
        _table(_REGIONAL),
    ),
    "world": Scenario(
        "world-wide: 8 regions on 3 continents; 2 Gbps/10 ms RTT inside a region",
        tuple(
            (r, 8)
            for r in (
                "Oregon",
                "Virginia",
                "Ohio",
                "Tokyo",
                "Seoul",
                "London",
                "Frankfurt",
                "Ireland",
            )
        ),
        _one_way(_REGION_WITHIN),
        _table(_WORLD),
    ),
}
SCENARIOS: tuple[str, ...] = tuple(SCENARIO_TABLE)
_SCENARIO_ALIASES = {
    "data-centre": "datacenter",
    "data-center": "datacenter",
    "dc": "datacenter",
    "spot-instances": "spot",
    "university": "multi-university",
    "multiuniversity": "multi-university",
    "world-wide": "world",
    "worldwide": "world",
}


def scenario_key(name: str) -> str | None:
    key = name.strip().lower().replace("_", "-")
    key = _SCENARIO_ALIASES.get(key, key)
    return key if key in SCENARIO_TABLE else None


def allocate(n: int, weights: Sequence[int]) -> list[int]:
    """Split ``n`` hosts over groups in proportion to ``weights`` (largest remainder;
    ties go to the earlier group)."""
    total = sum(weights)
    quotas = [n * w / total for w in weights]
    sizes = [math.floor(q) for q in quotas]
    left = n - sum(sizes)
    order = sorted(range(len(weights)), key=lambda g: (-(quotas[g] - sizes[g]), g))
    for g in order[:left]:
        sizes[g] += 1
    return sizes
