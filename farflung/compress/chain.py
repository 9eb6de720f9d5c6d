"""ChainCodec: zero or more selectors followed by one value stage.

The CocktailSGD order is ``randomk -> topk -> value stage``; any sub-sequence is a
valid chain, and the single codecs (``quantize``, ``topk``, ...) are chains too, so one
encode/decode path serves them all. Payload layout::

    header (12 B) | topk positions (bitmap or packed indices, if topk) | value bytes

Random-k adds no bytes: its mask is rederived from the :class:`CodecContext`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from farflung.compress.codec import Codec, CodecContext, CodecError
from farflung.compress.header import (
    HEADER_NBYTES,
    MAX_NUMEL,
    Header,
    describe_codec_id,
    spec_fingerprint,
)
from farflung.compress.sparsify import RandomKSelector, Selector
from farflung.compress.values import Fp32Values, ValueStage

SELECTOR_ORDER = ("randomk", "topk")


def flatten_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous flat float32 tensor (no copy when it already is one)."""
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"codecs encode torch tensors, got {type(x).__name__}")
    if not x.is_floating_point():
        raise CodecError(f"codecs encode floating-point tensors, got {x.dtype}")
    if x.numel() > MAX_NUMEL:
        raise CodecError(f"tensor of {x.numel()} elements exceeds the 48-bit numel limit")
    return x.detach().reshape(-1).float().contiguous()


class ChainCodec(Codec):
    """Selectors (in ``randomk, topk`` order, each at most once) then a value stage.

    Each selector works on the survivors of the previous one -- top-k after random-k
    ranks only the masked subset and its bitmap has one bit per subset element.
    Decoding scatters the values back into a zero tensor.
    """

    def __init__(self, selectors: Sequence[Selector], value: ValueStage | None = None) -> None:
        self.selectors = tuple(selectors)
        self.value = value if value is not None else Fp32Values()
        self._check_order()
        self.codec_id = sum(s.kind for s in self.selectors) | (self.value.kind << 2)
        # fp32 values after a selector are the default, so names and specs omit them.
        implicit_value = bool(self.selectors) and isinstance(self.value, Fp32Values)
        stages = [*self.selectors] + ([] if implicit_value else [self.value])
        self.name = "+".join(stage.name for stage in stages)
        self._spec = "+".join(stage.spec for stage in stages)
        self.fingerprint = spec_fingerprint(self._spec)
        self._flag_mask = 0
        for selector in self.selectors:
            self._flag_mask |= selector.flag_mask

    def _check_order(self) -> None:
        names = [s.name for s in self.selectors]
        ranks = [SELECTOR_ORDER.index(n) if n in SELECTOR_ORDER else -1 for n in names]
        if -1 in ranks or ranks != sorted(set(ranks)):
            raise CodecError(
                f"bad chain {' + '.join(names + [self.value.name])}: stages must follow "
                "randomk -> topk -> one value stage, each at most once"
            )

    @property
    def spec(self) -> str:
        return self._spec

    @property
    def requires_ctx(self) -> bool:
        """Whether encode/decode need a :class:`CodecContext` (random-k masks do)."""
        return any(s.requires_ctx for s in self.selectors)

    def mask_indices(self, numel: int, ctx: CodecContext) -> torch.Tensor:
        """Positions the random-k stage keeps for ``numel`` elements at ``ctx`` (CPU)."""
        for selector in self.selectors:
            if isinstance(selector, RandomKSelector):
                return selector.mask_indices(numel, ctx)
        raise CodecError(f"{self.spec} has no randomk stage, so it has no shared mask")

    # -- sizes ----------------------------------------------------------------------

    def _section_sizes(self, numel: int, ctx: CodecContext | None, flags: int) -> list[int]:
        """Byte size of each selector section, then of the value section."""
        sizes, count = [], numel
        for selector in self.selectors:
            sizes.append(selector.section_nbytes(count, flags))
            count = selector.count(count, ctx)
            if count is None:
                raise CodecError(f"{self.spec}: payload size depends on ctx.step; pass a ctx")
        sizes.append(self.value.nbytes(count))
        return sizes

    def _encoder_flags(self, numel: int, ctx: CodecContext | None) -> int | None:
        flags, count = 0, numel
        for selector in self.selectors:
            flags |= selector.flags_for(count)
            count = selector.count(count, ctx)
            if count is None:
                return None
        return flags

    def payload_nbytes(self, numel: int, ctx: CodecContext | None = None) -> int | None:
        flags = self._encoder_flags(numel, ctx)
        if flags is None:
            return None
        return HEADER_NBYTES + sum(self._section_sizes(numel, ctx, flags))

    # -- encode / decode ------------------------------------------------------------

    def _need_ctx(self, ctx: CodecContext | None) -> None:
        if ctx is None and self.requires_ctx:
            raise CodecError(
                f"{self.spec}: random-k needs a CodecContext(step=..., seed=...) shared by "
                "all ranks"
            )

    def encode(self, x: torch.Tensor, ctx: CodecContext | None = None) -> torch.Tensor:
        self._need_ctx(ctx)
        flat = flatten_input(x)
        values, flags, sections = flat, 0, []
        for selector in self.selectors:
            picked = selector.select(values, ctx)
            values = values[picked.index]
            flags |= picked.flags
            sections.append(picked.section)
        sections.append(self.value.pack(values, ctx))
        header = Header(self.codec_id, flags, flat.numel(), self.fingerprint)
        return torch.cat([header.to_tensor(flat.device), *sections])

    def decode(
        self,
        payload: torch.Tensor,
        ctx: CodecContext | None = None,
        *,
        out: torch.Tensor | None = None,
        add: bool = False,
    ) -> torch.Tensor:
        header = Header.parse(payload)
        self._check_header(header)
        self._need_ctx(ctx)
        numel = header.numel
        sizes = self._section_sizes(numel, ctx, header.flags)
        expected = HEADER_NBYTES + sum(sizes)
        if payload.numel() != expected:
            raise CodecError(
                f"{self.spec}: payload has {payload.numel()} bytes, expected {expected} for "
                f"numel={numel} (truncated or padded?)"
            )
        offset, positions, count = HEADER_NBYTES, None, numel
        for selector, size in zip(self.selectors, sizes, strict=False):
            local = selector.positions(payload[offset : offset + size], count, ctx, header.flags)
            positions = local if positions is None else positions[local]
            offset += size
            count = local.numel()
        values = self.value.unpack(payload[offset:], count)
        if out is None:
            if positions is None:
                return values
            out = torch.zeros(numel, dtype=torch.float32, device=payload.device)
            out[positions] = values
            return out
        _check_out(out, numel)
        if positions is None:
            return out.add_(values) if add else out.copy_(values)
        if not add:
            out.zero_()
        return out.index_add_(0, positions.to(out.device), values)

    def _check_header(self, header: Header) -> None:
        if header.codec_id != self.codec_id:
            raise CodecError(
                f"payload was made by a {describe_codec_id(header.codec_id)} codec, this "
                f"codec is {self.spec}"
            )
        if header.fingerprint != self.fingerprint:
            raise CodecError(
                f"payload was made by a {describe_codec_id(header.codec_id)} codec with "
                f"other parameters than this one ({self.spec})"
            )
        if header.flags & ~self._flag_mask:
            raise CodecError(f"{self.spec}: payload sets unknown flag bits 0x{header.flags:02x}")


def _check_out(out: torch.Tensor, numel: int) -> None:
    if out.dtype != torch.float32 or out.dim() != 1 or out.numel() != numel:
        raise CodecError(
            f"decode out= must be a flat float32 tensor of {numel} elements, got "
            f"{out.dtype} of shape {tuple(out.shape)}"
        )
