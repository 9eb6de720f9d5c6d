"""Ending what a test started: every multi-process test calls :func:`end_run` in
``finally``, so a failed assertion or a timeout leaves no process behind (a local
launcher's workers run in sessions of their own and outlive a launcher killed by
``subprocess.run``'s timeout)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def processes_of(folder: Path) -> list[int]:
    """Live processes (not this one) whose command line names ``folder`` or a path in
    it: a run's launcher, workers and joiners (``--out FOLDER``)."""
    name = str(folder)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        argv = _argv(int(entry.name))
        if any(a == name or a.startswith(name + "/") for a in argv):
            found.append(int(entry.name))
    return found


def end_run(folder: Path, *procs: subprocess.Popen, grace_s: float = 30.0) -> list[str]:
    """End a run in ``folder``: SIGTERM each of ``procs`` still running (a launcher
    stops its workers and removes its network lab), SIGKILL after ``grace_s``; then
    SIGCONT and SIGKILL whatever still names ``folder``. Returns the command lines of
    the processes found that way (empty after a run that ended cleanly)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    left = []
    for pid in processes_of(folder):
        left.append(" ".join(_argv(pid))[:200])
        for sig in (signal.SIGCONT, signal.SIGKILL):  # SIGKILL ends a stopped one too
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    return left
