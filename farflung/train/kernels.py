"""How one rank's step uses its device: which AdamW kernel it runs, whether its
forward is compiled, and how much memory it peaked at."""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Any

import torch

from farflung.comm.errors import first_line, say
from farflung.compress.fused import from_the_compiler
from farflung.config import OptimConfig


def make_optimizer(
    groups: list[dict[str, Any]], o: OptimConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over ``groups`` as ``optim`` says, ``optim.fused`` included."""
    kwargs: dict[str, Any] = {}
    if o.fused == "true" or (o.fused == "auto" and device.type == "cuda"):
        kwargs["fused"] = True
    elif o.fused == "false":
        kwargs["foreach"] = False
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), **kwargs)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device``: on a GPU through pinned memory with a non-blocking
    copy (the copy overlaps the work queued before it); elsewhere as it is."""
    if device.type != "cuda":
        return batch
    return batch.pin_memory().to(device, non_blocking=True)


def peak_bytes(device: torch.device) -> int:
    """This process's peak memory: CUDA's ``max_memory_allocated`` on a GPU, the peak
    resident set (``ru_maxrss``) on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)`` keeping this run's kernel choice: torch
    would take the saved groups' ``fused``/``foreach`` flags with their numbers, and
    ``optim.fused`` may change at ``--resume``."""
    kernel = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, kernel, strict=True):
        group.update(flags)


def compile_model(model: torch.nn.Module, backend: str | Callable = "inductor") -> None:
    """``torch.compile`` the module's forward in place (its parameters and state_dict
    keep their names). A forward that cannot compile (an unsupported platform, model or
    backend) says so once on stderr and runs uncompiled from then on: never silently."""
    compiled = torch.compile(model.forward, backend=backend)
    eager = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as e:
            if not from_the_compiler(e):
                raise
            say(
                f"farflung: train.compile: torch.compile failed ({first_line(e)}); "
                "running uncompiled"
            )
            del model.forward  # the class's forward from now on: this wrapper is gone
            return eager(*args, **kwargs)

    model.forward = forward
