"""The contract between a training worker and whoever launched it: exit codes, the
environment variables the launchers set, and the report a failing worker leaves.

Both sides import it (the local launcher and the elastic run on one side, the worker
entry on the other), so neither imports the other for a constant. It imports nothing
heavy: the command line reads its exit codes before torch is loaded."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

# Exit codes, most telling first (the local launcher explains a failed run by the
# most telling exit among its workers: bad input, then non-finite numbers, then a
# crash, then the lost-peer exits that the others' failures cause).
EXIT_USAGE = 2  # bad config, data or checkpoint
EXIT_NONFINITE = 4  # NaN/Inf with train.on_nonfinite = "stop"
EXIT_FAILED = 1  # a crash (Python's own exit code for an uncaught exception)
EXIT_PEER_LOST = 3  # a peer or its link stopped responding (comm.watchdog exits with it)
EXIT_INTERRUPTED = 130  # SIGTERM or Ctrl+C

_PR_SET_NAME = 15  # prctl: this thread's (the main thread's: the process's) name

REPORT_ENV = "FARFLUNG_REPORT_DIR"
"""Set by the local launcher: a private folder where a failing worker leaves
``rank<R>.json`` ({"rank", "kind", "code", "message", ...}) before it exits."""

COORDINATOR_ENV = "FARFLUNG_COORDINATOR"  # host:port of the coordinator
ID_ENV = "FARFLUNG_ELASTIC_ID"  # the worker's id (initial workers)
JOIN_ENV = "FARFLUNG_ELASTIC_JOIN"  # "1": enter the running job as a joiner


def write_report(rank: int, kind: str, code: int, message: str, **extra: object) -> None:
    """Leave this worker's conclusion for the local launcher (no-op elsewhere)."""
    folder = os.environ.get(REPORT_ENV)
    if not folder:
        return
    record = {"rank": rank, "kind": kind, "code": code, "message": message, **extra}
    path = Path(folder) / f"rank{rank}.json"
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)  # the launcher never reads half a report
    except OSError:
        pass  # the launcher falls back to the exit code


def process_name(rank: int) -> str:
    """What a worker calls its process (``ps -o comm``, ``top``, ``pgrep``): the rank
    it was started as. A forked worker's ``/proc/PID/environ`` shows its template's
    environment (see farflung.train.forkserver), so tools find a rank by this name."""
    return f"farflung-rank{rank}"[:15]  # the kernel keeps 15 bytes


def name_this_process(rank: int) -> None:
    """Give this process :func:`process_name` (Linux; elsewhere nothing happens)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_NAME, process_name(rank).encode(), 0, 0, 0)
