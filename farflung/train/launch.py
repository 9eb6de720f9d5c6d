"""farflung's own launcher for N local worker processes.

It sets the same environment torchrun would, watches the workers, and when one
dies it stops the rest at once and says which one it was, so a lost worker never
leaves the others waiting on a collective. Ctrl+C stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from farflung.comm import free_port
from farflung.train.entry import EXIT_FAILED, EXIT_USAGE

GRACE_S = 10.0  # after SIGTERM, before SIGKILL
SETTLE_S = 1.0  # after a failure, for the others to exit on their own


@dataclass
class Placement:
    """Where each local worker runs: a command prefix (e.g. ``ip netns exec NS``) and
    extra environment per rank, and the address rank 0 is reached at."""

    prefixes: list[list[str]]
    envs: list[dict[str, str]]
    master_addr: str = "127.0.0.1"
    description: str = "unshaped"

    @classmethod
    def plain(cls, workers: int, env: dict[str, str] | None = None) -> Placement:
        return cls([[] for _ in range(workers)], [dict(env or {}) for _ in range(workers)])


def worker_env(
    rank: int,
    world: int,
    port: int,
    master_addr: str = "127.0.0.1",
    extra: dict[str, str] | None = None,
) -> dict:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(port),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def launch_local(
    worker_args: Sequence[str],
    workers: int,
    module: str = "farflung.train",
    placement: Placement | None = None,
) -> int:
    """Run ``python -m module *worker_args`` as ``workers`` ranks; return an exit code."""
    place = placement or Placement.plain(workers)
    port = free_port()
    procs = [
        subprocess.Popen(
            [*place.prefixes[r], sys.executable, "-m", module, *worker_args],
            env=worker_env(
                r,
                workers,
                port,
                place.master_addr,
                {**place.envs[r], "FARFLUNG_NETWORK": place.description},
            ),
            start_new_session=True,  # our own Ctrl+C handling, not the tty's
        )
        for r in range(workers)
    ]
    try:
        return _watch(procs)
    except KeyboardInterrupt:
        print("farflung: interrupted; stopping workers", file=sys.stderr, flush=True)
        _stop(procs, signal.SIGTERM)
        return 130


def _watch(procs: list[subprocess.Popen]) -> int:
    while True:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            return _on_failure(procs)
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)


def _on_failure(procs: list[subprocess.Popen]) -> int:
    """Name the worker that failed first in cause, stop the others, return its code."""
    deadline = time.monotonic() + SETTLE_S  # peers failing the same way exit by themselves
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    alive = [r for r, p in enumerate(procs) if p.poll() is None]
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0)]
    # a bad-input exit outranks a crash, which outranks the comm failures it causes
    rank, code = min(failed, key=lambda rc: (rc[1] != EXIT_USAGE, rc[1] == EXIT_FAILED, rc[0]))
    stopping = f"; stopping ranks {alive}" if alive else ""
    print(
        f"farflung: worker rank {rank} exited with code {code}{stopping}",
        file=sys.stderr,
        flush=True,
    )
    _stop(procs, signal.SIGTERM)
    return code if code > 0 else 1


def _stop(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
