"""The compressed sharded all-reduce on real gloo groups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from farflung.comm import Comm
from farflung.comm.sharded import (
    OK,
    SKIPPED,
    PoisonedSync,
    ShardedAllReduce,
    chunk_contexts,
    chunk_sizes,
    status_nbytes,
)
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
    every other rank -- the codec's own size formula for each chunk, plus the status
    in front of each payload (one byte, then a bitmap of 2 bits per rank + 1)."""
    codec = make_codec(spec)
    chunks = chunk_sizes(NUMEL, world)
    ctxs = chunk_contexts(3, 7, world)
    sizes = [codec.payload_nbytes(chunks[j], ctxs[j]) for j in range(world)]
    phase1 = sum(sizes[j] + 1 for j in range(world) if j != rank)
    bitmap = (2 * world + 1 + 7) // 8
    assert status_nbytes(2, world) == bitmap
    return phase1 + (world - 1) * (sizes[rank] + bitmap)


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


def poisoned_worker(rank: int, world: int, spec: str, bad_value: float) -> dict:
    """Round 1: rank 1's input holds ``bad_value``; round 2: clean, rank 0 says it
    skipped a step. Every rank must come through both rounds."""
    comm = Comm()
    op = ShardedAllReduce(comm, NUMEL, make_codec(spec), server_feedback=True)
    op(_inputs(rank), step=0, seed=7)  # fills the server error buffer
    ef_before = op.server_ef.error.clone()
    x = _inputs(rank)
    if rank == 1:
        x[17] = bad_value
    try:
        op(x, step=1, seed=7)
        first = None
    except PoisonedSync as e:
        first = {"bad": e.faults.bad, "aggregate": e.faults.aggregate}
    ef_after = op.server_ef.error.clone()
    avg, _ = op(_inputs(rank), step=2, seed=7, status=SKIPPED if rank == 0 else OK)
    return {
        "first": first,
        "ef_kept": torch.equal(ef_before, ef_after),
        "avg": avg,
        "skipped": op.last_faults.skipped,
    }


@pytest.mark.parametrize(
    "spec,bad_value",
    [("quantize:bits=8", float("nan")), ("cocktail", float("inf")), ("quantize:bits=4", 1e38)],
    ids=["nan", "inf", "beyond-fp16-scale"],
)
def test_a_bad_input_poisons_the_round_on_every_rank(spec, bad_value):
    """The rank with the bad input does not fail alone (its peers would block): all
    ranks finish the round, name rank 1, apply nothing, and go on to the next round."""
    results = run_distributed(poisoned_worker, 3, spec, bad_value)
    for res in results:
        assert res["first"] == {"bad": [1], "aggregate": False}
        assert res["ef_kept"]  # the dropped round left the server error buffer alone
        assert torch.isfinite(res["avg"]).all()
        assert res["skipped"] == [0]
        torch.testing.assert_close(res["avg"], results[0]["avg"])
