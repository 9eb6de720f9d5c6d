"""How one rank's step uses its device: which AdamW kernel it runs, and how much
memory it peaked at."""

from __future__ import annotations

import resource
from typing import Any

import torch

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
