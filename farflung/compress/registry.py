"""Codecs by name: ``make_codec("randomk:p=0.1+topk:ratio=0.2+quantize:bits=4")``.

Spec grammar: stages joined by ``+``; a stage is ``name`` or ``name:key=value,...``.
Chains follow ``randomk -> topk -> value stage`` (``identity``, ``fp16``, ``bf16`` or
``quantize``); any sub-sequence is allowed and a chain without a value stage sends fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from farflung.compress.chain import ChainCodec
from farflung.compress.codec import Codec, CodecError
from farflung.compress.named import (
    Bf16Codec,
    Fp16Codec,
    IdentityCodec,
    QuantizeCodec,
    RandomKCodec,
    TopKCodec,
)
from farflung.compress.quantize import QuantizeValues
from farflung.compress.sparsify import RandomKSelector, TopKSelector
from farflung.compress.values import CastValues, Fp32Values

COCKTAIL = "randomk:p=0.1,mode=rolling+topk:ratio=0.2+quantize:bits=4,bucket=128"
"""CocktailSGD's default composition (REFERENCES.md section 1), about 0.18 bit/element."""

ALIASES = {"cocktail": COCKTAIL}
"""Short names accepted wherever a spec is."""


@dataclass(frozen=True)
class _StageInfo:
    role: str  # "selector" or "value"
    params: Mapping[str, type]
    stage: Callable[..., Any]
    codec: Callable[..., Codec]


_STAGES: dict[str, _StageInfo] = {
    "identity": _StageInfo("value", {}, Fp32Values, IdentityCodec),
    "fp16": _StageInfo("value", {}, lambda: CastValues(torch.float16), Fp16Codec),
    "bf16": _StageInfo("value", {}, lambda: CastValues(torch.bfloat16), Bf16Codec),
    "quantize": _StageInfo(
        "value", {"bits": int, "bucket": int, "rounding": str}, QuantizeValues, QuantizeCodec
    ),
    "topk": _StageInfo("selector", {"ratio": float, "k": int}, TopKSelector, TopKCodec),
    "randomk": _StageInfo("selector", {"p": float, "mode": str}, RandomKSelector, RandomKCodec),
}
CODEC_NAMES: tuple[str, ...] = tuple(_STAGES)
_ORDER_HINT = "randomk -> topk -> one of identity|fp16|bf16|quantize"


def make_codec(spec: str | Mapping[str, Any] | Codec) -> Codec:
    """Build a codec from a spec string, a mapping, or return a codec unchanged.

    Mappings are ``{"name": "quantize", "bits": 4}`` for one stage or
    ``{"stages": [<str or mapping>, ...]}`` for a chain.
    """
    if isinstance(spec, Codec):
        return spec
    if isinstance(spec, str):
        spec = ALIASES.get(spec.strip(), spec)
        stages = _parse_string(spec)
        where = spec
    elif isinstance(spec, Mapping):
        stages = _parse_mapping(spec)
        where = repr(dict(spec))
    else:
        raise CodecError(f"a codec spec is a string or a mapping, got {type(spec).__name__}")
    return _assemble(stages, where)


def _assemble(stages: list[tuple[str, dict[str, Any]]], where: str) -> Codec:
    if not stages:
        raise CodecError(f"empty codec spec {where!r}; known codecs: {', '.join(CODEC_NAMES)}")
    for position, (name, _) in enumerate(stages[:-1]):
        if _STAGES[name].role == "value":
            raise CodecError(
                f"bad chain {where!r}: value stage {name!r} at position {position + 1} must "
                f"come last; order is {_ORDER_HINT}"
            )
    if len(stages) > 1 and stages[-1][0] == "identity":
        stages = stages[:-1]  # fp32 values are what a selector sends anyway
    if len(stages) == 1:
        name, kwargs = stages[0]
        return _STAGES[name].codec(**kwargs)
    built = [_STAGES[name].stage(**kwargs) for name, kwargs in stages]
    value = built.pop() if _STAGES[stages[-1][0]].role == "value" else None
    return ChainCodec(built, value)


def _parse_string(spec: str) -> list[tuple[str, dict[str, Any]]]:
    stages = []
    for part in spec.split("+"):
        text = part.strip()
        if not text:
            raise CodecError(f"empty stage in codec spec {spec!r}")
        name, _, params = text.partition(":")
        info = _stage_info(name.strip(), spec)
        kwargs: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in params.split(","))):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq:
                raise CodecError(f"{name}: parameter {item!r} must look like key=value")
            _check_key(name, key, info, kwargs)
            kwargs[key] = _convert(name, key, raw.strip(), info.params[key])
        stages.append((name.strip(), kwargs))
    return stages


def _parse_mapping(spec: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if "stages" in spec:
        if set(spec) != {"stages"}:
            raise CodecError(f"a chain mapping holds only 'stages', got keys {sorted(spec)}")
        stages = []
        for item in spec["stages"]:
            stages.extend(_parse_string(item) if isinstance(item, str) else _parse_mapping(item))
        return stages
    if "name" not in spec:
        raise CodecError(f"a codec mapping needs a 'name' (or 'stages'), got keys {sorted(spec)}")
    name = spec["name"]
    info = _stage_info(name, repr(dict(spec)))
    kwargs: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "name":
            continue
        _check_key(name, key, info, kwargs)
        kind = info.params[key]
        kwargs[key] = _convert(name, key, value, kind) if isinstance(value, str) else value
    return [(name, kwargs)]


def _stage_info(name: str, where: str) -> _StageInfo:
    if name not in _STAGES:
        raise CodecError(
            f"unknown codec {name!r} in {where!r}; known codecs: {', '.join(CODEC_NAMES)}"
        )
    return _STAGES[name]


def _check_key(name: str, key: str, info: _StageInfo, seen: Mapping[str, Any]) -> None:
    if key not in info.params:
        allowed = ", ".join(info.params) if info.params else "none (it takes no parameters)"
        raise CodecError(f"{name}: unknown parameter {key!r}; allowed: {allowed}")
    if key in seen:
        raise CodecError(f"{name}: parameter {key!r} given twice")


def _convert(name: str, key: str, raw: str, kind: type) -> Any:
    if kind is str:
        return raw
    try:
        return kind(raw)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise CodecError(f"{name}: {key} must be {noun}, got {raw!r}") from None
