"""The DT-FM network scenarios (REFERENCES.md §3) as data, and how their regions
are scaled to N hosts. :meth:`farflung.comm.link.LinkMatrix.scenario` builds matrices
from them."""

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


def _table(pairs: dict[tuple[str, str], tuple[float, float]]) -> Callable[[str, str], tuple]:
    lookup = {frozenset(k): v for k, v in pairs.items()}

    def across(a: str, b: str) -> tuple[float, float]:
        return lookup[frozenset((a, b))]

    return across


_REGIONAL = {
    ("Virginia", "Oregon"): (1.15, 67.0),
    ("Virginia", "California"): (1.05, 59.0),
    ("Virginia", "Ohio"): (1.12, 11.0),
    ("Oregon", "California"): (1.25, 12.0),
    ("Oregon", "Ohio"): (1.10, 49.0),
    ("California", "Ohio"): (1.02, 52.0),
}

# World-wide: REFERENCES.md gives Oregon–Virginia 0.79/67, Virginia–Ohio 1.12/11 and
# Seoul–London 0.342/238 and says the other pairs are measured figures of the same
# scale (0.3–1.3 Gbps, 10–270 ms). The remaining entries below are farflung's OWN
# PLAUSIBLE ESTIMATES (rough geography: further apart → later and slower), not
# measurements. Oregon–Ohio reuses the regional scenario's figure.
_WORLD = {
    # stated
    ("Oregon", "Virginia"): (0.79, 67.0),
    ("Virginia", "Ohio"): (1.12, 11.0),
    ("Seoul", "London"): (0.342, 238.0),
    # assumed (see above)
    ("Oregon", "Ohio"): (1.10, 49.0),
    ("Oregon", "Tokyo"): (0.60, 100.0),
    ("Oregon", "Seoul"): (0.50, 125.0),
    ("Oregon", "London"): (0.45, 140.0),
    ("Oregon", "Frankfurt"): (0.42, 150.0),
    ("Oregon", "Ireland"): (0.48, 130.0),
    ("Virginia", "Tokyo"): (0.48, 150.0),
    ("Virginia", "Seoul"): (0.42, 180.0),
    ("Virginia", "London"): (0.90, 75.0),
    ("Virginia", "Frankfurt"): (0.80, 90.0),
    ("Virginia", "Ireland"): (0.95, 70.0),
    ("Ohio", "Tokyo"): (0.50, 140.0),
    ("Ohio", "Seoul"): (0.45, 170.0),
    ("Ohio", "London"): (0.85, 85.0),
    ("Ohio", "Frankfurt"): (0.75, 95.0),
    ("Ohio", "Ireland"): (0.85, 80.0),
    ("Tokyo", "Seoul"): (1.20, 35.0),
    ("Tokyo", "London"): (0.36, 215.0),
    ("Tokyo", "Frankfurt"): (0.35, 225.0),
    ("Tokyo", "Ireland"): (0.37, 205.0),
    ("Seoul", "Frankfurt"): (0.32, 250.0),
    ("Seoul", "Ireland"): (0.33, 245.0),
    ("London", "Frankfurt"): (1.25, 15.0),
    ("London", "Ireland"): (1.30, 12.0),
    ("Frankfurt", "Ireland"): (1.20, 25.0),
}

SCENARIO_TABLE: dict[str, Scenario] = {
    "datacenter": Scenario(
        "data centre: 8 machines x 8 GPUs, 100 Gbps inside a machine, 3.125 Gbps between",
        tuple((f"machine{k}", 8) for k in range(8)),
        (100.0, 0.0),
        lambda a, b: (3.125, 0.0),
    ),
    # the paper states no delay for spot instances: taken as 0 ms like the data centre
    "spot": Scenario(
        "spot instances: 8 x 4-GPU + 32 x 1-GPU machines, 100 Gbps inside, 1.25 Gbps between",
        tuple((f"machine{k}", 4) for k in range(8)) + tuple((f"single{k}", 1) for k in range(32)),
        (100.0, 0.0),
        lambda a, b: (1.25, 0.0),
    ),
    "multi-university": Scenario(
        "multi-university: Ohio + Virginia, 5 Gbps/1 ms inside a site, 1.12 Gbps/11 ms across",
        (("Ohio", 32), ("Virginia", 32)),
        (5.0, 1.0),
        lambda a, b: (1.12, 11.0),
    ),
    "regional": Scenario(
        "regional: Virginia, Oregon, California, Ohio; 2 Gbps/5 ms inside a region",
        (("Virginia", 16), ("Oregon", 16), ("California", 16), ("Ohio", 16)),
        (2.0, 5.0),
        _table(_REGIONAL),
    ),
    "world": Scenario(
        "world-wide: 8 regions on 3 continents; 2 Gbps/5 ms inside a region",
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
        (2.0, 5.0),
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
