"""Selectors: stages that keep a subset of their input and say which positions survive.

A selector sees a flat tensor of ``n`` values and returns the ascending positions it
keeps plus the bytes a receiver needs to find them again (none for random-k, whose
mask every rank derives from the shared :class:`CodecContext`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache

import torch

from farflung.compress.bits import (
    pack_bits,
    pack_uint,
    packed_nbytes,
    uint_width,
    unpack_bits,
    unpack_uint,
)
from farflung.compress.checks import check_choice, check_fraction, check_int, round_half_up
from farflung.compress.codec import CodecContext, CodecError, derive_seed

# Bits of the header's codec id that say which selectors a codec has.
SELECT_RANDOMK = 1
SELECT_TOPK = 2
# Header flag owned by top-k: positions travel as a bitmap instead of packed indices.
FLAG_BITMAP = 1

MODES = ("rolling", "random")
_MASK_SALT = 0x3A5C  # separates mask streams from rounding-noise streams


@dataclass(frozen=True)
class Selection:
    """What a selector kept: ascending positions, their wire section, header flags."""

    index: torch.Tensor
    section: torch.Tensor
    flags: int


class Selector(ABC):
    """A stage that keeps a subset of positions."""

    name: str
    kind: int
    flag_mask: int = 0
    requires_ctx: bool = False

    @property
    @abstractmethod
    def spec(self) -> str:
        """Canonical spec fragment of this stage."""

    @abstractmethod
    def count(self, n: int, ctx: CodecContext | None) -> int | None:
        """How many of ``n`` positions survive (``None``: unknown without ``ctx``)."""

    def flags_for(self, n: int) -> int:
        """Header flags the encoder sets for an input of ``n`` values."""
        return 0

    def section_nbytes(self, n: int, flags: int) -> int:
        """Bytes of position data for an input of ``n`` values."""
        return 0

    @abstractmethod
    def select(self, values: torch.Tensor, ctx: CodecContext | None) -> Selection:
        """Choose the positions of ``values`` to keep."""

    @abstractmethod
    def positions(
        self, section: torch.Tensor, n: int, ctx: CodecContext | None, flags: int
    ) -> torch.Tensor:
        """Recover the kept positions from the section bytes."""


class TopKSelector(Selector):
    """Keep the ``k`` (or ``ratio * n``) largest magnitudes.

    Positions travel as a bitmap (``ceil(n/8)`` bytes) or as indices packed with
    ``ceil(log2 n)`` bits each, whichever is smaller for the ``k`` at hand (bitmap on
    ties). Both depend only on ``n`` and ``k``, so the size is known in advance.
    """

    name = "topk"
    kind = SELECT_TOPK
    flag_mask = FLAG_BITMAP

    def __init__(self, ratio: float | None = None, k: int | None = None) -> None:
        if ratio is not None and k is not None:
            raise CodecError("topk: give either ratio or k, not both")
        if ratio is None and k is None:
            ratio = 0.01
        self.ratio = None if ratio is None else check_fraction("topk", "ratio", ratio)
        self.k = None if k is None else check_int("topk", "k", k, 1)

    @property
    def spec(self) -> str:
        return f"topk:k={self.k}" if self.k is not None else f"topk:ratio={self.ratio!r}"

    def count(self, n: int, ctx: CodecContext | None = None) -> int:
        if n == 0:
            return 0
        if self.k is not None:
            return min(self.k, n)
        return min(n, max(1, round_half_up(self.ratio * n)))

    def _index_nbytes(self, n: int) -> int:
        return packed_nbytes(self.count(n), uint_width(n))

    def flags_for(self, n: int) -> int:
        return FLAG_BITMAP if packed_nbytes(n, 1) <= self._index_nbytes(n) else 0

    def section_nbytes(self, n: int, flags: int) -> int:
        return packed_nbytes(n, 1) if flags & FLAG_BITMAP else self._index_nbytes(n)

    def select(self, values: torch.Tensor, ctx: CodecContext | None) -> Selection:
        n = values.numel()
        k = self.count(n)
        index = largest_magnitudes(values, k).sort().values
        flags = self.flags_for(n)
        if flags & FLAG_BITMAP:
            mask = torch.zeros(n, dtype=torch.uint8, device=values.device)
            mask[index] = 1
            section = pack_bits(mask, 1)
        else:
            section = pack_uint(index, uint_width(n))
        return Selection(index, section, flags)

    def positions(
        self, section: torch.Tensor, n: int, ctx: CodecContext | None, flags: int
    ) -> torch.Tensor:
        k = self.count(n)
        if flags & FLAG_BITMAP:
            index = unpack_bits(section, 1, n).nonzero().view(-1)
            if index.numel() != k:
                raise CodecError(
                    f"topk: bitmap marks {index.numel()} positions, expected {k} (corrupt payload)"
                )
            return index
        index = unpack_uint(section, uint_width(n), k)
        if k and (int(index[-1]) >= n or bool((index[1:] <= index[:-1]).any())):
            raise CodecError(
                f"topk: positions are not strictly increasing below {n} (corrupt payload)"
            )
        return index


class RandomKSelector(Selector):
    """Keep a subset that every rank derives from ``ctx.step`` and ``ctx.seed``.

    ``mode="rolling"`` (CocktailSGD): every ``stride = floor(1/p)``-th element starting at
    ``ctx.step % stride``, so ``stride`` consecutive steps cover each element exactly once.
    ``mode="random"``: ``round(p * n)`` distinct positions drawn by a generator seeded
    with (``ctx.seed``, ``ctx.step``). No positions travel in either mode.
    """

    name = "randomk"
    kind = SELECT_RANDOMK
    requires_ctx = True

    def __init__(self, p: float = 0.1, mode: str = "rolling") -> None:
        self.p = check_fraction("randomk", "p", p)
        self.mode = check_choice("randomk", "mode", mode, MODES)
        # The epsilon keeps p=0.1 from landing on 9 through 1/p = 9.999...
        self.stride = max(1, math.floor(1.0 / self.p + 1e-9))

    @property
    def spec(self) -> str:
        return f"randomk:p={self.p!r},mode={self.mode}"

    def count(self, n: int, ctx: CodecContext | None) -> int | None:
        if self.mode == "random":
            return min(n, round_half_up(self.p * n))
        if ctx is None:
            return n // self.stride if n % self.stride == 0 else None
        offset = ctx.step % self.stride
        return max(0, -(-(n - offset) // self.stride))

    def mask_indices(self, numel: int, ctx: CodecContext) -> torch.Tensor:
        """Ascending positions kept for ``numel`` elements at ``ctx`` (CPU int64)."""
        return self._mask(numel, ctx).clone()

    def _mask(self, numel: int, ctx: CodecContext | None) -> torch.Tensor:
        if ctx is None:
            raise CodecError(
                "randomk needs a CodecContext(step=..., seed=...) shared by all ranks; "
                "without it no two calls would agree on the mask"
            )
        if self.mode == "rolling":
            return torch.arange(min(ctx.step % self.stride, numel), numel, self.stride)
        return _random_mask(numel, self.count(numel, ctx), ctx.seed, ctx.step)

    def select(self, values: torch.Tensor, ctx: CodecContext | None) -> Selection:
        index = self._mask(values.numel(), ctx).to(values.device)
        empty = torch.empty(0, dtype=torch.uint8, device=values.device)
        return Selection(index, empty, 0)

    def positions(
        self, section: torch.Tensor, n: int, ctx: CodecContext | None, flags: int
    ) -> torch.Tensor:
        return self._mask(n, ctx).to(section.device)


_SAMPLE_TARGET = 1 << 16


def largest_magnitudes(values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest ``|values|`` (unordered), exact up to ties.

    A full ``torch.topk`` over millions of elements is the slowest step of a top-k
    encode, so large inputs first estimate a threshold from a strided sample, keep the
    candidates above it and rank only those. The answer stays exact: when at least
    ``k`` candidates pass, every element below the threshold is outside the top k;
    when fewer pass, it falls back to the full ``torch.topk``.
    """
    magnitude = values.abs()
    n = magnitude.numel()
    if n < 4 * _SAMPLE_TARGET or 4 * k > n:
        return torch.topk(magnitude, k, sorted=False).indices
    sample = magnitude[:: n // _SAMPLE_TARGET]
    # Aim ~25% above k so sampling noise rarely leaves fewer than k candidates.
    want = min(sample.numel(), int(1.25 * k * sample.numel() / n) + 32)
    threshold = torch.topk(sample, want, sorted=False).values.min()
    candidates = (magnitude >= threshold).nonzero().view(-1)
    if candidates.numel() < k or candidates.numel() > n // 2:
        return torch.topk(magnitude, k, sorted=False).indices
    return candidates[torch.topk(magnitude[candidates], k, sorted=False).indices]


@lru_cache(maxsize=4)
def _random_mask(numel: int, count: int, seed: int, step: int) -> torch.Tensor:
    # Cached because encode and decode of one step (and the server's re-encode in
    # CocktailSGD) all need the same mask; a permutation of millions is not free.
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, step, _MASK_SALT))
    return torch.randperm(numel, generator=gen)[:count].sort().values
