"""torch.distributed wrappers: process-group set-up, metered collectives, byte meters."""

from farflung.comm.collectives import Comm, Handle, nbytes
from farflung.comm.dist import (
    DistInfo,
    free_port,
    group_timeout,
    init_distributed,
    new_group,
    pick_backend,
    shutdown_distributed,
)
from farflung.comm.meter import Meter, MeterSnapshot, Traffic

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
