"""Exact Jaccard of shingle-hash sets: the check behind ``verify="shingles"``.

MinHash estimates a pair's Jaccard from 128 values (standard deviation 0.035 at 0.8),
too noisy to decide pairs between 0.8 and 0.85. The 32-bit shingle hashes the MinHasher
computes anyway give the Jaccard exactly (up to hash collisions, about one in 2**32 per
pair of shingles), at about 4 bytes per word of the corpus: each document keeps its
sorted unique hashes, and all of them are stored packed (``ShingleSets``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# Hashes compared per step: pairs are checked in chunks of about this many (64 MiB of
# uint64 keys to sort), whatever the number of candidates.
_HASHES_PER_STEP = 1 << 23


class ShingleSets(NamedTuple):
    """Documents' sorted unique uint32 shingle hashes, packed: document ``i`` is
    ``flat[offsets[i]:offsets[i + 1]]``."""

    flat: np.ndarray
    offsets: np.ndarray

    @classmethod
    def pack(cls, sets: Sequence[np.ndarray]) -> ShingleSets:
        """Pack per-document arrays, each already sorted and unique."""
        lengths = np.fromiter(map(len, sets), dtype=np.int64, count=len(sets))
        flat = np.concatenate(sets).astype(np.uint32) if len(sets) else np.empty(0, np.uint32)
        return cls(flat, np.r_[0, np.cumsum(lengths)].astype(np.int64))

    @classmethod
    def concat(cls, parts: Sequence[ShingleSets]) -> ShingleSets:
        """One packing of several (say one per shard), documents in order."""
        if not parts:
            return cls.pack([])
        shifts = np.cumsum([0] + [len(p.flat) for p in parts[:-1]])
        offsets = [parts[0].offsets[:1]] + [
            p.offsets[1:] + shift for p, shift in zip(parts, shifts, strict=True)
        ]
        return cls(np.concatenate([p.flat for p in parts]), np.concatenate(offsets))


def as_shingle_sets(shingles: ShingleSets | Sequence[np.ndarray]) -> ShingleSets:
    """``shingles`` packed: a ``ShingleSets`` as is, else a sequence of sorted unique arrays."""
    return shingles if isinstance(shingles, ShingleSets) else ShingleSets.pack(shingles)


def unique_hashes(hashes: np.ndarray) -> np.ndarray:
    """A document's shingle hashes as stored: sorted, each once (a set, for Jaccard)."""
    return np.unique(hashes).astype(np.uint32)


def jaccard(shingles: ShingleSets, pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard ``|A & B| / |A | B|`` of each pair's shingle sets (0 for two empty sets).

    Vectorised per chunk of pairs: each pair's two sets are tagged with the pair's index
    in the high 32 bits and sorted together; as each set holds a hash once, equal
    neighbours are exactly the intersection. A Python loop over ``np.intersect1d``
    costs ~10 us a pair, and verification may check millions of candidates.
    """
    out = np.empty(len(pairs))
    size = np.diff(shingles.offsets)
    cost = np.cumsum(size[pairs].sum(axis=1)) if len(pairs) else np.empty(0, np.int64)
    start = 0
    while start < len(pairs):
        stop = max(start + 1, int(np.searchsorted(cost, cost[start] + _HASHES_PER_STEP)))
        out[start:stop] = _chunk_jaccard(shingles, size, pairs[start:stop])
        start = stop
    return out


def _chunk_jaccard(shingles: ShingleSets, size: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``jaccard`` of one chunk of pairs, all of their hashes in memory at once."""
    docs = pairs.ravel()  # u0, v0, u1, v1, ...: both sets of a pair side by side
    lengths = size[docs]
    tags = np.repeat(np.arange(len(pairs), dtype=np.uint64), lengths[0::2] + lengths[1::2])
    keys = (tags << np.uint64(32)) | shingles.flat[_segments(shingles.offsets[docs], lengths)]
    keys.sort()
    same = np.flatnonzero(keys[1:] == keys[:-1])
    inter = np.bincount((keys[same] >> np.uint64(32)).astype(np.int64), minlength=len(pairs))
    union = lengths[0::2] + lengths[1::2] - inter
    return np.divide(inter, union, out=np.zeros(len(pairs)), where=union > 0)


def _segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices ``starts[k] .. starts[k] + lengths[k] - 1`` for every k, concatenated."""
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if len(ends) else 0) + np.repeat(starts - (ends - lengths), lengths)
