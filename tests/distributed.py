"""Run a function in N real gloo processes and collect what each returns.

Starting a process and importing torch costs seconds, and the suite calls
:func:`run_distributed` dozens of times, so the processes of each world size are kept
for the session (a pool) with their gloo group initialised once. Each call behaves as
if it ran in fresh processes: every rank takes the caller's environment and working
directory, runs ``fn`` after a barrier, and then undoes what a call may leave behind in
a process (farflung's process-global link model, rank hosts, epoch source and group
timeout; torch's seed, threads, grad mode, default dtype; signal handlers). What cannot
be undone -- a thread or child process still running, the default group destroyed or
replaced -- makes the pool stale: it is replaced before the next call. An error or a
timeout kills the pool. Pools are torn down at session end (tests/conftest.py, and
atexit as a backstop). ``POOL_DEBUG=1`` prints why a pool was replaced.
"""

from __future__ import annotations

import atexit
import io
import os
import pickle
import random
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from multiprocessing import forkserver
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import farflung.comm.dist  # noqa: F401  (before any process group exists: see there)
from farflung.comm import free_port

CALL_TIMEOUT_S = 240.0  # one call, all ranks
ERROR_GRACE_S = 10.0  # after one rank failed: its peers' reports, if they come
GROUP_TIMEOUT = timedelta(seconds=60)
MAX_POOLED = 9  # idle processes kept (~230 MB each: worlds 2-4); least recently used go first


def run_distributed(
    fn: Callable[..., Any], world: int, *args: Any, fresh: bool = False
) -> list[Any]:
    """``fn(rank, world, *args)`` in ``world`` processes; returns results by rank.

    ``fn`` must be importable (a module-level function) and return picklable data.
    ``fresh``: run in processes started for this call alone, which leave the group and
    exit as soon as ``fn`` returns -- for a ``fn`` that needs a process no earlier call
    ran in (counting threads from the start, say) or whose peers must have gone."""
    pool = _Pool(world, last=True) if fresh else _pooled(world)
    done = False
    try:
        replies = pool.call(fn, args)
        done = True
    finally:
        if fresh or not done or pool.stale:
            _drop(pool)
    errors = [f"rank {r}:\n{value}" for r, (status, value) in replies.items() if status != "ok"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [torch.load(io.BytesIO(replies[r][1]), weights_only=False) for r in range(world)]


def shutdown_pools() -> None:
    """End every pooled process (session end): all are told at once, then reaped."""
    pools = list(_POOLS.values())
    _POOLS.clear()
    for pool in pools:
        pool.hang_up()
    for pool in pools:
        pool.reap()


_POOLS: OrderedDict[int, _Pool] = OrderedDict()  # by world size, least recently used first
atexit.register(shutdown_pools)


def _pooled(world: int) -> _Pool:
    pool = _POOLS.pop(world, None)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.close()
        while _POOLS and sum(p.world for p in _POOLS.values()) + world > MAX_POOLED:
            _POOLS.popitem(last=False)[1].close()
        pool = _Pool(world)
    _POOLS[world] = pool
    return pool


def _context() -> Any:
    """Ranks are forked by multiprocessing's fork server, which imports torch and this
    module once for the session: a world of 4 spawned afresh spends about 7 s of a
    2-core machine importing torch. The server is single-threaded and never makes a
    process group, so each rank starts as clean as a spawned one."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    # Python 3.11's server ignores the sys.path it is sent: it would find another
    # `distributed` (dask's) and not the test modules whose functions the ranks run
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    return ctx


def _drop(pool: _Pool) -> None:
    if _POOLS.get(pool.world) is pool:
        del _POOLS[pool.world]
    pool.close()


class _Pool:
    """``world`` spawned processes in one gloo group, each behind a pipe to us."""

    def __init__(self, world: int, last: bool = False) -> None:
        self.world, self.last, self.stale = world, last, False
        self.groups: set[tuple[int, int]] = set()  # what each rank's _groups_made said
        ctx = _context()
        port = free_port()
        self.procs, self.conns = [], []
        try:
            for rank in range(world):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(rank, world, port, theirs), daemon=True)
                proc.start()
                theirs.close()  # so that a rank that dies reads as EOF here
                self.procs.append(proc)
                self.conns.append(ours)
        except BaseException:
            self.close()
            raise

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def call(self, fn: Callable[..., Any], args: tuple) -> dict[int, tuple[str, Any]]:
        """Every rank's ``(status, value)``; a rank that does not answer is an error."""
        task = pickle.dumps((fn, args, dict(os.environ), os.getcwd(), self.last))
        replies: dict[int, tuple[str, Any]] = {}
        self.groups.clear()
        pending = {}
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(task)
                pending[conn] = rank
            except OSError as e:  # it died before the call (failed to join the group?)
                replies[rank] = ("error", f"the process is gone ({e})")
                self.stale = True
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while pending and (left := deadline - time.monotonic()) > 0:
            for conn in wait(list(pending), timeout=left):
                rank = pending.pop(conn)
                replies[rank] = self._reply(rank, conn)
                if replies[rank][0] != "ok":
                    deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
        for rank in pending.values():
            replies[rank] = ("error", f"no answer within the call's {CALL_TIMEOUT_S:.0f} s")
            self.stale = True
        # torch names a new group by how many this process has made: ranks that made
        # different numbers (members-only groups) would name the next call's apart
        self.stale |= len(self.groups) > 1
        return replies

    def _reply(self, rank: int, conn: Connection) -> tuple[str, Any]:
        try:
            (status, value), left_over, groups = pickle.loads(conn.recv_bytes())
        except EOFError:
            self.stale = True
            self.procs[rank].join(timeout=5)
            return "error", f"the process died (exit code {self.procs[rank].exitcode})"
        self.groups.add(groups)
        if left_over or status != "ok":
            self.stale = True
            if os.environ.get("POOL_DEBUG"):
                print(f"pool of {self.world}: rank {rank} left {left_over}", file=sys.stderr)
        return status, value

    def close(self) -> None:
        """End the processes: politely when they are idle, else by force."""
        self.hang_up()
        self.reap()

    def hang_up(self) -> None:
        for conn in self.conns:
            conn.close()  # an idle rank reads EOF and exits

    def reap(self) -> None:
        grace = time.monotonic() + (30 if self.last else 5)
        for proc in self.procs:
            proc.join(timeout=max(0.0, grace - time.monotonic()) if not self.stale else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


# -- the rank's side ------------------------------------------------------------------


def _serve(rank: int, world: int, port: int, conn: Connection) -> None:
    """Join the group once, then run each task that arrives until the pipe closes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
    clean = _CleanState()
    try:
        while True:
            try:
                task = conn.recv_bytes()
            except EOFError:
                break
            reply, last = _run(task, rank, world, port)
            left_over = [] if last else clean.restore_or_say_why()
            conn.send_bytes(pickle.dumps((reply, left_over, _groups_made())))
            if last or left_over:
                break
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()
    # gloo threads still running into interpreter teardown can abort it; nothing is left
    # to flush
    os._exit(0)


def _run(task: bytes, rank: int, world: int, port: int) -> tuple[tuple[str, Any], bool]:
    last = False
    try:
        fn, args, environ, cwd, last = pickle.loads(task)
        os.environ.clear()
        os.environ.update(environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.chdir(cwd)
        if not last:
            dist.barrier()  # the previous call is over on every rank
        buf = io.BytesIO()
        # tensors go through bytes: shared-memory handles die with their process
        torch.save(fn(rank, world, *args), buf)
        return ("ok", buf.getvalue()), last
    except BaseException:  # report, don't hang the parent
        return ("error", traceback.format_exc()), last


class _CleanState:
    """What a fresh rank looks like, and :meth:`restore` to go back to it."""

    def __init__(self) -> None:
        import farflung.comm.dist as fdist

        # weakly: a reference here would keep a destroyed group's gloo threads running
        self.group = weakref.ref(dist.group.WORLD)
        self.threads = set(threading.enumerate())
        self.seed = torch.initial_seed()
        self.dtype = torch.get_default_dtype()
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.group_timeout = fdist._timeout
        self.handlers = {}
        for sig in signal.valid_signals():
            try:
                self.handlers[sig] = signal.getsignal(sig)
            except (OSError, ValueError):
                continue

    def restore_or_say_why(self) -> list[str]:
        """What cannot be undone after a call (none: the rank is as good as fresh)."""
        try:
            return self.restore()
        except Exception as e:  # the call left something our undoing cannot handle
            return [f"restoring the rank failed: {e!r}"]

    def restore(self) -> list[str]:
        """Undo what a call left; returns what cannot be undone (the pool is stale)."""
        import farflung.comm.collectives as coll
        import farflung.comm.dist as fdist

        coll.set_link_model(None)
        coll.set_rank_hosts(None)
        coll.set_epoch_source(None)
        coll._pinned = None
        fdist._timeout = self.group_timeout
        torch.set_num_threads(1)
        torch.set_grad_enabled(True)
        torch.set_default_dtype(self.dtype)
        torch.use_deterministic_algorithms(self.deterministic)
        torch.autograd.set_detect_anomaly(False)
        torch.manual_seed(self.seed)  # a fresh process's seed: unseeded code repeats
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        for sig, handler in self.handlers.items():
            if handler is not None and signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
        return self._left_over()

    def _left_over(self) -> list[str]:
        left = []
        if not dist.is_initialized() or dist.group.WORLD is not self.group():
            left.append("the default process group was destroyed or replaced")
        threads = [t for t in threading.enumerate() if t not in self.threads]
        for t in threads:
            t.join(timeout=1.0)
        left += [f"thread {t.name}" for t in threads if t.is_alive()]
        if mp.active_children() or _child_pids():
            left.append("child processes")
        return left


def _groups_made() -> tuple[int, int]:
    """How many process groups this process has made, and belongs to now."""
    world = dist.distributed_c10d._world
    return world.group_count, len(world.pg_names)


def _child_pids() -> list[str]:
    """This process's running children (Linux; elsewhere none are seen)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    pids = []
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/children") as f:
                pids += f.read().split()
        except OSError:
            continue
    return pids
