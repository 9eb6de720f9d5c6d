"""The data-parallel algorithms by name, without torch: what a launcher checks a
config against before it starts workers.

:data:`ALGORITHMS` is the one list of algorithm names; each module in it registers
its class under its name (:func:`farflung.parallel.base.register`) when
:func:`load_algorithms` imports it, and tests/test_launcher_imports.py holds the
registry to this list."""

from __future__ import annotations

import importlib

from farflung.config import ConfigError, ParallelConfig

ALGORITHMS: dict[str, str] = {
    "allreduce": "farflung.parallel.allreduce",
    "cocktail": "farflung.parallel.cocktail",
    "compressed": "farflung.parallel.compressed",
    "diloco": "farflung.parallel.diloco",
    "gossip": "farflung.parallel.gossip",
}
"""Algorithm name -> the module that registers it."""


def load_algorithms() -> None:
    """Import every algorithm module, which fills the registry (torch is loaded)."""
    for module in ALGORITHMS.values():
        importlib.import_module(module)


def check_parallel_config(cfg: ParallelConfig) -> None:
    """Validate what the config layer cannot: the algorithm name and the codec spec.
    Only a codec spec needs torch (the codec is built to check its parameters)."""
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(
            f"parallel.algorithm = {cfg.algorithm!r} is not allowed; allowed: "
            f"{', '.join(sorted(ALGORITHMS))}"
        )
    if cfg.codec:
        from farflung.compress import CodecError, make_codec

        try:
            make_codec(cfg.codec)
        except CodecError as e:
            raise ConfigError(f"parallel.codec = {cfg.codec!r}: {e}") from None
