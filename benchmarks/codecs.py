"""Benchmark farflung's codecs on one core.

For each codec on a float32 tensor of normal values: compression ratio against fp32,
bits per element, encode+decode throughput in MB/s of fp32 input (median of a few
repetitions) and relative error ||x - x_hat|| / ||x||. A table goes to stderr and one
JSON line to stdout::

    python benchmarks/codecs.py [--numel 10000000] [--reps 5] [--threads 1] [--device cuda]

``--device cuda`` runs the same codecs on a GPU (timings synchronise the device).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from farflung.compress import COCKTAIL, CodecContext, make_codec

SPECS = [
    "fp16",
    "bf16",
    "quantize:bits=8",
    "quantize:bits=4",
    "quantize:bits=2",
    "quantize:bits=4,rounding=stochastic",
    "topk:ratio=0.01",
    "randomk:p=0.1,mode=rolling",
    "randomk:p=0.1,mode=random",
    COCKTAIL,
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(spec: str, x: torch.Tensor, reps: int) -> dict[str, float | str]:
    """Time ``reps`` encode+decode round trips (after one warm-up) of ``x``."""
    codec = make_codec(spec)
    n = x.numel()
    times = []
    for step in range(reps + 1):
        ctx = CodecContext(step=step, seed=0)  # a new mask each step, as in training
        _sync(x.device)
        start = time.perf_counter()
        payload = codec.encode(x, ctx)
        decoded = codec.decode(payload, ctx)
        _sync(x.device)
        elapsed = time.perf_counter() - start
        if step:
            times.append(elapsed)
    nbytes = payload.numel()
    return {
        "codec": codec.spec,
        "ratio": round(4 * n / nbytes, 3),
        "bits_per_elem": round(8 * nbytes / n, 4),
        "mb_per_s": round(4 * n / 1e6 / statistics.median(times), 1),
        "rel_error": round(float((x - decoded).norm() / x.norm()), 5),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=10_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0)).to(args.device)
    results = [measure(spec, x, args.reps) for spec in SPECS]

    print(
        f"codecs on {args.numel:,} float32 values on {args.device}, {args.threads} thread(s), "
        f"median of {args.reps}",
        file=sys.stderr,
    )
    print(f"{'codec':<72} {'ratio':>8} {'bits/el':>8} {'MB/s':>8} {'rel err':>8}", file=sys.stderr)
    for r in results:
        print(
            f"{r['codec']:<72} {r['ratio']:>8.1f} {r['bits_per_elem']:>8.3f} "
            f"{r['mb_per_s']:>8.0f} {r['rel_error']:>8.4f}",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "benchmark": "codecs",
                "numel": args.numel,
                "device": args.device,
                "threads": args.threads,
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
