"""The single-stage codecs, as thin :class:`ChainCodec` subclasses with keyword APIs."""

from __future__ import annotations

import torch

from farflung.compress.chain import ChainCodec
from farflung.compress.quantize import QuantizeValues
from farflung.compress.sparsify import RandomKSelector, TopKSelector
from farflung.compress.values import CastValues, Fp32Values


class IdentityCodec(ChainCodec):
    """Raw float32: ``12 + 4n`` bytes, lossless."""

    def __init__(self) -> None:
        super().__init__([], Fp32Values())


class Fp16Codec(ChainCodec):
    """Cast to float16: ``12 + 2n`` bytes (overflows to inf beyond 65504)."""

    def __init__(self) -> None:
        super().__init__([], CastValues(torch.float16))


class Bf16Codec(ChainCodec):
    """Cast to bfloat16: ``12 + 2n`` bytes, fp32's range with 8 mantissa bits."""

    def __init__(self) -> None:
        super().__init__([], CastValues(torch.bfloat16))


class QuantizeCodec(ChainCodec):
    """``bits``-bit bucketed quantization: ``12 + 2*ceil(n/bucket) + ceil(n*bits/8)`` bytes."""

    def __init__(self, bits: int = 8, bucket: int = 128, rounding: str = "nearest") -> None:
        super().__init__([], QuantizeValues(bits=bits, bucket=bucket, rounding=rounding))


class TopKCodec(ChainCodec):
    """Top-k magnitudes with fp32 values: ``12 + min(bitmap, indices) + 4k`` bytes."""

    def __init__(self, ratio: float | None = None, k: int | None = None) -> None:
        super().__init__([TopKSelector(ratio=ratio, k=k)], Fp32Values())


class RandomKCodec(ChainCodec):
    """Shared random-k mask with fp32 values: ``12 + 4m`` bytes, no positions sent."""

    def __init__(self, p: float = 0.1, mode: str = "rolling") -> None:
        super().__init__([RandomKSelector(p=p, mode=mode)], Fp32Values())
