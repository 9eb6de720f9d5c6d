"""Per-shard dedup keys: the part that runs in worker processes, one shard at a time.

A pipeline computes each shard's ids, exact keys and signatures in parallel (saving them
as ``.npy``: a signature row is 128 x 4 bytes), then concatenates them in shard order
and runs ``exact_clusters`` / ``cluster`` once over the whole corpus. For
``verify="shingles"`` it also keeps each document's shingle hashes (``shard_shingle_keys``;
4 bytes per distinct 13-gram, about 4 bytes per word of the corpus).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from functools import lru_cache

import numpy as np

from farflung.curate.dedup.minhash import MinHasher
from farflung.curate.dedup.normalize import normalize
from farflung.curate.dedup.shingles import ShingleSets

KEY_DTYPE = np.dtype("S40")
"""Exact keys as saved: 40 ASCII hex digits of SHA-1 (no NUL bytes that ``S`` would drop)."""


@lru_cache(maxsize=1)
def default_hasher() -> MinHasher:
    """RedPajama-v2's settings: 128 permutations, word 13-grams, seed 42."""
    return MinHasher()


def shard_signatures(
    docs: Iterable[tuple[str, str]], hasher: MinHasher | None = None
) -> tuple[list[str], np.ndarray]:
    """Ids and ``(n, num_perm)`` uint32 MinHash signatures of ``(id, text)`` pairs."""
    ids: list[str] = []
    texts = (normalize(text).encode("utf-8") for text in _recording(docs, ids))
    return ids, (hasher or default_hasher()).from_normalized(texts)


def shard_exact_keys(docs: Iterable[tuple[str, str]]) -> tuple[list[str], np.ndarray]:
    """Ids and exact keys (``exact_key``, as ``KEY_DTYPE``) of ``(id, text)`` pairs."""
    ids: list[str] = []
    keys = [_sha1_hex(normalize(text).encode("utf-8")) for text in _recording(docs, ids)]
    return ids, np.array(keys, dtype=KEY_DTYPE)


def shard_keys(
    docs: Iterable[tuple[str, str]], hasher: MinHasher | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Ids, exact keys and signatures in one pass, normalising each text once."""
    return _keys(docs, hasher, None)


def shard_shingle_keys(
    docs: Iterable[tuple[str, str]], hasher: MinHasher | None = None
) -> tuple[list[str], np.ndarray, np.ndarray, ShingleSets]:
    """``shard_keys`` and each document's shingle-hash set, hashing each shingle once."""
    shingles: list[np.ndarray] = []
    ids, keys, signatures = _keys(docs, hasher, shingles)
    return ids, keys, signatures, ShingleSets.pack(shingles)


def _keys(
    docs: Iterable[tuple[str, str]], hasher: MinHasher | None, shingles: list[np.ndarray] | None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    ids: list[str] = []
    keys: list[str] = []

    def normalized() -> Iterator[bytes]:
        for text in _recording(docs, ids):
            data = normalize(text).encode("utf-8")
            keys.append(_sha1_hex(data))
            yield data

    signatures = (hasher or default_hasher()).from_normalized(normalized(), shingles)
    return ids, np.array(keys, dtype=KEY_DTYPE), signatures


def _recording(docs: Iterable[tuple[str, str]], ids: list[str]) -> Iterator[str]:
    """The texts of ``docs``, appending each id to ``ids`` as its text is taken."""
    for doc_id, text in docs:
        ids.append(doc_id)
        yield text


def _sha1_hex(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()
