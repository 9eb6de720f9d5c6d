"""Dense, vectorised bit packing of small unsigned integers into bytes.

Values are packed little-endian: value ``i`` occupies bits ``[b*i, b*i + b)`` of the
stream, bit 0 being the least significant bit of byte 0. Eight ``b``-bit values fill
exactly ``b`` bytes, so the work is done on groups of eight with one shift-and-or per
(value slot, byte) overlap -- at most 15 column operations, whatever the length.
"""

from __future__ import annotations

from functools import cache

import torch

from farflung.compress.codec import CodecError


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed for ``count`` values of ``bits`` bits each."""
    return (count * bits + 7) // 8


@cache
def _overlaps(bits: int) -> tuple[tuple[int, int, int], ...]:
    """(value slot, byte, shift) for every value/byte overlap in a group of eight.

    ``shift`` is how far the value's bit 0 sits above the byte's bit 0 (negative when
    the value started in an earlier byte).
    """
    pairs = []
    for slot in range(8):
        lo = bits * slot
        hi = lo + bits
        for byte in range(lo // 8, (hi - 1) // 8 + 1):
            pairs.append((slot, byte, lo - 8 * byte))
    return tuple(pairs)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise CodecError(f"bit width must be in 1..8, got {bits}")


def _padded(flat: torch.Tensor, length: int) -> torch.Tensor:
    if flat.numel() == length:
        return flat
    out = flat.new_zeros(length)
    out[: flat.numel()] = flat
    return out


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8`` codes, each below ``2**bits``, into ``packed_nbytes(n, bits)`` bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:
        raise CodecError(f"pack_bits needs uint8 codes, got {flat.dtype}")
    count = flat.numel()
    if bits == 8:
        return flat.clone()
    groups = -(-count // 8)
    grid = _padded(flat, groups * 8).view(groups, 8)
    out = torch.zeros(groups, bits, dtype=torch.uint8, device=flat.device)
    for slot, byte, shift in _overlaps(bits):
        col = grid[:, slot]
        out[:, byte] |= (col << shift) if shift >= 0 else (col >> -shift)
    return out.view(-1)[: packed_nbytes(count, bits)]


def unpack_bits(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` ``uint8`` codes from packed bytes."""
    _check_bits(bits)
    need = packed_nbytes(count, bits)
    if data.numel() != need:
        raise CodecError(
            f"packed section has {data.numel()} bytes, {count} values of {bits} bits need {need}"
        )
    if bits == 8:
        return data.clone()
    groups = -(-count // 8)
    grid = _padded(data.reshape(-1), groups * bits).view(groups, bits)
    out = torch.zeros(groups, 8, dtype=torch.uint8, device=data.device)
    for slot, byte, shift in _overlaps(bits):
        col = grid[:, byte]
        out[:, slot] |= (col >> shift) if shift >= 0 else (col << -shift)
    out &= (1 << bits) - 1
    return out.view(-1)[:count]


def pack_uint(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integers below ``2**width`` (width up to 62) densely.

    Used for top-k positions, where ``width = ceil(log2(n))`` bits beat a fixed int32.
    """
    if not 1 <= width <= 62:
        raise CodecError(f"integer width must be in 1..62, got {width}")
    shifts = torch.arange(width, device=values.device)
    planes = ((values.reshape(-1, 1).long() >> shifts) & 1).to(torch.uint8)
    return pack_bits(planes, 1)


def unpack_uint(data: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint`, as an ``int64`` tensor."""
    if not 1 <= width <= 62:
        raise CodecError(f"integer width must be in 1..62, got {width}")
    planes = unpack_bits(data, 1, count * width).view(count, width).long()
    shifts = torch.arange(width, device=data.device)
    return (planes << shifts).sum(dim=1)


def uint_width(limit: int) -> int:
    """Bits needed to store every integer in ``[0, limit)`` (at least 1)."""
    return max(1, (limit - 1).bit_length())
