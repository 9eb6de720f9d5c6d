"""How a model is spread over workers: data-parallel algorithms chosen by name.

The algorithm names and the config check (:mod:`farflung.parallel.names`) load no
torch; the rest resolves on first use (module ``__getattr__``), which imports every
algorithm and so fills the registry."""

from __future__ import annotations

from farflung.parallel.names import ALGORITHMS, check_parallel_config, load_algorithms

_LAZY = (
    "REGISTRY",
    "DataParallel",
    "NonFiniteStep",
    "algorithm_names",
    "distribute",
    "make_algorithm",
    "register",
)


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from farflung.parallel import base

        load_algorithms()
        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALGORITHMS",
    "REGISTRY",
    "DataParallel",
    "NonFiniteStep",
    "algorithm_names",
    "check_parallel_config",
    "distribute",
    "load_algorithms",
    "make_algorithm",
    "register",
]
