"""Exact and fuzzy (MinHash LSH) deduplication, with RedPajama-v2's definitions.

Per shard, in worker processes::

    ids, keys, sigs = shard_keys(docs)           # docs: iterable of (id, text)

Then once over all shards (concatenated in shard order)::

    clusters = merge_clusters(ids, exact_clusters(ids, keys), cluster(ids, sigs, 0.8))
    keep = survivors(ids, clusters)              # each cluster's first id in input order

Exact keys hash RedPajama-v2's normalised text (``normalize``). Signatures are
RedPajama-v2's MinHash of word 13-grams with 128 permutations (seed 42), and
``lsh_params`` its bands x rows: 14x9, 9x13, 5x25, 1x128 for Jaccard 0.7, 0.8, 0.9, 1.0.
Documents shorter than 13 words have no signature and are only found by exact dedup.
``cluster(..., verify=True)`` trades RedPajama-v2's exact LSH for more recall near the
threshold: a more sensitive banding whose candidates are checked (``duplicate_pairs``).
"""

from farflung.data.dedup.clusters import (
    cluster,
    components,
    exact_clusters,
    groups,
    merge_clusters,
    survivors,
)
from farflung.data.dedup.lsh import (
    RPV2_BANDS,
    VERIFY_FN_WEIGHT,
    agreement,
    candidate_pairs,
    duplicate_pairs,
    lsh_params,
    optimal_params,
)
from farflung.data.dedup.minhash import EMPTY, RPV2_SEED, MinHasher, permutations, shingle_hashes
from farflung.data.dedup.normalize import exact_key, normalize, words
from farflung.data.dedup.shard import (
    KEY_DTYPE,
    default_hasher,
    shard_exact_keys,
    shard_keys,
    shard_signatures,
)

__all__ = [
    "EMPTY",
    "KEY_DTYPE",
    "RPV2_BANDS",
    "RPV2_SEED",
    "VERIFY_FN_WEIGHT",
    "MinHasher",
    "agreement",
    "candidate_pairs",
    "cluster",
    "components",
    "default_hasher",
    "duplicate_pairs",
    "exact_clusters",
    "exact_key",
    "groups",
    "lsh_params",
    "merge_clusters",
    "normalize",
    "optimal_params",
    "permutations",
    "shard_exact_keys",
    "shard_keys",
    "shard_signatures",
    "shingle_hashes",
    "survivors",
    "words",
]
