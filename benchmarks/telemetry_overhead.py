"""What a slow link costs a run that has nothing to communicate: telemetry's toll.

DiLoCo with 100 local steps and 12 steps in all runs no outer sync, so whatever time a
slow link adds between steps 2 and 12 is overhead of the loop itself (telemetry,
bookkeeping). Trains ``configs/demo.toml`` with 2 local workers unshaped and behind
the in-process link model (100mbit, 300 ms one-way by default) in this one
invocation, and reports the ``elapsed_s`` between the records of steps 2 and 12 and
their ratio (issue 8's acceptance: at most 1.2x). JSON on the last line::

    {"benchmark": "telemetry_overhead", ...,
     "results": {"unshaped_s": ..., "shaped_s": ..., "ratio": ...}}

    python benchmarks/telemetry_overhead.py [--link 100mbit,300ms] [--log-every 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import train

OVERRIDES = ["parallel.algorithm=diloco", "parallel.local_steps=100"]


def between(records: list[dict], first: int, last: int) -> float:
    by_step = {r["step"]: r for r in records}
    return by_step[last]["elapsed_s"] - by_step[first]["elapsed_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.toml")
    p.add_argument("--link", default="100mbit,300ms")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--log-every", type=int, default=10, help="train.log_every")
    args = p.parse_args()
    extra = OVERRIDES + [f"train.log_every={args.log_every}"]
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, net in (("unshaped", []), ("shaped", ["--link-model", args.link])):
            print(f"[telemetry_overhead] {name}", file=sys.stderr, flush=True)
            records, _ = train(args.config, 2, args.steps, Path(tmp) / name, extra, net)
            times[name] = between(records, 2, args.steps)
    ratio = times["shaped"] / times["unshaped"]
    print(
        f"steps 2-{args.steps}: unshaped {times['unshaped']:.2f} s, {args.link} "
        f"{times['shaped']:.2f} s ({ratio:.2f}x)",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "benchmark": "telemetry_overhead",
                "config": args.config,
                "link": args.link,
                "log_every": args.log_every,
                "results": {
                    "unshaped_s": times["unshaped"],
                    "shaped_s": times["shaped"],
                    "ratio": ratio,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
