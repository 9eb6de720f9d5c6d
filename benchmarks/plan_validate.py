"""The planner's predicted step time against measured pipeline x data-parallel runs.

For each configuration below, uneven per-pair links between N hosts (one device per
host) are written as a link file, ``farflung plan`` places the devices (``--stages``
x ``--dp`` fixed), and ``farflung train`` runs the plan's placement and rank order's
(the planner's baseline, written into the placement file) behind the same links:
shaped by the network lab (per-destination htb classes, delays in-process) or by the
in-process link model (``--link-model``) where the lab is not the point. With
``--with-dtfm``, DT-FM's layout (GCMA, :func:`~farflung.plan.search.dtfm_search`, as
``farflung plan`` writes it among the baselines) runs too, behind the same links, and
the plan rows get ``dtfm_over_plan_measured``/``_predicted``. Measured:
the median step wall time after the first ``--skip`` steps. Predicted: the plan
file's ``total`` for that placement, under the schedule cost model
(:mod:`farflung.plan.timeline`).

Compute calibration, the one fitted figure: four or six workers share 2 cores here,
so a device's speed is not a property of the chip alone. First every host gets the
TFLOP/s this CPU reaches on one forward+backward of the whole model on one
micro-batch with one thread (the workers' setting), divided by the planner's assumed
efficiency; then one unshaped run of the configuration (loopback, no link costs)
measures the compute-only step, and every device's speed is scaled so that the
planner's compute-only step equals it (``speed_scale``; ``one_thread_compute_s`` is
the unscaled prediction). The placements and all link terms are then predicted, not
fitted: the shaped runs test the communication model and the ranking of placements.

JSON on the last line::

    {"results": [{"config": ..., "placement": "plan" | "rank order" | "dtfm", "predicted_s": ...,
                  "measured_s": ..., "error": predicted / measured - 1, ...}, ...]}

    python benchmarks/plan_validate.py [--steps 8] [--configs two-sites ...] [--with-dtfm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, train

from farflung.cli.plan import EFFICIENCY
from farflung.config import load_config
from farflung.model import GPT
from farflung.netlab.link import LinkMatrix
from farflung.plan.placement import Slot, StageMap
from farflung.plan.workload import workload

MODEL = [
    "model.n_layer=6",
    "model.d_model=128",
    "model.n_head=4",
    "model.context=128",
    "model.tie_embeddings=false",  # a tied head adds a first-last exchange (see docs)
    "train.batch_size=16",
    "pipeline.micro_batches=4",
    "pipeline.compression=none",
]
INTRA, DELAY = "200mbit", "2ms"


def sites_matrix(sites: list[list[int]], cross: dict[tuple[int, int], str]) -> LinkMatrix:
    """Hosts d0..dN-1 in sites; pairs inside a site at INTRA, across sites as ``cross``
    says for the two site indices; every delay DELAY."""
    n = sum(len(s) for s in sites)
    site = {h: k for k, s in enumerate(sites) for h in s}
    bw = [
        [
            None
            if i == j
            else INTRA
            if site[i] == site[j]
            else cross[tuple(sorted((site[i], site[j])))]
            for j in range(n)
        ]
        for i in range(n)
    ]
    delay = [[0 if i == j else DELAY for j in range(n)] for i in range(n)]
    return LinkMatrix(bw, delay, [f"d{i}" for i in range(n)])


def uneven_matrix(n: int) -> LinkMatrix:
    """Every pair its own bandwidth (4-40 Mbit, one per unordered pair) and delay."""
    rates = [4, 40, 8, 30, 12, 20]
    delays = ["5ms", "2ms", "10ms", "3ms", "8ms", "4ms"]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    bw = [[None] * n for _ in range(n)]
    delay = [[0] * n for _ in range(n)]
    for k, (i, j) in enumerate(pairs):
        bw[i][j] = bw[j][i] = f"{rates[k % len(rates)]}mbit"
        delay[i][j] = delay[j][i] = delays[k % len(delays)]
    return LinkMatrix(bw, delay, [f"d{i}" for i in range(n)])


# name: (stages, dp, links, network flag, extra overrides)
CONFIGS = {
    # rank order puts each data-parallel pair across the sites, the plan each pipeline
    "two-sites": (2, 2, lambda: sites_matrix([[0, 2], [1, 3]], {(0, 1): "10mbit"}), "--netlab", []),
    # three sites in a chain: X-Y and Y-Z 20 Mbit, X-Z 4 Mbit
    "three-sites": (
        3,
        2,
        lambda: sites_matrix(
            [[0, 3], [1, 4], [2, 5]], {(0, 1): "20mbit", (1, 2): "20mbit", (0, 2): "4mbit"}
        ),
        "--netlab",
        [],
    ),
    # every pair different, GPipe, in the link model
    "uneven-gpipe": (2, 2, lambda: uneven_matrix(4), "--link-model", ["pipeline.schedule=gpipe"]),
}


def calibrate(config: str, overrides: list[str]) -> tuple[float, float]:
    """(TFLOP/s reached, seconds) for one forward+backward of the whole model on one
    micro-batch, one thread, median of 5 after a warm-up."""
    cfg = load_config(config, [*overrides, "model.vocab_size=4096"])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    mb = cfg.train.batch_size // 2 // cfg.pipeline.micro_batches  # dp = 2 everywhere here
    x = torch.randint(0, cfg.model.vocab_size, (mb, cfg.model.context))
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        times.append(time.perf_counter() - t0)
    secs = statistics.median(times[1:])
    flops = sum(workload(cfg, 1, 2).stage_flops)
    return flops / secs / 1e12, secs


def placement_file(path: Path, stages: list[list[str]]) -> Path:
    """A placement with ``stages[k]`` = the device (host) names of stage k."""
    dp = len(stages[0])
    slots = [
        Slot(k * dp + r, k, r, host)
        for k, hosts in enumerate(stages)
        for r, host in enumerate(hosts)
    ]
    return StageMap(len(stages), dp, tuple(slots)).to_file(path)


def measured(records: list[dict], skip: int) -> float:
    return statistics.median(r["wall_s"] for r in records[skip:])


def write_devices(path: Path, n: int, tflops: float) -> Path:
    path.write_text(
        json.dumps({"devices": [{"name": f"d{i}", "tflops": tflops} for i in range(n)]})
    )
    return path


def plan(args, name: str, overrides: list[str], links: Path, devices: Path, out: Path) -> dict:
    """Run ``farflung plan`` with the configuration's fixed shape; its placement file."""
    stages, dp = CONFIGS[name][:2]
    cmd = [sys.executable, "-m", "farflung.cli.main", "plan", args.config, "--links", str(links)]
    cmd += ["--devices", str(devices), "--stages", str(stages), "--dp", str(dp)]
    cmd += ["--budget-s", "2", "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=sys.stderr)
    return json.loads(out.read_text())


def run_config(name: str, args: argparse.Namespace, tflops: float, tmp: Path) -> list[dict]:
    """The unshaped run (compute calibration), the plan, then the plan's and rank
    order's placements behind the links."""
    stages, dp, make_links, flag, extra = CONFIGS[name]
    n, overrides = stages * dp, [*MODEL, f"pipeline.stages={stages}", *extra]
    links = make_links().to_file(tmp / f"{name}.links.json")
    first = plan(
        args, name, overrides, links, write_devices(tmp / "d.json", n, tflops), tmp / "p.json"
    )
    log(f"{name}: unshaped run (compute calibration)")
    plain, _ = train(args.config, n, args.steps, tmp / name / "unshaped", overrides)
    compute_s = measured(plain, args.skip)
    # one speed for every device, fitted so the predicted compute-only step (bubble
    # included) equals the measured one: it absorbs the 2 cores' contention, the
    # optimizer step and the per-step overhead; everything shaped is then predicted
    scale = first["predicted"]["compute"] / compute_s
    log(f"{name}: farflung plan, devices at {scale:.3f} x the one-thread calibration")
    devices = write_devices(tmp / f"{name}.devices.json", n, tflops * scale)
    planned = plan(args, name, overrides, links, devices, tmp / f"{name}.plan.json")
    rank = planned["baselines"]["rank order"]
    runs = [
        ("plan", planned["predicted"], tmp / f"{name}.plan.json"),
        ("rank order", rank, placement_file(tmp / f"{name}.rank.json", rank["stages"])),
    ]
    if args.with_dtfm:  # DT-FM's search (GCMA port) on the same problem, same lab
        dtfm = planned["baselines"]["dtfm"]
        runs.append(("dtfm", dtfm, placement_file(tmp / f"{name}.dtfm.json", dtfm["stages"])))
    rows = []
    for label, figs, path in runs:
        log(f"{name}: {label} behind the links ({flag})")
        recs, summary = train(
            args.config,
            n,
            args.steps,
            tmp / name / label.replace(" ", "_"),
            overrides,
            ["--placement", str(path), flag, str(links)],
        )
        rows.append(
            {
                "config": name,
                "shape": f"{stages}x{dp}",
                "placement": label,
                "schedule": "gpipe" if "pipeline.schedule=gpipe" in extra else "1f1b",
                "network": flag.strip("-"),
                "predicted_s": figs["total"],
                "measured_s": measured(recs, args.skip),
                "predicted_compute_s": figs["compute"],
                "predicted_pp_s": figs["pp"],
                "predicted_dp_s": figs["dp"],
                "unshaped_s": compute_s,
                "one_thread_compute_s": first["predicted"]["compute"],
                "speed_scale": scale,
                "stages": figs["stages"],
            }
        )
    for r in rows:
        r["error"] = r["predicted_s"] / r["measured_s"] - 1
        log(f"result {json.dumps(r)}")
    return rows


def log(msg: str) -> None:
    print(f"[plan_validate] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/small.toml")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=int, default=2, help="steps left out of the median")
    p.add_argument(
        "--with-dtfm",
        action="store_true",
        help="also run DT-FM's layout (its GCMA search, from the plan file's baselines)",
    )
    args = p.parse_args()
    tflops, secs = calibrate(args.config, [*MODEL, "pipeline.stages=1"])
    device_tflops = tflops / EFFICIENCY
    log(f"calibration: {secs * 1e3:.1f} ms per micro-batch, {tflops * 1e3:.2f} GFLOP/s achieved")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            results += run_config(name, args, device_tflops, Path(tmp))
    for r in results:
        if r["placement"] == "plan":
            rank = next(
                x for x in results if x["config"] == r["config"] and x["placement"] == "rank order"
            )
            r["rank_over_plan_measured"] = rank["measured_s"] / r["measured_s"]
            r["rank_over_plan_predicted"] = rank["predicted_s"] / r["predicted_s"]
            dtfm = [x for x in results if x["config"] == r["config"] and x["placement"] == "dtfm"]
            if dtfm:
                r["dtfm_over_plan_measured"] = dtfm[0]["measured_s"] / r["measured_s"]
                r["dtfm_over_plan_predicted"] = dtfm[0]["predicted_s"] / r["predicted_s"]
    print(
        json.dumps(
            {"benchmark": "plan_validate", "calibration_gflops": tflops * 1e3, "results": results}
        )
    )


if __name__ == "__main__":
    main()
