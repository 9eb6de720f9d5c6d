"""farflung's placement search against DT-FM's own search (GCMA, ported) on DT-FM's
five scenarios with DT-FM's inputs, priced by DT-FM's cost function.

Inputs (:mod:`farflung.plan.dtfm`): the delay and bandwidth matrices as DT-FM's
scheduler builds them (``config.py``, delays in ms used as given), 64 devices, pp = 8
x dp = 8, GPT-3 XL traffic as the scheduler derives it (0.4712 GB of activations per
boundary, 0.65 GB of gradients per stage; ``--sizes config`` takes config.py's
per-scenario overrides instead). Every cost below is DT-FM's objective DP + 2·PP in
seconds; each reported layout is re-priced by :func:`~farflung.plan.dtfm.dtfm_cost`,
the port of DT-FM's cost function in its own units, and checked against farflung's
:func:`~farflung.plan.cost.total_cost`.

Sections of the JSON (top-level key ``results``, one row per scenario):

* ``gcma_s`` (mean over ``--gcma-seeds``), ``gcma_min_s``/``gcma_max_s``: the GCMA port
  at population 100 and ``--trails`` trials (300, as the reference run), beside
  ``dtfm_reference_s``, what DT-FM's own code found (issue 22), and
  ``gcma_vs_reference`` = gcma_s / dtfm_reference_s (the port's fidelity);
* ``plan_s``: farflung's plan (:func:`~farflung.plan.search.plan_search`,
  ``--plan-evals`` pricings), ``gcma_over_plan`` and ``verdict`` ("tie" within 0.5%,
  else "plan wins x" / "GCMA wins x");
* ``search``: per seed of ``--seeds``, the best start's cost and kind, the search's
  final cost and whether the search improved on its starts; ``improved_fraction``;
* ``equal_budget``: both searches held to the same number of pricings
  (``--equal-evals``; GCMA's 300 trials price 400 partitions), seconds reported
  beside (wall time is noisy on a shared machine: the budget is the pricings);
* ``jittered``: the same scenario with every pair's bandwidth and delay scaled by an
  independent factor in [0.7, 1.3] (symmetric, seeded), where the structured starts
  are no longer exact: best start, search result, improved fraction, and both
  searches at ``--equal-evals`` pricings.

``--synthetic BUDGET_S`` adds ``synthetic``: farflung's search alone on 250- and
1,000-device synthetic networks (:func:`synthetic`) with that wall-clock budget.

    python benchmarks/plan_scenarios.py [--seeds 0 1 2] [--scenarios world spot]
                                        [--synthetic 10]
                                        [--out benchmarks/results/plan_scenarios.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from farflung.plan import dtfm
from farflung.plan.cost import Problem
from farflung.plan.search import dtfm_search, plan_search_traced, random_placement, rank_order
from farflung.plan.synthetic import synthetic_arrays

TIE = 0.005  # relative difference under which two costs are called a tie
JITTER = 0.3


def log(msg: str) -> None:
    print(f"[plan_scenarios] {msg}", file=sys.stderr, flush=True)


def jittered(sc: dtfm.DtfmScenario, seed: int) -> dtfm.DtfmScenario:
    """Every pair's bandwidth and delay times its own factor in [1 - JITTER, 1 +
    JITTER] (symmetric), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    n = len(sc.regions)

    def factors() -> np.ndarray:
        f = np.triu(rng.uniform(1 - JITTER, 1 + JITTER, (n, n)), 1)
        return f + f.T + np.eye(n)

    return dataclasses.replace(sc, bw_gbps=sc.bw_gbps * factors(), delay_ms=sc.delay_ms * factors())


def checked(sc: dtfm.DtfmScenario, groups: list[list[int]], cost: float) -> float:
    """DT-FM's cost function's price of ``groups``, asserted equal to farflung's."""
    theirs = dtfm.dtfm_cost(sc, groups)[0]
    assert abs(theirs - cost) <= 1e-9 * cost, (sc.name, theirs, cost)
    return theirs


def verdict(gcma: float, plan: float) -> str:
    r = gcma / plan
    if abs(r - 1) <= TIE:
        return "tie"
    return f"plan wins {r:.2f}x" if r > 1 else f"GCMA wins {1 / r:.2f}x"


def search_rows(sc: dtfm.DtfmScenario, seeds: list[int], evals: int) -> list[dict]:
    p = dtfm.problem(sc)
    rows = []
    for s in seeds:
        res, tr = plan_search_traced(p, seed=s, budget_s=600, max_evaluations=evals)
        rows.append(
            {
                "seed": s,
                "best_start_s": tr.start_cost,
                "best_start": tr.start_kind,
                "search_s": checked(sc, res.groups, res.cost.total),
                "improved": tr.improved,
                "evaluations": res.evaluations,
                "seconds": res.seconds,
            }
        )
    return rows


def equal_budget(sc: dtfm.DtfmScenario, seed: int, evals: int) -> dict:
    p = dtfm.problem(sc)
    plan = plan_search_traced(p, seed=seed, budget_s=600, max_evaluations=evals)[0]
    gcma = dtfm_search(p, seed=seed, budget_s=600, trails=10**6, max_evaluations=evals)
    return {
        "seed": seed,
        "evaluations": evals,
        "plan_s": checked(sc, plan.groups, plan.cost.total),
        "gcma_s": checked(sc, gcma.groups, gcma.cost.total),
        "plan_seconds": plan.seconds,
        "gcma_seconds": gcma.seconds,
        "gcma_over_plan": gcma.cost.total / plan.cost.total,
    }


def run(name: str, args: argparse.Namespace) -> dict:
    sc = dtfm.scenario(name, args.sizes)
    p = dtfm.problem(sc)
    gcma = []
    for s in args.gcma_seeds:
        t0 = time.perf_counter()
        g = dtfm_search(p, seed=s, budget_s=3600, trails=args.trails)
        gcma.append((checked(sc, g.groups, g.cost.total), time.perf_counter() - t0, g.evaluations))
        log(f"{name}: GCMA seed {s}: {gcma[-1][0]:.3f} s ({gcma[-1][1]:.1f} s)")
    search = search_rows(sc, args.seeds, args.plan_evals)
    plan = min(r["search_s"] for r in search)
    log(f"{name}: plan {plan:.3f} s; starts improved in {sum(r['improved'] for r in search)}")
    gmean = statistics.mean(c for c, _, _ in gcma)
    ref = dtfm.REFERENCE_GCMA_300.get(name) if args.sizes == "model" else None
    eq = [equal_budget(sc, s, args.equal_evals) for s in args.seeds]
    jit = []
    for s in args.seeds:
        jsc = jittered(sc, s)
        row = search_rows(jsc, [s], args.plan_evals)[0]
        row["equal_budget"] = equal_budget(jsc, s, args.equal_evals)
        jit.append(row)
        log(f"{name} jitter {s}: start {row['best_start_s']:.3f} -> {row['search_s']:.3f}")
    rank = rank_order(p)
    return {
        "scenario": name,
        "act_gb": sc.act_gb,
        "grad_gb": sc.grad_gb,
        "dtfm_reference_s": ref,
        "gcma_trails": args.trails,
        "gcma_s": gmean,
        "gcma_min_s": min(c for c, _, _ in gcma),
        "gcma_max_s": max(c for c, _, _ in gcma),
        "gcma_seconds": statistics.mean(t for _, t, _ in gcma),
        "gcma_evaluations": gcma[0][2],
        "gcma_vs_reference": gmean / ref if ref else None,
        "plan_s": plan,
        "plan_evaluations": args.plan_evals,
        "gcma_over_plan": gmean / plan,
        "verdict": verdict(gmean, plan),
        "rank_order_s": checked(sc, rank.groups, rank.cost.total),
        "search": search,
        "improved_fraction": sum(r["improved"] for r in search) / len(search),
        "equal_budget": eq,
        "jittered": jit,
        "jittered_improved_fraction": sum(r["improved"] for r in jit) / len(jit),
    }


SYNTHETIC = {250: (10, 25), 1000: (10, 100)}  # N: (pp, dp)


def synthetic(n: int, budget_s: float, seed: int) -> dict:
    """farflung's search at a size DT-FM's scenarios do not reach: the synthetic
    network of :mod:`farflung.plan.synthetic` (10 regions, 8-GPU machines), an
    ~8B-parameter workload (40 layers, width 4096, context 2048, 40 sequences per
    replica, fp16: c_PP = 40·2048·4096·2 bytes, c_DP = (40/pp)·12·4096²·2 bytes),
    DT-FM's objective, a wall-clock budget. GCMA is left out: its cyclic partitioning
    rebuilds an N x N pair-gain sum per move, up to N moves per cycle."""
    pp, dp = SYNTHETIC[n]
    bw, delay, _ = synthetic_arrays(n, seed=seed)
    p = Problem(delay, bw / 8.0, pp, dp, (40 / pp) * 12 * 4096**2 * 2, 40 * 2048 * 4096 * 2)
    res, tr = plan_search_traced(p, seed=seed, budget_s=budget_s)
    rng = np.random.default_rng(seed)
    rand = [random_placement(p, rng).cost.total for _ in range(5)]
    return {
        "n": n,
        "pp": pp,
        "dp": dp,
        "budget_s": budget_s,
        "plan_s": res.cost.total,
        "best_start_s": tr.start_cost,
        "best_start": tr.start_kind,
        "improved": tr.improved,
        "rank_order_s": rank_order(p).cost.total,
        "random_mean_s": statistics.mean(rand),
        "evaluations": res.evaluations,
        "seconds": res.seconds,
        "hit_budget": not res.complete,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", nargs="+", default=list(dtfm.SCENARIOS), choices=dtfm.SCENARIOS)
    ap.add_argument("--sizes", choices=["model", "config"], default="model")
    ap.add_argument("--trails", type=int, default=300, help="GCMA trials (reference: 300)")
    ap.add_argument("--gcma-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="plan_search seeds")
    ap.add_argument("--plan-evals", type=int, default=4000, help="plan_search pricings")
    ap.add_argument("--equal-evals", type=int, default=400, help="equal-budget pricings")
    ap.add_argument(
        "--synthetic",
        type=float,
        metavar="BUDGET_S",
        help="also run the planner alone on 250- and 1,000-device synthetic networks",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/plan_scenarios.json"))
    args = ap.parse_args()
    results = [run(name, args) for name in args.scenarios]
    for r in results:
        log(
            f"{r['scenario']:>16}: GCMA {r['gcma_s']:7.3f} (ref {r['dtfm_reference_s']}) | "
            f"plan {r['plan_s']:7.3f} | {r['verdict']} | improved {r['improved_fraction']:.2f},"
            f" jittered {r['jittered_improved_fraction']:.2f}"
        )
    doc = {
        "benchmark": "plan_scenarios",
        "cost": "DT-FM's objective (DP + 2 PP), DT-FM's inputs",
        "sizes": args.sizes,
        "tie_within": TIE,
        "jitter": JITTER,
        "argv": sys.argv[1:],
        "results": results,
        "synthetic": [synthetic(n, args.synthetic, 0) for n in SYNTHETIC] if args.synthetic else [],
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
