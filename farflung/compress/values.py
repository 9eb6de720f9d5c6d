"""Value stages: how the surviving float values of a codec are laid out as bytes.

A value stage sees a flat ``float32`` tensor (all elements, or the ones a selector
kept) and turns it into bytes whose length depends only on the count.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from farflung.compress.codec import CodecContext, CodecError

# Ids stored in bits 2-3 of the header's codec id.
VALUE_FP32 = 0
VALUE_FP16 = 1
VALUE_BF16 = 2
VALUE_QUANTIZE = 3


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as flat ``uint8``."""
    return t.contiguous().view(-1).view(torch.uint8)


def bytes_as(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret a ``uint8`` slice as ``dtype``, copying when it is not aligned.

    Sections after a variable-length bitmap start at arbitrary offsets, and torch only
    reinterprets storage that is aligned to the wider element size.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if data.storage_offset() % itemsize or not data.is_contiguous():
        data = data.clone()
    return data.view(dtype)


class ValueStage(ABC):
    """Packs a flat float32 tensor into bytes and back."""

    name: str
    kind: int

    @property
    def spec(self) -> str:
        """Canonical spec fragment of this stage."""
        return self.name

    @abstractmethod
    def nbytes(self, count: int) -> int:
        """Exact bytes for ``count`` values."""

    @abstractmethod
    def pack(self, values: torch.Tensor, ctx: CodecContext | None) -> torch.Tensor:
        """Bytes for a flat float32 tensor."""

    @abstractmethod
    def unpack(self, data: torch.Tensor, count: int) -> torch.Tensor:
        """Flat float32 values from exactly ``nbytes(count)`` bytes."""


class Fp32Values(ValueStage):
    """Raw float32 values: lossless, 4 bytes each."""

    name = "identity"
    kind = VALUE_FP32

    def nbytes(self, count: int) -> int:
        return 4 * count

    def pack(self, values: torch.Tensor, ctx: CodecContext | None) -> torch.Tensor:
        return as_bytes(values.float())

    def unpack(self, data: torch.Tensor, count: int) -> torch.Tensor:
        # Clone so the result never aliases a payload buffer the caller may reuse.
        return bytes_as(data, torch.float32).clone()


class CastValues(ValueStage):
    """Values cast to a 16-bit float (``fp16`` overflows to inf beyond 65504)."""

    def __init__(self, dtype: torch.dtype) -> None:
        if dtype == torch.float16:
            self.name, self.kind = "fp16", VALUE_FP16
        elif dtype == torch.bfloat16:
            self.name, self.kind = "bf16", VALUE_BF16
        else:
            raise CodecError(f"cast stage supports float16 and bfloat16, got {dtype}")
        self.dtype = dtype

    def nbytes(self, count: int) -> int:
        return 2 * count

    def pack(self, values: torch.Tensor, ctx: CodecContext | None) -> torch.Tensor:
        return as_bytes(values.to(self.dtype))

    def unpack(self, data: torch.Tensor, count: int) -> torch.Tensor:
        return bytes_as(data, self.dtype).float()
