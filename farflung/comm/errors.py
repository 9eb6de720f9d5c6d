"""Typed failures that the layers above communication report to the user."""

from __future__ import annotations

import re
import sys

import torch.distributed


def say(line: str) -> None:
    """``line`` on stderr in one write: processes that share the stream (a launcher's
    workers) never split each other's lines (``print`` writes the text and the
    newline apart)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class NonFiniteError(RuntimeError):
    """A NaN or Inf reached a loss, a gradient or a synchronised tensor, and the run is
    set to stop on it (``train.on_nonfinite = "stop"``). Every rank raises it at the
    same step; the message names the step and the rank(s) where it arose."""

    def __init__(self, message: str, step: int, ranks: list[int]) -> None:
        super().__init__(message)
        self.step = step
        self.ranks = ranks


class PeerLostError(RuntimeError):
    """A point-to-point transfer with a named peer failed (it died, froze, or its link
    is down); the message says which peer and what this rank was doing."""


class Reconfigure(Exception):
    """Elastic training: the coordinator re-formed the group (a member was lost or one
    joined) while this rank waited on a collective of the old group. The step in
    flight is abandoned and redone in the new group."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an error's message, without gloo's source location prefix
    (``[/.../pair.cc:553] ``), at most ``limit`` characters."""
    text = str(e).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", text[0]) if text else ""
    return line[:limit] or type(e).__name__


# "[.../gloo/transport/tcp/pair.cc] Connection closed by peer" for a dead peer,
# "Timed out waiting 15000ms for recv operation to complete" for a frozen one or a cut
# link, "Rank 1 failed to pass monitoredBarrier". Only for those plain RuntimeErrors
# are these fragments matched; every typed error (NCCL's DistBackendError, the store's
# DistNetworkError / DistStoreError) is classified by its type.
_GLOO_FRAGMENTS = (
    "gloo/transport/",
    "connection closed by peer",
    "connection reset by peer",
    "timed out waiting",
    "failed to pass monitoredbarrier",
    "broken pipe",
)


def is_comm_failure(e: BaseException) -> bool:
    """True for errors raised by a collective or the store whose peer or link failed,
    and for a wait on a peer that gave up at its deadline (TimeoutError: cocktail's
    wait for its background sync)."""
    if isinstance(e, (torch.distributed.DistError, TimeoutError, PeerLostError)):
        return True
    if type(e) is not RuntimeError:  # subclasses (NonFiniteError, ...) mean something else
        return False
    text = str(e).lower()
    return any(f in text for f in _GLOO_FRAGMENTS)
