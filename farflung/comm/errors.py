"""Typed failures that the layers above communication report to the user."""

from __future__ import annotations

import re


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
