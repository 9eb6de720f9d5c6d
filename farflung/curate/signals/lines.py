"""Line-level signals (RedPajama-v2's ``lines.py``) and the ellipsis-line fraction.

farflung's own implementation of their definitions, computed for all lines at once:
each line's first and last non-space character come from one sorted array of
non-space positions, and per-line counts from ``bincount`` over line indices. Raw lines
and their offsets are those of :mod:`~farflung.curate.signals.text`; "normalised line"
is the line after RedPajama-v2's normalisation (``" ".join`` of its normalised words).
"""

from __future__ import annotations

import numpy as np

from farflung.curate.signals.arrays import isin_sorted
from farflung.curate.signals.chars import NUMERIC, SPACE, UPPER
from farflung.curate.signals.hashing import string_hashes
from farflung.curate.signals.spans import (
    Spans,
    as_floats,
    doc_span,
    line_spans,
    ratio,
    rounded_list,
)
from farflung.curate.signals.text import ParsedDoc

NAMES = (
    "rps_lines_ending_with_terminal_punctution_mark",
    "rps_lines_javascript_counts",
    "rps_lines_num_words",
    "rps_lines_uppercase_letter_fraction",
    "rps_lines_numerical_chars_fraction",
    "rps_lines_start_with_bulletpoint",
)
ELLIPSIS_NAME = "rps_doc_frac_lines_end_with_ellipsis"

_TERMINAL = np.sort([ord(c) for c in ".!?\u201d"])
_BULLETS = np.sort([0x2022, 0x2023, 0x25B6, 0x25C0, 0x25E6, 0x25A0, 0x25A1, 0x25AA, 0x25AB, 0x2013])
_DOT, _ELLIPSIS = ord("."), 0x2026
_JAVASCRIPT = string_hashes(["javascript"])[0][0]


def line_ends_and_starts(doc: ParsedDoc) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(last, first, blank)``: each raw line's last and first non-space character.

    This is what ``line.rstrip().endswith(...)`` and ``line.lstrip().startswith(...)``
    look at. ``blank`` marks lines with no non-space character (their positions are 0).
    """
    solid = np.flatnonzero((doc.flags & SPACE) == 0)
    if solid.size == 0:
        zeros = np.zeros(doc.n_lines, dtype=np.int64)
        return zeros, zeros, np.ones(doc.n_lines, dtype=bool)
    k_last = np.searchsorted(solid, doc.line_ends) - 1
    last = solid[np.maximum(k_last, 0)]
    blank = (k_last < 0) | (last < doc.line_starts)
    first = solid[np.minimum(np.searchsorted(solid, doc.line_starts), solid.size - 1)]
    return np.where(blank, 0, last), np.where(blank, 0, first), blank


def ends_with_ellipsis(doc: ParsedDoc, last: np.ndarray, blank: np.ndarray) -> np.ndarray:
    """Lines whose stripped text ends with ``...`` or ``…``."""
    cp = doc.cp
    dots = (
        (cp[last] == _DOT)
        & (last - 2 >= doc.line_starts)
        & (cp[np.maximum(last - 1, 0)] == _DOT)
        & (cp[np.maximum(last - 2, 0)] == _DOT)
    )
    return ~blank & ((cp[last] == _ELLIPSIS) | dots)


def per_line(positions: np.ndarray, line_ends: np.ndarray, n_lines: int) -> np.ndarray:
    """How many of the sorted ``positions`` fall in each line."""
    lines = np.searchsorted(line_ends, positions, side="right")
    return np.bincount(lines, minlength=n_lines)[:n_lines]


def normalized_line_counts(doc: ParsedDoc) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(words, length, numeric characters)`` of every normalised line."""
    n = doc.n_lines
    words = np.bincount(doc.word_line, minlength=n)[:n]
    chars = np.bincount(doc.word_line, weights=doc.word_lengths, minlength=n)[:n]
    length = chars.astype(np.int64) + np.maximum(words - 1, 0)  # one space between words
    numeric_at = np.flatnonzero(doc.norm_flags & NUMERIC)
    norm_line_ends = np.append(doc.norm_newlines + 1, doc.norm_cp.size)
    numeric = per_line(numeric_at, norm_line_ends, n)
    return words, length, numeric


def javascript_counts(doc: ParsedDoc) -> np.ndarray:
    """Normalised words equal to ``javascript``, per line (the hash finds, the str checks)."""
    counts = np.zeros(doc.n_lines, dtype=np.int64)
    for i in np.flatnonzero(doc.word_hashes[0] == _JAVASCRIPT).tolist():
        if doc.word(i) == "javascript":
            counts[doc.word_line[i]] += 1
    return counts


def line_signals(doc: ParsedDoc) -> dict[str, Spans]:
    """Every signal of :data:`NAMES`, plus :data:`ELLIPSIS_NAME`."""
    n_chars, n = len(doc.text), doc.n_lines
    if n == 0:
        empty: dict[str, Spans] = {name: [] for name in NAMES}
        empty["rps_lines_start_with_bulletpoint"] = doc_span(n_chars, None)
        empty[ELLIPSIS_NAME] = doc_span(n_chars, None)
        return empty
    starts, ends = doc.line_starts, doc.line_ends
    last, first, blank = line_ends_and_starts(doc)
    terminal = ~blank & isin_sorted(doc.cp[last], _TERMINAL)
    bullet = ~blank & isin_sorted(doc.cp[first], _BULLETS)
    upper = per_line(np.flatnonzero(doc.flags & UPPER), ends, n)
    words, length, numeric = normalized_line_counts(doc)
    numeric_frac = np.divide(numeric, length, out=np.zeros(n), where=length > 0)
    ellipsis = int(np.count_nonzero(ends_with_ellipsis(doc, last, blank)))
    upper_frac = rounded_list(upper / (ends - starts))
    at, to = starts.tolist(), ends.tolist()
    return {
        NAMES[0]: line_spans(at, to, as_floats(terminal)),
        NAMES[1]: line_spans(at, to, as_floats(javascript_counts(doc))),
        NAMES[2]: line_spans(at, to, words.tolist()),
        NAMES[3]: line_spans(at, to, upper_frac),
        NAMES[4]: line_spans(at, to, rounded_list(numeric_frac)),
        NAMES[5]: line_spans(at, to, as_floats(bullet)),
        ELLIPSIS_NAME: doc_span(n_chars, ratio(float(ellipsis), n)),
    }
