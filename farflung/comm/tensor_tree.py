"""Nested training state as safetensors bytes, without pickle.

A *tree* is what a snapshot is made of: dicts (``OrderedDict`` too, with a
``state_dict``'s ``_metadata``), lists and tuples holding tensors,
ints, floats, bools, None and strings (a model's and an optimizer's ``state_dict``,
an algorithm's state, counters). :func:`encode` lays it out as one safetensors file:
every tensor under a path name (``model/wte.weight``), and in the header's
``__metadata__`` a JSON *skeleton* that rebuilds the exact structure: tuples stay
tuples, int keys stay ints, dtypes and shapes are the tensors' own, floats travel as
``float.hex`` so every bit (and inf and nan) comes back. The same tensor object met
twice (tied weights) is stored once and comes back as one object.

Nothing else can be encoded: another type (a dataclass, a numpy array, a function)
is a TypeError naming its path, and :func:`decode` builds only those types from
JSON and safetensors' own parser. There is no code path that unpickles, so bytes
from another machine can at worst be refused (ValueError naming what is wrong).

:meth:`Encoded.chunks` streams the bytes from the tensors themselves, so sending a
state costs one bounded frame of memory, not a copy of the state."""

from __future__ import annotations

import collections
import json
import struct
import sys
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

METADATA_KEY = "farflung.tree"
"""The ``__metadata__`` entry that holds the skeleton."""
MAX_HEADER = 100 << 20  # safetensors' own limit on a header

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


class Encoded:
    """A tree laid out as safetensors: ``nbytes`` in all, written by :meth:`chunks`
    (or :meth:`to_bytes`). It refers to the tree's tensors: they must not change
    while it is written."""

    def __init__(self, header: bytes, tensors: list[torch.Tensor]) -> None:
        self.header = header
        self.tensors = tensors
        self.nbytes = len(header) + sum(t.numel() * t.element_size() for t in tensors)

    def chunks(self, size: int = 4 << 20) -> Iterator[memoryview]:
        """The bytes in pieces of at most ``size``; one tensor at a time is made
        contiguous on the CPU (most already are: then nothing is copied)."""
        yield from _pieces(memoryview(self.header), size)
        for t in self.tensors:
            if t.numel() == 0:
                continue
            flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            yield from _pieces(memoryview(flat.numpy()), size)

    def to_bytes(self) -> bytes:
        return b"".join(bytes(c) for c in self.chunks())


def _pieces(view: memoryview, size: int) -> Iterator[memoryview]:
    for start in range(0, len(view), size):
        yield view[start : start + size]


def encode(tree: Any) -> Encoded:
    """``tree`` as safetensors bytes with its skeleton (see the module docstring); a
    TypeError names the path of anything that is not a tree."""
    if sys.byteorder != "little":  # safetensors is little-endian; so are torch's bytes here
        raise RuntimeError("encoding state needs a little-endian machine")
    walker = _Flattener()
    skeleton = walker.node(tree, "")
    entries: dict[str, Any] = {"__metadata__": {METADATA_KEY: json.dumps(skeleton)}}
    offset = 0
    for name, t in zip(walker.names, walker.tensors, strict=True):
        end = offset + t.numel() * t.element_size()
        entries[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
    return Encoded(struct.pack("<Q", len(header)) + header, walker.tensors)


class _Flattener:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []
        self.seen: dict[int, str] = {}  # id(tensor) -> its name: tied tensors once

    def node(self, x: Any, path: str) -> dict[str, Any]:
        if isinstance(x, torch.Tensor):
            return {"T": self._tensor(x, path)}
        if type(x) is dict:
            return {"D": self._pairs(x, path)}
        if type(x) is collections.OrderedDict:  # a state_dict, with its modules' versions
            meta = getattr(x, "_metadata", None)
            return {"O": [self._pairs(x, path), self.node(meta, _join(path, "_metadata"))]}
        if type(x) in (list, tuple):
            items = [self.node(v, _join(path, i)) for i, v in enumerate(x)]
            return {"L" if type(x) is list else "U": items}
        return _scalar(x, path)

    def _pairs(self, x: dict[Any, Any], path: str) -> list[list[dict[str, Any]]]:
        return [[_scalar(k, f"{path}[{k!r}]"), self.node(v, _join(path, k))] for k, v in x.items()]

    def _tensor(self, t: torch.Tensor, path: str) -> str:
        if id(t) in self.seen:
            return self.seen[id(t)]
        if t.dtype not in _DTYPES:
            raise TypeError(f"{path or 'the state'}: tensors of {t.dtype} cannot be encoded")
        if t.is_sparse or t.layout != torch.strided:
            raise TypeError(f"{path or 'the state'}: a {t.layout} tensor cannot be encoded")
        name = path or "."
        while name in self.seen.values():  # "a/b" as one key and as a path: both kept
            name += "'"
        self.seen[id(t)] = name
        self.names.append(name)
        self.tensors.append(t)
        return name


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _scalar(x: Any, path: str) -> dict[str, Any]:
    """A leaf (or a dict key): its JSON node. bool before int: bool is an int."""
    if x is None:
        return {"N": 0}
    if type(x) is bool:
        return {"B": x}
    if type(x) is int:
        return {"I": x}
    if type(x) is float:
        return {"F": x.hex()}  # exact, and inf/nan survive
    if type(x) is str:
        return {"S": x}
    raise TypeError(
        f"{path or 'the state'}: a {type(x).__module__}.{type(x).__qualname__} cannot be "
        "encoded (only dicts, lists, tuples, tensors, ints, floats, bools, None and strings)"
    )


# -- decoding ----------------------------------------------------------------------------
def decode(data: bytes | bytearray | memoryview) -> Any:
    """The tree :func:`encode` wrote; a ValueError says what is wrong with bytes that
    are not such a tree (nothing in them is ever executed)."""
    skeleton = _skeleton(data)
    try:
        tensors = load_safetensors(bytes(data))
    except Exception as e:  # safetensors raises its own error types for bad bytes
        raise ValueError(f"not a valid safetensors state ({e})") from None
    used: set[str] = set()
    tree = _build(skeleton, tensors, used, "", 0)
    unused = set(tensors) - used
    if unused:
        raise ValueError(f"the state holds tensors its skeleton never names: {sorted(unused)[:5]}")
    return tree


def _skeleton(data: bytes | bytearray | memoryview) -> Any:
    if len(data) < 8:
        raise ValueError(f"not a safetensors state: {len(data)} bytes")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > min(MAX_HEADER, len(data) - 8):
        raise ValueError(f"not a safetensors state: a header of {n} bytes in {len(data)}")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
        return json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(
            f"not a farflung state: no readable skeleton in the header ({e!r})"
        ) from None


_MAX_DEPTH = 64  # a state is a few levels deep; a hostile skeleton must not recurse far


def _build(
    node: Any, tensors: dict[str, torch.Tensor], used: set[str], path: str, depth: int
) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError(f"{path}: the skeleton nests deeper than {_MAX_DEPTH}")
    if not (isinstance(node, dict) and len(node) == 1):
        raise ValueError(f"{path or 'the skeleton'}: {str(node)[:80]} is not a node")
    ((kind, value),) = node.items()
    if kind == "T":
        if not isinstance(value, str) or value not in tensors:
            raise ValueError(f"{path}: names tensor {str(value)[:80]!r}, which the state lacks")
        used.add(value)
        return tensors[value]
    if kind in ("L", "U") and isinstance(value, list):
        items = [_build(v, tensors, used, _join(path, i), depth + 1) for i, v in enumerate(value)]
        return items if kind == "L" else tuple(items)
    if kind == "D" and isinstance(value, list):
        return _build_pairs(value, {}, tensors, used, path, depth)
    if kind == "O" and isinstance(value, list) and len(value) == 2:
        out = _build_pairs(value[0], collections.OrderedDict(), tensors, used, path, depth)
        meta = _build(value[1], tensors, used, _join(path, "_metadata"), depth + 1)
        if meta is not None:
            out._metadata = meta  # type: ignore[attr-defined]  (what load_state_dict reads)
        return out
    return _leaf(node, path)


def _build_pairs(
    pairs: Any,
    out: dict[Any, Any],
    tensors: dict[str, torch.Tensor],
    used: set[str],
    path: str,
    depth: int,
) -> dict[Any, Any]:
    if not isinstance(pairs, list):
        raise ValueError(f"{path}: dict entries {str(pairs)[:80]} are not a list")
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError(f"{path}: a dict entry {str(pair)[:80]} is not [key, value]")
        key = _leaf(pair[0], path)
        out[key] = _build(pair[1], tensors, used, _join(path, key), depth + 1)
    return out


def _leaf(node: Any, path: str) -> Any:
    if not (isinstance(node, dict) and len(node) == 1):
        raise ValueError(f"{path or 'the skeleton'}: {str(node)[:80]} is not a node")
    ((kind, value),) = node.items()
    checks = {
        "N": lambda v: type(v) is int and v == 0,
        "B": lambda v: type(v) is bool,
        "I": lambda v: type(v) is int,
    }
    checks.update({"S": lambda v: type(v) is str, "F": lambda v: type(v) is str})
    if kind not in checks or not checks[kind](value):
        raise ValueError(f"{path or 'the skeleton'}: {str(node)[:80]} is not a valid leaf")
    if kind == "F":
        try:
            return float.fromhex(value)  # "inf", "-inf" and "nan" included
        except ValueError:
            raise ValueError(f"{path}: {value[:40]!r} is not a float") from None
    return None if kind == "N" else value
