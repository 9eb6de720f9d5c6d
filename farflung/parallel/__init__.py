"""How a model is spread over workers: data-parallel algorithms chosen by name."""

from farflung.parallel import allreduce  # noqa: F401  (registers the algorithm)
from farflung.parallel.base import (
    REGISTRY,
    DataParallel,
    algorithm_names,
    make_algorithm,
    register,
)

__all__ = ["REGISTRY", "DataParallel", "algorithm_names", "make_algorithm", "register"]
