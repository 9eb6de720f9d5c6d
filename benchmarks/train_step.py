"""Training-step throughput for 1 and N local workers on configs/small.toml.

Runs ``farflung train`` for each worker count in the same invocation (same data,
same global batch), skips warm-up steps, and prints one JSON line:
tokens/s, median step / compute / comm seconds, bytes per step per rank, and the
throughput ratio of each worker count to one worker.

    python benchmarks/train_step.py [--steps 30] [--workers 1 2] [--config configs/small.toml]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import train

WARMUP = 3


def run(config: str, workers: int, steps: int, out: Path, extra: list[str]) -> dict:
    records, summary = train(config, workers, steps, out, extra)
    timed = records[WARMUP:]
    step_s = statistics.median(r["wall_s"] for r in timed)
    tokens_per_step = timed[0]["tokens"] - records[WARMUP - 1]["tokens"]
    return {
        "workers": workers,
        "tokens_per_s": tokens_per_step / step_s,
        "step_s": step_s,
        "compute_s": statistics.median(r["compute_s"] for r in timed),
        "comm_s": statistics.median(r["comm_s"] for r in timed),
        "bytes_per_step_per_rank": statistics.median(r["bytes_sent"] for r in timed) / workers,
        "params": summary["params"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/small.toml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            run(args.config, w, args.steps, Path(tmp) / f"w{w}", args.set) for w in args.workers
        ]
    base = results[0]["tokens_per_s"]
    for r in results:
        r["throughput_ratio_vs_1"] = r["tokens_per_s"] / base
        print(
            f"{r['workers']} worker(s): {r['tokens_per_s']:,.0f} tok/s, step "
            f"{r['step_s']:.3f}s (compute {r['compute_s']:.3f}s, comm {r['comm_s']:.3f}s), "
            f"{r['bytes_per_step_per_rank'] / 1e6:.2f} MB/step/rank",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "benchmark": "train_step",
                "config": args.config,
                "steps": args.steps,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
