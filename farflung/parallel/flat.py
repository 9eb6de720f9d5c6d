"""Views of a model's parameters and gradients as one flat fp32 vector."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def make_buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list]:
    """Group tensors (in reverse order, as backward produces gradients) into buckets of
    at most ``bucket_bytes`` (a larger tensor gets a bucket of its own)."""
    buckets: list[list] = []
    current: list = []
    size = 0
    for p in reversed(tensors):
        b = p.numel() * p.element_size()
        if current and size + b > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += b
    if current:
        buckets.append(current)
    return buckets


def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive pieces of ``flat`` into ``tensors``."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor holds NaN or Inf: each one's max and min (both propagate a
    NaN, and an Inf is one of them), one sync. Several times faster than
    ``isfinite(t).all()``, which writes a bool tensor as large as ``t`` first."""
    ends = [e for t in tensors if t.numel() for e in (t.amax(), t.amin())]
    return not ends or bool(torch.isfinite(torch.stack(ends)).all())


def grads_finite(model: nn.Module) -> bool:
    """True when no gradient holds NaN or Inf."""
    return all_finite([p.grad for p in model.parameters() if p.grad is not None])


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_params(params: list[nn.Parameter], out: torch.Tensor | None = None) -> torch.Tensor:
    """A flat fp32 copy of the parameters: a new tensor, or written into ``out``."""
    parts = [p.detach().reshape(-1).float() for p in params]
    return torch.cat(parts) if out is None else torch.cat(parts, out=out)


def flat_grads(params: list[nn.Parameter]) -> torch.Tensor:
    """A new flat fp32 copy of the gradients (zeros where a parameter has none)."""
    return torch.cat(
        [
            p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel())
            for p in params
        ]
    )


def _views(params: list[nn.Parameter], flat: torch.Tensor):
    offset = 0
    for p in params:
        n = p.numel()
        yield p, flat[offset : offset + n].view_as(p)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} elements, parameters {offset}")


def set_params(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    with torch.no_grad():
        for p, v in _views(params, flat):
            p.copy_(v)


def add_to_params(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    with torch.no_grad():
        for p, v in _views(params, flat):
            p.add_(v)


def set_grads(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    for p, v in _views(params, flat):
        if p.grad is None:
            p.grad = v.clone().to(p.dtype)
        else:
            p.grad.copy_(v)


@contextlib.contextmanager
def swapped_params(params: list[nn.Parameter], flat: torch.Tensor) -> Iterator[None]:
    """Load ``flat`` into the parameters for the ``with`` block, then put the
    parameters back as they were (for evaluating a global model on a local replica)."""
    saved = flat_params(params)
    set_params(params, flat)
    try:
        yield
    finally:
        set_params(params, saved)
