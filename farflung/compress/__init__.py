"""Codecs that shrink what crosses a slow link: casts, quantization, top-k, random-k,
their CocktailSGD-style composition, and error feedback.

Pure tensor code: nothing here touches process groups. Every payload is a 1-D
``torch.uint8`` tensor whose ``numel()`` is its exact size on the wire.
"""

from farflung.compress.activations import ActivationBuffer, BoundaryCodec
from farflung.compress.bits import pack_bits, packed_nbytes, unpack_bits
from farflung.compress.chain import ChainCodec
from farflung.compress.codec import Codec, CodecContext, CodecError
from farflung.compress.feedback import ErrorFeedback, encode_with_feedback
from farflung.compress.header import HEADER_NBYTES
from farflung.compress.named import (
    Bf16Codec,
    Fp16Codec,
    IdentityCodec,
    QuantizeCodec,
    RandomKCodec,
    TopKCodec,
)
from farflung.compress.registry import COCKTAIL, CODEC_NAMES, make_codec

__all__ = [
    "CODEC_NAMES",
    "COCKTAIL",
    "HEADER_NBYTES",
    "Bf16Codec",
    "ChainCodec",
    "Codec",
    "CodecContext",
    "CodecError",
    "ErrorFeedback",
    "Fp16Codec",
    "IdentityCodec",
    "QuantizeCodec",
    "RandomKCodec",
    "TopKCodec",
    "encode_with_feedback",
    "make_codec",
    "pack_bits",
    "packed_nbytes",
    "unpack_bits",
    "ActivationBuffer",
    "BoundaryCodec",
]
