"""Bucketed symmetric quantization to 1-8 bits with fp16 scales.

Each run of ``bucket`` consecutive values shares one scale ``s`` (stored as fp16).
With ``b >= 2`` bits the levels are the integers ``q`` in ``[-L, L]``, ``L = 2**(b-1) - 1``,
decoded as ``q * s`` with ``s = max|x| / L``; codes ``q + L`` are bit-packed densely.

With ``b = 1`` a value is its sign times the scale. ``rounding="nearest"`` uses the mean
absolute value of the bucket as scale (the least-squares choice for a fixed sign
pattern); ``rounding="stochastic"`` uses max-abs, the only choice that keeps the sign
draw unbiased (``P(+) = (1 + x/s) / 2``).
"""

from __future__ import annotations

import torch

from farflung.compress import fused
from farflung.compress.bits import pack_bits, packed_nbytes, unpack_bits
from farflung.compress.checks import check_choice, check_int
from farflung.compress.codec import CodecContext, CodecError, derive_seed
from farflung.compress.values import VALUE_QUANTIZE, ValueStage, as_bytes, bytes_as

ROUNDINGS = ("nearest", "stochastic")
_NOISE_SALT = 0x51A7  # keeps rounding noise independent of any mask drawn from the same ctx


def _round_up_to_fp16(scale: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 scales as fp16, never smaller than the input.

    Rounding the scale up keeps ``|x| / s <= L``, so no value needs clipping.
    """
    half = scale.half()
    too_small = half.float() < scale
    # For non-negative finite fp16 the next representable value is the next bit pattern.
    bumped = half.view(torch.int16) + too_small.to(torch.int16)
    return bumped.view(torch.float16)


class QuantizeValues(ValueStage):
    """Value stage: ``bits``-bit codes plus one fp16 scale per ``bucket`` values."""

    name = "quantize"
    kind = VALUE_QUANTIZE

    def __init__(self, bits: int = 8, bucket: int = 128, rounding: str = "nearest") -> None:
        self.bits = check_int("quantize", "bits", bits, 1, 8)
        self.bucket = check_int("quantize", "bucket", bucket, 1)
        self.rounding = check_choice("quantize", "rounding", rounding, ROUNDINGS)
        self.levels = 2 ** (self.bits - 1) - 1
        self._generators: dict[str, torch.Generator] = {}

    @property
    def spec(self) -> str:
        return f"quantize:bits={self.bits},bucket={self.bucket},rounding={self.rounding}"

    def nbytes(self, count: int) -> int:
        return 2 * self._buckets(count) + packed_nbytes(count, self.bits)

    def _buckets(self, count: int) -> int:
        return -(-count // self.bucket)

    # -- encoding -------------------------------------------------------------------

    def pack(self, values: torch.Tensor, ctx: CodecContext | None) -> torch.Tensor:
        count = values.numel()
        if count == 0:
            return torch.empty(0, dtype=torch.uint8, device=values.device)
        nb = self._buckets(count)
        grid = _pad_to(values.float(), nb * self.bucket, 0.0).view(nb, self.bucket)
        compiled = self._compiled(grid.device)
        scale16 = self._scales(grid, count, compiled)
        scale = scale16.float().unsqueeze(1)

        def eager() -> torch.Tensor:
            return pack_bits(self._codes(grid, scale, ctx).view(-1)[:count], self.bits)

        if compiled:
            packed = fused.pack_codes(grid, scale, self.levels, self.bits, count, eager)
        else:
            packed = eager()
        return torch.cat([as_bytes(scale16), packed])

    def _compiled(self, device: torch.device) -> bool:
        return fused.active(device, self.bits, self.bucket, self.rounding)

    def _scales(self, grid: torch.Tensor, count: int, compiled: bool = False) -> torch.Tensor:
        if self.bits == 1 and self.rounding == "nearest":
            sizes = torch.full((grid.shape[0],), float(self.bucket), device=grid.device)
            sizes[-1] = count - (grid.shape[0] - 1) * self.bucket
            scale16 = (grid.abs().sum(dim=1) / sizes).half()
        else:
            if compiled:
                amax = fused.absmax(grid, lambda: grid.abs().amax(dim=1))
            else:
                amax = grid.abs().amax(dim=1)
            scale16 = _round_up_to_fp16(amax / max(self.levels, 1))
        if not torch.isfinite(scale16).all():
            raise CodecError(
                "quantize: input holds non-finite values or magnitudes beyond what fp16 "
                f"scales can represent (|x| <= 65504 * {max(self.levels, 1)})"
            )
        return scale16

    def _codes(self, grid: torch.Tensor, scale: torch.Tensor, ctx: CodecContext | None):
        inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        scaled = grid * inverse
        if self.bits == 1:
            if self.rounding == "nearest":
                return (grid >= 0).to(torch.uint8)
            # P(+1) = (1 + x/s) / 2 makes E[sign * s] = x.
            noise = self._uniform(scaled, ctx)
            return (2.0 * noise < scaled + 1.0).to(torch.uint8)
        scaled += self.levels  # shift to the unsigned code range [0, 2L] before rounding
        if self.rounding == "nearest":
            scaled.round_()
        else:
            scaled += self._uniform(scaled, ctx)
            scaled.floor_()
        return scaled.clamp_(0, 2 * self.levels).to(torch.uint8)

    def _uniform(self, like: torch.Tensor, ctx: CodecContext | None) -> torch.Tensor:
        gen = self._generator(like.device, ctx)
        return torch.rand(like.shape, generator=gen, device=like.device)

    def _generator(self, device: torch.device, ctx: CodecContext | None) -> torch.Generator:
        if ctx is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(derive_seed(ctx.seed, ctx.step, ctx.rank, _NOISE_SALT))
            return gen
        # No context: one private stream per device that advances call after call.
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(derive_seed(_NOISE_SALT))
            self._generators[key] = gen
        return self._generators[key]

    # -- decoding -------------------------------------------------------------------

    def unpack(self, data: torch.Tensor, count: int) -> torch.Tensor:
        if count == 0:
            return torch.empty(0, dtype=torch.float32, device=data.device)
        nb = self._buckets(count)
        scale = bytes_as(data[: 2 * nb], torch.float16).float()
        if not (torch.isfinite(scale).all() and (scale >= 0).all()):
            raise CodecError("quantize: payload holds negative or non-finite scales (corrupt)")
        packed = data[2 * nb :]

        def eager() -> tuple[torch.Tensor, int]:
            codes = unpack_bits(packed, self.bits, count)
            top = int(codes.max()) if self.bits > 1 else 0
            grid = _pad_to(codes, nb * self.bucket, 0).float().view(nb, self.bucket)
            if self.bits == 1:
                grid.mul_(2.0).sub_(1.0)
            else:
                grid.sub_(self.levels)
            return grid.mul_(scale.unsqueeze(1)).view(-1), top

        if self._compiled(data.device):
            if packed.numel() != packed_nbytes(count, self.bits):
                unpack_bits(packed, self.bits, count)  # its message for a wrong size
            values, top = fused.unpack_values(
                packed, scale.unsqueeze(1), self.levels, self.bits, self.bucket, eager
            )
        else:
            values, top = eager()
        if self.bits > 1 and top > 2 * self.levels:
            raise CodecError(f"quantize: payload holds codes above {2 * self.levels} (corrupt)")
        return values[:count]


def _pad_to(flat: torch.Tensor, length: int, fill: float) -> torch.Tensor:
    if flat.numel() == length:
        return flat
    out = flat.new_full((length,), fill)
    out[: flat.numel()] = flat
    return out
