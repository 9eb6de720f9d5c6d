"""Character classes of every code point, exactly as Python's str methods and ``re`` see them.

RedPajama-v2 defines its signals with per-character Python: ``str.isupper``,
``str.isnumeric``, ``str.split``/``strip`` and the ``re`` classes ``\\w``, ``\\s`` and
``\\b``. To compute them over a whole document in a few numpy operations instead of one
Python call per character, each code point gets a byte of flags from a lookup table that
is *built by calling those same str methods*, so the vectorised signals agree with the
per-character definitions by construction. The table for ASCII is built at import; the
rest is built one 64K-code-point plane at a time, the first time a document needs it.
"""

from __future__ import annotations

import string

import numpy as np

WORD = 1
"""``re``'s ``\\w`` for str patterns: ``str.isalnum()`` or ``"_"``."""
SPACE = 2
"""``str.isspace()``: what ``re``'s ``\\s``, ``str.split()`` and ``str.strip()`` treat as space."""
UPPER = 4
"""``str.isupper()`` of the character alone."""
LOWER_OR_TITLE = 8
"""Lowercase or titlecase: one of these in a string makes ``str.isupper()`` false."""
NUMERIC = 16
"""``str.isnumeric()``."""
ASCII_ALPHA = 32
"""``[a-zA-Z]``, RedPajama-v2's test for "contains an alphabetic character"."""
ASCII_PUNCT = 64
"""``string.punctuation``: what RedPajama-v2's normalisation deletes."""
SENTENCE_END = 128
"""``.``, ``!`` or ``?``: what ends a sentence in ``rps_doc_num_sentences``."""

_PLANE = 1 << 16
_UNIT = np.uint8


def _flags_of_range(lo: int, hi: int) -> np.ndarray:
    """Flags of code points ``lo..hi-1``, each computed by the str method it stands for."""
    chars = "".join(map(chr, range(lo, hi)))
    n = hi - lo

    def test(method) -> np.ndarray:
        return np.fromiter(map(method, chars), dtype=bool, count=n)

    upper = test(str.isupper)
    # A one-character str.istitle() is true for uppercase too, hence the "and not upper".
    title = test(str.istitle) & ~upper
    flags = np.zeros(n, dtype=_UNIT)
    flags[test(str.isalnum)] |= WORD
    flags[test(str.isspace)] |= SPACE
    flags[upper] |= UPPER
    flags[test(str.islower) | title] |= LOWER_OR_TITLE
    flags[test(str.isnumeric)] |= NUMERIC
    if lo < 128:
        for ch in "_":
            flags[ord(ch) - lo] |= WORD
        for ch in string.ascii_letters:
            flags[ord(ch) - lo] |= ASCII_ALPHA
        for ch in string.punctuation:
            flags[ord(ch) - lo] |= ASCII_PUNCT
        for ch in ".!?":
            flags[ord(ch) - lo] |= SENTENCE_END
    return flags


ASCII_FLAGS = _flags_of_range(0, 128)
"""Flags of the 128 ASCII code points (most documents need no other table)."""

_table = np.zeros(0, dtype=_UNIT)


def _table_through(top: int) -> np.ndarray:
    """The flag table covering code points ``0..top``, extended plane by plane on demand."""
    global _table
    while _table.size <= top:
        lo = _table.size
        _table = np.concatenate([_table, _flags_of_range(lo, lo + _PLANE)])
    return _table


def flags_of(cp: np.ndarray) -> np.ndarray:
    """Flags of each code point in ``cp`` (uint8 for ASCII text, uint32 otherwise)."""
    if cp.dtype == np.uint8:
        return ASCII_FLAGS[cp]
    if cp.size == 0:
        return np.zeros(0, dtype=_UNIT)
    return _table_through(int(cp.max()))[cp]


def code_points(text: str) -> np.ndarray:
    """The code points of ``text``: uint8 when it is ASCII (cheaper), uint32 otherwise.

    Lone surrogates (which JSON can smuggle into a str) pass through as their own code
    points rather than failing, so no document can crash the signals.
    """
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def text_of(cp: np.ndarray) -> str:
    """The inverse of :func:`code_points`."""
    if cp.dtype == np.uint8:
        return cp.tobytes().decode("ascii")
    return cp.astype(np.uint32).tobytes().decode("utf-32-le", "surrogatepass")
