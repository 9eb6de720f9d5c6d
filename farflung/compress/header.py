"""The 12-byte header that starts every payload.

Layout (little-endian)::

    offset  size  field
    0       1     magic 0xFA
    1       1     format version (1)
    2       1     codec id: bit 0 random-k, bit 1 top-k, bits 2-3 value stage
                  (0 fp32, 1 fp16, 2 bf16, 3 quantize)
    3       1     flags: bit 0 = top-k positions are a bitmap (else packed indices)
    4       6     numel, unsigned 48-bit
    10      2     fingerprint: low 16 bits of CRC-32 of the codec's canonical spec

The fingerprint catches a payload decoded by a codec with other parameters (say
4-bit nearest vs 4-bit stochastic) whose sizes happen to agree.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from farflung.compress.codec import CodecError

MAGIC = 0xFA
VERSION = 1
HEADER_NBYTES = 12
MAX_NUMEL = (1 << 48) - 1

_VALUE_NAMES = ("fp32", "fp16", "bf16", "quantize")


def spec_fingerprint(spec: str) -> int:
    """16-bit fingerprint of a canonical spec string."""
    return zlib.crc32(spec.encode()) & 0xFFFF


def describe_codec_id(codec_id: int) -> str:
    """Human-readable stage list for a codec id, for error messages."""
    stages = []
    if codec_id & 1:
        stages.append("randomk")
    if codec_id & 2:
        stages.append("topk")
    value = (codec_id >> 2) & 3
    stages.append(_VALUE_NAMES[value])
    suffix = "" if codec_id < 16 else f" (unknown bits 0x{codec_id:02x})"
    return "+".join(stages) + suffix


@dataclass(frozen=True)
class Header:
    """The parsed fixed-size header of a payload."""

    codec_id: int
    flags: int
    numel: int
    fingerprint: int

    def to_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The header as ``HEADER_NBYTES`` uint8 values."""
        if not 0 <= self.numel <= MAX_NUMEL:
            raise CodecError(f"numel {self.numel} does not fit the 48-bit header field")
        raw = (
            bytes((MAGIC, VERSION, self.codec_id, self.flags))
            + self.numel.to_bytes(6, "little")
            + self.fingerprint.to_bytes(2, "little")
        )
        return torch.tensor(list(raw), dtype=torch.uint8, device=device)

    @classmethod
    def parse(cls, payload: torch.Tensor) -> Header:
        """Read and sanity-check the header of ``payload``."""
        if not isinstance(payload, torch.Tensor):
            raise CodecError(f"payload must be a torch.Tensor, got {type(payload).__name__}")
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise CodecError(
                f"payload must be a 1-D torch.uint8 tensor, got {payload.dtype} with "
                f"shape {tuple(payload.shape)}"
            )
        if payload.numel() < HEADER_NBYTES:
            raise CodecError(
                f"payload truncated: {payload.numel()} bytes, the header alone needs "
                f"{HEADER_NBYTES}"
            )
        raw = bytes(payload[:HEADER_NBYTES].tolist())
        if raw[0] != MAGIC:
            raise CodecError(
                f"not a farflung codec payload: magic byte 0x{raw[0]:02x}, expected 0x{MAGIC:02x}"
            )
        if raw[1] != VERSION:
            raise CodecError(
                f"unsupported payload format version {raw[1]} (this build reads {VERSION})"
            )
        return cls(
            codec_id=raw[2],
            flags=raw[3],
            numel=int.from_bytes(raw[4:10], "little"),
            fingerprint=int.from_bytes(raw[10:12], "little"),
        )
