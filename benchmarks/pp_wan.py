"""Pipeline parallelism over a slow boundary link: AQ-SGD against plain and quantized
activations, and, with ``--dp 2``, pipeline x data parallelism end to end.

A GPT split into 2 stages (GPipe, M micro-batches, the schedule AQ-SGD used) trains on
the first ``--max-samples`` samples of the bundled corpus for ``--epochs`` epochs, so
every sample is revisited (AQ-SGD's buffers gain from revisits, as in fine-tuning).
Modes: none (fp32), fp16, quantize fw4/bw8 and fw3/bw6, aqsgd fw4/bw8 and fw3/bw6. Per
mode and link: samples/s, speed-up against none and against fp16, bytes per step by
direction, final validation loss and its ratio to none.

How it is timed: training does not depend on the link (the same bits arrive either
way; the runs are deterministic), only its time does. So epochs 1 .. E-1 train
unshaped, the last epoch is resumed behind the link (steady state: every sample
revisited) and ends with the run's final validation loss, and a first epoch (first
visits: AQ-SGD sends fp16) is timed behind the link from scratch. The whole run's time
is first + (E-1) x last. Links are shaped by the network lab (``--mode netlab``:
namespaces + tc, the in-process link model without root).

The regime: a CPU computes ~1000x slower than the GPUs AQ-SGD used, so at 100 Mbit the
boundary traffic of this small model hides behind compute here. The default link
(``--link 4mbit,10ms``) makes the fp32 baseline spend >= 75% of its step waiting on the
link (``link_wait_fraction`` = 1 - unshaped step / shaped step), as a GPU pipeline does
over a slow network; the 100 Mbit row is reported beside it.

With ``--dp 2`` (4 workers: 2 stages x 2 replicas, every rank on its own host, all
links shaped alike) the pairs are {none + allreduce, aqsgd + cocktail}: end-to-end
speed-up and loss ratio.

The head is untied (``model.tie_embeddings = false``): a tied head's gradient would be
summed over the same boundary link every step (vocab x d_model fp32 each way, counted
as ``pp_tied``), traffic AQ-SGD does not compress.

JSON on the last line::

    {"results": [{"mode": "aqsgd", "fwd_bits": 4, "bwd_bits": 8, "link": ...,
                  "speedup": ..., "speedup_vs_fp16": ..., "val_loss_ratio": ...,
                  "bytes_pp_fwd": ..., "bytes_pp_bwd": ...}, ...]}

    python benchmarks/pp_wan.py [--link 4mbit,10ms] [--links 100mbit,10ms] [--dp 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import train

MODES = {
    "none": ("none", 32, 32),
    "fp16": ("fp16", 16, 16),
    "quantize-4-8": ("quantize", 4, 8),
    "quantize-3-6": ("quantize", 3, 6),
    "aqsgd-4-8": ("aqsgd", 4, 8),
    "aqsgd-3-6": ("aqsgd", 3, 6),
}
DP_PAIRS = {
    "none+allreduce": ("none", 32, 32, "allreduce"),
    "aqsgd-4-8+cocktail": ("aqsgd", 4, 8, "cocktail"),
}
MODEL = [
    "model.n_layer=4",
    "model.d_model=128",
    "model.n_head=4",
    "model.context=128",
    "model.tie_embeddings=false",
    "train.batch_size=16",
    "optim.warmup_steps=4",
]


def overrides_for(spec: tuple, args: argparse.Namespace) -> list[str]:
    compression, fwd, bwd = spec[:3]
    algorithm = spec[3] if len(spec) > 3 else "allreduce"
    return MODEL + [
        "pipeline.stages=2",
        f"pipeline.schedule={args.schedule}",
        f"pipeline.micro_batches={args.micro_batches}",
        f"pipeline.compression={compression}",
        f"pipeline.fwd_bits={min(fwd, 8)}",
        f"pipeline.bwd_bits={min(bwd, 8)}",
        f"data.max_samples={args.max_samples}",
        f"parallel.algorithm={algorithm}",
        f"optim.decay_steps={total_steps(args)}",  # one schedule when a run is extended
        *args.set,
    ]


def steps_per_epoch(args: argparse.Namespace) -> int:
    return max(1, args.max_samples // 16)  # a global batch of 16 samples


def total_steps(args: argparse.Namespace) -> int:
    return args.epochs * steps_per_epoch(args)


def train_unshaped(name: str, spec: tuple, args: argparse.Namespace, out: Path) -> Path:
    """Epochs 1 .. E-1 without a shaped link: the training does not depend on the link
    (the same bits either way), only its time does."""
    print(f"[pp_wan] {name}: epochs 1-{args.epochs - 1} unshaped", file=sys.stderr, flush=True)
    steps = total_steps(args) - steps_per_epoch(args)
    train(args.config, 2 * args.dp, steps, out, overrides_for(spec, args))
    return out


def run(name: str, spec: tuple, link: str, args: argparse.Namespace, trained: Path, out: Path):
    """Time one mode behind one link: a first epoch from scratch (first visits), and
    the last epoch resumed from ``trained`` (steady state: every sample revisited), whose
    end is the run's final validation loss. The whole run's time is estimated as
    first + (E-1) x last."""
    per_epoch, overrides = steps_per_epoch(args), overrides_for(spec, args)
    net = [] if link == "unshaped" else [f"--{args.mode}", link]
    workers = 2 * args.dp
    print(f"[pp_wan] {name} @ {link}", file=sys.stderr, flush=True)
    first, _ = train(args.config, workers, per_epoch, out / "first", overrides, net)
    shutil.copytree(trained, out / "run")
    records, summary = train(
        args.config, workers, total_steps(args), out / "run", overrides, [*net, "--resume"]
    )
    last = records[-per_epoch:]
    t_first, t_last = (sum(r["wall_s"] for r in rs) for rs in (first, last))
    wall = t_first + (args.epochs - 1) * t_last

    def mean(key: str, rs: list[dict]) -> float:
        return statistics.mean(r["bytes_by_kind"][key] for r in rs)

    return {
        "mode": spec[0],
        "name": name,
        "algorithm": spec[3] if len(spec) > 3 else "allreduce",
        "fwd_bits": spec[1],
        "bwd_bits": spec[2],
        "link": link,
        "steps": total_steps(args),
        "samples_per_s": 16 * total_steps(args) / wall,
        "steady_samples_per_s": 16 * per_epoch / t_last,
        "first_epoch_step_s": t_first / per_epoch,
        "step_s": t_last / per_epoch,
        "comm_fraction": statistics.mean(r["comm_s"] / r["wall_s"] for r in last),
        "bytes_pp_fwd": (mean("pp_fwd", first) + (args.epochs - 1) * mean("pp_fwd", last))
        / args.epochs,
        "bytes_pp_bwd": mean("pp_bwd", last),
        "bytes_pp_fwd_first_epoch": mean("pp_fwd", first),
        "bytes_pp_fwd_later": mean("pp_fwd", last),
        "bytes_dp": mean("dp", last),
        "val_loss": summary["final_val_loss"],
        "network": summary.get("network", "unshaped"),
    }


def compare(results: list[dict], base: str, fp16: str | None) -> None:
    """Ratios against the baseline (and fp16) on the same link."""
    by = {(r["name"], r["link"]): r for r in results}
    for r in results:
        b = by[(base, r["link"])]
        r["speedup"] = r["samples_per_s"] / b["samples_per_s"]
        r["val_loss_ratio"] = r["val_loss"] / b["val_loss"]
        if (fp16, r["link"]) in by:
            r["speedup_vs_fp16"] = r["samples_per_s"] / by[(fp16, r["link"])]["samples_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/small.toml")
    p.add_argument("--link", default="4mbit,10ms", help="the GPU-regime link (see above)")
    p.add_argument("--links", nargs="*", default=["100mbit,10ms"], help="further links")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--dp", type=int, default=1, choices=[1, 2])
    p.add_argument("--max-samples", type=int, default=256)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--schedule", default="gpipe", choices=["gpipe", "1f1b"])
    p.add_argument("--mode", choices=["netlab", "link-model"], default="netlab")
    p.add_argument("--set", action="append", default=[], help="extra overrides")
    args = p.parse_args()
    runs = DP_PAIRS if args.dp > 1 else {m: MODES[m] for m in args.modes}
    base = "none+allreduce" if args.dp > 1 else "none"
    fp16 = "fp16" if "fp16" in runs else None
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in runs.items():
            trained = train_unshaped(name, spec, args, Path(tmp) / name / "trained")
            # the baseline unshaped too: how much of its shaped step waits on the link
            links = ["unshaped"] if name == base else []
            for link in [*links, args.link, *args.links]:
                out = Path(tmp) / name / link.replace(",", "_")
                results.append(run(name, spec, link, args, trained, out))
                print(f"[pp_wan] result {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    compare(results, base, fp16)
    unshaped = next(r for r in results if r["link"] == "unshaped")
    for r in results:
        if r["name"] == base:
            r["link_wait_fraction"] = 1 - unshaped["step_s"] / r["step_s"]
    results.remove(unshaped)
    for r in results:
        print(
            f"{r['name']:>20} @ {r['link']:>13}: {r['samples_per_s']:6.1f} samples/s "
            f"({r['speedup']:.2f}x), fwd {r['bytes_pp_fwd'] / 1e6:.3f} MB/step, "
            f"bwd {r['bytes_pp_bwd'] / 1e6:.3f} MB/step, val {r['val_loss']:.4f} "
            f"({r['val_loss_ratio']:.4f}x), waiting {r['comm_fraction']:.0%}  [{r['network']}]",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "benchmark": "pp_dp_wan" if args.dp > 1 else "pp_wan",
                "config": args.config,
                "overrides": MODEL + args.set,
                "schedule": args.schedule,
                "micro_batches": args.micro_batches,
                "max_samples": args.max_samples,
                "epochs": args.epochs,
                "unshaped_baseline_step_s": unshaped["step_s"],
                "estimate": "samples/s = all steps / (first epoch + (epochs - 1) x last "
                "epoch), both timed behind the link; epochs 2 .. E-1 trained unshaped",
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
