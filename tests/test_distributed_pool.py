"""The reused gloo worker pool of tests/distributed.py: a call finds processes as
fresh as new ones (what an earlier call set is gone), and a call that leaves what
cannot be undone, fails, or asks for fresh processes gets new ones."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

import farflung.comm.collectives as coll
from farflung.netlab.link import LinkMatrix, LinkModel

ENV = "FARFLUNG_POOL_TEST"


def _leave_state(rank: int, world: int) -> dict:
    """Set every piece of process-global state a test's fn might set, and say how the
    process looked before."""
    before = _state(rank, world)
    coll.set_link_model(LinkModel(LinkMatrix.uniform(world, "1gbit", "10ms")))
    coll.set_rank_hosts([0] * world)
    coll.set_epoch_source(lambda: 7)
    os.environ[ENV] = "left"
    os.chdir("/")
    signal.signal(signal.SIGUSR1, lambda *_: None)
    torch.set_grad_enabled(False)
    torch.manual_seed(99)
    return before


def _state(rank: int, world: int) -> dict:
    x = torch.ones(1)
    dist.all_reduce(x)  # the group works
    return {
        "pid": os.getpid(),
        "sum": x.item(),
        "link": coll._link_model is not None,
        "hosts": coll.host_of(rank),
        "epoch": coll.current_epoch(),
        "env": os.environ.get(ENV),
        "cwd": os.getcwd(),
        "usr1": signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL,
        "grad": torch.is_grad_enabled(),
        "draw": torch.rand(3).tolist(),  # unseeded: a fresh process's default seed
    }


def _leave_a_thread(rank: int, world: int) -> int:
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    return os.getpid()


def _fail_on_rank_1(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    return os.getpid()


def _uneven_groups(rank: int, world: int) -> int:
    """A group that rank 0 alone makes (as members-only groups are)."""
    if rank == 0:
        dist.new_group([0], use_local_synchronization=True)
    return os.getpid()


def _pid(rank: int, world: int) -> int:
    return os.getpid()


def test_a_call_finds_the_processes_as_fresh_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = run_distributed(_leave_state, 2)
    after = run_distributed(_state, 2)
    for rank, (b, a) in enumerate(zip(before, after, strict=True)):
        assert a["pid"] == b["pid"]  # the same process: the pool was reused
        assert a["sum"] == 2
        assert not a["link"] and a["hosts"] == rank and a["epoch"] is None
        assert a["env"] is None and a["cwd"] == str(tmp_path)
        assert a["usr1"] and a["grad"]
        assert a["draw"] == b["draw"]  # the same unseeded draws as the first call
    monkeypatch.setenv(ENV, "from the caller")
    assert [r["env"] for r in run_distributed(_state, 2)] == ["from the caller"] * 2


def test_what_cannot_be_undone_an_error_or_fresh_get_new_processes():
    first = run_distributed(_leave_a_thread, 2)
    second = run_distributed(_pid, 2)
    assert not set(first) & set(second)  # the left thread made the pool stale
    with pytest.raises(AssertionError, match="rank 1 fails on purpose"):
        run_distributed(_fail_on_rank_1, 2)
    third = run_distributed(_pid, 2)
    assert not set(second) & set(third)
    fresh = run_distributed(_pid, 2, fresh=True)
    assert not set(third) & set(fresh)
    assert run_distributed(_pid, 2) == third  # fresh ones did not replace the pool
    for pid in fresh:  # and are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # ranks that made different numbers of groups would name their next ones apart
    assert run_distributed(_uneven_groups, 2) == third
    assert not set(third) & set(run_distributed(_pid, 2))
