"""Stable 64-bit hashes of many substrings at once, computed in numpy.

Words and tokens are runs of code points inside one array (``starts``/``ends``). Each
run is hashed as a polynomial in its code points modulo 2**64, ``sum(v[r] * P**r)`` over
the rank ``r`` inside the run (``v`` = code point + 1). This is pure integer arithmetic
on code points, so a word hashes to the same value in every process, on every machine
and in every Python version: unlike ``hash()``, which Python salts per process
(RedPajama-v2's DSIR features use ``hash()`` and so cannot be reproduced). Where hashes
are bucketed (DSIR) or combined (n-grams) they first go through splitmix64's mixer.

Two independent bases give two hashes per run. Callers that need *equality* (word ids,
stop words) compare both, which makes a false match between two different words of
fewer than 2048 characters a ~2**-128 event; longer runs are where known attacks on
polynomial hashes modulo 2**64 start, and callers treat those separately.
"""

from __future__ import annotations

import numpy as np

from farflung.curate.signals.chars import code_points

U64 = np.uint64
_BASES = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)  # odd, so invertible modulo 2**64
_LOW_BITS = 10  # ranks split into (low 10 bits, the rest): two small power tables

LONG_RUN = 2048
"""Runs at least this long are too long for the equality guarantee above."""


def _power_table(base: int, count: int) -> np.ndarray:
    """``base**i mod 2**64`` for ``i < count`` (numpy integer products wrap modulo 2**64)."""
    table = np.full(count, base, dtype=U64)
    table[0] = 1
    return np.cumprod(table, dtype=U64)


_LOW_POWERS = [_power_table(b, 1 << _LOW_BITS) for b in _BASES]
_HIGH_POWERS = [_power_table(pow(b, 1 << _LOW_BITS, 1 << 64), 16) for b in _BASES]


def _high_powers(which: int, count: int) -> np.ndarray:
    """Powers of ``base**1024``, grown when a run is longer than any seen before."""
    table = _HIGH_POWERS[which]
    if table.size < count:
        step = pow(_BASES[which], 1 << _LOW_BITS, 1 << 64)
        table = _HIGH_POWERS[which] = _power_table(step, max(count, 2 * table.size))
    return table


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the whole word (bucketing)."""
    x = x ^ (x >> U64(30))
    x = x * U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> U64(27))
    x = x * U64(0x94D049BB133111EB)
    return x ^ (x >> U64(31))


def run_hashes(
    cp: np.ndarray, starts: np.ndarray, ends: np.ndarray, both: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Polynomial hashes of the runs ``cp[starts[i]:ends[i]]`` (all non-empty).

    Returns ``(h1, h2)``, or ``(h1, None)`` without ``both``. The values are for
    equality tests; pass them through :func:`mix64` before taking them modulo anything.
    """
    lengths = ends - starts
    if lengths.size == 0:
        empty = np.zeros(0, dtype=U64)
        return empty, (empty if both else None)
    offsets = np.cumsum(lengths) - lengths
    rank = np.arange(int(offsets[-1] + lengths[-1]), dtype=np.int64)
    rank -= np.repeat(offsets, lengths)
    values = cp[np.repeat(starts, lengths) + rank].astype(U64)
    values += U64(1)  # so that a NUL character still counts
    low = rank & ((1 << _LOW_BITS) - 1)
    high = rank >> _LOW_BITS if int(lengths.max()) > (1 << _LOW_BITS) else None
    out = []
    for which in range(2 if both else 1):
        terms = values * _LOW_POWERS[which][low]
        if high is not None:
            terms *= _high_powers(which, int(high.max()) + 1)[high]
        out.append(np.add.reduceat(terms, offsets))
    return out[0], (out[1] if both else None)


def string_hashes(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The same two hashes for non-empty Python strings, equal to :func:`run_hashes`'s."""
    if not words:
        empty = np.zeros(0, dtype=U64)
        return empty, empty
    joined = code_points("".join(words))
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    ends = np.cumsum(lengths)
    h1, h2 = run_hashes(joined, ends - lengths, ends)
    return h1, h2


def ngram_hashes(h1: np.ndarray, n: int) -> np.ndarray:
    """A hash of every run of ``n`` consecutive items, from the items' own hashes."""
    count = h1.size - n + 1
    if count <= 0:
        return np.zeros(0, dtype=U64)
    out = h1[:count].copy()
    for k in range(1, n):
        out = mix64(out * U64(_BASES[0]) ^ h1[k : k + count])
    return out


def extend_ngrams(grams: np.ndarray, h1: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Hashes of n-grams grown by one item (at positions ``last``): one step of
    :func:`ngram_hashes`, for callers that follow a few candidate positions only."""
    return mix64(grams * U64(_BASES[0]) ^ h1[last])
