"""Pipeline-boundary codecs for activations and activation gradients, and the per-sample
activation buffers of AQ-SGD.

This is the project's own code, following the method of AQ-SGD (Wang et al., "Fine-tuning
Language Models over Slow Networks using Activation Compression with Guarantees",
NeurIPS 2022). At a boundary between pipeline stages, activations ``a`` of shape
``[B, T, d]`` go forward and their gradients come back. Quantizing ``a`` directly at 2-4
bits loses too much; AQ-SGD instead quantizes the *change* of a sample's activation since
its previous visit, which shrinks as training settles.

Modes of :class:`BoundaryCodec` and their payloads (1-D ``uint8``, exact wire size):

* ``none``: the raw float32 bytes.
* ``fp16``: the float16 bytes (values beyond 65504 become inf).
* ``bf16``: the bfloat16 bytes (fp32's range, 8 bits of mantissa): what a bf16 run
  computes in, sent as it is.
* ``quantize``: ``Q(x)`` -- ``x`` transposed to ``[B, d, T]`` and handed to
  :class:`~farflung.compress.quantize.QuantizeValues` with ``bucket = T``, so each
  (sample, channel) gets its own fp16 max-abs scale: ``B*d`` fp16 scales, then the
  densely packed ``bits``-bit codes.
* ``aqsgd``: both sides keep ``m(xi)`` per sample id ``xi`` in an
  :class:`ActivationBuffer`. The payload is all *fresh* samples (first visit), in batch
  order, as fp16; then the other ``k`` samples as one quantized ``[k, T, d]`` block of
  ``Q(x - m)``. Both sides set ``m <- fp16(m + D(Q(x - m)))`` for those (the sender decodes
  its own payload bytes, so the buffers stay bit-identical) and ``m <- fp16(x)`` for fresh
  ones; the receiver returns the new ``m`` as float32. Within one call all buffer reads
  happen before the writes, and when an id occurs twice its last occurrence wins.

Non-finite values. A sample whose quantized input is non-finite -- or so large that an
fp16 scale cannot hold it (``max|x| > 65504 * (2**(bits-1) - 1)``) -- is sent with all its
scales set to fp16 NaN and its codes as if it were zero, so the payload keeps its size;
the decoder sees the NaN scales and returns that sample as all-NaN. A NaN loss on the last
stage therefore still shows up as non-finite gradients upstream. AQ-SGD buffers never
store non-finite rows: such a sample keeps its previous ``m`` (or stays unvisited, so the
runtime sends it fresh again next time), on both sides alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from farflung.compress.checks import check_choice, check_int
from farflung.compress.codec import CodecContext, CodecError
from farflung.compress.quantize import ROUNDINGS, QuantizeValues
from farflung.compress.values import as_bytes, bytes_as

MODES = ("none", "fp16", "bf16", "quantize", "aqsgd")
_FP16_MAX = 65504.0

Shape3 = tuple[int, int, int]


# -- argument checks ----------------------------------------------------------------------


def _check_ids(ids: object, n_samples: int, length: int | None = None) -> np.ndarray:
    """A 1-D integer array of sample ids in ``[0, n_samples)`` (of ``length``, if given)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"ids must be a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
    if length is not None and arr.size != length:
        raise ValueError(f"ids has {arr.size} entries, expected {length} (one per sample)")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= n_samples):
        raise ValueError(f"ids must lie in [0, {n_samples}), got {arr.min()}..{arr.max()}")
    return arr


def _check_fresh(fresh: object, length: int) -> np.ndarray:
    """A 1-D bool array with one entry per sample."""
    arr = np.asarray(fresh)
    if arr.ndim != 1 or arr.size != length or not (arr.size == 0 or arr.dtype == np.bool_):
        raise ValueError(
            f"fresh must be a 1-D bool array of length {length}, "
            f"got {arr.dtype} of shape {arr.shape}"
        )
    return arr.astype(np.bool_, copy=False)


def _check_shape(shape: object) -> Shape3:
    """``(B, T, d)`` with ``B >= 0`` and ``T, d >= 1``."""
    dims = tuple(shape) if isinstance(shape, tuple | list | torch.Size) else ()
    ok = len(dims) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in dims)
    if not ok or dims[0] < 0 or dims[1] < 1 or dims[2] < 1:
        raise ValueError(f"shape must be (B, T, d) with B >= 0 and T, d >= 1, got {shape!r}")
    return dims  # type: ignore[return-value]


# -- the per-sample buffer -----------------------------------------------------------------


class ActivationBuffer:
    """``m(xi)`` for one side of one boundary: fp16 ``[n_samples, T, d]`` in a memory-mapped
    file, allocated lazily (the file is created, sparse, at the first write), plus a
    visited bitmap held in memory.

    The file is scratch: whatever stood at ``path`` is truncated at the first write, and
    :meth:`close` removes it. A checkpoint saves :meth:`state_dict` instead. Rows must be
    finite; unvisited rows read as zeros.
    """

    def __init__(self, path: str | Path, n_samples: int, context: int, d_model: int) -> None:
        self.path = Path(path)
        self.n_samples = check_int("activation buffer", "n_samples", n_samples, 1)
        self.context = check_int("activation buffer", "context", context, 1)
        self.d_model = check_int("activation buffer", "d_model", d_model, 1)
        self._visited = np.zeros(self.n_samples, dtype=np.bool_)
        self._rows: np.memmap | None = None
        self._closed = False

    @property
    def shape(self) -> Shape3:
        return (self.n_samples, self.context, self.d_model)

    @property
    def nbytes_allocated(self) -> int:
        """Bytes of the visited rows (the file's apparent size is larger: it is sparse)."""
        return int(self._visited.sum()) * self.context * self.d_model * 2

    def seen(self, ids: np.ndarray) -> np.ndarray:
        """Whether each id has been written (bool per id)."""
        return self._visited[self._ids(ids)].copy()

    def read(self, ids: np.ndarray) -> torch.Tensor:
        """A copy of the rows of ``ids``: fp16 ``[len(ids), T, d]`` (zeros where unvisited)."""
        ids = self._ids(ids)
        if self._rows is None:
            return torch.zeros((ids.size, self.context, self.d_model), dtype=torch.float16)
        return torch.from_numpy(np.array(self._rows[ids]))

    def write(self, ids: np.ndarray, rows: torch.Tensor) -> None:
        """Store fp16 ``rows [len(ids), T, d]`` and mark them visited (last duplicate wins)."""
        ids = self._ids(ids)
        self._check_rows(rows, ids.size)
        if ids.size == 0:
            return
        _, last = np.unique(ids[::-1], return_index=True)
        keep = np.sort(ids.size - 1 - last)
        self._allocate()[ids[keep]] = rows.detach().cpu().numpy()[keep]
        self._visited[ids[keep]] = True

    def state_dict(self) -> dict:
        """``{"ids": int64 sorted visited ids, "rows": fp16 [k, T, d], "shape": [n, T, d]}``."""
        ids = np.flatnonzero(self._visited).astype(np.int64)
        return {
            "ids": torch.from_numpy(ids),
            "rows": self.read(ids),
            "shape": list(self.shape),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore exactly what :meth:`state_dict` saved; every other row becomes unvisited."""
        shape = [int(v) for v in state["shape"]]
        if shape != list(self.shape):
            raise ValueError(f"activation buffer: state has shape {shape}, buffer is {self.shape}")
        ids = state["ids"]
        ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        ids, rows = self._ids(ids), state["rows"]
        self._check_rows(rows, ids.size)
        self._release()
        self._visited[:] = False
        self.write(ids, rows)

    def close(self) -> None:
        """Drop the mapping and remove the scratch file; the buffer is unusable afterwards."""
        self._release()
        self._closed = True

    # -- internals --

    def _ids(self, ids: object) -> np.ndarray:
        if self._closed:
            raise ValueError(f"activation buffer {self.path} is closed")
        return _check_ids(ids, self.n_samples)

    def _check_rows(self, rows: object, count: int) -> None:
        want = (count, self.context, self.d_model)
        if not isinstance(rows, torch.Tensor) or rows.dtype != torch.float16:
            got = rows.dtype if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ValueError(f"activation buffer: rows must be a float16 tensor, got {got}")
        if tuple(rows.shape) != want:
            raise ValueError(f"activation buffer: rows have shape {tuple(rows.shape)}, want {want}")
        if not torch.isfinite(rows).all():
            raise ValueError("activation buffer: rows must be finite")

    def _allocate(self) -> np.memmap:
        if self._rows is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:  # truncate, then extend sparsely with zeros
                f.truncate(int(np.prod(self.shape)) * 2)
            self._rows = np.memmap(self.path, dtype=np.float16, mode="r+", shape=self.shape)
        return self._rows

    def _release(self) -> None:
        if self._rows is None:
            return
        del self._rows
        self._rows = None
        if self.path.exists():
            os.remove(self.path)

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:  # interpreter shutdown, or __init__ failed: nothing to clean up
            pass


# -- the codec ------------------------------------------------------------------------------


class BoundaryCodec:
    """Encodes one direction of one pipeline boundary (see the module docstring)."""

    def __init__(
        self,
        mode: str,
        bits: int = 8,
        rounding: str = "nearest",
        buffer: ActivationBuffer | None = None,
    ) -> None:
        self.mode = check_choice("boundary codec", "mode", mode, MODES)
        self.bits = check_int("boundary codec", "bits", bits, 2, 8)
        self.rounding = check_choice("boundary codec", "rounding", rounding, ROUNDINGS)
        if self.mode == "aqsgd" and not isinstance(buffer, ActivationBuffer):
            raise ValueError("boundary codec: mode 'aqsgd' requires an ActivationBuffer")
        self.buffer = buffer if self.mode == "aqsgd" else None
        self.levels = 2 ** (self.bits - 1) - 1
        self._quantizers: dict[int, QuantizeValues] = {}  # by bucket = T

    def __repr__(self) -> str:
        return f"BoundaryCodec(mode={self.mode!r}, bits={self.bits}, rounding={self.rounding!r})"

    # -- sizes --

    def payload_nbytes(self, shape: Shape3, fresh: np.ndarray | None = None) -> int:
        """Exact size of :meth:`encode`'s output for a ``[B, T, d]`` input."""
        b, t, d = _check_shape(shape)
        if self.mode == "none":
            return 4 * b * t * d
        if self.mode in ("fp16", "bf16"):
            return 2 * b * t * d
        if self.mode == "quantize":
            return self._block_nbytes(b, t, d)
        n_fresh = int(self._fresh(fresh, b).sum())
        return 2 * n_fresh * t * d + self._block_nbytes(b - n_fresh, t, d)

    def _block_nbytes(self, k: int, t: int, d: int) -> int:
        return self._quantizer_for(t).nbytes(k * t * d)

    def _quantizer_for(self, t: int) -> QuantizeValues:
        if t not in self._quantizers:
            self._quantizers[t] = QuantizeValues(self.bits, t, self.rounding)
        return self._quantizers[t]

    # -- encoding --

    def encode(
        self,
        x: torch.Tensor,
        ids: np.ndarray | None = None,
        fresh: np.ndarray | None = None,
        ctx: CodecContext | None = None,
    ) -> torch.Tensor:
        """Pack ``x [B, T, d]`` into a 1-D ``uint8`` payload on ``x.device``."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"boundary codec: x must be a floating tensor, got {type(x)}")
        _check_shape(tuple(x.shape))
        x = x.detach().to(torch.float32)
        if self.mode == "none":
            return as_bytes(x.clone())
        if self.mode == "fp16":
            return as_bytes(x.half())
        if self.mode == "bf16":
            return as_bytes(x.bfloat16())
        if self.mode == "quantize":
            return self._pack_block(x, ctx)
        return self._encode_aqsgd(x, ids, fresh, ctx)

    def _encode_aqsgd(
        self, x: torch.Tensor, ids: object, fresh: object, ctx: CodecContext | None
    ) -> torch.Tensor:
        ids, fresh_np = self._aqsgd_args(x.shape, ids, fresh)
        is_fresh = torch.from_numpy(fresh_np).to(x.device)
        fresh16 = x[is_fresh].half()
        m = self.buffer.read(ids[~fresh_np]).to(x.device).float()
        block = self._pack_block(x[~is_fresh] - m, ctx)
        new_m = self._apply_block(block, m)
        self._store(ids, is_fresh, fresh16, new_m)
        return torch.cat([as_bytes(fresh16), block])

    def _pack_block(self, v: torch.Tensor, ctx: CodecContext | None) -> torch.Tensor:
        """``Q(v)`` for float32 ``v [k, T, d]``; unquantizable samples get NaN scales."""
        k, t, d = v.shape
        bad = self._unquantizable(v)
        if bad.any():
            v = v.masked_fill(bad.view(k, 1, 1), 0.0)
        data = self._quantizer_for(t).pack(v.transpose(1, 2).contiguous().view(-1), ctx)
        if bad.any():
            data[: 2 * k * d].view(torch.float16).view(k, d)[bad] = float("nan")
        return data

    def _unquantizable(self, v: torch.Tensor) -> torch.Tensor:
        """Per sample: non-finite, or too large for an fp16 scale (matches the quantizer)."""
        if v.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool, device=v.device)
        amax = v.abs().amax(dim=(1, 2))
        return ~(amax / self.levels <= _FP16_MAX)  # NaN compares False, so it is caught

    # -- decoding --

    def decode(
        self,
        payload: torch.Tensor,
        shape: Shape3,
        ids: np.ndarray | None = None,
        fresh: np.ndarray | None = None,
    ) -> torch.Tensor:
        """Unpack a payload into float32 ``[B, T, d]`` on ``payload.device``."""
        shape = _check_shape(shape)
        fresh_np = self._fresh(fresh, shape[0]) if self.mode == "aqsgd" else None
        self._check_payload(payload, shape, fresh_np)
        if self.mode == "none":
            return bytes_as(payload, torch.float32).clone().view(shape)
        if self.mode == "fp16":
            return bytes_as(payload, torch.float16).float().view(shape)
        if self.mode == "bf16":
            return bytes_as(payload, torch.bfloat16).float().view(shape)
        if self.mode == "quantize":
            return self._unpack_block(payload, shape)
        return self._decode_aqsgd(payload, shape, ids, fresh_np)

    def _decode_aqsgd(
        self, payload: torch.Tensor, shape: Shape3, ids: object, fresh: np.ndarray
    ) -> torch.Tensor:
        b, t, d = shape
        ids, fresh = self._aqsgd_args(shape, ids, fresh)
        n_fresh = int(fresh.sum())
        split = 2 * n_fresh * t * d
        fresh16 = bytes_as(payload[:split], torch.float16).view(n_fresh, t, d)
        m = self.buffer.read(ids[~fresh]).to(payload.device).float()
        new_m = self._apply_block(payload[split:], m)
        is_fresh = torch.from_numpy(fresh).to(payload.device)
        return self._store(ids, is_fresh, fresh16, new_m).float()

    def _unpack_block(self, data: torch.Tensor, shape: Shape3) -> torch.Tensor:
        """``D(Q(v))`` as float32 ``[k, T, d]``; samples sent with NaN scales come out NaN."""
        k, t, d = shape
        scales = bytes_as(data[: 2 * k * d], torch.float16).view(k, d)
        bad = ~torch.isfinite(scales).all(dim=1)
        if bad.any():
            data = data.clone()
            data[: 2 * k * d].view(torch.float16).view(k, d)[bad] = 0.0
        flat = self._quantizer_for(t).unpack(data, k * t * d)
        out = flat.view(k, d, t).transpose(1, 2).contiguous()
        return out.masked_fill_(bad.view(k, 1, 1), float("nan"))

    # -- AQ-SGD buffer updates (identical on both sides) --

    def _apply_block(self, block: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The new ``m = fp16(m + D(block))``; NaN where the block carried a bad sample."""
        return (m + self._unpack_block(block, tuple(m.shape))).half()

    def _store(
        self, ids: np.ndarray, is_fresh: torch.Tensor, fresh16: torch.Tensor, new_m: torch.Tensor
    ) -> torch.Tensor:
        """Write the finite new rows (batch order) to the buffer; return all new rows."""
        b = is_fresh.numel()
        rows = fresh16.new_empty((b, *fresh16.shape[1:]))
        rows[is_fresh] = fresh16
        rows[~is_fresh] = new_m
        finite = torch.isfinite(rows).flatten(1).all(dim=1).cpu().numpy()
        self.buffer.write(ids[finite], rows[torch.from_numpy(finite).to(rows.device)].cpu())
        return rows

    # -- argument checks --

    def _aqsgd_args(self, shape: tuple, ids: object, fresh: object) -> tuple:
        b, t, d = shape
        buf = self.buffer
        if (t, d) != (buf.context, buf.d_model):
            raise ValueError(
                f"boundary codec: input is [B, {t}, {d}], buffer holds "
                f"[n, {buf.context}, {buf.d_model}]"
            )
        if ids is None:
            raise ValueError("boundary codec: mode 'aqsgd' requires ids")
        return _check_ids(ids, buf.n_samples, b), self._fresh(fresh, b)

    def _fresh(self, fresh: object, b: int) -> np.ndarray:
        if fresh is None:
            raise ValueError("boundary codec: mode 'aqsgd' requires fresh (bool per sample)")
        return _check_fresh(fresh, b)

    def _check_payload(self, payload: object, shape: Shape3, fresh: np.ndarray | None) -> None:
        if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
            raise ValueError("boundary codec: payload must be a uint8 tensor")
        want = self.payload_nbytes(shape, fresh)
        if payload.dim() != 1 or payload.numel() != want:
            raise CodecError(
                f"boundary codec ({self.mode}): payload has shape {tuple(payload.shape)}, "
                f"expected {want} bytes for {shape}"
            )
