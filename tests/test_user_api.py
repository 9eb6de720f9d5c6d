"""farflung's algorithms and codecs from a user's own code: `distribute` in a plain
loop under torchrun, and the DDP communication hook."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from distributed import run_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

from farflung.config import ConfigError
from farflung.parallel import distribute
from farflung.parallel.ddp_hook import codec_hook

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("algorithm", ["allreduce", "cocktail"])
def test_own_loop_example_under_torchrun(algorithm):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run(
        [
            torchrun,
            "--nproc-per-node=2",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=127.0.0.1:0",
            str(ROOT / "examples" / "own_loop.py"),
            algorithm,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    found = re.findall(r"rank (\d): held-out mse ([\d.]+), bytes sent (\d+)", r.stdout)
    assert sorted(f[0] for f in found) == ["0", "1"]
    for _, mse, sent in found:
        assert float(mse) < 0.05  # the linear target is learned (it starts near 1)
        assert int(sent) > 0


def _threads_after_teardown(rank: int, world: int) -> dict:
    """A user's loop with each kind of algorithm (plain, and with a background thread
    and group), then close() and destroy_process_group(): which threads are left."""
    torch.manual_seed(0)
    algos = []
    for algorithm in ("allreduce", "cocktail"):
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # after init, as users do
        algos.append(algo := distribute(model, opt, algorithm, warmup_steps=1))
        for _ in range(4):
            model(torch.randn(4, 8)).square().mean().backward()
            algo.step()
    for algo in algos:
        algo.close()
    torch.distributed.destroy_process_group()
    tasks = Path("/proc/self/task")
    native = sorted((t / "comm").read_text().strip() for t in tasks.iterdir())
    return {"native": native, "python": sorted(t.name for t in threading.enumerate())}


def test_close_and_teardown_leave_no_thread_behind():
    """A gloo thread left running into interpreter exit aborts the process at random
    ("terminate called without an active exception") when it drops a finished work's
    tensors there: close() and destroy_process_group() must have joined them all."""
    for left in run_distributed(_threads_after_teardown, 2, fresh=True):
        assert not [n for n in left["native"] if "gloo" in n], left
        assert not [n for n in left["python"] if "cocktail" in n], left


def test_distribute_rejects_unknown_options():
    with pytest.raises(ConfigError, match="unknown option"):
        distribute(torch.nn.Linear(2, 2), None, "cocktail", codecs="x")  # type: ignore[arg-type]


def _ddp_losses(rank: int, world: int, specs: list[str | None]) -> dict:
    """Each spec's run (None: DDP's own all-reduce), one after another in one group:
    one start of the processes for all of them."""
    return {spec: _ddp_run(rank, spec) for spec in specs}


def _ddp_run(rank: int, spec: str | None) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    ddp = DDP(model, bucket_cap_mb=0.001)  # several buckets
    state = None
    if spec is not None:
        state, hook = codec_hook(spec)
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    target = torch.randn(16, 1, generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(30):
        g = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(32, 16, generator=g)
        loss = torch.nn.functional.mse_loss(ddp(x), x @ target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "sent": state.comm.meter.snapshot().sent if state else None}


def test_ddp_hook_identity_matches_ddp_and_quantized_trains():
    specs = [None, "identity", "quantize:bits=4"]
    runs = run_distributed(_ddp_losses, 2, specs)
    plain, ident, quant = ([run[s] for run in runs] for s in specs)
    for r in range(2):
        torch.testing.assert_close(ident[r]["losses"], plain[r]["losses"], rtol=1e-5, atol=1e-6)
    q = quant[0]["losses"]
    assert sum(q[-5:]) / 5 < 0.3 * q[0]
    assert quant[0]["sent"] < ident[0]["sent"] / 5
