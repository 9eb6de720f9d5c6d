"""Small numpy building blocks, leaner than the general-purpose numpy functions.

Documents are often a few kilobytes, where numpy's per-call overhead outweighs the
work; ``np.unique``, ``np.isin`` and ``np.diff`` carry generality the signals never
need, so these do the same job in fewer primitive operations.
"""

from __future__ import annotations

import numpy as np


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of the maximal runs of True in ``mask``."""
    padded = np.zeros(mask.size + 2, dtype=bool)
    padded[1:-1] = mask
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return edges[0::2], edges[1::2]


def isin_sorted(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``np.isin(values, table)`` for a sorted ``table``."""
    if table.size == 0 or values.size == 0:
        return np.zeros(values.size, dtype=bool)
    pos = table.searchsorted(values)
    np.minimum(pos, table.size - 1, out=pos)
    return table[pos] == values


def group(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, counts, first)``: dense ids of equal values, and per id its count and the
    position of its first occurrence (``np.unique`` with inverse, counts and index)."""
    size = codes.size
    order = np.argsort(codes, kind="stable")  # stable: a group's first entry comes first
    ordered = codes[order]
    new = np.empty(size, dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    starts = new.nonzero()[0]
    ids = np.empty(size, dtype=np.int64)
    ids[order] = new.cumsum() - 1
    counts = np.empty_like(starts)
    counts[:-1] = starts[1:] - starts[:-1]
    counts[-1:] = size - starts[-1:]
    return ids, counts, order[starts]
