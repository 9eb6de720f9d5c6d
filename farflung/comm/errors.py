"""Typed failures that the layers above communication report to the user."""

from __future__ import annotations


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
