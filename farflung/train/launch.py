"""farflung's own launcher for N local worker processes.

It sets the same environment torchrun would, watches the workers, and when one
fails it stops the rest at once and says why, so a lost worker never leaves the
others waiting on a collective. Workers leave a small JSON report of what they
concluded (a lost peer, non-finite numbers, a crash) in a private folder named by
``FARFLUNG_REPORT_DIR``; the launcher prints the most telling one. Ctrl+C stops
them all."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from farflung.comm.binding import BIND_ENV, free_port, is_loopback
from farflung.train.contract import (
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    EXIT_PEER_LOST,
    EXIT_USAGE,
    REPORT_ENV,
)
from farflung.train.forkserver import Worker, WorkerStarter, shared_env

GRACE_S = 10.0  # after SIGTERM (and SIGCONT), before SIGKILL
SETTLE_S = 1.0  # after a failure, for the others to exit (and report) on their own


@dataclass
class Placement:
    """Where each local worker runs: a command prefix (e.g. ``ip netns exec NS``) and
    extra environment per rank, and the address rank 0 is reached at."""

    prefixes: list[list[str]]
    envs: list[dict[str, str]]
    master_addr: str = "127.0.0.1"
    description: str = "unshaped"
    coordinator_addr: str = ""
    """Where the workers reach an elastic run's coordinator (this process); empty:
    127.0.0.1."""
    coordinator_netns: str = ""
    """The network namespace the coordinator listens in (the lab's bridge); empty:
    this process's own."""

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
    env = base_env()
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(port),
    )
    env.update(extra or {})
    return env


def base_env() -> dict[str, str]:
    """What every local worker's environment starts from."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def bind_env(place: Placement, rank: int) -> dict[str, str]:
    """Where worker ``rank``'s listeners bind: rank 0's rendezvous store on the master
    address (not every interface, torch's default; see farflung.comm.dist), and in a
    run on loopback every rank's listeners, gloo's included, on loopback too (gloo
    would take the address the host name resolves to). The lab's placements name
    each rank's interface themselves."""
    env = {}
    local = is_loopback(place.master_addr)
    if rank == 0 or local:
        env[BIND_ENV] = place.master_addr
    ifname = _loopback_ifname()
    if local and ifname and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = ifname
    return env


def _loopback_ifname() -> str | None:
    names = {name for _, name in socket.if_nameindex()}
    return next((n for n in ("lo", "lo0") if n in names), None)


def launch_local(
    worker_args: Sequence[str],
    workers: int,
    module: str = "farflung.train",
    placement: Placement | None = None,
) -> int:
    """Run ``python -m module *worker_args`` as ``workers`` ranks; return an exit code."""
    place = placement or Placement.plain(workers)
    port = free_port()
    reports = Path(tempfile.mkdtemp(prefix="farflung-reports-"))
    envs = []
    for r in range(workers):
        extra = {**bind_env(place, r), **place.envs[r], "FARFLUNG_NETWORK": place.description}
        extra[REPORT_ENV] = str(reports)
        envs.append(worker_env(r, workers, port, place.master_addr, extra))
    starter = WorkerStarter(module, worker_args, shared_env(envs), preload_for(module))
    procs: list[Worker] = []
    try:
        for r in range(workers):
            procs.append(starter.start(envs[r], place.prefixes[r]))
        starter.close()
        return _watch(procs, reports)
    except KeyboardInterrupt:
        print("farflung: interrupted; stopping workers", file=sys.stderr, flush=True)
        stop_processes(procs)
        return EXIT_INTERRUPTED
    finally:
        starter.close()
        stop_processes(procs)  # nothing is left behind, whatever happened
        shutil.rmtree(reports, ignore_errors=True)


# what a training worker imports beyond its entry: torch's optimizers import
# torch._dynamo at their first step (see farflung.train.forkserver)
WORKER_PRELOAD = (
    "farflung.train.entry",
    "farflung.train.loop",
    "farflung.train.pipeline",
    "farflung.train.elastic_worker",
    "torch._dynamo",
)


def preload_for(module: str) -> tuple[str, ...]:
    """The modules a worker template for ``module`` imports before it forks."""
    return WORKER_PRELOAD if module == "farflung.train" else (module,)


def _watch(procs: list[Worker], reports: Path) -> int:
    while True:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            return _on_failure(procs, reports)
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)


def _on_failure(procs: list[Worker], reports: Path) -> int:
    """Say why the run failed (the most telling failure), stop the others, return
    the failed worker's code."""
    deadline = time.monotonic() + SETTLE_S  # peers failing the same way exit by themselves
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    alive = [r for r, p in enumerate(procs) if p.poll() is None]
    failed = {r: p.returncode for r, p in enumerate(procs) if p.returncode not in (None, 0)}
    found = read_reports(reports)
    rank = most_telling(failed, found)
    stopping = f"; stopping ranks {alive}" if alive else ""
    why = explain(rank, failed[rank], found)
    print(f"farflung: {why}{stopping}", file=sys.stderr, flush=True)
    stop_processes(procs)
    code = failed[rank]
    return code if code > 0 else 1


def read_reports(folder: Path) -> dict[int, dict]:
    """The workers' reports by rank (see farflung.train.contract.write_report)."""
    found = {}
    for path in folder.glob("rank*.json"):
        try:
            record = json.loads(path.read_text())
            found[int(record["rank"])] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a torn or foreign file: the exit code still tells something
    return found


# the order in which failures explain a run: bad input first, then non-finite
# numbers, then a crash, then the lost-peer exits that a crash or a freeze causes
_RANK_OF_CODE = {EXIT_USAGE: 0, EXIT_NONFINITE: 1, EXIT_PEER_LOST: 3, EXIT_INTERRUPTED: 4}
# among lost-peer reports: a foreign value in the heartbeat store explains the rest;
# a rank that read the store and saw a peer fall silent is a better witness than one
# that lost the store itself (both sides of a cut link report), and either is better
# than a failed collective alone
_RANK_OF_VIA = {"protocol": -1, "heartbeat": 0, "store": 1}


_SAID_BY_RANK_0 = {"usage": "bad input, see above", "nonfinite": "non-finite numbers, see above"}


def most_telling(failed: dict[int, int], reports: dict[int, dict]) -> int:
    """The rank whose failure (exit code by rank) best explains the run's."""

    def order(rank: int) -> tuple[int, int, int]:
        report = reports.get(rank)
        via = _RANK_OF_VIA.get(report.get("via", ""), 2) if report else 3
        return (_RANK_OF_CODE.get(failed[rank], 2), via, rank)

    return min(failed, key=order)


def explain(rank: int, code: int, reports: dict[int, dict]) -> str:
    """One line on why worker ``rank`` failed with ``code``, from its report if any."""
    report = reports.get(rank)
    if code < 0:
        exited = f"worker rank {rank} was killed by {signal.Signals(-code).name}"
    else:
        exited = f"worker rank {rank} exited with code {code}"
    if report is None:
        return exited + (" (lost a peer)" if code == EXIT_PEER_LOST else "")
    if report.get("kind") != "lost_peer":
        # rank 0 printed its bad-input or non-finite message itself already
        said = _SAID_BY_RANK_0.get(report.get("kind", "")) if rank == 0 else None
        return f"{exited} ({said or report['message']})"
    if report.get("via") == "comm":
        return f"worker rank {rank}: {report['message']}"
    lost = [int(r) for r in report.get("lost", [])]
    why = f"{report['message']}, noticed by rank {rank}"
    # both ends of a cut link report each other: say so rather than pick a culprit
    mutual = [r for r in lost if rank in reports.get(r, {}).get("lost", [])]
    if mutual:
        them = ", ".join(str(r) for r in mutual)
        why += f"; rank {them} lost contact with rank {rank} too: the link between them may be down"
    return why


def stop_processes(procs: list[Worker], sig: int = signal.SIGTERM) -> None:
    """``sig`` (and SIGCONT, for a stopped one) to the live ``procs``, SIGKILL to
    those still alive :data:`GRACE_S` later."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.send_signal(sig)
    for p in alive:
        # a stopped (SIGSTOPped) worker acts on SIGTERM only once continued
        p.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + GRACE_S
    for p in alive:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
