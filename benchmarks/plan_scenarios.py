"""Predicted step time of farflung's placement search against DT-FM's reference search,
random placements and rank order, on the five DT-FM scenarios and a 1,000-device
synthetic network.

DT-FM scenarios (datacenter, spot, multi-university, regional, world): 64 devices, a
GPT3-XL-sized model (24 layers, width 2048, context 2048, batch 1024 sequences,
micro-batch 1), pp=8 x dp=8, fp16 traffic as in the DT-FM paper:

* ``c_pp`` = (batch / dp) x context x width x 2 bytes: one pipeline replica's
  activations per step across one stage boundary (128 x 2048 x 2048 x 2 = 1 GiB);
* ``c_dp`` = (layers / pp) x 12·width² x 2 bytes: one stage's parameters in fp16 (a
  block has 12·width² parameters: 4·width² attention + 8·width² MLP; 3 blocks a
  stage: 3 x 12 x 2048² x 2 = 302 MB);
* no compute term (DT-FM's model: the cost is DP + 2·PP communication only).

``--cost-model schedule`` prices the same placements with farflung's step timeline
instead (micro-batch 1: 128 messages per boundary and step, boundaries and
directions overlapping; still no compute term), where the ratios between placements
are what a real pipeline would see rather than DT-FM's sum of transfers.

``synthetic-1000``: :func:`farflung.plan.synthetic.synthetic_link` (1,000 devices, 10
regions, 8 devices a machine, seed 0), pp=10 x dp=100 and a workload scaled to that
size: an ~8B model (40 layers, width 4096, context 2048) with a batch of 4,000
sequences (40 per replica), so ``c_pp`` = 40 x 2048 x 4096 x 2 = 671 MB and ``c_dp`` =
4 x 12 x 4096² x 2 = 1.61 GB, by the same formulas.

For every scenario: ``plan_s`` (:func:`~farflung.plan.search.plan_search`),
``dtfm_s`` (:func:`~farflung.plan.search.dtfm_search`, same budget), ``random_s``
(mean of 20 seeded random partitions), ``rank_order_s``, the ratios to ``plan_s``, the
search seconds and evaluations (placements priced) of both searches. ``scaling``:
plan_search on the synthetic generator for N in (64, 250, 1000) with the same budget
(evaluations, seconds, evaluations/s, whether the budget ran out). JSON on the last
line of stdout::

    {"results": [{"scenario": ..., "plan_s": ..., "dtfm_s": ..., "random_s": ...,
                  "rank_order_s": ..., "search_s": ..., "dtfm_search_s": ...}],
     "scaling": [...]}

    python benchmarks/plan_scenarios.py [--budget-s 30] [--seed 0]
                                        [--scenarios datacenter world synthetic-1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from farflung.comm.link import LinkMatrix
from farflung.comm.scenarios import SCENARIOS
from farflung.plan.cost import Problem, total_cost
from farflung.plan.search import dtfm_search, plan_search, random_placement, rank_order
from farflung.plan.synthetic import synthetic_arrays, synthetic_link

SYNTHETIC = "synthetic-1000"
ALL = [*SCENARIOS, SYNTHETIC]
FP16 = 2
RANDOM_SAMPLES = 20
DTFM_POPULATION = 100  # dtfm_search's default population
SCALING_LAYOUTS = {64: (8, 8), 250: (10, 25), 1000: (10, 100)}  # N: (pp, dp)


def traffic(layers: int, width: int, context: int, batch: int, pp: int, dp: int):
    """(c_dp, c_pp) in bytes: one stage's fp16 parameters, and one replica's fp16
    activations per step across one boundary (see the module docstring)."""
    c_dp = (layers / pp) * 12 * width**2 * FP16
    c_pp = (batch / dp) * context * width * FP16
    return c_dp, c_pp


def dtfm_problem(name: str, model: str = "dtfm") -> Problem:
    """A DT-FM scenario; micro-batch 1, so 128 micro-batches per replica and step (only
    the schedule model uses them: DT-FM's moves the whole batch per boundary cost)."""
    c_dp, c_pp = traffic(24, 2048, 2048, 1024, 8, 8)
    link = LinkMatrix.scenario(name, 64)
    return Problem.from_link(link, 8, 8, c_dp, c_pp, model=model, micro_batches=1024 // 8)


def synthetic_problem(
    n: int, pp: int, dp: int, via_link: bool = True, model: str = "dtfm"
) -> Problem:
    """The synthetic workload at any layout: 40 layers, width 4096, 40 sequences per
    replica (batch = 40·dp), micro-batch 1."""
    c_dp, c_pp = traffic(40, 4096, 2048, 40 * dp, pp, dp)
    kw = {"model": model, "micro_batches": 40}
    if via_link:
        return Problem.from_link(synthetic_link(n), pp, dp, c_dp, c_pp, **kw)
    bw, delay, _ = synthetic_arrays(n)
    return Problem(delay, bw / 8.0, pp, dp, c_dp, c_pp, **kw)


def log(msg: str) -> None:
    print(f"[plan_scenarios] {msg}", file=sys.stderr, flush=True)


def run(name: str, args: argparse.Namespace) -> dict:
    log(f"{name}: building")
    model = args.cost_model
    problem = (
        synthetic_problem(1000, 10, 100, model=model)
        if name == SYNTHETIC
        else dtfm_problem(name, model)
    )
    plan = plan_search(problem, seed=args.seed, budget_s=args.budget_s)
    log(f"{name}: plan {plan.cost.total:.3f} s ({plan.seconds:.1f} s, {plan.evaluations} evals)")
    dtfm = dtfm_search(problem, seed=args.seed, budget_s=args.budget_s)
    log(f"{name}: dtfm {dtfm.cost.total:.3f} s ({dtfm.seconds:.1f} s, {dtfm.evaluations} evals)")
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    rand = [random_placement(problem, rng).cost.total for _ in range(RANDOM_SAMPLES)]
    random_eval_s = (time.perf_counter() - t0) / RANDOM_SAMPLES
    rank = rank_order(problem).cost.total
    # sanity: the searches' reported costs are the cost model's price of their groups
    assert abs(total_cost(problem, plan.groups).total - plan.cost.total) < 1e-6 * plan.cost.total
    return {
        "scenario": name,
        "n": problem.n,
        "pp": problem.pp,
        "dp": problem.dp,
        "c_dp_bytes": problem.c_dp,
        "c_pp_bytes": problem.c_pp,
        "plan_s": plan.cost.total,
        "plan_dp_s": plan.cost.dp,
        "plan_pp_s": plan.cost.pp,
        "dtfm_s": dtfm.cost.total,
        "random_s": statistics.mean(rand),
        "random_min_s": min(rand),
        "rank_order_s": rank,
        "dtfm_over_plan": dtfm.cost.total / plan.cost.total,
        "random_over_plan": statistics.mean(rand) / plan.cost.total,
        "rank_over_plan": rank / plan.cost.total,
        "search_s": plan.seconds,
        "dtfm_search_s": dtfm.seconds,
        "plan_evaluations": plan.evaluations,
        "plan_complete": plan.complete,
        "dtfm_evaluations": dtfm.evaluations,
        # PlanResult has no generation count; evaluations == the population size (100)
        # means DT-FM never finished its initial population's first generation
        "dtfm_past_population": dtfm.evaluations > DTFM_POPULATION,
        "one_full_pricing_s": random_eval_s,
        "budget_s": args.budget_s,
    }


def scaling(args: argparse.Namespace) -> list[dict]:
    """plan_search on the synthetic generator at growing N, same budget (the search
    has a fixed step count but its descent runs to convergence, so the budget decides
    at large N: report evaluations/s and whether it ran out)."""
    out = []
    for n, (pp, dp) in SCALING_LAYOUTS.items():
        problem = synthetic_problem(n, pp, dp, via_link=False, model=args.cost_model)
        res = plan_search(problem, seed=args.seed, budget_s=args.budget_s)
        row = {
            "n": n,
            "pp": pp,
            "dp": dp,
            "plan_s": res.cost.total,
            "search_s": res.seconds,
            "evaluations": res.evaluations,
            "evaluations_per_s": res.evaluations / res.seconds,
            "budget_s": args.budget_s,
            "hit_budget": not res.complete,
            "rank_order_s": rank_order(problem).cost.total,
        }
        log(
            f"scaling N={n}: {row['evaluations']} evals in {row['search_s']:.1f} s "
            f"({row['evaluations_per_s']:.0f}/s), hit budget: {row['hit_budget']}"
        )
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, default=30.0, help="seconds per search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenarios", nargs="+", default=ALL, choices=ALL)
    p.add_argument("--no-scaling", action="store_true", help="skip the N-scaling runs")
    p.add_argument(
        "--cost-model",
        choices=["dtfm", "schedule"],
        default="dtfm",
        help="dtfm: DT-FM's objective, as the paper compares (default); schedule: "
        "farflung's step timeline, no compute term",
    )
    args = p.parse_args()
    results = [run(name, args) for name in args.scenarios]
    for r in results:
        log(
            f"{r['scenario']:>16}: plan {r['plan_s']:8.2f} s | dtfm {r['dtfm_s']:8.2f} s "
            f"({r['dtfm_over_plan']:.2f}x) | random {r['random_s']:8.2f} s "
            f"({r['random_over_plan']:.2f}x) | rank {r['rank_order_s']:8.2f} s "
            f"({r['rank_over_plan']:.2f}x)"
        )
    scale = [] if args.no_scaling or SYNTHETIC not in args.scenarios else scaling(args)
    print(
        json.dumps(
            {
                "benchmark": "plan_scenarios",
                "budget_s": args.budget_s,
                "seed": args.seed,
                "cost_model": args.cost_model,
                "results": results,
                "scaling": scale,
            }
        )
    )


if __name__ == "__main__":
    main()
