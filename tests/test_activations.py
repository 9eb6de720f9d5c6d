"""Tests for farflung.compress.activations: pipeline-boundary codecs and AQ-SGD buffers.

Expected values come from plain torch arithmetic on the inputs (or on the scales read
straight out of the payload bytes), never from the codec under test.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from farflung.compress import CodecContext, CodecError
from farflung.compress.activations import MODES, ActivationBuffer, BoundaryCodec

SHAPES = [(1, 1, 1), (2, 3, 5), (4, 16, 8), (3, 7, 13)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed))


def levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def channel_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over tokens: one value per (sample, channel), shape [B, d]."""
    return x.abs().amax(dim=1)


def payload_scales(payload: torch.Tensor, b: int, d: int, offset: int = 0) -> torch.Tensor:
    """The ``b*d`` fp16 scales at the start of a quantized block, as float32 [b, d]."""
    raw = payload[offset : offset + 2 * b * d].clone()
    return raw.view(torch.float16).float().view(b, d)


def expected_nbytes(mode: str, shape: tuple[int, int, int], bits: int, n_fresh: int) -> int:
    """Sizes worked out from the format: fp16 scale per (sample, channel) + packed codes."""
    b, t, d = shape
    if mode == "none":
        return 4 * b * t * d
    if mode in ("fp16", "bf16"):
        return 2 * b * t * d
    k = b if mode == "quantize" else b - n_fresh
    fresh_bytes = 0 if mode == "quantize" else 2 * n_fresh * t * d
    return fresh_bytes + 2 * k * d + math.ceil(k * t * d * bits / 8)


def make_pair(tmp_path, n: int, t: int, d: int, bits: int = 4, rounding: str = "nearest"):
    send_buf = ActivationBuffer(tmp_path / "send.bin", n, t, d)
    recv_buf = ActivationBuffer(tmp_path / "recv.bin", n, t, d)
    send = BoundaryCodec("aqsgd", bits, rounding, buffer=send_buf)
    recv = BoundaryCodec("aqsgd", bits, rounding, buffer=recv_buf)
    return send, recv, send_buf, recv_buf


def assert_buffers_identical(a: ActivationBuffer, b: ActivationBuffer) -> None:
    every = np.arange(a.n_samples)
    assert np.array_equal(a.seen(every), b.seen(every))
    assert torch.equal(a.read(every), b.read(every))


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", range(2, 9))
def test_payload_nbytes_matches_encode(tmp_path, mode, shape, bits) -> None:
    b, t, d = shape
    buffer = ActivationBuffer(tmp_path / "m.bin", 64, t, d) if mode == "aqsgd" else None
    codec = BoundaryCodec(mode, bits, buffer=buffer)
    x = randn(shape, seed=bits)
    ids = np.arange(b) * 3
    for fresh in (np.ones(b, bool), np.zeros(b, bool), np.arange(b) % 2 == 0):
        want = expected_nbytes(mode, shape, bits, int(fresh.sum()))
        assert codec.payload_nbytes(shape, fresh) == want
        payload = codec.encode(x, ids, fresh)
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        assert payload.numel() == want
        assert codec.decode(payload, shape, ids, fresh).shape == shape


def test_empty_batch_round_trips(tmp_path) -> None:
    buffer = ActivationBuffer(tmp_path / "m.bin", 4, 3, 2)
    for mode in MODES:
        codec = BoundaryCodec(mode, 4, buffer=buffer)
        ids, fresh = np.zeros(0, np.int64), np.zeros(0, bool)
        payload = codec.encode(torch.zeros(0, 3, 2), ids, fresh)
        assert payload.numel() == 0
        assert codec.decode(payload, (0, 3, 2), ids, fresh).shape == (0, 3, 2)


# -- none / fp16 / quantize ----------------------------------------------------------------


def test_none_round_trips_exactly() -> None:
    x = randn((3, 5, 7)) * 1e6
    x[0, 0, 0] = float("nan")
    codec = BoundaryCodec("none")
    out = codec.decode(codec.encode(x), (3, 5, 7))
    assert out.dtype == torch.float32
    assert torch.equal(out.view(torch.int32), x.view(torch.int32))


def test_none_payload_does_not_alias_input() -> None:
    x = randn((2, 3, 4))
    sent = x.clone()
    payload = BoundaryCodec("none").encode(x)
    x.zero_()
    assert torch.equal(payload.view(torch.float32), sent.view(-1))


def test_fp16_equals_half_cast() -> None:
    x = randn((3, 5, 7)) * 100
    x[1, 2, 3] = 1e5  # overflows fp16 to inf, as a plain cast does
    codec = BoundaryCodec("fp16")
    out = codec.decode(codec.encode(x), (3, 5, 7))
    assert torch.equal(out, x.half().float())


def test_bf16_is_the_bfloat16_bytes() -> None:
    x = randn((3, 5, 7)) * 100
    x[1, 2, 3] = 1e30  # beyond fp16, within bf16's range
    codec = BoundaryCodec("bf16")
    payload = codec.encode(x)
    assert payload.numel() == 2 * x.numel() == codec.payload_nbytes((3, 5, 7))
    assert torch.equal(payload.view(torch.bfloat16).view(3, 5, 7), x.bfloat16())
    out = codec.decode(payload, (3, 5, 7))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, x.bfloat16().float())


def test_fp16_accepts_other_input_dtypes() -> None:
    x = randn((2, 4, 3)).bfloat16()
    codec = BoundaryCodec("fp16")
    assert torch.equal(codec.decode(codec.encode(x), (2, 4, 3)), x.float().half().float())


@pytest.mark.parametrize("bits", range(2, 9))
def test_quantize_error_within_half_a_step(bits) -> None:
    shape = (3, 11, 6)
    x = randn(shape, seed=bits) * torch.linspace(0.01, 10, 6)  # channels of unequal size
    codec = BoundaryCodec("quantize", bits)
    payload = codec.encode(x)
    out = codec.decode(payload, shape)
    step = channel_amax(x) / levels(bits)  # [B, d]
    # the fp16 scale is the float32 one rounded *up* to fp16: at most one ulp (2**-10) above
    sent = payload_scales(payload, 3, 6)
    assert torch.all(sent >= step) and torch.all(sent <= step * (1 + 2**-10))
    err = (out - x).abs()
    assert torch.all(err <= (sent / 2).unsqueeze(1) * (1 + 1e-6))
    # nearest rounding on the sent grid, computed with plain torch
    want = torch.round(x / sent.unsqueeze(1)) * sent.unsqueeze(1)
    assert torch.allclose(out, want, rtol=0, atol=1e-6)


def test_quantize_scale_is_per_sample_and_channel() -> None:
    shape = (2, 32, 4)
    x = randn(shape, seed=3)
    x[0, :, 1] *= 1e4  # one huge channel of sample 0
    x[1] *= 1e3  # one huge sample
    codec = BoundaryCodec("quantize", 4)
    out = codec.decode(codec.encode(x), shape)
    err = (out - x).abs().amax(dim=1)  # [B, d]
    step = channel_amax(x) / levels(4)
    assert torch.all(err <= step * 0.5 * (1 + 2**-9))
    # sample 0's small channels keep their own precision: far below the huge channel's step
    small = [0, 2, 3]
    assert torch.all(err[0, small] < step[0, 1] / 1000)
    assert torch.all(err[0, small] <= channel_amax(x[:1, :, small])[0] / levels(4) / 2 * 1.01)


def test_quantize_payload_starts_with_scales_in_sample_channel_order() -> None:
    shape = (2, 5, 3)
    x = torch.zeros(shape)
    for b in range(2):
        for c in range(3):
            x[b, 2, c] = float(1 + 3 * b + c) * levels(8)  # amax/L = 1 + 3b + c, exact in fp16
    payload = BoundaryCodec("quantize", 8).encode(x)
    assert torch.equal(payload_scales(payload, 2, 3).view(-1), torch.arange(1.0, 7.0))


def test_quantize_works_on_zeros() -> None:
    codec = BoundaryCodec("quantize", 3)
    out = codec.decode(codec.encode(torch.zeros(2, 4, 5)), (2, 4, 5))
    assert torch.equal(out, torch.zeros(2, 4, 5))


# -- stochastic rounding -------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased() -> None:
    shape = (2, 6, 4)
    x = randn(shape, seed=7)
    codec = BoundaryCodec("quantize", 2, "stochastic")
    n = 2000
    total = torch.zeros(shape)
    for step in range(n):
        total += codec.decode(codec.encode(x, ctx=CodecContext(step=step, seed=1)), shape)
    step_size = channel_amax(x).unsqueeze(1)  # 2 bits: L = 1, step = amax
    # each draw has variance <= step^2 / 4, so the mean's std is <= step / (2 sqrt(n))
    assert torch.all((total / n - x).abs() <= 5 * step_size / (2 * math.sqrt(n)))
    # nearest rounding at 2 bits is far more biased than that on the same values
    nearest = BoundaryCodec("quantize", 2).decode(BoundaryCodec("quantize", 2).encode(x), shape)
    assert (nearest - x).abs().mean() > 5 * (total / n - x).abs().mean()


def test_stochastic_rounding_is_reproducible_with_ctx() -> None:
    x = randn((3, 8, 5), seed=2)
    ctx = CodecContext(step=4, seed=9, rank=1)
    a = BoundaryCodec("quantize", 3, "stochastic").encode(x, ctx=ctx)
    b = BoundaryCodec("quantize", 3, "stochastic").encode(x, ctx=ctx)
    c = BoundaryCodec("quantize", 3, "stochastic").encode(x, ctx=CodecContext(step=5, seed=9))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# -- AQ-SGD --------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_aqsgd_buffers_stay_bit_identical(tmp_path, rounding, bits) -> None:
    n, t, d, batch = 12, 6, 10, 4
    send, recv, send_buf, recv_buf = make_pair(tmp_path, n, t, d, bits, rounding)
    base = randn((n, t, d), seed=1) * 3
    drift = randn((n, t, d), seed=2)
    order = np.random.default_rng(0)
    for epoch in range(4):
        perm = order.permutation(n)
        for start in range(0, n, batch):
            ids = perm[start : start + batch]
            fresh = ~send_buf.seen(ids)  # the runtime fixes this at the start of the step
            x = base[ids] + 0.05 * epoch * drift[ids]
            ctx = CodecContext(step=epoch * 10 + start, seed=3)
            payload = send.encode(x, ids, fresh, ctx)
            out = recv.decode(payload, x.shape, ids, fresh)
            assert_buffers_identical(send_buf, recv_buf)
            assert torch.equal(out, recv_buf.read(ids).float())
            if epoch == 0:
                assert fresh.all() and torch.equal(out, x.half().float())
            else:
                assert not fresh.any()
    assert send_buf.nbytes_allocated == recv_buf.nbytes_allocated == n * t * d * 2


def test_aqsgd_second_visit_matches_hand_computation(tmp_path) -> None:
    n, t, d = 5, 4, 3
    send, recv, send_buf, recv_buf = make_pair(tmp_path, n, t, d, bits=3)
    ids = np.array([4, 1])
    x0, x1 = randn((2, t, d), seed=5), randn((2, t, d), seed=6)
    recv.decode(send.encode(x0, ids, np.ones(2, bool)), x0.shape, ids, np.ones(2, bool))
    m0 = x0.half().float()
    assert torch.equal(recv_buf.read(ids).float(), m0)

    # second visit: mixed batch, id 0 is new, ids 4 and 1 are not
    ids2, fresh2 = np.array([4, 0, 1]), np.array([False, True, False])
    x_new = randn((1, t, d), seed=7)
    x2 = torch.stack([x1[0], x_new[0], x1[1]])
    payload = send.encode(x2, ids2, fresh2)
    out = recv.decode(payload, x2.shape, ids2, fresh2)

    # layout: the fresh sample as fp16, then the [2, t, d] block of Q(x1 - m0)
    fresh_bytes = 2 * t * d
    assert torch.equal(payload[:fresh_bytes].clone().view(torch.float16), x_new.half().view(-1))
    delta = x1 - m0
    scale = payload_scales(payload, 2, d, offset=fresh_bytes).unsqueeze(1)  # [2, 1, d]
    assert torch.all(scale >= channel_amax(delta).unsqueeze(1) / levels(3))
    m1 = (m0 + torch.round(delta / scale) * scale).half()
    assert torch.equal(out[[0, 2]], m1.float())
    assert torch.equal(out[1], x_new[0].half().float())
    assert torch.equal(
        recv_buf.read(np.array([4, 0, 1])), torch.stack([m1[0], out[1].half(), m1[1]])
    )
    assert_buffers_identical(send_buf, recv_buf)


@pytest.mark.parametrize("bits", [3, 4])
def test_aqsgd_tracks_slowly_changing_activations(tmp_path, bits) -> None:
    n, t, d = 8, 16, 16
    send, recv, send_buf, _ = make_pair(tmp_path, n, t, d, bits)
    direct = BoundaryCodec("quantize", bits)
    base, drift = randn((n, t, d), seed=11), randn((n, t, d), seed=12)
    ids = np.arange(n)
    for epoch in range(6):
        x = base + 0.01 * epoch * drift + 0.003 * randn((n, t, d), seed=100 + epoch)
        fresh = ~send_buf.seen(ids)
        out = recv.decode(send.encode(x, ids, fresh), x.shape, ids, fresh)
    aq_err = (out - x).abs().mean()
    direct_err = (direct.decode(direct.encode(x), x.shape) - x).abs().mean()
    assert aq_err * 10 < direct_err, (float(aq_err), float(direct_err))


def test_aqsgd_duplicate_ids_are_consistent(tmp_path) -> None:
    n, t, d = 4, 3, 2
    send, recv, send_buf, recv_buf = make_pair(tmp_path, n, t, d)
    ids = np.array([2, 2, 1])
    fresh = np.ones(3, bool)
    x = randn((3, t, d), seed=1)
    out = recv.decode(send.encode(x, ids, fresh), x.shape, ids, fresh)
    assert torch.equal(out, x.half().float())
    assert torch.equal(recv_buf.read(np.array([2]))[0], x[1].half())  # the last one wins
    assert_buffers_identical(send_buf, recv_buf)
    # and the same id twice as non-fresh: both read the old m, the last write wins
    fresh = np.zeros(3, bool)
    x2 = x + 0.1 * randn((3, t, d), seed=2)
    out = recv.decode(send.encode(x2, ids, fresh), x.shape, ids, fresh)
    assert torch.equal(recv_buf.read(np.array([2]))[0], out[1].half())
    assert_buffers_identical(send_buf, recv_buf)


# -- non-finite input ----------------------------------------------------------------------


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e12])
def test_quantize_non_finite_sample_decodes_to_nan(poison) -> None:
    shape = (3, 4, 5)
    x = randn(shape, seed=4)
    x[1, 2, 3] = poison  # 1e12 is finite but beyond what an fp16 scale can hold
    codec = BoundaryCodec("quantize", 8)
    payload = codec.encode(x)
    assert payload.numel() == codec.payload_nbytes(shape)
    out = codec.decode(payload, shape)
    assert torch.isnan(out[1]).all()
    ok = [0, 2]
    step = channel_amax(x[ok]) / levels(8)
    assert torch.all((out[ok] - x[ok]).abs() <= step.unsqueeze(1) * 0.5 * (1 + 2**-9))


def test_aqsgd_non_finite_keeps_buffers_clean(tmp_path) -> None:
    n, t, d = 6, 4, 3
    send, recv, send_buf, recv_buf = make_pair(tmp_path, n, t, d)
    ids = np.array([0, 1, 2])
    x = randn((3, t, d), seed=1)
    x[1, 0, 0] = float("nan")  # a fresh sample: fp16 carries the NaN, the buffer skips it
    fresh = np.ones(3, bool)
    out = recv.decode(send.encode(x, ids, fresh), x.shape, ids, fresh)
    assert torch.isnan(out[1, 0, 0]) and torch.isfinite(out[[0, 2]]).all()
    assert list(recv_buf.seen(ids)) == [True, False, True]
    assert_buffers_identical(send_buf, recv_buf)

    # a revisit: sample 0 turns NaN, sample 2 is fine; 1 comes again as fresh
    before = recv_buf.read(ids)
    x2 = x + 0.01
    x2[0, 1, 2] = float("inf")
    x2[1] = randn((t, d), seed=9)
    fresh = np.array([False, True, False])
    payload = send.encode(x2, ids, fresh)
    assert payload.numel() == send.payload_nbytes(x2.shape, fresh)
    out = recv.decode(payload, x2.shape, ids, fresh)
    assert torch.isnan(out[0]).all()  # the whole sample, so the NaN propagates upstream
    assert torch.isfinite(out[[1, 2]]).all()
    assert torch.equal(recv_buf.read(ids[:1]), before[:1])  # kept its previous m
    assert not torch.equal(recv_buf.read(ids[2:]), before[2:])
    assert recv_buf.seen(ids).all()
    assert torch.isfinite(recv_buf.read(np.arange(n))).all()
    assert_buffers_identical(send_buf, recv_buf)


def test_aqsgd_fp16_overflow_of_new_m_is_not_stored(tmp_path) -> None:
    send, recv, send_buf, recv_buf = make_pair(tmp_path, 2, 1, 1, bits=8)
    ids = np.array([0])
    recv.decode(send.encode(torch.full((1, 1, 1), 60000.0), ids, [True]), (1, 1, 1), ids, [True])
    x = torch.full((1, 1, 1), 70000.0)  # delta 10000 quantizes fine, but m + delta > 65504
    out = recv.decode(send.encode(x, ids, [False]), (1, 1, 1), ids, [False])
    assert torch.isinf(out).all()
    assert recv_buf.read(ids).item() == 60000.0
    assert_buffers_identical(send_buf, recv_buf)


# -- the buffer ----------------------------------------------------------------------------


def sparse_files_supported(directory) -> bool:
    probe = directory / "probe.bin"
    with open(probe, "wb") as f:
        f.truncate(1 << 24)
    blocks = os.stat(probe).st_blocks
    probe.unlink()
    return blocks * 512 < (1 << 20)


def test_buffer_is_lazy_and_sparse(tmp_path) -> None:
    n, t, d = 2000, 64, 32
    path = tmp_path / "sub" / "m.bin"
    buf = ActivationBuffer(path, n, t, d)
    assert not path.exists()
    assert torch.equal(buf.read(np.array([5, 7])), torch.zeros(2, t, d, dtype=torch.float16))
    assert not buf.seen(np.arange(n)).any() and buf.nbytes_allocated == 0
    assert not path.exists()

    row = randn((1, t, d), seed=1).half()
    buf.write(np.array([1234]), row)
    assert path.exists() and os.path.getsize(path) == n * t * d * 2
    assert buf.nbytes_allocated == t * d * 2
    assert torch.equal(buf.read(np.array([1234]))[0], row[0])
    assert torch.equal(buf.read(np.array([0, 1999])), torch.zeros(2, t, d, dtype=torch.float16))
    assert list(buf.seen(np.array([1233, 1234]))) == [False, True]
    if sparse_files_supported(tmp_path):
        assert os.stat(path).st_blocks * 512 < n * t * d * 2 // 10
    buf.close()
    assert not path.exists()


def test_buffer_read_is_a_copy(tmp_path) -> None:
    buf = ActivationBuffer(tmp_path / "m.bin", 3, 2, 2)
    buf.write(np.array([0]), torch.ones(1, 2, 2, dtype=torch.float16))
    rows = buf.read(np.array([0]))
    rows.zero_()
    assert torch.equal(buf.read(np.array([0])), torch.ones(1, 2, 2, dtype=torch.float16))


def test_buffer_state_dict_round_trip(tmp_path) -> None:
    n, t, d = 50, 5, 4
    src = ActivationBuffer(tmp_path / "a.bin", n, t, d)
    src.write(np.array([30, 3, 17]), randn((3, t, d), seed=1).half())
    src.write(np.array([3]), randn((1, t, d), seed=2).half())  # overwrite
    state = src.state_dict()
    assert torch.equal(state["ids"], torch.tensor([3, 17, 30], dtype=torch.int64))
    assert state["rows"].dtype == torch.float16 and state["rows"].shape == (3, t, d)
    assert list(state["shape"]) == [n, t, d]
    torch.save(state, tmp_path / "ckpt.pt")

    dst = ActivationBuffer(tmp_path / "b.bin", n, t, d)
    dst.write(np.array([5, 17]), torch.full((2, t, d), 7.0, dtype=torch.float16))  # stale
    dst.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    every = np.arange(n)
    assert np.array_equal(dst.seen(every), src.seen(every))
    assert torch.equal(dst.read(every), src.read(every))
    assert dst.nbytes_allocated == src.nbytes_allocated == 3 * t * d * 2

    empty = ActivationBuffer(tmp_path / "c.bin", n, t, d).state_dict()
    dst.load_state_dict(empty)
    assert not dst.seen(every).any()
    assert torch.equal(dst.read(every), torch.zeros(n, t, d, dtype=torch.float16))


def test_buffer_state_dict_shape_mismatch(tmp_path) -> None:
    state = ActivationBuffer(tmp_path / "a.bin", 10, 4, 3).state_dict()
    with pytest.raises(ValueError, match="shape"):
        ActivationBuffer(tmp_path / "b.bin", 10, 4, 2).load_state_dict(state)


def test_buffer_validates(tmp_path) -> None:
    buf = ActivationBuffer(tmp_path / "m.bin", 4, 2, 3)
    ones = torch.ones(1, 2, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16"):
        buf.write(np.array([0]), ones.float())
    with pytest.raises(ValueError, match="shape"):
        buf.write(np.array([0, 1]), ones)
    with pytest.raises(ValueError, match="finite"):
        buf.write(np.array([0]), ones * float("inf"))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        buf.read(np.array([4]))
    with pytest.raises(ValueError, match="integer"):
        buf.seen(np.array([0.5]))
    with pytest.raises(ValueError):
        ActivationBuffer(tmp_path / "x.bin", 0, 2, 3)
    buf.close()
    with pytest.raises(ValueError, match="closed"):
        buf.read(np.array([0]))


# -- configuration and argument errors -----------------------------------------------------


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_out_of_range(bits) -> None:
    with pytest.raises(ValueError, match=f"bits={bits}"):
        BoundaryCodec("quantize", bits)


def test_bad_configuration(tmp_path) -> None:
    with pytest.raises(ValueError, match="mode"):
        BoundaryCodec("int4")
    with pytest.raises(ValueError, match="rounding"):
        BoundaryCodec("quantize", 4, "floor")
    with pytest.raises(ValueError, match="ActivationBuffer"):
        BoundaryCodec("aqsgd", 4)


def test_bad_arguments(tmp_path) -> None:
    buf = ActivationBuffer(tmp_path / "m.bin", 8, 4, 3)
    aq = BoundaryCodec("aqsgd", 4, buffer=buf)
    x = torch.zeros(2, 4, 3)
    ids, fresh = np.array([0, 1]), np.array([True, False])
    with pytest.raises(ValueError, match="ids"):
        aq.encode(x, None, fresh)
    with pytest.raises(ValueError, match="fresh"):
        aq.encode(x, ids, None)
    with pytest.raises(ValueError, match="fresh"):
        aq.payload_nbytes((2, 4, 3))
    with pytest.raises(ValueError, match="fresh"):
        aq.encode(x, ids, np.array([1, 0]))
    with pytest.raises(ValueError, match="ids"):
        aq.encode(x, np.array([0]), fresh)
    with pytest.raises(ValueError, match="buffer"):
        aq.encode(torch.zeros(2, 5, 3), ids, fresh)
    with pytest.raises(ValueError, match="shape"):
        BoundaryCodec("fp16").encode(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="floating"):
        BoundaryCodec("fp16").encode(torch.zeros(2, 3, 4, dtype=torch.int32))
    q = BoundaryCodec("quantize", 4)
    payload = q.encode(torch.ones(2, 3, 4))
    with pytest.raises(CodecError, match="bytes"):
        q.decode(payload[:-1], (2, 3, 4))
    with pytest.raises(ValueError, match="uint8"):
        q.decode(payload.to(torch.int8), (2, 3, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_aqsgd_cuda_sender_cpu_receiver_identical(tmp_path) -> None:
    n, t, d = 6, 8, 16
    send, recv, send_buf, recv_buf = make_pair(tmp_path, n, t, d, 4, "stochastic")
    ids = np.arange(n)
    for epoch in range(3):
        x = (randn((n, t, d), seed=1) + 0.02 * epoch * randn((n, t, d), seed=2)).cuda()
        fresh = ~send_buf.seen(ids)
        payload = send.encode(x, ids, fresh, CodecContext(step=epoch))
        assert payload.is_cuda
        out = recv.decode(payload.cpu(), x.shape, ids, fresh)
        assert_buffers_identical(send_buf, recv_buf)
        assert torch.equal(out, recv_buf.read(ids).float())
    for mode in ("none", "fp16", "quantize"):
        codec = BoundaryCodec(mode, 5)
        xc = randn((3, t, d), seed=4).cuda()
        assert torch.equal(
            codec.decode(codec.encode(xc), xc.shape).cpu(),
            codec.decode(codec.encode(xc.cpu()), xc.shape),
        )
