"""The data-parallel algorithm interface and its registry (Bagua's idea: the
algorithm is a strategy chosen by name; the training loop stays the same)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from farflung.comm import Comm
from farflung.config import Config, ConfigError, ParallelConfig, validate
from farflung.parallel.flat import grads_finite, make_buckets, unflatten_into
from farflung.parallel.names import check_parallel_config, load_algorithms

REGISTRY: dict[str, type[DataParallel]] = {}

SETUP_BUCKET_BYTES = 64 << 20
"""The start-up broadcast moves the parameters in flat buckets of this size: one round
trip each rather than one per tensor (a GPT has a dozen tensors per block)."""


class NonFiniteStep(Exception):
    """NaN/Inf in a loss, a gradient or a synchronised tensor; the step's update was not
    applied where ``dropped``. ``ranks`` are global ranks, whatever group the algorithm
    runs on.

    ``local``: only this rank knows yet (a local-step algorithm skipped its own
    optimizer step; its peers learn it at the next sync, as ``ranks`` of a non-local
    report). Otherwise every rank raises the same report at the same step."""

    def __init__(self, ranks: list[int], dropped: bool, local: bool = False) -> None:
        what = "skipped a step with" if not dropped else "sent"
        super().__init__(f"rank(s) {ranks} {what} non-finite values")
        self.ranks, self.dropped, self.local = list(ranks), dropped, local


def register(name: str) -> Callable[[type[DataParallel]], type[DataParallel]]:
    """Class decorator adding an algorithm to the registry under ``name``."""

    def add(cls: type[DataParallel]) -> type[DataParallel]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return add


def algorithm_names() -> list[str]:
    load_algorithms()
    return sorted(REGISTRY)


def distribute(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    algorithm: str = "allreduce",
    group: Any = None,
    **options: Any,
) -> DataParallel:
    """Wrap a model and its optimizer in a data-parallel algorithm for your own loop.

    ``options`` are :class:`ParallelConfig` fields (``codec``, ``warmup_steps``,
    ``local_steps``, ...). Needs an initialised default process group; ``group`` (one
    this rank belongs to, e.g. a pipeline stage's replicas) limits the algorithm to
    its ranks, which must all call this."""
    from dataclasses import fields

    known = {f.name for f in fields(ParallelConfig)}
    unknown = set(options) - known
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)}; allowed: {sorted(known)}")
    cfg = ParallelConfig(algorithm=algorithm, **options)
    validate(Config(parallel=cfg))
    check_parallel_config(cfg)
    if group is not None and dist.get_rank(group) < 0:  # torch's NON_GROUP_MEMBER
        raise ValueError(f"rank {dist.get_rank()} is not a member of the group it was given")
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
    load_algorithms()  # this module may have been imported without the package's names
    if name not in REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(algorithm_names())}")
    return REGISTRY[name](model, optimizer, comm, cfg or ParallelConfig(algorithm=name))


class DataParallel:
    """What a data-parallel algorithm decides: what is communicated, and when.

    The caller's loop is::

        algo.setup()
        for step in ...:
            loss.backward()            # possibly over several micro-batches
            algo.sync_gradients(math.isfinite(loss))  # e.g. all-reduce; nothing for
                                                      # local-step methods
            clip, optimizer.step(), optimizer.zero_grad()
            algo.after_step(step)      # e.g. model-delta sync, outer step
        algo.close()

    Either call may raise :class:`NonFiniteStep`; after one from ``sync_gradients`` the
    caller skips the optimizer step (zeroes the gradients) and still calls
    ``after_step``, whose syncs every rank must join.
    """

    name: ClassVar[str] = "?"
    replicas_identical: ClassVar[bool] = True
    """False when ranks hold different model weights between syncs (local-step
    methods); checkpoints then keep every rank's weights."""

    averages_gradients: ClassVar[bool] = False
    """True when ``sync_gradients`` leaves every rank the same averaged gradients (the
    optimizer then takes the same step everywhere); False for local-step methods."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, comm: Comm, cfg: ParallelConfig
    ) -> None:
        self.model, self.optimizer, self.comm, self.cfg = model, optimizer, comm, cfg
        # set by a loss-scaled (fp16) loop: a gradient-averaging algorithm averages
        # non-finite gradients from a finite loss as they are, so that every rank finds
        # the overflow in the same average and skips alike; a non-finite loss still
        # raises NonFiniteStep
        self.tolerate_overflow = False
        self.steps_taken = 0  # counted by step(), for users' own loops
        self.skipped_since_sync = False

    @property
    def lr_scale(self) -> float:
        """What the training loop multiplies the schedule's learning rate by (1 unless
        an algorithm's local steps need it, see cocktail)."""
        return 1.0

    def setup(self) -> None:
        """Make every rank start from rank 0's parameters, in a few flat buckets."""
        if self.comm.size == 1:
            return
        params = [p.data for p in self.model.parameters()]
        for bucket in make_buckets(params, SETUP_BUCKET_BYTES):
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for t in bucket:
                by_dtype.setdefault(t.dtype, []).append(t)
            for tensors in by_dtype.values():
                flat = torch.cat([t.reshape(-1) for t in tensors])
                self.comm.broadcast(flat, src=0, kind="init")
                unflatten_into(flat, tensors)

    def sync_gradients(self, finite: bool = True) -> None:
        """Called once per step after the last backward, before the optimizer step.

        ``finite``: the caller's verdict on this rank's loss. Raises
        :class:`NonFiniteStep` when the step must not be applied."""

    def local_check(self, finite: bool) -> None:
        """For local-step algorithms: skip this rank's own step (and remember to tell
        the peers) when its loss or gradients are not finite."""
        if not (finite and grads_finite(self.model)):
            self.skipped_since_sync = True
            raise NonFiniteStep(self.global_ranks([self.comm.rank]), dropped=True, local=True)

    def global_ranks(self, ranks: list[int]) -> list[int]:
        """``ranks`` of the algorithm's group as global ranks: reports must name the
        processes the user knows, not their places in a pipeline stage's group."""
        if self.comm.group is None:
            return list(ranks)
        return [dist.get_global_rank(self.comm.group, r) for r in ranks]

    def quiesce(self) -> None:
        """Wait for any background communication to finish (its result stays pending).

        Called before the training thread issues a collective of its own on NCCL, where
        two communicators used from two threads in different orders can deadlock."""

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

    # -- elastic training (farflung/train/elastic_worker.py) ---------------------------
    settle_every: int = 1
    """Steps between the points where every rank's contribution has been averaged
    (DiLoCo: its local steps); an elastic run rolls back only to such points."""

    def settled_step(self, step: int) -> int:
        """The newest step whose contribution every rank has averaged in, after
        ``after_step(step)``."""
        return step

    def shared_state(self) -> dict[str, Any]:
        """What this algorithm keeps equal on every rank at a settled step (hashed
        there to prove it): the model and optimizer when replicas are identical."""
        if not self.replicas_identical:
            return {}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def elastic_state(self) -> dict[str, Any]:
        """A snapshot to roll back to, taken without waiting for background work
        (copied by the caller)."""
        return self.state_dict()

    def load_elastic_state(self, state: dict[str, Any], same_group: bool) -> None:
        """Restore :meth:`elastic_state`'s snapshot; ``same_group``: the group has as
        many ranks as when it was taken (per-chunk state depends on that)."""
        self.load_state_dict(state)

    def step(self, finite: bool = True) -> None:
        """The whole sync-and-step for a user's loop, after ``loss.backward()``:
        sync gradients, optimizer step, zero the gradients, then ``after_step``.

        A step with non-finite numbers is skipped (and :class:`NonFiniteStep` raised
        once the syncs are done), so nothing non-finite reaches the weights."""
        skipped = None
        try:
            self.sync_gradients(finite)
            self.optimizer.step()
        except NonFiniteStep as e:
            skipped = e
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 1
        self.after_step(self.steps_taken)
        if skipped is not None:
            raise skipped

    def close(self, abort: bool = False) -> None:
        """Finish background work; ``abort``: the run is failing, do not wait for it."""
