"""RedPajama-v2's span format: every signal is a list of ``[start, end, score]``.

A document-level signal is one span over the whole raw text; a line-level signal has
one span per line, with character offsets into the raw text. Scores are rounded to 8
decimals, as RedPajama-v2 rounds them (``core/constants.py``: ``PRECISION = 8``), with
Python's ``round`` so that the digits agree with theirs, not just the value. A score
that is undefined (a mean over no words) is ``None``, as theirs is.
"""

from __future__ import annotations

import numpy as np

PRECISION = 8
_SCALE = 10.0**PRECISION

Score = float | int | None
Spans = list[list]
"""``[[start: int, end: int, score: float | int | None], ...]``."""


def doc_span(n_chars: int, score: Score) -> Spans:
    """The one span of a document-level signal."""
    return [[0, n_chars, score]]


def rounded(x: float) -> float:
    """``x`` rounded to RedPajama-v2's precision."""
    return round(x, PRECISION)


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator`` rounded, or None when there is nothing to divide by."""
    if denominator == 0:
        return None
    return round(numerator / denominator, PRECISION)


def line_spans(starts: list[int], ends: list[int], scores: list) -> Spans:
    """One ``[start, end, score]`` per line (built in C: documents can have many lines)."""
    return list(map(list, zip(starts, ends, scores, strict=True)))


def rounded_list(values: np.ndarray) -> list[float]:
    """Each value rounded exactly as Python's ``round(x, 8)`` rounds it, vectorised.

    ``round`` picks the multiple of 1e-8 nearest to the exact binary value; ``rint(x *
    1e8) / 1e8`` picks the same one unless ``x * 1e8`` lies within its own rounding error
    of a half-way point, so exactly those values (rare) go through ``round`` itself.
    """
    scaled = values * _SCALE
    out = np.rint(scaled) / _SCALE
    distance = np.abs(np.abs(scaled - np.floor(scaled)) - 0.5)
    unsure = np.flatnonzero((distance <= np.abs(scaled) * 1e-15 + 1e-300) | ~(np.abs(values) < 1e6))
    result = out.tolist()
    for i in unsure.tolist():
        result[i] = round(float(values[i]), PRECISION)
    return result


def as_floats(values: np.ndarray) -> list[float]:
    """Python floats of an array of counts or flags."""
    return values.astype(np.float64).tolist()
