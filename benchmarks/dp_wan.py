"""Step time of the data-parallel algorithms over emulated slow links.

For every link in {unshaped, 1gbit, 500mbit, 100mbit, 100mbit with 50 ms one-way
delay} and every algorithm in
{allreduce, compressed, cocktail, diloco}, trains ``configs/small.toml`` with 2 local
workers behind that link (``--netlab``: namespaces + tc when root, else the
in-process link model — the JSON says which) and reports the step time, the slowdown
against the same algorithm unshaped, bytes per step per rank and tokens/s. All runs
happen in this one invocation. JSON on the last line::

    {"results": [{"algorithm": ..., "link": ..., "step_s": ..., "slowdown": ...,
                  "bytes_per_step": ..., "tokens_per_s": ...}, ...]}

``step_s`` is the mean over the timed steps (after warm-up), so periodic syncs
(diloco) are amortised; ``median_step_s`` is reported beside it.

    python benchmarks/dp_wan.py [--steps 12] [--links unshaped 500mbit 100mbit]
                                [--algorithms allreduce cocktail] [--delay 0ms]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import train

LINKS = ["unshaped", "1gbit", "500mbit", "100mbit", "100mbit,50ms"]
ALGORITHMS = {
    "allreduce": ["parallel.algorithm=allreduce"],
    "compressed": ["parallel.algorithm=compressed", "parallel.codec=quantize:bits=4"],
    "cocktail": ["parallel.algorithm=cocktail"],
    "diloco": ["parallel.algorithm=diloco", "parallel.local_steps=5"],
}
WARMUP = 2


def run(algorithm: str, link: str, args: argparse.Namespace, out: Path) -> dict:
    print(f"[dp_wan] {algorithm} @ {link}", file=sys.stderr, flush=True)
    spec = link if "," in link else f"{link},{args.delay}"  # a link may name its own delay
    net = [] if link == "unshaped" else [f"--{args.mode}", spec]
    records, summary = train(
        args.config, args.workers, args.steps, out, ALGORITHMS[algorithm] + args.set, net
    )
    timed = records[WARMUP:]
    step_s = statistics.mean(r["wall_s"] for r in timed)
    tokens = timed[-1]["tokens"] - records[WARMUP - 1]["tokens"]
    return {
        "algorithm": algorithm,
        "link": link,
        "step_s": step_s,
        "median_step_s": statistics.median(r["wall_s"] for r in timed),
        "comm_s": statistics.mean(r["comm_s"] for r in timed),
        "bytes_per_step": statistics.mean(r["bytes_by_kind"]["dp"] for r in timed) / args.workers,
        "tokens_per_s": tokens / sum(r["wall_s"] for r in timed),
        "network": summary.get("network", "unshaped"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/small.toml")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--links", nargs="+", default=LINKS)
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    p.add_argument("--delay", default="0ms", help="one-way delay added to every shaped link")
    p.add_argument(
        "--mode",
        choices=["netlab", "link-model"],
        default="netlab",
        help="netlab: namespaces + tc (falls back to the model without root)",
    )
    p.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    args = p.parse_args()
    links = ["unshaped"] + [link for link in args.links if link != "unshaped"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm in args.algorithms:
            for link in links:
                results.append(run(algorithm, link, args, Path(tmp) / f"{algorithm}-{link}"))
    base = {r["algorithm"]: r["step_s"] for r in results if r["link"] == "unshaped"}
    for r in results:
        r["slowdown"] = r["step_s"] / base[r["algorithm"]]
        print(
            f"{r['algorithm']:>10} @ {r['link']:>12}: {r['step_s']:.2f} s/step "
            f"({r['slowdown']:.2f}x), {r['bytes_per_step'] / 1e6:.2f} MB/step/rank, "
            f"{r['tokens_per_s']:,.0f} tok/s  [{r['network']}]",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "benchmark": "dp_wan",
                "config": args.config,
                "workers": args.workers,
                "steps": args.steps,
                "delay": args.delay,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
