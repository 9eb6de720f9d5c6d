"""Compiled kernels for the quantize value stage: each bucket's max magnitude in one
read, and codes rounded, clamped and bit-packed in one pass (and back), instead of
the eight to twelve full-size passes of the eager code.

They are ``torch.compile``'d (inductor: C++ on a CPU, Triton on CUDA) and must give
the eager code's bytes exactly: the same operations in the same order, ``x * (1/s)``
then ``+ L`` rounded half to even, the same packing (value ``i`` in bits ``[b i, b i +
b)``). ``tests/test_compress.py`` compares them byte for byte, ties included. Off by
default; :func:`set_mode` turns them on (``parallel.compile_codecs``). A platform that
cannot compile says so once and the eager code runs. Each new size compiles once (seconds
on a CPU); beyond torch._dynamo's recompile limit a size runs eager."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from farflung.compress.bits import packed_nbytes

MODES = ("false", "true", "auto")
_mode = "false"
_broken: str | None = None
_kernels: dict[str, Callable] = {}


def set_mode(mode: str) -> None:
    """``true``: compiled kernels on every device; ``auto``: on CUDA only; ``false``."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"compile_codecs must be one of {MODES}, got {mode!r}")
    _mode = mode


def active(device: torch.device, bits: int, bucket: int, rounding: str) -> bool:
    """Whether the compiled path serves this quantizer on ``device``."""
    if _broken is not None or _mode == "false" or (_mode == "auto" and device.type != "cuda"):
        return False
    return rounding == "nearest" and bits in (2, 4, 8) and bucket % (8 // bits) == 0


def _compiled(name: str, fn: Callable) -> Callable:
    if name not in _kernels:
        # static shapes: a sync's sizes repeat step after step, and inductor's
        # dynamic-shape kernels for these were several times slower on a CPU
        _kernels[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _kernels[name]


def _absmax(grid: torch.Tensor) -> torch.Tensor:
    return grid.abs().amax(dim=1)


def _codes(grid: torch.Tensor, scale: torch.Tensor, levels: int, bits: int) -> torch.Tensor:
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    scaled = grid * inverse
    scaled = scaled + levels
    codes = scaled.round().clamp(0, 2 * levels).to(torch.uint8)
    per = 8 // bits
    if per == 1:
        return codes.reshape(-1)
    c = codes.view(grid.shape[0], grid.shape[1] // per, per)
    out = c[..., 0]
    for i in range(1, per):
        out = out | (c[..., i] << (bits * i))
    return out.reshape(-1)


def _values(packed: torch.Tensor, scale: torch.Tensor, levels: int, bits: int, bucket: int):
    per = 8 // bits
    nb = scale.shape[0]
    if per == 1:
        codes = packed.view(nb, bucket)
    else:
        b = packed.view(nb, bucket // per, 1)
        shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
        codes = ((b >> shifts) & ((1 << bits) - 1)).view(nb, bucket)
    top = codes.max()
    grid = codes.float() - levels
    return grid * scale, top


def from_the_compiler(e: BaseException) -> bool:
    """Whether ``e`` came from torch.compile's machinery rather than the code compiled."""
    module = type(e).__module__
    return module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch"))


def _guard(run: Callable, fallback: Callable):
    """``run()``, or ``fallback()`` when compiling fails (said once, then eager)."""
    global _broken
    if _broken is not None:
        return fallback()
    try:
        return run()
    except Exception as e:  # torch._dynamo / _inductor errors of many kinds
        if not from_the_compiler(e):
            raise
        _broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(
            f"farflung: compile_codecs: torch.compile failed ({_broken}); codecs run eager",
            file=sys.stderr,
            flush=True,
        )
        return fallback()


def absmax(grid: torch.Tensor, fallback: Callable) -> torch.Tensor:
    """Each row's largest magnitude."""
    return _guard(lambda: _compiled("absmax", _absmax)(grid), fallback)


def pack_codes(
    grid: torch.Tensor, scale: torch.Tensor, levels: int, bits: int, count: int, fallback
) -> torch.Tensor:
    """The packed codes of the first ``count`` values of ``grid`` [nb, bucket] under
    per-row ``scale`` [nb, 1]: what ``pack_bits`` of the eager codes gives."""

    def run() -> torch.Tensor:
        out = _compiled("codes", _codes)(grid, scale, levels, bits)
        out = out[: packed_nbytes(count, bits)]
        tail = count % (8 // bits)
        if tail:  # the eager packing pads with zero codes, not with the padding's codes
            out[-1] &= (1 << (bits * tail)) - 1
        return out

    return _guard(run, fallback)


def unpack_values(
    data: torch.Tensor, scale: torch.Tensor, levels: int, bits: int, bucket: int, fallback
) -> tuple[torch.Tensor, int]:
    """(values [nb * bucket], the largest code) from packed ``data``, zero-padded to
    whole buckets."""

    def run():
        nb = scale.shape[0]
        need = nb * bucket * bits // 8
        padded = data
        if data.numel() != need:
            padded = data.new_zeros(need)
            padded[: data.numel()] = data
        grid, top = _compiled("values", _values)(padded, scale, levels, bits, bucket)
        return grid.view(-1), int(top)

    return _guard(run, fallback)
