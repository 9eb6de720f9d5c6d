"""torch.distributed wrappers: process-group set-up, metered collectives, byte meters."""

from farflung.comm.collectives import Comm, Handle, nbytes
from farflung.comm.dist import (
    DistInfo,
    free_port,
    init_distributed,
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
    "init_distributed",
    "nbytes",
    "pick_backend",
    "shutdown_distributed",
]
