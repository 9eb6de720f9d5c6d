"""LSH banding of MinHash signatures: RedPajama-v2's band sizes and candidate pairs.

RedPajama-v2 has no fixed table: for each similarity threshold it calls
``optimal_param(threshold, num_perm)`` (``app/src/dedupe/utils.py``, from datasketch),
which picks the bands ``b`` and rows ``r`` (``b * r <= num_perm``) that minimise the
false-positive plus false-negative area under the LSH S-curve
``P(s) = 1 - (1 - s**r)**b``, integrated over [0, t] and [t, 1] with equal weights.
For 128 permutations that gives the table ``RPV2_BANDS``; ``lsh_params`` returns it for
those thresholds and runs the same search for any other.

Two documents are candidates when all ``r`` values of some band are equal, exactly as
in RedPajama-v2's ``run_lsh.py``: each bucket links every member to its first one.
``duplicate_pairs(..., verify="signatures")`` (or ``True``) is farflung's variant: a more
sensitive banding, then each candidate checked against the threshold by its signatures'
agreement; ``verify="shingles"`` bands for recall (``recall_params``) and checks each
candidate's exact Jaccard on its shingle-hash sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np

from farflung.curate.dedup.minhash import EMPTY
from farflung.curate.dedup.shingles import ShingleSets, as_shingle_sets, jaccard

Verify = Literal["signatures", "shingles"] | bool | None
"""How candidate pairs are checked: not at all (False, None: RedPajama-v2), by signature
agreement ("signatures", or True for backward compatibility) or by exact Jaccard ("shingles")."""

RPV2_BANDS = {0.7: (14, 9), 0.8: (9, 13), 0.9: (5, 25), 1.0: (1, 128)}
"""RedPajama-v2's (bands, rows) per Jaccard threshold, for 128 permutations."""

VERIFY_FN_WEIGHT = 0.9
"""How much more a missed pair costs than a false candidate, when candidates are verified."""

SHINGLE_RECALL = 0.99
"""P(candidate) at the threshold that ``verify="shingles"`` bands for (``recall_params``)."""

# Pairs compared per step: two (n, 128) uint32 gathers of 32 MiB each, whatever the total.
_PAIRS_PER_STEP = 1 << 16

# FNV-1a's 64-bit prime: mixes a band's 32-bit values into one sortable key.
_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)


def lsh_params(threshold: float, num_perm: int = 128) -> tuple[int, int]:
    """(bands, rows) for a Jaccard threshold: RedPajama-v2's table, else its search."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if num_perm == 128 and threshold in RPV2_BANDS:
        return RPV2_BANDS[threshold]
    return optimal_params(threshold, num_perm)


@lru_cache(maxsize=64)
def optimal_params(threshold: float, num_perm: int, fn_weight: float = 0.5) -> tuple[int, int]:
    """The (b, r) with the least weighted false-positive + false-negative area.

    The first minimum in (b, r) order, like the reference's loop; ``fn_weight`` is
    datasketch's false-negative weight (the false-positive weight is ``1 - fn_weight``).
    The areas are integrals of polynomials of degree ``r * b <= num_perm``, so
    Gauss-Legendre quadrature with ``num_perm // 2 + 1`` nodes is exact (up to rounding);
    scipy's adaptive ``quad``, which the reference uses, agrees to ~1e-9.
    """
    pairs = [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)]
    bands, rows = (np.array(col, dtype=np.float64)[:, None] for col in zip(*pairs, strict=True))
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 1)

    def area(lo: float, hi: float, miss: bool) -> np.ndarray:
        s = (hi - lo) / 2 * nodes + (hi + lo) / 2
        p = 1.0 - (1.0 - s**rows) ** bands  # probability that a pair at s is a candidate
        return (hi - lo) / 2 * ((1.0 - p if miss else p) @ weights)

    fp = area(0.0, threshold, miss=False)
    fn = area(threshold, 1.0, miss=True)
    return pairs[int(np.argmin((1.0 - fn_weight) * fp + fn_weight * fn))]


@lru_cache(maxsize=64)
def recall_params(
    threshold: float, num_perm: int, recall: float = SHINGLE_RECALL
) -> tuple[int, int]:
    """The (b, r) with the most rows whose S-curve reaches ``recall`` at the threshold.

    For r rows the most bands that fit, ``num_perm // r``, give the most recall; more
    rows make a chance match of a band rarer, so of those that reach ``recall`` the one
    with the most rows has the fewest candidates below the threshold, which are all
    checked. At 0.8 with 128 permutations: 21x6, P(0.8) = 0.998 (25x5 would make a pair
    at 0.3 a candidate four times as often: 0.059 vs 0.015; 18x7 reaches only 0.985).
    """
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands, rows
    raise ValueError(f"no banding of {num_perm} permutations reaches {recall} at {threshold}")


def verify_mode(verify: Verify) -> str | None:
    """``verify`` as None, "signatures" or "shingles" (True is "signatures")."""
    if verify is None or verify is False:
        return None
    if verify is True or verify == "signatures":
        return "signatures"
    if verify == "shingles":
        return "shingles"
    raise ValueError(f"verify must be False, True, 'signatures' or 'shingles', got {verify!r}")


def duplicate_pairs(
    signatures: np.ndarray,
    threshold: float,
    verify: Verify = False,
    shingles: ShingleSets | Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """``(n, 2)`` pairs of rows taken as near-duplicates at a Jaccard threshold.

    ``verify=False`` is RedPajama-v2's LSH: candidates share a band of ``lsh_params``
    (9x13 at 0.8), and none is checked. Its S-curve is centred above the threshold: 9x13
    finds a pair at Jaccard 0.8 with probability 0.40, at 0.85 with 0.69, at 0.9 with 0.93.

    ``verify=True`` finds candidates with the banding that weighs a missed pair 9 times a
    false candidate (``VERIFY_FN_WEIGHT``; 14x9, RedPajama-v2's 0.7 banding, at 0.8),
    then keeps those whose signatures agree on at least ``threshold`` of their values,
    MinHash's estimate of their Jaccard (standard deviation 0.035 at 0.8 with 128).

    ``verify="shingles"`` finds candidates with ``recall_params`` (21x6 at 0.8: 99.8% of
    pairs at 0.8 are candidates) and keeps those whose ``shingles`` (row ``i``'s sorted
    unique 32-bit shingle hashes; see ``ShingleSets``) have an exact Jaccard of at least
    ``threshold``: no pair below it, and only pairs the banding misses are lost.
    """
    mode = verify_mode(verify)
    num_perm = signatures.shape[1]
    if mode is None:
        return candidate_pairs(signatures, *lsh_params(threshold, num_perm))
    if mode == "signatures":
        bands = optimal_params(threshold, num_perm, VERIFY_FN_WEIGHT)
        pairs = candidate_pairs(signatures, *bands)
        return pairs[agreement(signatures, pairs) >= threshold]
    if shingles is None:
        raise ValueError('verify="shingles" needs the documents\' shingles')
    sets = as_shingle_sets(shingles)
    if len(sets.offsets) - 1 != len(signatures):
        raise ValueError(f"{len(sets.offsets) - 1} shingle sets for {len(signatures)} signatures")
    pairs = candidate_pairs(signatures, *recall_params(threshold, num_perm))
    return pairs[jaccard(sets, pairs) >= threshold]


def agreement(signatures: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Fraction of equal signature values of each pair: MinHash's estimate of its Jaccard."""
    out = np.empty(len(pairs))
    for start in range(0, len(pairs), _PAIRS_PER_STEP):
        u, v = pairs[start : start + _PAIRS_PER_STEP].T
        out[start : start + len(u)] = (signatures[u] == signatures[v]).mean(axis=1)
    return out


def candidate_pairs(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(n, 2)`` int64 pairs ``(first, other)`` of rows sharing a band, each pair once.

    Rows that are all ``EMPTY`` (documents shorter than one shingle) are never candidates.
    """
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"{bands} x {rows} bands need {bands * rows} permutations")
    live = np.flatnonzero((signatures != EMPTY).any(axis=1))
    found = [_band_pairs(signatures[live, i * rows : (i + 1) * rows]) for i in range(bands)]
    pairs = live[np.concatenate(found)] if found else np.empty((0, 2), dtype=np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def _band_pairs(band: np.ndarray) -> np.ndarray:
    """Pairs (first member, member) of every bucket of identical rows in one band."""
    order, starts = _buckets(band)
    head = order[np.repeat(starts, np.diff(np.r_[starts, len(order)]))]
    pairs = np.stack([head, order], axis=1)
    return pairs[head != order].astype(np.int64)


def _buckets(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices grouped by identical band values, and where each group starts.

    Sorting one 64-bit key per row is several times faster than sorting the rows
    themselves; the rare rows whose keys collide but whose values differ are caught by
    comparing every row with its group's first, and the band is then grouped exactly.
    """
    key = np.full(len(band), _FNV_OFFSET, dtype=np.uint64)
    for column in band.T:
        key ^= column
        key *= _FNV_PRIME
    order = np.argsort(key, kind="stable")
    starts = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1]])
    firsts = order[np.repeat(starts, np.diff(np.r_[starts, len(order)]))]
    if not np.array_equal(band[order], band[firsts]):
        _, inverse = np.unique(band, axis=0, return_inverse=True)
        order = np.argsort(inverse.ravel(), kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(inverse.ravel()[order]) != 0])
    return order, starts
