"""The data-parallel algorithm interface and its registry (Bagua's idea: the
algorithm is a strategy chosen by name; the training loop stays the same)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from farflung.comm import Comm
from farflung.config import Config, ConfigError, ParallelConfig, validate

REGISTRY: dict[str, type[DataParallel]] = {}


def register(name: str) -> Callable[[type[DataParallel]], type[DataParallel]]:
    """Class decorator adding an algorithm to the registry under ``name``."""

    def add(cls: type[DataParallel]) -> type[DataParallel]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return add


def algorithm_names() -> list[str]:
    return sorted(REGISTRY)


def check_parallel_config(cfg: ParallelConfig) -> None:
    """Validate what the config layer cannot: the algorithm name and the codec spec."""
    from farflung.compress import CodecError, make_codec

    if cfg.algorithm not in REGISTRY:
        raise ConfigError(
            f"parallel.algorithm = {cfg.algorithm!r} is not allowed; allowed: "
            f"{', '.join(algorithm_names())}"
        )
    if cfg.codec:
        try:
            make_codec(cfg.codec)
        except CodecError as e:
            raise ConfigError(f"parallel.codec = {cfg.codec!r}: {e}") from None


def distribute(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    algorithm: str = "allreduce",
    group: Any = None,
    **options: Any,
) -> DataParallel:
    """Wrap a model and its optimizer in a data-parallel algorithm for your own loop.

    ``options`` are :class:`ParallelConfig` fields (``codec``, ``warmup_steps``,
    ``local_steps``, ...). Needs an initialised default process group (or ``group``)."""
    from dataclasses import fields

    known = {f.name for f in fields(ParallelConfig)}
    unknown = set(options) - known
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)}; allowed: {sorted(known)}")
    cfg = ParallelConfig(algorithm=algorithm, **options)
    validate(Config(parallel=cfg))
    check_parallel_config(cfg)
    algo = make_algorithm(algorithm, model, optimizer, Comm(group), cfg)
    algo.setup()
    return algo


def make_algorithm(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    comm: Comm,
    cfg: ParallelConfig | None = None,
) -> DataParallel:
    """Build the algorithm registered as ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(algorithm_names())}")
    return REGISTRY[name](model, optimizer, comm, cfg or ParallelConfig(algorithm=name))


class DataParallel:
    """What a data-parallel algorithm decides: what is communicated, and when.

    The caller's loop is::

        algo.setup()
        for step in ...:
            loss.backward()            # possibly over several micro-batches
            algo.sync_gradients()      # e.g. all-reduce, or nothing for local-step methods
            clip, optimizer.step(), optimizer.zero_grad()
            algo.after_step(step)      # e.g. model-delta sync, outer step
        algo.close()
    """

    name: ClassVar[str] = "?"
    replicas_identical: ClassVar[bool] = True
    """False when ranks hold different model weights between syncs (local-step
    methods); checkpoints then keep every rank's weights."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, comm: Comm, cfg: ParallelConfig
    ) -> None:
        self.model, self.optimizer, self.comm, self.cfg = model, optimizer, comm, cfg
        self.steps_taken = 0  # counted by step(), for users' own loops

    def setup(self) -> None:
        """Make every rank start from rank 0's parameters."""
        for p in self.model.parameters():
            self.comm.broadcast(p.data, src=0, kind="init")

    def sync_gradients(self) -> None:
        """Called once per step after the last backward, before the optimizer step."""

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (``step`` counts from 1)."""

    @contextlib.contextmanager
    def eval_parameters(self) -> Iterator[nn.Module]:
        """The model to evaluate and checkpoint as *the* model of the run."""
        yield self.model

    def state_dict(self) -> dict[str, Any]:
        """Per-rank algorithm state (error buffers, outer optimizer, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state but the checkpoint holds {list(state)}")

    def step(self) -> None:
        """The whole sync-and-step for a user's loop, after ``loss.backward()``:
        sync gradients, optimizer step, zero the gradients, then ``after_step``."""
        self.sync_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 1
        self.after_step(self.steps_taken)

    def close(self) -> None:
        """Finish background work."""
