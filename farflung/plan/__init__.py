"""Placement planning: a cost model of a pipeline x data-parallel layout over a
heterogeneous network (DT-FM, NeurIPS 2022) and searches over device placements.

Pure computation (numpy only): :mod:`farflung.plan.cost` prices a placement,
:mod:`farflung.plan.search` looks for a cheap one."""

from farflung.plan.cost import (
    Breakdown,
    Problem,
    dp_cost,
    edge_cost,
    pp_cost,
    total_cost,
    tsp_path,
)
from farflung.plan.search import (
    PlanResult,
    brute_force,
    dtfm_search,
    plan_search,
    random_placement,
    rank_order,
)

__all__ = [
    "Breakdown",
    "PlanResult",
    "Problem",
    "brute_force",
    "dp_cost",
    "dtfm_search",
    "edge_cost",
    "plan_search",
    "pp_cost",
    "random_placement",
    "rank_order",
    "total_cost",
    "tsp_path",
]
