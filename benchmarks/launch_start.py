"""What a local launch costs before training: workers forked from a warm template
against workers started as fresh interpreters (``FARFLUNG_WORKER_START=spawn``).

Runs ``farflung train`` on ``configs/demo.toml`` for 2 steps (no evaluation, no
checkpoints), so that start-up is most of the run, with 2 and 4 local workers; the
two start methods alternate within each pair of runs, in this one invocation. Wall
time is the launcher's, start to exit; CPU time is the whole process tree's (user +
system, from ``getrusage(RUSAGE_CHILDREN)``: every worker and the template are
waited for). Medians over ``--repeats`` pairs, and their ratios fork / spawn. JSON on
the last line::

    {"benchmark": "launch_start", ..., "results": {"rows": [...], "ratios": [...]}}

    python benchmarks/launch_start.py [--repeats 5] [--workers 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT

STARTS = ("spawn", "fork")


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch(config: str, workers: int, out: Path, start: str, data: Path) -> tuple[float, float]:
    """One run: (wall seconds, CPU seconds of its whole process tree)."""
    cmd = [sys.executable, "-m", "farflung.cli.main", "train", config]
    cmd += ["--workers", str(workers), "--out", str(out), "--quiet", "--force"]
    for item in ("train.steps=2", "train.eval_every=0", "train.checkpoint_every=0"):
        cmd += ["--set", item]
    cmd += ["--set", f"data.dir={data}"]
    env = {**os.environ, "FARFLUNG_WORKER_START": start}
    cpu, wall = cpu_of_children(), time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - wall, cpu_of_children() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.toml")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    args = p.parse_args()
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        launch(args.config, 2, Path(tmp) / "warm", "spawn", data)  # prepares the data
        for workers in args.workers:
            got: dict[str, list[tuple[float, float]]] = {s: [] for s in STARTS}
            for rep in range(args.repeats):
                order = STARTS if rep % 2 == 0 else STARTS[::-1]
                for start in order:
                    out = Path(tmp) / f"{start}{workers}_{rep}"
                    got[start].append(launch(args.config, workers, out, start, data))
            medians = {}
            for start in STARTS:
                wall = statistics.median(w for w, _ in got[start])
                cpu = statistics.median(c for _, c in got[start])
                medians[start] = (wall, cpu)
                rows.append(
                    {
                        "workers": workers,
                        "start": start,
                        "wall_s_median": wall,
                        "cpu_s_median": cpu,
                        "wall_s": [w for w, _ in got[start]],
                        "cpu_s": [c for _, c in got[start]],
                    }
                )
                print(
                    f"{workers} workers, {start}: wall {wall:.2f} s, CPU {cpu:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
            ratios.append(
                {
                    "workers": workers,
                    "wall": medians["fork"][0] / medians["spawn"][0],
                    "cpu": medians["fork"][1] / medians["spawn"][1],
                }
            )
    print(
        json.dumps(
            {
                "benchmark": "launch_start",
                "config": args.config,
                "steps": 2,
                "repeats": args.repeats,
                "cores": os.cpu_count(),
                "results": {"rows": rows, "ratios": ratios},
            }
        )
    )


if __name__ == "__main__":
    main()
