"""Mixed precision: which dtype the forward and backward compute in, and fp16's
dynamic loss scale.

The weights, their gradients and the optimizer state stay fp32 (the masters);
``torch.autocast`` runs the matrix products in bf16 or fp16. fp16's narrow range makes
small gradients underflow, so the loss is multiplied by a scale before the backward
and the gradients divided by it after; a step whose gradients overflow is skipped and
the scale halved, and after :data:`GROWTH_INTERVAL` good steps in a row it doubles
(torch's ``GradScaler`` policy, written here so that the skip is decided the same way
on every rank: see :meth:`farflung.train.loop.Worker.update`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INIT_SCALE = 2.0**16
GROWTH_INTERVAL = 2000
"""Good fp16 steps in a row before the scale doubles (torch's GradScaler default)."""
MIN_SCALE = 1.0
"""The scale never goes below this: a loss that overflows unscaled is a real fault."""


def resolve_precision(name: str, device: torch.device) -> str:
    """``train.precision`` for this device: ``auto`` is bf16 on a CUDA device that
    supports it, fp32 elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


Compute = Callable[[], contextlib.AbstractContextManager[Any]]
"""A factory of the context a forward runs in."""


def autocast(precision: str, device: torch.device) -> Compute:
    """A factory of the context every forward runs in (its backward follows it)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = DTYPES[precision]
    return lambda: torch.autocast(device.type, dtype=dtype)


class LossScaler:
    """fp16's dynamic loss scale; ``enabled`` False (bf16, fp32) makes it the identity.

    Its decisions depend only on the overflow verdicts it is given, so ranks given the
    same verdicts hold the same scale (it is saved with the rank's state)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.factor = INIT_SCALE if enabled else 1.0
        self.good_steps = 0
        self.overflows = 0  # counted over the run, for the summary

    @property
    def may_skip(self) -> bool:
        """Whether an overflow is still a scale event (False once the scale is down to
        :data:`MIN_SCALE`: an overflow then is a fault, handled as one)."""
        return self.enabled and self.factor > MIN_SCALE

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """What the backward starts from."""
        return loss * self.factor if self.enabled else loss

    def unscale(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Divide the accumulated gradients by the scale (exact: a power of two)."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.factor)

    def update(self, overflow: bool) -> None:
        """After a step: halve on an overflow, double after enough good steps."""
        if not self.enabled:
            return
        if overflow:
            self.factor = max(MIN_SCALE, self.factor / 2)
            self.good_steps = 0
            self.overflows += 1
            return
        self.good_steps += 1
        if self.good_steps == GROWTH_INTERVAL:
            self.factor *= 2
            self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.factor, "good_steps": self.good_steps, "overflows": self.overflows}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None or not self.enabled:  # a checkpoint from another precision
            return
        self.factor = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.overflows = int(state["overflows"])
