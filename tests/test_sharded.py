"""The compressed sharded all-reduce on real gloo groups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from farflung.comm import Comm
from farflung.comm.sharded import ShardedAllReduce, chunk_contexts, chunk_sizes
from farflung.compress import make_codec

NUMEL = 1001  # divisible by none of 2, 3, 4


def _inputs(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    return torch.randn(NUMEL, generator=g) * (rank + 1)


def sharded_worker(rank: int, world: int, spec: str) -> dict:
    x = _inputs(rank)
    reference = x.clone()
    dist.all_reduce(reference)
    reference /= world
    comm = Comm()
    op = ShardedAllReduce(comm, NUMEL, make_codec(spec), server_feedback=True)
    avg, sent = op(x, step=3, seed=7)
    snap = comm.meter.snapshot()
    return {
        "avg": avg,
        "sent": sent,
        "ref": reference,
        "x": x,
        "bytes_sent": snap.sent,
        "bytes_recv": snap.recv,
        "codec_s": snap.work["codec"],
    }


def expected_bytes(spec: str, world: int, rank: int) -> int:
    """Phase 1: our payload for every other owner's chunk; phase 2: our aggregate to
    every other rank -- the codec's own size formula for each chunk."""
    codec = make_codec(spec)
    chunks = chunk_sizes(NUMEL, world)
    ctxs = chunk_contexts(3, 7, world)
    sizes = [codec.payload_nbytes(chunks[j], ctxs[j]) for j in range(world)]
    return sum(sizes[j] for j in range(world) if j != rank) + (world - 1) * sizes[rank]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_identity_equals_all_reduce_average(world):
    results = run_distributed(sharded_worker, world, "identity")
    for r, res in enumerate(results):
        torch.testing.assert_close(res["avg"], res["ref"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res["sent"], res["x"])
        assert res["codec_s"] > 0  # encoding/decoding time is accounted
        assert res["bytes_sent"] == expected_bytes("identity", world, r)
    # every byte sent is received by someone
    assert sum(r["bytes_sent"] for r in results) == sum(r["bytes_recv"] for r in results)


@pytest.mark.parametrize("world", [2, 3])
def test_quantized_within_codec_bound(world):
    results = run_distributed(sharded_worker, world, "quantize:bits=8")
    ref = results[0]["ref"]
    # phase 1 rounds each contribution, phase 2 the aggregate: half a step each
    max_in = max(r["x"].abs().max().item() for r in results)
    bound = (max_in + ref.abs().max().item()) / 127 / 2 * 1.01
    for r, res in enumerate(results):
        torch.testing.assert_close(res["avg"], results[0]["avg"])  # all ranks agree
        assert (res["avg"] - ref).abs().max().item() <= bound
        assert res["bytes_sent"] == expected_bytes("quantize:bits=8", world, r)
        # 8-bit sends about a quarter of what fp32 would
        assert res["bytes_sent"] < expected_bytes("identity", world, r) / 3


def test_cocktail_sends_a_fraction_of_a_bit_per_element():
    results = run_distributed(sharded_worker, 2, "cocktail")
    for r, res in enumerate(results):
        assert res["bytes_sent"] == expected_bytes("cocktail", 2, r)
        nonzero = (res["sent"] != 0).sum().item()
        assert 0 < nonzero <= 0.1 * 0.2 * NUMEL + 4  # random-k 10% then top-k 20%


def test_chunks_cover_everything():
    for n, parts in [(1001, 3), (5, 4), (3, 4), (0, 2)]:
        sizes = chunk_sizes(n, parts)
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
