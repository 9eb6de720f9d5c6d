"""Samples and batches: which tokens each optimizer step trains on, as pure functions.

A sample is identified by a stable integer id, and the ids of every step follow from
``(step, batch_size, n_samples, seed)`` alone. Any worker can therefore compute its
share of any step without talking to the others, and resuming at step ``s`` replays
exactly the batches an uninterrupted run would have seen: the data order needs no
checkpoint state beyond the step number.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from farflung.data.errors import DataError
from farflung.data.shards import TokenStream

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
"""Target id of tokens that are not trained on (PyTorch cross_entropy's ``ignore_index``)."""


class SampleSet:
    """Fixed-length training samples cut from a token stream.

    Sample ``i`` is tokens ``[i*context, i*context + context + 1)``: the input is the
    first ``context`` tokens and the target the same window shifted by one. Windows
    overlap by the one target token only, so every token is a target once per epoch.
    With a loss mask (instruction data), a target whose token is not trained on (a
    prompt token) is :data:`IGNORE_INDEX` instead.
    """

    def __init__(self, stream: TokenStream, context: int) -> None:
        if context < 1:
            raise DataError(f"context must be positive, got {context}")
        self.stream = stream
        self.context = context
        self.n = (len(stream) - 1) // context
        if self.n <= 0:
            raise DataError(
                f"context {context} is larger than the {stream.split!r} split "
                f"({len(stream)} tokens): use a shorter context or more data"
            )

    def __len__(self) -> int:
        return self.n

    def tokens(self, i: int) -> np.ndarray:
        """The ``context + 1`` tokens of sample ``i``."""
        if not 0 <= i < self.n:
            raise IndexError(f"sample id {i} out of range [0, {self.n})")
        return self.stream.slice(i * self.context, i * self.context + self.context + 1)

    @property
    def has_mask(self) -> bool:
        """Whether targets can be :data:`IGNORE_INDEX` (the data has a loss mask)."""
        return self.stream.has_mask

    def target_mask(self, i: int) -> np.ndarray:
        """Which of sample ``i``'s ``context`` targets count (bool); all without a mask."""
        if not 0 <= i < self.n:
            raise IndexError(f"sample id {i} out of range [0, {self.n})")
        if not self.has_mask:
            return np.ones(self.context, dtype=bool)
        start = i * self.context + 1  # the targets are the window shifted by one
        return self.stream.mask_slice(start, start + self.context).astype(bool)

    def batch(self, ids: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``x`` and targets ``y``, both LongTensor ``[len(ids), context]``; ``y``
        is :data:`IGNORE_INDEX` where the loss mask says the target is not trained on."""
        import torch  # here: launchers check sample ids without loading torch (seconds)

        ids = _as_ids(ids)
        rows = np.empty((len(ids), self.context + 1), dtype=np.int64)
        for row, i in enumerate(ids):
            rows[row] = self.tokens(int(i))
        x = np.ascontiguousarray(rows[:, :-1])
        # A copy, never a view: with one row ``ascontiguousarray`` returns views of
        # ``rows`` that overlap x, and masking y in place would then corrupt x.
        y = rows[:, 1:].copy()
        if self.has_mask:
            for row, i in enumerate(ids):
                y[row, ~self.target_mask(int(i))] = IGNORE_INDEX
        return torch.from_numpy(x), torch.from_numpy(y)

    def target_counts(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Targets that count per sample (int64; ``context`` each without a mask), so
        micro-batches can be weighted by the tokens they actually train on."""
        ids = _as_ids(ids)
        if not self.has_mask:
            return np.full(len(ids), self.context, dtype=np.int64)
        return np.array([self.target_mask(int(i)).sum() for i in ids], dtype=np.int64)


def _as_ids(ids: np.ndarray | list[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64).reshape(-1)


@lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n_samples: int) -> np.ndarray:
    """Sample order of one epoch. Cached because consecutive steps share an epoch and a
    permutation costs O(n_samples); read-only so cached copies cannot be altered."""
    perm = np.random.default_rng([seed, epoch]).permutation(n_samples).astype(np.int64)
    perm.setflags(write=False)
    return perm


def batch_ids(step: int, batch_size: int, n_samples: int, seed: int) -> np.ndarray:
    """Sample ids of the global batch of optimizer step ``step``.

    The sample order is the concatenation of per-epoch permutations
    ``default_rng([seed, epoch]).permutation(n_samples)``; step ``s`` takes positions
    ``[s*batch_size, (s+1)*batch_size)`` of that endless sequence, so a batch may
    straddle two (or, if ``batch_size > n_samples``, more) epochs. Only the epochs the
    batch touches are computed, so step 10**9 costs the same as step 0.
    """
    if step < 0 or batch_size < 1 or n_samples < 1 or seed < 0:
        raise ValueError(
            f"need step >= 0, batch_size >= 1, n_samples >= 1, seed >= 0; got "
            f"step={step}, batch_size={batch_size}, n_samples={n_samples}, seed={seed}"
        )
    start = step * batch_size
    end = start + batch_size
    parts = []
    for epoch in range(start // n_samples, (end - 1) // n_samples + 1):
        base = epoch * n_samples
        perm = _epoch_permutation(seed, epoch, n_samples)
        parts.append(perm[max(start, base) - base : min(end, base + n_samples) - base])
    return np.concatenate(parts)


def rank_slice(ids: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous share of a global batch; shares are disjoint and equal."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if len(ids) % world_size:
        raise ValueError(f"batch of {len(ids)} does not split evenly over {world_size} ranks")
    share = len(ids) // world_size
    return ids[rank * share : (rank + 1) * share]


def val_batch_ids(batch_index: int, batch_size: int, n_samples: int) -> np.ndarray:
    """Ids of validation batch ``batch_index``: samples in order, wrapping at the end, so
    every evaluation looks at the same tokens and results are comparable across runs."""
    if batch_index < 0 or batch_size < 1 or n_samples < 1:
        raise ValueError(
            f"need batch_index >= 0, batch_size >= 1, n_samples >= 1; got "
            f"batch_index={batch_index}, batch_size={batch_size}, n_samples={n_samples}"
        )
    start = batch_index * batch_size
    return np.arange(start, start + batch_size, dtype=np.int64) % n_samples
