"""Duplicate clusters: connected components of duplicate pairs, and who survives.

A cluster is a list of at least two ids, in input order; clusters are ordered by their
first member. The survivor of a cluster is its first id in input order, the same choice
as RedPajama-v2's ``run_lsh.py`` (its cluster id is the smallest document id), made
deterministic here by input order, which does not depend on how ids hash or sort.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from farflung.curate.dedup.lsh import Verify, duplicate_pairs
from farflung.curate.dedup.shingles import ShingleSets


def cluster(
    ids: Sequence[str],
    signatures: np.ndarray,
    threshold: float,
    verify: Verify = False,
    shingles: ShingleSets | Sequence[np.ndarray] | None = None,
) -> list[list[str]]:
    """Near-duplicate clusters at a Jaccard threshold: components of ``duplicate_pairs``.

    ``ids[i]`` names ``signatures[i]`` (and ``shingles``' set ``i``, which
    ``verify="shingles"`` needs); for several shards, concatenate them in shard order
    (``ShingleSets.concat``). ``verify=False`` is RedPajama-v2's LSH; see
    ``duplicate_pairs`` for the verified modes.
    """
    if len(ids) != len(signatures):
        raise ValueError(f"{len(ids)} ids for {len(signatures)} signatures")
    _check_unique(ids)
    pairs = duplicate_pairs(signatures, threshold, verify, shingles)
    return groups(ids, components(len(ids), pairs))


def exact_clusters(ids: Sequence[str], keys: Sequence[Hashable]) -> list[list[str]]:
    """Clusters of ids whose exact keys (``exact_key``) are equal."""
    if len(ids) != len(keys):
        raise ValueError(f"{len(ids)} ids for {len(keys)} keys")
    _check_unique(ids)
    first: dict[Hashable, int] = {}
    labels = np.fromiter(
        (first.setdefault(key, i) for i, key in enumerate(keys)), dtype=np.int64, count=len(ids)
    )
    return groups(ids, labels)


def merge_clusters(ids: Sequence[str], *cluster_lists: list[list[str]]) -> list[list[str]]:
    """One clustering from several (say exact and fuzzy): ids linked in any are together."""
    position = {doc_id: i for i, doc_id in enumerate(ids)}
    pairs = [
        (position[members[0]], position[m])
        for found in cluster_lists
        for members in found
        for m in members[1:]
    ]
    return groups(ids, components(len(ids), np.array(pairs, dtype=np.int64).reshape(-1, 2)))


def survivors(ids: Sequence[str], clusters: list[list[str]]) -> set[str]:
    """The ids to keep: every id outside the clusters and each cluster's first in ``ids``."""
    position = {doc_id: i for i, doc_id in enumerate(ids)}
    dropped = set()
    for members in clusters:
        keep = min(members, key=position.__getitem__)
        dropped.update(m for m in members if m != keep)
    return set(ids) - dropped


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Label each of ``n`` nodes with the smallest node connected to it through ``pairs``.

    Union-find in whole-array steps: hook every edge's larger root under its smaller
    root, then jump pointers until each node points at a root; repeat until no edge
    joins two roots. Parents only ever point at smaller nodes, so a root is its
    component's smallest node, and a few rounds suffice even for long chains.
    """
    parent = np.arange(n)
    u, v = pairs[:, 0], pairs[:, 1]
    while True:
        ru, rv = parent[u], parent[v]
        apart = ru != rv
        if not apart.any():
            return parent
        ru, rv = ru[apart], rv[apart]
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
        while not np.array_equal(jumped := parent[parent], parent):
            parent = jumped


def groups(ids: Sequence[str], labels: np.ndarray) -> list[list[str]]:
    """Ids grouped by label (a label is its group's first index), groups of two or more."""
    counts = np.bincount(labels, minlength=len(ids))
    members = np.flatnonzero(counts[labels] >= 2)
    members = members[np.argsort(labels[members], kind="stable")]
    splits = np.flatnonzero(np.diff(labels[members])) + 1
    return [[ids[i] for i in group] for group in np.split(members, splits)] if len(members) else []


def _check_unique(ids: Sequence[str]) -> None:
    """Survivors are chosen by id, so a repeated id would make the choice ambiguous."""
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique")
