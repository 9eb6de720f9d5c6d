"""torch.distributed wrappers: process-group set-up, metered collectives, byte meters.

The names below resolve on first use (module ``__getattr__``): a launcher that only
needs :func:`free_port` or :mod:`farflung.comm.binding` must not pay for torch."""

from __future__ import annotations

import importlib

from farflung.comm.binding import free_port

# name -> the submodule that defines it (imported when the name is first read)
_LAZY = {
    "Comm": "collectives",
    "Handle": "collectives",
    "nbytes": "collectives",
    "DistInfo": "dist",
    "group_timeout": "dist",
    "init_distributed": "dist",
    "new_group": "dist",
    "pick_backend": "dist",
    "shutdown_distributed": "dist",
    "Meter": "meter",
    "MeterSnapshot": "meter",
    "Traffic": "meter",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        # dist first, whatever the name: it must be imported before any process group
        # exists (its torch.distributed.nn import), as it was when this package loaded
        # everything eagerly
        importlib.import_module("farflung.comm.dist")
        module = importlib.import_module(f"farflung.comm.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Comm",
    "DistInfo",
    "Handle",
    "Meter",
    "MeterSnapshot",
    "Traffic",
    "free_port",
    "group_timeout",
    "init_distributed",
    "nbytes",
    "new_group",
    "pick_backend",
    "shutdown_distributed",
]
