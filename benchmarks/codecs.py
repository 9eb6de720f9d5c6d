"""Benchmark farflung's codecs on one core.

For each codec on a float32 tensor of normal values: compression ratio against fp32,
bits per element, encode+decode throughput in MB/s (and GB/s) of fp32 input (median of
a few repetitions), relative error ||x - x_hat|| / ||x||, and the throughput's ratio to
a same-size ``copy_`` on the same device and threads, timed the same way in the same
run (``copy_ratio``): the memory-bandwidth limit a codec that reads its input once
would meet. A table goes to stderr and one JSON line to stdout::

    python benchmarks/codecs.py [--numel 10000000[,100000000]] [--reps 5] [--threads 1]
                                [--device cuda]

``--device cuda`` runs the same codecs on a GPU (timings synchronise the device).
``--compile-codecs`` adds rows (``"compiled": true``) for the quantize codecs and the
cocktail chain with ``parallel.compile_codecs``' kernels (farflung/compress/fused.py;
their compiling falls in the untimed warm-up round trip).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from farflung.compress import COCKTAIL, CodecContext, fused, make_codec

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
COMPILED = ["quantize:bits=8", "quantize:bits=4", "quantize:bits=2", COCKTAIL]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_seconds(x: torch.Tensor, reps: int) -> float:
    """Median time of ``reps`` ``copy_`` of ``x`` into a same-size buffer (one warm-up)."""
    dst = torch.empty_like(x)
    times = []
    for step in range(reps + 1):
        _sync(x.device)
        start = time.perf_counter()
        dst.copy_(x)
        _sync(x.device)
        if step:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    seconds = statistics.median(times)
    return {
        "codec": codec.spec,
        "numel": n,
        "ratio": round(4 * n / nbytes, 3),
        "bits_per_elem": round(8 * nbytes / n, 4),
        "mb_per_s": round(4 * n / 1e6 / seconds, 1),
        "gb_per_s": round(4 * n / 1e9 / seconds, 4),
        "seconds": seconds,
        "rel_error": round(float((x - decoded).norm() / x.norm()), 5),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--numel", default="10000000", help="elements, or several comma-separated sizes"
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU")
    parser.add_argument("--compile-codecs", action="store_true", help="add compiled rows")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    sizes = [int(v) for v in args.numel.split(",")]
    results, copies = [], {}
    for n in sizes:
        x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(args.device)
        copy_s = copy_seconds(x, args.reps)
        copies[str(n)] = {"seconds": copy_s, "gb_per_s": round(4 * n / 1e9 / copy_s, 3)}
        runs = [(spec, False) for spec in SPECS]
        runs += [(spec, True) for spec in COMPILED] if args.compile_codecs else []
        for spec, compiled in runs:
            fused.set_mode("true" if compiled else "false")
            r = measure(spec, x, args.reps)
            r["compiled"] = compiled
            r["copy_ratio"] = round(copy_s / r["seconds"], 5)
            results.append(r)
        fused.set_mode("false")
        del x
    _table(results, copies, args)
    print(
        json.dumps(
            {
                "benchmark": "codecs",
                "numel": sizes[0] if len(sizes) == 1 else sizes,
                "device": args.device,
                "threads": args.threads,
                "reps": args.reps,
                "copy": copies,
                "results": results,
            }
        )
    )
    return 0


def _table(results: list[dict], copies: dict[str, dict], args: argparse.Namespace) -> None:
    print(
        f"codecs on {args.device}, {args.threads} thread(s), median of {args.reps}; "
        + ", ".join(f"copy_ of {int(n):,}: {c['gb_per_s']} GB/s" for n, c in copies.items()),
        file=sys.stderr,
    )
    head = f"{'codec':<64} {'numel':>11} {'ratio':>7} {'bits/el':>8} {'MB/s':>7} {'x copy':>7}"
    print(head + f" {'rel err':>8}", file=sys.stderr)
    for r in results:
        name = r["codec"] + (" (compiled)" if r["compiled"] else "")
        print(
            f"{name:<64} {r['numel']:>11,} {r['ratio']:>7.1f} {r['bits_per_elem']:>8.3f} "
            f"{r['mb_per_s']:>7.0f} {r['copy_ratio']:>7.4f} {r['rel_error']:>8.4f}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    raise SystemExit(main())
