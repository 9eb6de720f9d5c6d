"""The codec interface: :class:`Codec`, its :class:`CodecContext` and :class:`CodecError`.

A codec turns a flat float tensor into a *payload* -- a 1-D ``torch.uint8`` tensor that
holds the real packed bytes -- and back. ``payload.numel()`` is the exact number of bytes
that crosses the wire: header, positions, scales and values included.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


class CodecError(ValueError):
    """A codec is misconfigured, or a payload cannot be decoded by this codec."""


@dataclass(frozen=True)
class CodecContext:
    """Per-call facts that every rank agrees on.

    ``step`` and ``seed`` drive the random-k masks, so all ranks must pass equal values
    for a payload to decode the same everywhere. ``rank`` only feeds the noise of
    stochastic rounding (so ranks round independently); masks never depend on it.
    """

    step: int = 0
    seed: int = 0
    rank: int = 0


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit generator seed (splitmix64 over the parts).

    Neighbouring inputs (step 7 vs step 8) must give unrelated streams, which a plain
    ``seed + step`` would not.
    """
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


class Codec(ABC):
    """Encode a float tensor into a ``uint8`` payload and decode it back.

    Codecs are configured once and hold no training state; error feedback lives in
    :class:`farflung.compress.ErrorFeedback`.
    """

    name: str = "codec"

    @property
    @abstractmethod
    def spec(self) -> str:
        """Canonical spec string; ``make_codec(codec.spec)`` rebuilds an equal codec."""

    @abstractmethod
    def encode(self, x: torch.Tensor, ctx: CodecContext | None = None) -> torch.Tensor:
        """Pack ``x`` (any shape, any float dtype) into a 1-D ``uint8`` payload."""

    @abstractmethod
    def decode(
        self,
        payload: torch.Tensor,
        ctx: CodecContext | None = None,
        *,
        out: torch.Tensor | None = None,
        add: bool = False,
    ) -> torch.Tensor:
        """Unpack a payload into a flat ``float32`` tensor of the encoded numel.

        With ``out`` (a flat float32 tensor of that numel, e.g. a slice of a larger
        buffer) the result is written there, or added to it when ``add``, and ``out``
        is returned: no dense temporary is made for sparse payloads, which is most of
        the cost of decoding them.

        Raises :class:`CodecError` when the payload is malformed, truncated or was made
        by a different codec.
        """

    @abstractmethod
    def payload_nbytes(self, numel: int, ctx: CodecContext | None = None) -> int | None:
        """Exact payload size for ``numel`` elements, or ``None`` when it is not known.

        Sizes never depend on the values; a rolling random-k mask over a numel that its
        stride does not divide makes the size depend on ``ctx.step``, so without a
        ``ctx`` that case answers ``None``.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)
