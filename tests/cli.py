"""``farflung ARGS`` in the test's own process: for what needs no process of its own
(usage and config errors, help, refusals, ``sample``, ``plan``, ``data``), without a
new interpreter and torch import (seconds) per call. A run that launches workers, or a
test of signals, stays a real subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import signal

from farflung.cli.main import main


def run_cli(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``farflung *args``; argparse's own exits (usage
    errors, ``--help``) give their code. The signal handlers and the environment that
    ``main`` sets are put back."""
    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    env = dict(os.environ)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        os.environ.clear()
        os.environ.update(env)
    return code, out.getvalue(), err.getvalue()
