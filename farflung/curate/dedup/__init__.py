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
``cluster(..., verify="signatures")`` (or ``True``) trades RedPajama-v2's exact LSH for
more recall near the threshold: a more sensitive banding whose candidates are checked by
signature agreement; ``verify="shingles"`` checks candidates of a still more sensitive
banding by their exact Jaccard, from each document's shingle hashes (``shard_shingle_keys``,
``ShingleSets``), the most accurate (``duplicate_pairs``).
"""

from farflung.curate.dedup.clusters import (
    cluster,
    components,
    exact_clusters,
    groups,
    merge_clusters,
    survivors,
)
from farflung.curate.dedup.lsh import (
    RPV2_BANDS,
    SHINGLE_RECALL,
    VERIFY_FN_WEIGHT,
    Verify,
    agreement,
    candidate_pairs,
    duplicate_pairs,
    lsh_params,
    optimal_params,
    recall_params,
    verify_mode,
)
from farflung.curate.dedup.minhash import EMPTY, RPV2_SEED, MinHasher, permutations, shingle_hashes
from farflung.curate.dedup.normalize import exact_key, normalize, words
from farflung.curate.dedup.shard import (
    KEY_DTYPE,
    default_hasher,
    shard_exact_keys,
    shard_keys,
    shard_shingle_keys,
    shard_signatures,
)
from farflung.curate.dedup.shingles import ShingleSets, jaccard, unique_hashes

__all__ = [
    "EMPTY",
    "KEY_DTYPE",
    "RPV2_BANDS",
    "RPV2_SEED",
    "SHINGLE_RECALL",
    "VERIFY_FN_WEIGHT",
    "MinHasher",
    "ShingleSets",
    "Verify",
    "agreement",
    "candidate_pairs",
    "cluster",
    "components",
    "default_hasher",
    "duplicate_pairs",
    "exact_clusters",
    "exact_key",
    "groups",
    "jaccard",
    "lsh_params",
    "merge_clusters",
    "normalize",
    "optimal_params",
    "permutations",
    "recall_params",
    "shard_exact_keys",
    "shard_keys",
    "shard_shingle_keys",
    "shard_signatures",
    "shingle_hashes",
    "survivors",
    "unique_hashes",
    "verify_mode",
    "words",
]
