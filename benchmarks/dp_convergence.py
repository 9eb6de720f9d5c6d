"""Convergence and bytes of the data-parallel algorithms at equal tokens.

Trains the same config (same seed, data order and number of steps) once per
algorithm with ``farflung train`` in this one invocation, then reports each run's
final validation loss and bytes sent per step per rank, and their ratios to the
``allreduce`` run (fp32 gradient all-reduce). JSON on the last line::

    {"results": [{"algorithm": ..., "val_loss": ..., "val_loss_ratio": ...,
                  "bytes_per_step": ..., "bytes_ratio": ...}, ...]}

``bytes_ratio`` is allreduce's bytes divided by the algorithm's (how many times
fewer bytes it sends); ``val_loss_ratio`` is the algorithm's loss over allreduce's.

``--seeds N`` repeats everything with ``train.seed`` + 0 .. N-1 (initial weights and
data order both follow it): each row then holds the mean ratio over the seeds,
``val_loss_ratio_std`` (sample standard deviation), ``val_loss_ratios`` (one per
seed, each against the same seed's allreduce) and ``val_loss`` as the mean.
``--variant NAME=KEY=VALUE,KEY=VALUE`` adds a row of any overrides.

    python benchmarks/dp_convergence.py [--config configs/small.toml] [--steps 150]
                                        [--workers 2] [--only cocktail diloco]
                                        [--cocktail-codec SPEC ...] [--seeds 3]
                                        [--variant NAME=KEY=VALUE,... ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import train

from farflung.config import load_config

# name -> config overrides; every run shares the rest of the config
VARIANTS: dict[str, list[str]] = {
    "allreduce": ["parallel.algorithm=allreduce"],
    "compressed": ["parallel.algorithm=compressed", "parallel.codec=quantize:bits=4"],
    "cocktail": ["parallel.algorithm=cocktail"],
    "diloco": ["parallel.algorithm=diloco", "parallel.local_steps=10"],
    "diloco+cocktail": [
        "parallel.algorithm=diloco",
        "parallel.local_steps=10",
        "parallel.codec=cocktail",
    ],
}


def run(name: str, args: argparse.Namespace, out: Path, seed: int | None = None) -> dict:
    seeded = [] if seed is None else [f"train.seed={seed}"]
    what = " ".join(VARIANTS[name] + seeded)
    print(f"[dp_convergence] {name}: {what}", file=sys.stderr, flush=True)
    records, summary = train(
        args.config,
        args.workers,
        args.steps,
        out,
        VARIANTS[name] + [f"train.eval_batches={args.eval_batches}", *args.set, *seeded],
    )
    dp_bytes = sum(r["bytes_by_kind"]["dp"] for r in records)
    return {
        "algorithm": name,
        "val_loss": summary["final_val_loss"],
        "train_loss_last10": sum(r["loss"] for r in records[-10:]) / min(10, len(records)),
        # data-parallel traffic only (telemetry is the same small amount for everyone)
        "bytes_per_step": dp_bytes / len(records) / args.workers,
        "step_s": statistics.median(r["wall_s"] for r in records[3:]),
        # encoding/decoding CPU time (on any thread) as a share of the training time;
        # summed rather than a median, so periodic syncs (diloco) count
        "codec_share": sum(r.get("codec_s", 0.0) for r in records[3:])
        / sum(r["wall_s"] for r in records[3:]),
        "tokens": summary["tokens"],
        "wall_s": summary["wall_s"],
    }


def run_seeds(names: list[str], args: argparse.Namespace, root: Path) -> list[dict]:
    """Every variant at every seed; one row per variant with its ratios to the same
    seed's allreduce, averaged over the seeds."""
    base_seed = load_config(args.config, args.set).train.seed
    per_seed = []
    for k in range(args.seeds):
        seed = base_seed + k if args.seeds > 1 else None
        rows = [run(n, args, root / f"seed{k}" / _folder(n), seed) for n in names]
        for r in rows:
            r["val_loss_ratio"] = r["val_loss"] / rows[0]["val_loss"]
            r["bytes_ratio"] = rows[0]["bytes_per_step"] / r["bytes_per_step"]
            print(f"[dp_convergence] result {json.dumps(r)}", file=sys.stderr, flush=True)
        per_seed.append(rows)
    if args.seeds == 1:
        return per_seed[0]
    out = []
    for i, name in enumerate(names):
        rows = [rows[i] for rows in per_seed]
        ratios = [r["val_loss_ratio"] for r in rows]
        row = {**rows[0], "algorithm": name, "seeds": args.seeds}
        for key in ("val_loss", "val_loss_ratio", "bytes_per_step", "bytes_ratio", "step_s"):
            row[key] = statistics.mean(r[key] for r in rows)
        row["val_loss_ratios"] = ratios
        row["val_loss_ratio_std"] = statistics.stdev(ratios)
        out.append(row)
    return out


def spread(row: dict) -> str:
    return f" ± {row['val_loss_ratio_std']:.3f}" if "val_loss_ratio_std" in row else ""


def _folder(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/small.toml")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument(
        "--only",
        nargs="+",
        choices=list(VARIANTS),
        help="subset (allreduce is always run as the baseline)",
    )
    p.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    p.add_argument("--keep", help="keep the run folders here (for `farflung report`)")
    p.add_argument(
        "--cocktail-codec",
        action="append",
        default=[],
        metavar="SPEC",
        help="also run cocktail with this codec (a row named cocktail[SPEC]); repeatable",
    )
    p.add_argument("--seeds", type=int, default=1, help="repeat with this many seeds")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="a row NAME with comma-separated KEY=VALUE overrides; repeatable",
    )
    args = p.parse_args()
    for spec in args.cocktail_codec:
        VARIANTS[f"cocktail[{spec}]"] = ["parallel.algorithm=cocktail", f"parallel.codec={spec}"]
    extra = [f"cocktail[{spec}]" for spec in args.cocktail_codec]
    for v in args.variant:
        name, _, overrides = v.partition("=")
        VARIANTS[name] = overrides.split(",")
        extra.append(name)
    names = ["allreduce"] + [n for n in (args.only or VARIANTS) if n != "allreduce"]
    names += [n for n in extra if args.only and n not in names]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        results = run_seeds(names, args, root)
    for r in results:
        print(
            f"{r['algorithm']:>16}: val loss {r['val_loss']:.4f} ({r['val_loss_ratio']:.3f}x"
            f"{spread(r)}), {r['bytes_per_step'] / 1e3:,.1f} kB/step/rank "
            f"({r['bytes_ratio']:,.0f}x fewer)",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "benchmark": "dp_convergence",
                "config": args.config,
                "steps": args.steps,
                "workers": args.workers,
                "seeds": args.seeds,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
