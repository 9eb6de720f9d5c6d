"""MinHash signatures of word 13-grams, bit for bit as RedPajama-v2 computes them.

RedPajama-v2 (``app/src/dedupe/minhash.py`` and ``utils.py``, adapted from datasketch
before its 2.0 release) defines a document's signature as follows, and so does this
module:

- words: the document's normalised words (``normalize.words``);
- shingles: every run of ``ngram`` consecutive words joined by single spaces; a document
  with fewer than ``ngram`` words has no signature (RedPajama-v2 stores ``None``; here
  its row is all ``EMPTY`` and clustering skips it);
- each shingle hashed to 32 bits: the first 4 bytes of its UTF-8 SHA-1, little-endian;
- permutation ``i``: ``((h * a_i + b_i) mod 2**64) mod (2**61 - 1)``, keeping the low 32
  bits, where ``(a_i, b_i)`` are drawn in turn from ``numpy.random.RandomState(seed)``
  (``a`` in [1, p), ``b`` in [0, p)); the signature is the minimum over shingles.

With RedPajama-v2's seed (42, the default) the signatures, and so the LSH band keys,
equal the ones published with RedPajama-v2. Unlike the reference, which builds one
(shingles x permutations) matrix per document, shingles of many documents are permuted
together in cache-sized blocks, and ``mod 2**61 - 1`` is done with shifts and masks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np

from farflung.curate.dedup.normalize import normalize
from farflung.curate.dedup.shingles import unique_hashes

EMPTY = np.uint32(0xFFFFFFFF)
"""Every value of the signature row of a document too short to have a shingle."""

RPV2_SEED = 42
"""RedPajama-v2's default seed (``pipeline.py --seed``); it fixes the permutations."""

_MERSENNE = np.uint64((1 << 61) - 1)
_LOW32 = np.uint64((1 << 32) - 1)
_SHIFT = np.uint64(61)
# Shingles permuted per numpy step: a (2048, 128) uint64 block (2 MiB) stays in cache,
# which made the permutation ~2x faster per element than 16k-row blocks.
_BLOCK = 2048
# Shingles gathered before a batch of documents is permuted; bounds memory on big shards.
_BATCH = 1 << 16


def permutations(num_perm: int = 128, seed: int = RPV2_SEED) -> np.ndarray:
    """The ``(2, num_perm)`` uint64 array of ``a`` and ``b``, drawn as RedPajama-v2 draws them.

    One ``a`` then one ``b`` per permutation, in a Python loop: drawing all the ``a`` at
    once would give different numbers from the same seed.
    """
    rng = np.random.RandomState(seed)
    pairs = [
        (rng.randint(1, _MERSENNE, dtype=np.uint64), rng.randint(0, _MERSENNE, dtype=np.uint64))
        for _ in range(num_perm)
    ]
    return np.ascontiguousarray(np.array(pairs, dtype=np.uint64).T)


def shingle_hashes(normalized: bytes, ngram: int = 13) -> np.ndarray:
    """32-bit SHA-1 hashes of every word ``ngram``-gram of UTF-8 normalised text.

    Normalised text has single spaces between words and none at the ends, so a shingle
    is the byte slice from one word's start to the end of the word ``ngram - 1`` later,
    which is cheaper than joining words. Repeated shingles are hashed again rather than
    deduplicated first: the minimum does not change.
    """
    if normalized.count(b" ") + 1 < ngram:
        return np.empty(0, dtype=np.uint32)
    spaces = np.flatnonzero(np.frombuffer(normalized, dtype=np.uint8) == 0x20)
    starts = [0, *(spaces[: len(spaces) + 1 - ngram] + 1).tolist()]
    ends = [*spaces[ngram - 1 :].tolist(), len(normalized)]
    sha1 = hashlib.sha1
    digests = b"".join(
        [sha1(normalized[s:e]).digest()[:4] for s, e in zip(starts, ends, strict=True)]
    )
    return np.frombuffer(digests, dtype="<u4")


class MinHasher:
    """Computes MinHash signatures; same arguments, same signatures, in any process."""

    def __init__(self, num_perm: int = 128, ngram: int = 13, seed: int = RPV2_SEED) -> None:
        if num_perm < 1 or ngram < 1:
            raise ValueError(f"num_perm and ngram must be positive, got {num_perm}, {ngram}")
        self.num_perm = num_perm
        self.ngram = ngram
        self.seed = seed
        self._perm = permutations(num_perm, seed)

    @property
    def checksum(self) -> str:
        """SHA-256 of the permutations: RedPajama-v2 logs the same as ``__MINHASH_PERM_CHECKSUM__``.

        Store it beside saved signatures so that signatures made with other settings are
        never clustered together.
        """
        return hashlib.sha256(self._perm.tobytes()).hexdigest()

    def signature(self, text: str) -> np.ndarray:
        """The ``(num_perm,)`` uint32 signature of one document."""
        return self.signatures([text])[0]

    def signatures(self, texts: Iterable[str]) -> np.ndarray:
        """The ``(len(texts), num_perm)`` uint32 signatures, one row per text, in order."""
        return self.from_normalized(normalize(t).encode("utf-8") for t in texts)

    def from_normalized(
        self, texts: Iterable[bytes], shingles: list[np.ndarray] | None = None
    ) -> np.ndarray:
        """Signatures of already normalised, UTF-8 encoded texts (see ``normalize``).

        ``shingles``: if given, each text's sorted unique shingle hashes are appended to
        it, reusing the hashes of the signatures (exact verification, ``ShingleSets``).
        """
        blocks = [self._batch(batch) for batch in self._batches(texts, shingles)]
        if not blocks:
            return np.empty((0, self.num_perm), dtype=np.uint32)
        return np.concatenate(blocks)

    def _batches(
        self, texts: Iterable[bytes], keep: list[np.ndarray] | None
    ) -> Iterator[list[np.ndarray]]:
        """Shingle hashes of consecutive documents, in batches of about ``_BATCH`` shingles."""
        batch: list[np.ndarray] = []
        size = 0
        for text in texts:
            hashes = shingle_hashes(text, self.ngram)
            if keep is not None:
                keep.append(unique_hashes(hashes))
            batch.append(hashes)
            size += len(hashes)
            if size >= _BATCH:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _batch(self, hashes: list[np.ndarray]) -> np.ndarray:
        """Signatures of one batch: each block's minima folded into its documents' rows."""
        out = np.full((len(hashes), self.num_perm), EMPTY, dtype=np.uint32)
        counts = np.fromiter(map(len, hashes), dtype=np.int64, count=len(hashes))
        if not counts.any():
            return out
        flat = np.concatenate(hashes).astype(np.uint64)
        owner = np.repeat(np.arange(len(hashes)), counts)
        for start in range(0, len(flat), _BLOCK):
            rows = owner[start : start + _BLOCK]
            first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            minima = np.minimum.reduceat(self._permute(flat[start : start + _BLOCK]), first)
            # A document cut by a block boundary gets a minimum from each block.
            doc = rows[first]
            out[doc] = np.minimum(out[doc], minima.astype(np.uint32))
        return out

    def _permute(self, h: np.ndarray) -> np.ndarray:
        """``((h * a + b) mod 2**64 mod (2**61 - 1)) & (2**32 - 1)`` for every shingle x perm.

        numpy's uint64 arithmetic wraps like the reference's; ``x mod (2**61 - 1)`` is
        ``(x & p) + (x >> 61)`` less one ``p`` where that reaches ``p`` (2**61 = 1 mod p),
        exact and faster than numpy's 64-bit division.
        """
        a, b = self._perm
        x = np.multiply.outer(h, a)
        x += b
        y = x & _MERSENNE
        x >>= _SHIFT
        y += x
        np.subtract(y, _MERSENNE, out=y, where=y >= _MERSENNE)
        y &= _LOW32
        return y
