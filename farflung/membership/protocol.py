"""What crosses between the coordinator and its members: the wire's constants and the
checks every worker message passes before the coordinator uses it.

Both ends import this (:mod:`farflung.membership.coordinator` and
:mod:`farflung.membership.member`), so neither needs the other to agree on the
beat, the handshake deadline or the message cap."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from farflung.comm.channel import MAX_FRAME

BEATS_PER_BOUND = 5
"""Beats (both ways) per ``heartbeat_s``: a silence of the whole bound is five missed
beats, so a beat delayed behind bulk traffic on a slow link is not a death."""
HANDSHAKE_S = 5.0
"""A connection proves the run key and says hello within this, or is closed."""
MAX_MESSAGE = MAX_FRAME
"""The largest message the coordinator reads (1 MiB)."""
MAX_AHEAD = 1 << 16
"""A vote for a step this far beyond the last commit is a protocol error."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, (int, float))) and not isinstance(x, bool)


_FIELDS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "hello": {
        "join": lambda v: isinstance(v, bool),
        "step": lambda v: _is_int(v) and 0 <= v < 1 << 53,
        "state_port": lambda v: _is_int(v) and 1 <= v <= 65535,
        "id": lambda v: v is None or _is_int(v),
    },
    "beat": {},
    "met": {"gen": _is_int},
    "vote": {"gen": _is_int, "votes": lambda v: isinstance(v, list) and len(v) > 0},
    "healed": {"bytes": lambda v: _is_int(v) and v >= 0, "seconds": _is_num},
    "fault": {"gen": _is_int, "why": lambda v: isinstance(v, str)},
    "done": {"gen": _is_int, "summary": lambda v: isinstance(v, dict)},
}
_VOTE_FIELDS: dict[str, Callable[[Any], bool]] = {
    "step": lambda v: _is_int(v) and v >= 1,
    "samples": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    "row": lambda v: isinstance(v, list) and 0 < len(v) <= 4096 and all(map(_is_num, v)),
}
_VOTE_OPTIONAL: dict[str, Callable[[Any], bool]] = {
    "hash": lambda v: isinstance(v, str) and 0 < len(v) <= 256,
    "val_loss": _is_num,
}


def check_message(msg: dict[str, Any]) -> str | None:
    """What is wrong with a worker's message (None: nothing): an unknown ``op``, a
    missing field or one of the wrong type."""
    op = msg.get("op")
    spec = _FIELDS.get(op) if isinstance(op, str) else None
    if spec is None:
        return f"unknown op {str(op)[:40]!r}"
    for name, ok in spec.items():
        if name not in msg or not ok(msg[name]):
            return f"{op}: field {name!r} missing or invalid"
    if op == "vote":
        for vote in msg["votes"]:
            problem = _check_vote(vote)
            if problem:
                return f"vote: {problem}"
    return None


def _check_vote(vote: Any) -> str | None:
    if not isinstance(vote, dict):
        return "a vote that is not an object"
    for name, ok in _VOTE_FIELDS.items():
        if name not in vote or not ok(vote[name]):
            return f"field {name!r} missing or invalid"
    for name, ok in _VOTE_OPTIONAL.items():
        if name in vote and not ok(vote[name]):
            return f"field {name!r} invalid"
    return None
