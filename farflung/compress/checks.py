"""Parameter validation shared by the stages; every failure is a :class:`CodecError`
that names the stage, the parameter and what would have been accepted."""

from __future__ import annotations

import math
from collections.abc import Sequence

from farflung.compress.codec import CodecError


def check_int(stage: str, name: str, value: object, lo: int, hi: int | None = None) -> int:
    """An integer in ``[lo, hi]`` (``hi=None``: unbounded)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(f"{stage}: {name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise CodecError(f"{stage}: {name}={value} out of range; allowed {allowed}")
    return value


def check_fraction(stage: str, name: str, value: object) -> float:
    """A float in ``(0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"{stage}: {name} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise CodecError(f"{stage}: {name}={value} out of range; allowed 0 < {name} <= 1")
    return value


def check_choice(stage: str, name: str, value: object, choices: Sequence[str]) -> str:
    """One of a fixed set of strings."""
    if value not in choices:
        raise CodecError(
            f"{stage}: {name}={value!r} is not allowed; choose one of {', '.join(choices)}"
        )
    return str(value)


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's ``round`` goes to even)."""
    return math.floor(x + 0.5)
