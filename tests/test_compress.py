"""Tests for farflung.compress: codecs, payload layout and sizes, composition, specs,
error feedback."""

from __future__ import annotations

import math

import pytest
import torch

from farflung.compress import (
    COCKTAIL,
    HEADER_NBYTES,
    Bf16Codec,
    ChainCodec,
    CodecContext,
    CodecError,
    ErrorFeedback,
    Fp16Codec,
    IdentityCodec,
    QuantizeCodec,
    RandomKCodec,
    TopKCodec,
    encode_with_feedback,
    make_codec,
    pack_bits,
    unpack_bits,
)
from farflung.compress.bits import pack_uint, packed_nbytes, unpack_uint
from farflung.compress.sparsify import FLAG_BITMAP, largest_magnitudes

CTX = CodecContext(step=5, seed=11)
SIZES = [0, 1, 7, 127, 128, 129, 1000, 4099]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def randn(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def header_flags(payload: torch.Tensor) -> int:
    return int(payload[3])


# -- bit packing -------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 1001])
def test_pack_bits_round_trip_and_size(bits: int, n: int) -> None:
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_bits_layout_is_little_endian() -> None:
    # 4-bit values 1, 2 -> one byte 0x21; 3-bit values 1..8 wrap across byte borders.
    assert pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    codes = torch.tensor([1, 0, 0, 7], dtype=torch.uint8)
    assert pack_bits(codes, 3).tolist() == [0b00000001, 0b00001110]


def test_pack_uint_wide_round_trip() -> None:
    values = torch.randint(0, 2**33, (517,))
    packed = pack_uint(values, 33)
    assert packed.numel() == packed_nbytes(517, 33) == math.ceil(517 * 33 / 8)
    assert torch.equal(unpack_uint(packed, 33, 517), values)


# -- exact payload sizes -----------------------------------------------------------


def quantize_bytes(count: int, bits: int, bucket: int) -> int:
    return 2 * ceil_div(count, bucket) + ceil_div(count * bits, 8)


def topk_position_bytes(n: int, k: int) -> int:
    width = max(1, (n - 1).bit_length())
    return min(ceil_div(n, 8), ceil_div(k * width, 8))


def topk_k(n: int, ratio: float) -> int:
    return 0 if n == 0 else min(n, max(1, math.floor(ratio * n + 0.5)))


def rolling_count(n: int, stride: int, step: int) -> int:
    return len(range(step % stride, n, stride))


SIZE_FORMULAS = {
    "identity": lambda n: HEADER_NBYTES + 4 * n,
    "fp16": lambda n: HEADER_NBYTES + 2 * n,
    "bf16": lambda n: HEADER_NBYTES + 2 * n,
    "quantize:bits=4,bucket=128": lambda n: HEADER_NBYTES + quantize_bytes(n, 4, 128),
    "quantize:bits=3,bucket=100": lambda n: HEADER_NBYTES + quantize_bytes(n, 3, 100),
    "quantize:bits=1,bucket=64": lambda n: HEADER_NBYTES + quantize_bytes(n, 1, 64),
    "quantize:bits=8,bucket=7,rounding=stochastic": lambda n: (
        HEADER_NBYTES + quantize_bytes(n, 8, 7)
    ),
    "topk:ratio=0.01": lambda n: (
        HEADER_NBYTES + topk_position_bytes(n, topk_k(n, 0.01)) + 4 * topk_k(n, 0.01)
    ),
    "topk:ratio=0.3": lambda n: (
        HEADER_NBYTES + topk_position_bytes(n, topk_k(n, 0.3)) + 4 * topk_k(n, 0.3)
    ),
    "topk:k=5": lambda n: HEADER_NBYTES + topk_position_bytes(n, min(5, n)) + 4 * min(5, n),
    "randomk:p=0.1,mode=rolling": lambda n: HEADER_NBYTES + 4 * rolling_count(n, 10, CTX.step),
    "randomk:p=0.3,mode=random": lambda n: HEADER_NBYTES + 4 * math.floor(0.3 * n + 0.5),
    "topk:ratio=0.1+quantize:bits=2": lambda n: (
        HEADER_NBYTES
        + topk_position_bytes(n, topk_k(n, 0.1))
        + quantize_bytes(topk_k(n, 0.1), 2, 128)
    ),
    "randomk:p=0.25+quantize:bits=4": lambda n: (
        HEADER_NBYTES + quantize_bytes(rolling_count(n, 4, CTX.step), 4, 128)
    ),
    "randomk:p=0.1+topk:ratio=0.2": lambda n: (
        HEADER_NBYTES
        + topk_position_bytes(m := rolling_count(n, 10, CTX.step), topk_k(m, 0.2))
        + 4 * topk_k(m, 0.2)
    ),
    "topk:ratio=0.05+bf16": lambda n: (
        HEADER_NBYTES + topk_position_bytes(n, topk_k(n, 0.05)) + 2 * topk_k(n, 0.05)
    ),
    COCKTAIL: lambda n: (
        HEADER_NBYTES
        + topk_position_bytes(m := rolling_count(n, 10, CTX.step), topk_k(m, 0.2))
        + quantize_bytes(topk_k(m, 0.2), 4, 128)
    ),
}


@pytest.mark.parametrize("spec", list(SIZE_FORMULAS))
def test_payload_size_matches_formula(spec: str) -> None:
    codec = make_codec(spec)
    for n in SIZES:
        payload = codec.encode(randn(n, seed=n), CTX)
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        assert payload.numel() == codec.payload_nbytes(n, CTX) == SIZE_FORMULAS[spec](n), n
        assert codec.decode(payload, CTX).shape == (n,)


def test_cocktail_is_about_0_18_bits_per_element() -> None:
    n = 1_000_000
    bits = 8 * make_codec(COCKTAIL).payload_nbytes(n, CTX) / n
    assert 0.17 < bits < 0.19


def test_rolling_size_needs_ctx_only_when_stride_does_not_divide() -> None:
    codec = make_codec("randomk:p=0.1")
    assert codec.payload_nbytes(1000) == HEADER_NBYTES + 4 * 100
    assert codec.payload_nbytes(1005) is None
    assert codec.payload_nbytes(1005, CodecContext(step=3)) == HEADER_NBYTES + 4 * 101
    assert codec.payload_nbytes(1005, CodecContext(step=7)) == HEADER_NBYTES + 4 * 100


# -- casts -------------------------------------------------------------------------


def test_identity_is_lossless_and_accepts_shapes_and_dtypes() -> None:
    x = randn(60).view(3, 4, 5)
    out = IdentityCodec().decode(IdentityCodec().encode(x))
    assert out.dtype == torch.float32 and out.shape == (60,)
    assert torch.equal(out, x.reshape(-1))
    assert torch.equal(IdentityCodec().decode(IdentityCodec().encode(x.double())), out)


@pytest.mark.parametrize(
    "codec,dtype", [(Fp16Codec(), torch.float16), (Bf16Codec(), torch.bfloat16)]
)
def test_casts_match_torch(codec, dtype) -> None:
    x = randn(1001) * 100
    assert torch.equal(codec.decode(codec.encode(x)), x.to(dtype).float())


def test_decode_does_not_alias_payload() -> None:
    codec = IdentityCodec()
    payload = codec.encode(torch.ones(8))
    out = codec.decode(payload)
    payload.zero_()
    assert torch.equal(out, torch.ones(8))


# -- quantize ----------------------------------------------------------------------


def bucket_bound(x: torch.Tensor, bucket: int, bits: int) -> torch.Tensor:
    """Per-element max allowed error: half a level of the bucket's max-abs scale."""
    n = x.numel()
    pad = ceil_div(n, bucket) * bucket - n
    grid = torch.cat([x.abs(), x.new_zeros(pad)]).view(-1, bucket)
    scale = grid.amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
    # The fp16 scale is rounded up, at most one fp16 ulp (2^-10 relative) above.
    return (scale * (1 + 2**-10) / 2).expand_as(grid).reshape(-1)[:n]


@pytest.mark.parametrize("bits", range(2, 9))
def test_quantize_nearest_error_bound(bits: int) -> None:
    x = randn(1000, seed=bits) * torch.linspace(0.01, 10, 1000)
    codec = QuantizeCodec(bits=bits, bucket=128)
    err = (codec.decode(codec.encode(x)) - x).abs()
    assert (err <= bucket_bound(x, 128, bits) * (1 + 1e-5) + 1e-12).all()


@pytest.mark.parametrize("bits", range(2, 9))
def test_quantize_stochastic_error_within_one_level(bits: int) -> None:
    x = randn(1000, seed=bits)
    codec = QuantizeCodec(bits=bits, bucket=64, rounding="stochastic")
    err = (codec.decode(codec.encode(x, CTX)) - x).abs()
    assert (err <= 2 * bucket_bound(x, 64, bits) * (1 + 1e-5) + 1e-12).all()


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantize_stochastic_is_unbiased(bits: int) -> None:
    x = randn(256, seed=3)
    codec = QuantizeCodec(bits=bits, bucket=32, rounding="stochastic")
    draws = 1500
    mean = torch.stack(
        [codec.decode(codec.encode(x, CodecContext(step=s))) for s in range(draws)]
    ).mean(0)
    # One draw lands on one of two neighbouring levels s apart (b=1: -s or +s with s =
    # max-abs), so its std is at most s/2 (b=1: s); allow 6 std of the mean.
    scale = 2 * bucket_bound(x, 32, bits) if bits > 1 else 2 * bucket_bound(x, 32, 2)
    std_one = scale / 2 if bits > 1 else scale
    assert ((mean - x).abs() <= 6 * std_one / math.sqrt(draws) + 1e-6).all()
    # And nearest rounding would be visibly biased on the same data.
    nearest = QuantizeCodec(bits=bits, bucket=32)
    assert (nearest.decode(nearest.encode(x)) - x).abs().mean() > (mean - x).abs().mean()


def test_quantize_stochastic_depends_on_ctx_and_is_reproducible() -> None:
    x = randn(500)
    codec = QuantizeCodec(bits=2, rounding="stochastic")
    a = codec.encode(x, CodecContext(step=1, seed=2))
    assert torch.equal(a, codec.encode(x, CodecContext(step=1, seed=2)))
    assert not torch.equal(a, codec.encode(x, CodecContext(step=2, seed=2)))
    assert not torch.equal(a, codec.encode(x, CodecContext(step=1, seed=2, rank=1)))
    # Without a ctx the codec's own generator advances between calls.
    assert not torch.equal(codec.encode(x), codec.encode(x))


def test_quantize_one_bit_nearest_uses_sign_and_mean_abs() -> None:
    x = torch.tensor([1.0, -3.0, 2.0, -2.0, 0.5, 0.5])
    out = QuantizeCodec(bits=1, bucket=4).decode(QuantizeCodec(bits=1, bucket=4).encode(x))
    assert torch.equal(out, torch.tensor([2.0, -2.0, 2.0, -2.0, 0.5, 0.5]))


def test_quantize_zero_buckets_and_empty() -> None:
    x = torch.zeros(300)
    x[200:] = randn(100)
    for bits in (1, 2, 4, 8):
        for rounding in ("nearest", "stochastic"):
            codec = QuantizeCodec(bits=bits, bucket=128, rounding=rounding)
            out = codec.decode(codec.encode(x))
            assert torch.isfinite(out).all() and (out[:128] == 0).all()
            assert codec.decode(codec.encode(torch.zeros(0))).numel() == 0


def test_quantize_exact_on_grid_and_scale_rounds_up() -> None:
    x = torch.tensor([3.0, -3.0, 1.0, 0.0])  # bits=3: L=3, scale 1 is exact in fp16
    codec = QuantizeCodec(bits=3, bucket=4)
    assert torch.equal(codec.decode(codec.encode(x)), x)
    # 4/3 is not an fp16 value: the scale rounds up so max|x| never needs clipping.
    y = torch.tensor([4.0, -4.0, 2.0, 0.0])
    out = codec.decode(codec.encode(y))
    assert out[0] >= 4.0 and out[0] - 4.0 < 4.0 * 2**-10


def test_quantize_rejects_non_finite() -> None:
    with pytest.raises(CodecError, match="non-finite"):
        QuantizeCodec(bits=4).encode(torch.tensor([1.0, float("nan")]))
    with pytest.raises(CodecError, match="fp16"):
        QuantizeCodec(bits=2).encode(torch.tensor([1e6]))


# -- top-k -------------------------------------------------------------------------


@pytest.mark.parametrize("n,ratio", [(1000, 0.01), (1000, 0.3), (300_000, 0.01), (300_000, 0.2)])
def test_topk_keeps_exactly_the_largest(n: int, ratio: float) -> None:
    x = randn(n, seed=n)
    codec = TopKCodec(ratio=ratio)
    out = codec.decode(codec.encode(x))
    k = topk_k(n, ratio)
    expected = torch.argsort(x.abs(), descending=True)[:k]
    kept = out.nonzero().view(-1)
    assert torch.equal(kept, expected.sort().values)
    assert torch.equal(out[kept], x[kept])


def test_largest_magnitudes_falls_back_on_adversarial_layout() -> None:
    # Big values only where the strided sample never looks: still exact.
    x = torch.zeros(400_000)
    x[1::97] = torch.arange(1, len(x[1::97]) + 1, dtype=torch.float32)
    k = 1000
    got = largest_magnitudes(x, k).sort().values
    assert torch.equal(got, torch.topk(x.abs(), k).indices.sort().values)


def test_topk_picks_smaller_position_encoding() -> None:
    n = 1000  # 125 bitmap bytes; indices take 10 bits each
    sparse = TopKCodec(ratio=0.05)  # k=50 -> 63 bytes of indices
    dense = TopKCodec(ratio=0.2)  # k=200 -> 250 bytes of indices
    x = randn(n)
    p_sparse, p_dense = sparse.encode(x), dense.encode(x)
    assert header_flags(p_sparse) & FLAG_BITMAP == 0
    assert header_flags(p_dense) & FLAG_BITMAP
    assert p_sparse.numel() == HEADER_NBYTES + 63 + 4 * 50
    assert p_dense.numel() == HEADER_NBYTES + 125 + 4 * 200
    for codec, payload in ((sparse, p_sparse), (dense, p_dense)):
        out = codec.decode(payload)
        assert (out != 0).sum() == codec.selectors[0].count(n)


def test_topk_k_larger_than_n() -> None:
    x = randn(3)
    codec = TopKCodec(k=10)
    assert torch.equal(codec.decode(codec.encode(x)), x)


# -- random-k ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["rolling", "random"])
def test_randomk_masks_shared_and_step_dependent(mode: str) -> None:
    a, b = RandomKCodec(p=0.1, mode=mode), RandomKCodec(p=0.1, mode=mode)
    assert torch.equal(a.mask_indices(1003, CTX), b.mask_indices(1003, CTX))
    other = CodecContext(step=CTX.step + 1, seed=CTX.seed)
    assert not torch.equal(a.mask_indices(1000, CTX), a.mask_indices(1000, other))
    # rank must not change a mask, or ranks could not decode each other
    ranked = CodecContext(step=CTX.step, seed=CTX.seed, rank=3)
    assert torch.equal(a.mask_indices(1000, CTX), a.mask_indices(1000, ranked))
    x = randn(1003)
    out = b.decode(a.encode(x, CTX), CTX)
    mask = a.mask_indices(1003, CTX)
    assert torch.equal(out[mask], x[mask])
    assert out.count_nonzero() == mask.numel()


def test_randomk_random_mode_seed_changes_mask_and_size() -> None:
    codec = RandomKCodec(p=0.3, mode="random")
    m1 = codec.mask_indices(1000, CodecContext(step=1, seed=1))
    m2 = codec.mask_indices(1000, CodecContext(step=1, seed=2))
    assert m1.numel() == m2.numel() == 300 and not torch.equal(m1, m2)
    assert torch.equal(m1, m1.unique())  # ascending, distinct


@pytest.mark.parametrize("p,n", [(0.1, 1000), (0.1, 1005), (0.3, 77), (0.5, 9)])
def test_rolling_covers_every_element_once_per_cycle(p: float, n: int) -> None:
    codec = RandomKCodec(p=p, mode="rolling")
    stride = math.floor(1 / p + 1e-9)
    for start in (0, 13):
        hits = torch.zeros(n, dtype=torch.long)
        for step in range(start, start + stride):
            hits[codec.mask_indices(n, CodecContext(step=step, seed=9))] += 1
        assert (hits == 1).all()


def test_chain_exposes_its_mask() -> None:
    chain = make_codec(COCKTAIL)
    assert torch.equal(chain.mask_indices(500, CTX), RandomKCodec(p=0.1).mask_indices(500, CTX))
    with pytest.raises(CodecError, match="no randomk"):
        make_codec("topk:ratio=0.1").mask_indices(500, CTX)


def test_randomk_requires_ctx() -> None:
    codec = RandomKCodec(p=0.1)
    with pytest.raises(CodecError, match="CodecContext"):
        codec.encode(randn(100))
    payload = codec.encode(randn(100), CTX)
    with pytest.raises(CodecError, match="CodecContext"):
        codec.decode(payload)


# -- composition -------------------------------------------------------------------


def test_cocktail_decode_matches_stages_by_hand() -> None:
    n = 10_007
    x = randn(n, seed=1)
    codec = make_codec(COCKTAIL)
    out = codec.decode(codec.encode(x, CTX), CTX)

    mask = RandomKCodec(p=0.1).mask_indices(n, CTX)
    subset = x[mask]
    k = topk_k(subset.numel(), 0.2)
    top = torch.topk(subset.abs(), k).indices.sort().values
    quant = QuantizeCodec(bits=4, bucket=128)
    values = quant.decode(quant.encode(subset[top]))
    expected = torch.zeros(n)
    expected[mask[top]] = values
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "spec",
    [
        "topk:ratio=0.1+quantize:bits=4",
        "randomk:p=0.2+quantize:bits=3,bucket=32",
        "randomk:p=0.1,mode=random+topk:ratio=0.5",
        "topk:k=20+fp16",
        "randomk:p=0.5+bf16",
    ],
)
def test_chain_matches_stages_by_hand(spec: str) -> None:
    n = 3001
    x = randn(n, seed=2)
    codec = make_codec(spec)
    out = codec.decode(codec.encode(x, CTX), CTX)
    positions = torch.arange(n)
    for selector in codec.selectors:
        values = x[positions]
        picked = selector.select(values, CTX)
        positions = positions[picked.index]
    value_codec = make_codec(codec.value.spec)
    expected = torch.zeros(n)
    expected[positions] = value_codec.decode(value_codec.encode(x[positions]))
    assert torch.equal(out, expected)


def test_topk_bitmap_inside_chain_is_over_the_subset() -> None:
    n = 10_000  # rolling p=0.1 -> 1000-element subset; topk 0.2 -> 200 kept
    codec = make_codec("randomk:p=0.1+topk:ratio=0.2")
    payload = codec.encode(randn(n), CodecContext(step=0))
    assert header_flags(payload) & FLAG_BITMAP
    assert payload.numel() == HEADER_NBYTES + 1000 // 8 + 4 * 200


def test_empty_tensors_round_trip_everywhere() -> None:
    for spec in list(SIZE_FORMULAS):
        codec = make_codec(spec)
        assert codec.decode(codec.encode(torch.zeros(0), CTX), CTX).numel() == 0


def test_chain_order_is_enforced() -> None:
    with pytest.raises(CodecError, match="must come last"):
        make_codec("quantize:bits=4+topk:ratio=0.1")
    with pytest.raises(CodecError, match="randomk -> topk"):
        make_codec("topk:ratio=0.1+randomk:p=0.1")
    with pytest.raises(CodecError, match="randomk -> topk"):
        make_codec("topk:ratio=0.1+topk:ratio=0.2")
    with pytest.raises(CodecError, match="must come last"):
        make_codec("fp16+quantize:bits=4")


# -- malformed payloads ------------------------------------------------------------


def test_malformed_payloads_raise() -> None:
    codec = make_codec(COCKTAIL)
    good = codec.encode(randn(5000), CTX)
    cases = {
        "truncated": good[:-1],
        "padded": torch.cat([good, torch.zeros(1, dtype=torch.uint8)]),
        "header": good[:5],
        "empty": good[:0],
    }
    for bad in cases.values():
        with pytest.raises(CodecError, match="truncated|bytes"):
            codec.decode(bad, CTX)
    wrong_magic = good.clone()
    wrong_magic[0] = 0
    with pytest.raises(CodecError, match="magic"):
        codec.decode(wrong_magic, CTX)
    wrong_version = good.clone()
    wrong_version[1] = 99
    with pytest.raises(CodecError, match="version"):
        codec.decode(wrong_version, CTX)
    with pytest.raises(CodecError, match="uint8"):
        codec.decode(good.float(), CTX)
    with pytest.raises(CodecError, match="uint8"):
        codec.decode(good.view(1, -1), CTX)
    bad_flags = good.clone()
    bad_flags[3] |= 0x80
    with pytest.raises(CodecError, match="flag"):
        codec.decode(bad_flags, CTX)


def test_wrong_codec_payloads_raise() -> None:
    x = randn(1000)
    with pytest.raises(CodecError, match="fp16"):
        QuantizeCodec(bits=4).decode(Fp16Codec().encode(x))
    # Same layout and size, different parameters: caught by the fingerprint.
    nearest = QuantizeCodec(bits=4)
    stochastic = QuantizeCodec(bits=4, rounding="stochastic")
    payload = nearest.encode(x)
    assert payload.numel() == stochastic.payload_nbytes(1000)
    with pytest.raises(CodecError, match="other parameters"):
        stochastic.decode(payload)


def test_corrupt_sections_raise() -> None:
    x = randn(1000)
    dense = TopKCodec(ratio=0.3)
    payload = dense.encode(x)
    payload[HEADER_NBYTES] ^= 0xFF  # flip bitmap bits: popcount no longer k
    with pytest.raises(CodecError, match="bitmap"):
        dense.decode(payload)
    sparse = TopKCodec(ratio=0.01)
    payload = sparse.encode(x)
    payload[HEADER_NBYTES : HEADER_NBYTES + 13] = 0xFF  # indices no longer increasing
    with pytest.raises(CodecError, match="increasing"):
        sparse.decode(payload)
    quant = QuantizeCodec(bits=2, bucket=1000)
    payload = quant.encode(x)
    payload[HEADER_NBYTES + 2 :] = 0xFF  # code 3 never appears in 2-bit payloads
    with pytest.raises(CodecError, match="codes"):
        quant.decode(payload)


def test_encode_rejects_non_float() -> None:
    with pytest.raises(CodecError, match="floating"):
        IdentityCodec().encode(torch.arange(4))


# -- specs -------------------------------------------------------------------------


def test_spec_round_trip_and_canonical_form() -> None:
    assert make_codec("quantize:bits=4").spec == "quantize:bits=4,bucket=128,rounding=nearest"
    assert make_codec("topk:ratio=0.01+identity").spec == "topk:ratio=0.01"
    assert make_codec(" randomk : p=0.1 ").spec == "randomk:p=0.1,mode=rolling"
    assert isinstance(make_codec("quantize"), QuantizeCodec)
    assert isinstance(make_codec("randomk:p=0.1"), RandomKCodec)
    assert isinstance(make_codec(COCKTAIL), ChainCodec)
    assert make_codec("topk:ratio=0.1").name == "topk"
    assert make_codec(COCKTAIL).name == "randomk+topk+quantize"
    for spec in [*SIZE_FORMULAS, "topk:k=3+fp16"]:
        codec = make_codec(spec)
        assert make_codec(codec.spec).spec == codec.spec
        assert make_codec(codec.spec) == codec


def test_mapping_specs() -> None:
    assert make_codec({"name": "quantize", "bits": 2}).spec == make_codec("quantize:bits=2").spec
    chain = make_codec({"stages": ["randomk:p=0.1", {"name": "topk", "ratio": 0.2}, "quantize"]})
    assert chain.spec == make_codec("randomk:p=0.1+topk:ratio=0.2+quantize").spec
    codec = QuantizeCodec()
    assert make_codec(codec) is codec


@pytest.mark.parametrize(
    "spec,pattern",
    [
        ("zip", r"unknown codec 'zip'.*identity, fp16, bf16, quantize, topk, randomk"),
        ("quantize:bitz=4", r"unknown parameter 'bitz'; allowed: bits, bucket, rounding"),
        ("fp16:bits=4", r"unknown parameter 'bits'.*no parameters"),
        ("quantize:bits=9", r"bits=9 out of range; allowed 1..8"),
        ("quantize:bits=four", r"bits must be an integer"),
        ("quantize:bits=0", r"bits=0"),
        ("quantize:bucket=0", r"bucket=0"),
        ("quantize:rounding=up", r"rounding='up'.*nearest, stochastic"),
        ("topk:ratio=0", r"ratio=0.0 out of range"),
        ("topk:ratio=1.5", r"ratio=1.5"),
        ("topk:ratio=0.1,k=5", r"either ratio or k"),
        ("topk:k=0", r"k=0"),
        ("randomk:p=0.1,mode=shuffle", r"mode='shuffle'.*rolling, random"),
        ("randomk:q=0.1", r"unknown parameter 'q'; allowed: p, mode"),
        ("quantize:bits", r"'bits' must look like key=value"),
        ("quantize:bits=2,bits=3", r"'bits' given twice"),
        ("fp16++quantize", r"empty stage"),
        ("", r"empty stage"),
    ],
)
def test_spec_errors_name_the_bad_part(spec: str, pattern: str) -> None:
    with pytest.raises(CodecError, match=pattern):
        make_codec(spec)


def test_mapping_spec_errors() -> None:
    with pytest.raises(CodecError, match="unknown parameter 'bitz'"):
        make_codec({"name": "quantize", "bitz": 4})
    with pytest.raises(CodecError, match="needs a 'name'"):
        make_codec({"bits": 4})
    with pytest.raises(CodecError, match="bits must be an integer"):
        make_codec({"name": "quantize", "bits": 4.5})
    with pytest.raises(CodecError, match="string or a mapping"):
        make_codec(4)


# -- error feedback ----------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["topk:ratio=0.05", "quantize:bits=2", COCKTAIL, "randomk:p=0.1,mode=random"]
)
def test_error_feedback_sums_converge(spec: str) -> None:
    codec = make_codec(spec)
    ef = ErrorFeedback()
    n, steps = 5000, 200
    drift = randn(n, seed=100)  # a consistent direction, like a gradient's mean
    total_in = torch.zeros(n)
    total_out = torch.zeros(n)
    for step in range(steps):
        x = drift + 0.5 * randn(n, seed=step)
        payload, decoded = encode_with_feedback(codec, ef, x, CodecContext(step=step))
        assert payload.dtype == torch.uint8
        total_in += x
        total_out += decoded
        if step == steps // 2 - 1:
            half_residual = ef.error.norm()
    gap = (total_out - total_in).norm()
    # sum(decoded) = sum(inputs) - e_T exactly, and e_T stays bounded while the sum
    # grows linearly, so the relative gap shrinks like 1/T.
    assert torch.allclose(gap, ef.error.norm(), rtol=1e-3)
    assert gap < 1.25 * half_residual
    assert gap < 0.15 * total_in.norm()
    # Without feedback, a biased codec loses a large share of the signal.
    if spec.startswith("topk"):
        plain = sum(codec.decode(codec.encode(drift)) for _ in range(steps))
        assert (plain - steps * drift).norm() > 0.5 * (steps * drift).norm()


def test_error_feedback_state_dict_round_trip() -> None:
    codec = TopKCodec(ratio=0.1)
    ef = ErrorFeedback()
    assert ef.state_dict() == {"error": None}
    x = randn(64).view(8, 8)
    _, decoded = encode_with_feedback(codec, ef, x)
    assert decoded.shape == (8, 8)
    state = ef.state_dict()
    assert torch.equal(state["error"], x - decoded)
    restored = ErrorFeedback()
    restored.load_state_dict(state)
    state["error"].zero_()  # the loaded copy must not alias the checkpoint
    y = randn(64, seed=1).view(8, 8)
    assert torch.equal(restored.compensate(y), ef.compensate(y))
    restored.reset()
    assert restored.error is None
    with pytest.raises(CodecError, match="shape"):
        ef.compensate(randn(10))
    with pytest.raises(CodecError, match="'error'"):
        restored.load_state_dict({})


@pytest.mark.parametrize("spec", list(SIZE_FORMULAS))
def test_decode_into_out_writes_or_adds_in_place(spec):
    codec = make_codec(spec)
    x = randn(1000, seed=3)
    payload = codec.encode(x, CTX)
    expected = codec.decode(payload, CTX)
    buf = torch.full((3000,), 7.0)
    view = buf[1000:2000]  # a slice of a larger buffer, as the sharded all-reduce uses
    assert codec.decode(payload, CTX, out=view) is view
    torch.testing.assert_close(view, expected, rtol=0, atol=0)
    assert (buf[:1000] == 7).all() and (buf[2000:] == 7).all()  # neighbours untouched
    base = randn(1000, seed=4)
    acc = base.clone()
    codec.decode(payload, CTX, out=acc, add=True)
    torch.testing.assert_close(acc, base + expected)
    with pytest.raises(CodecError, match="flat float32 tensor of 1000"):
        codec.decode(payload, CTX, out=torch.zeros(999))


def test_compiled_quantize_gives_the_eager_bytes() -> None:
    """parallel.compile_codecs' inductor kernels against the eager code, byte for byte:
    a partial last bucket with an odd count, an all-zero bucket, exact halfway ties
    (rounded to even), a chain (cocktail's), and a corrupt code rejected alike."""
    from farflung.compress import fused
    from farflung.compress.codec import CodecError

    g = torch.Generator().manual_seed(3)
    x = torch.randn(128 * 40 + 37, generator=g)
    x[128:256] = 0.0
    x[256:384] = (torch.arange(128) % 29 - 14) * 0.25  # s = 3.5 / 7 = 0.5: x/s + 7 at .5
    x[384:512] = torch.arange(128) * (3.0 / 127) - 1.5
    ctx = CodecContext(step=4, seed=1, rank=0)
    try:
        for spec in ("quantize:bits=4", "quantize:bits=8", COCKTAIL):
            codec = make_codec(spec)
            fused.set_mode("false")
            eager = codec.encode(x, ctx)
            eager_back = codec.decode(eager, ctx)
            fused.set_mode("true")
            compiled = codec.encode(x, ctx)
            assert torch.equal(compiled, eager), spec
            assert torch.equal(codec.decode(eager, ctx), eager_back), spec
        assert fused._broken is None and {"codes", "values", "absmax"} <= set(fused._kernels)
        codec = make_codec("quantize:bits=4")
        bad = codec.encode(x, ctx).clone()
        bad[-1] = 0xFF  # code 15 > 2 x 7
        with pytest.raises(CodecError, match="codes above 14"):
            codec.decode(bad, ctx)
    finally:
        fused.set_mode("false")
