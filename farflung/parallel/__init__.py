"""How a model is spread over workers: data-parallel algorithms chosen by name."""

from farflung.parallel import (  # noqa: F401  (registry)
    allreduce,
    cocktail,
    compressed,
    diloco,
    gossip,
)
from farflung.parallel.base import (
    REGISTRY,
    DataParallel,
    NonFiniteStep,
    algorithm_names,
    check_parallel_config,
    distribute,
    make_algorithm,
    register,
)

__all__ = [
    "REGISTRY",
    "DataParallel",
    "NonFiniteStep",
    "algorithm_names",
    "check_parallel_config",
    "distribute",
    "make_algorithm",
    "register",
]
