"""Local workers started from a warm template process (a fork server).

Most of a worker's start is imports: torch, and ``torch._dynamo``, which torch's
optimizers load at their first use, cost about 3 CPU-seconds in a fresh interpreter.
A local launch that starts each worker as ``python -m farflung.train`` pays that once
per worker. Here the launcher starts one template that imports what a worker needs,
and each worker is a fork of it: one import per launch, and a joiner that replaces a
crashed member starts at once.

The workers stay the launcher's own children, so that it waits for them, reads their
exit codes and signals them exactly as it would processes it spawned: the launcher
marks itself a child subreaper (Linux), and the template forks each worker through a
short-lived intermediate process whose exit hands the worker over to the launcher.
Each worker runs in a session of its own with the environment the launcher gives it,
and runs its module as ``__main__`` with the template's command line (which names
the worker's arguments, so ``ps`` and ``pgrep -f`` still find a run's workers).

A worker is a fresh interpreter instead (``subprocess.Popen``) where a fork cannot
stand in for one: off Linux, under a command prefix (the network lab's ``ip netns
exec``), when its environment differs from the template's in a variable read while
starting up (``PYTHON*``, ``OMP_*``, ...), with ``FARFLUNG_WORKER_START=spawn``, or if
the template failed; and, unless ``FARFLUNG_WORKER_START=fork``, on a machine with a
GPU (NVIDIA or AMD device nodes): the template initialises no GPU, but forked
workers have not been verified on a GPU machine yet. Unlike fresh interpreters, the
forks share the template's string hash seed; ``torchrun`` workers, and ``spawn``, do
not.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence

from farflung.config import ConfigError

START_ENV = "FARFLUNG_WORKER_START"  # "auto" (the default), "fork" or "spawn"
# a GPU driver that a process initialised may not work in its forks; the template
# initialises none, but that is not verified on a GPU machine yet, so "auto" spawns
# where one is present
_GPU_DEVICES = ("/dev/nvidiactl", "/dev/kfd")
_FDS_ENV = "FARFLUNG_FORKSERVER_FDS"  # the template's request and reply pipes
READY_TIMEOUT_S = 300.0  # the template's imports on a loaded host, then each fork
# read while an interpreter (or torch, or its OpenMP runtime) starts: a worker whose
# value differs from the template's cannot be a fork of it
_READ_AT_START = ("PYTHON", "LD_", "OMP_", "KMP_", "MKL_", "OPENBLAS_", "MALLOC_", "TORCH")
_PR_SET_CHILD_SUBREAPER = 36


class Forked:
    """A worker forked by the template, now a child of this process: the part of
    :class:`subprocess.Popen` the launchers use."""

    def __init__(self, pid: int, args: list[str]) -> None:
        self.pid, self.args = pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (a waitpid on its pid)
                if self.returncode is None and not _exists(self.pid):
                    self.returncode = 1  # gone, and its code with it: never wait forever
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(0.02)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never a pid that may have been reused
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


Worker = subprocess.Popen | Forked


class WorkerStarter:
    """Starts ``python -m module *argv`` as local workers, forked from one template
    when it can (see the module's docstring). Close it when no more workers will
    start; the workers themselves are not affected."""

    def __init__(
        self, module: str, argv: Sequence[str], env: dict[str, str], preload: Sequence[str] = ()
    ) -> None:
        self.module, self.argv, self.preload = module, list(argv), list(preload)
        # the template's environment: what every worker's has in common (a forked
        # worker's /proc/PID/environ shows this, not its own os.environ)
        self._env = dict(env)
        self._template: subprocess.Popen | None = None
        self._requests = self._replies = -1
        self._broken = not may_fork()

    def start(self, env: dict[str, str], prefix: Sequence[str] = ()) -> Worker:
        """One worker with environment ``env`` (complete, as for Popen), after the
        command ``prefix`` if any."""
        if prefix or self._broken or not self._fits(env):
            return self._spawn(env, prefix)
        try:
            return self._fork(env)
        except (OSError, ValueError, TimeoutError) as e:
            print(
                f"farflung: worker template failed ({e}); starting workers as fresh interpreters",
                file=sys.stderr,
                flush=True,
            )
            self._broken = True
            self.close()
            return self._spawn(env, prefix)

    def close(self) -> None:
        """End the template (it exits when its request pipe closes)."""
        for fd in (self._requests, self._replies):
            if fd >= 0:
                os.close(fd)
        self._requests = self._replies = -1
        if self._template is not None:
            try:
                self._template.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._template.kill()
                self._template.wait()
            self._template = None

    def _spawn(self, env: dict[str, str], prefix: Sequence[str]) -> subprocess.Popen:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", self.module, *self.argv],
            env=env,
            start_new_session=True,  # the launcher's own Ctrl+C handling, not the tty's
        )

    def _fits(self, env: dict[str, str]) -> bool:
        """Whether a fork of the template can stand in for a fresh interpreter with
        ``env``."""
        keys = set(env) | set(self._env)
        return all(env.get(k) == self._env.get(k) for k in keys if k.startswith(_READ_AT_START))

    def _fork(self, env: dict[str, str]) -> Forked:
        if self._template is None:
            self._start_template()
        os.write(self._requests, json.dumps(env).encode() + b"\n")
        reply = _read_line(self._replies, READY_TIMEOUT_S)
        return Forked(int(reply), [sys.executable, "-m", self.module, *self.argv])

    def _start_template(self) -> None:
        _become_subreaper()
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        try:
            self._template = subprocess.Popen(
                [sys.executable, "-m", __name__, ",".join(self.preload), self.module, *self.argv],
                env={**self._env, _FDS_ENV: f"{req_r},{rep_w}"},
                pass_fds=(req_r, rep_w),
                start_new_session=True,
            )
        finally:
            os.close(req_r)
            os.close(rep_w)
        self._requests, self._replies = req_w, rep_r


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def may_fork() -> bool:
    """Whether workers may be forked here: ``FARFLUNG_WORKER_START``, the platform."""
    how = os.environ.get(START_ENV, "auto")
    if how not in ("auto", "fork", "spawn"):
        raise ConfigError(f"{START_ENV}={how!r}: expected one of 'auto', 'fork', 'spawn'")
    if how == "spawn" or not sys.platform.startswith("linux"):
        return False
    return how == "fork" or not any(os.path.exists(d) for d in _GPU_DEVICES)


def _become_subreaper() -> None:
    """Make this process the subreaper of its descendants (Linux): a worker whose
    intermediate parent exits becomes this process's child."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def shared_env(envs: Sequence[dict[str, str]]) -> dict[str, str]:
    """The variables every one of ``envs`` sets alike."""
    first, *rest = envs
    return {k: v for k, v in first.items() if all(e.get(k) == v for e in rest)}


def _read_line(fd: int, timeout: float) -> str:
    """One line from ``fd`` within ``timeout`` seconds; EOF is an error."""
    deadline, data = time.monotonic() + timeout, b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no worker started within {timeout:.0f} s")
        chunk = os.read(fd, 64)
        if not chunk:
            raise OSError("the template exited")
        data += chunk
    return data.decode().strip()


# -- the template's side -------------------------------------------------------------


def serve(preload: list[str], module: str, argv: list[str]) -> None:
    """Import ``preload``, then fork a worker for each environment that arrives."""
    req_fd, rep_fd = (int(x) for x in os.environ.pop(_FDS_ENV).split(","))
    for name in preload:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()  # the forks need not copy pages to count references in shared objects
    with os.fdopen(req_fd, "rb") as requests:
        for line in requests:
            env = json.loads(line)
            pid = _fork_worker(module, argv, env, (req_fd, rep_fd))
            os.write(rep_fd, f"{pid}\n".encode())


def _fork_worker(module: str, argv: list[str], env: dict[str, str], fds: tuple) -> int:
    """Fork a worker through an intermediate process; returns the worker's pid once
    the intermediate has exited (the worker is the subreaper's child by then)."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(r)
            worker = os.fork()
            if worker == 0:
                os.close(w)
                _run_worker(module, argv, env, fds)
            os.write(w, str(worker).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as got:
        pid = int(got.read() or b"0")
    os.waitpid(middle, 0)
    if not pid:
        raise OSError("fork failed")
    return pid


def _run_worker(module: str, argv: list[str], env: dict[str, str], fds: tuple) -> None:
    """In the forked worker: become what ``python -m module *argv`` would be; never
    returns."""
    code = 1
    try:
        for fd in fds:
            os.close(fd)
        os.setsid()
        os.environ.clear()
        os.environ.update(env)
        if "numpy" in sys.modules:  # a fresh interpreter draws its own entropy
            sys.modules["numpy"].random.seed()
        sys.argv = [module, *argv]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    serve([m for m in sys.argv[1].split(",") if m], sys.argv[2], sys.argv[3:])
    # no interpreter teardown (about a CPU-second with torch loaded): nothing to keep
    sys.stderr.flush()
    os._exit(0)
