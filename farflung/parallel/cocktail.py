"""CocktailSGD: local steps, compressed model-delta sync, overlapped, one step stale.

Every rank steps its own optimizer on its own model ``x_i`` every iteration and keeps
a copy of the global model ``x̄``. After step ``t`` it snapshots
``δ_i = x_i − x̄`` and hands it to a background thread, which averages it through the
compressed sharded all-reduce (random-k → top-k → 4-bit by default) while step
``t+1``'s forward and backward run. After step ``t+1`` the result ``Δ`` (the decoded
average) and ``δ̂_i`` (what this rank's contribution decoded to) are applied:

    x̄ ← x̄ + s·Δ           x_i ← x_i + s·Δ − δ̂_i

so ``x_i − x̄`` keeps exactly what was not sent yet (worker-side error feedback is
implicit), while the owner of each chunk keeps its re-compression error (server-side
error feedback). ``s`` is ``parallel.delta_scale`` (default 1): an outer learning
rate that makes up for each worker's AdamW normalising by the second moments of its
own share of the batch (inflated by its gradient noise, so its steps are short).
``parallel.lr_scale`` (:attr:`lr_scale`, applied by the training loop to the local
learning rate; sqrt(workers) by default) does the same from inside the workers'
steps, and measured better.

This project's departure from the paper (issue 11): every ``moment_sync_every`` steps
the snapshot carries the statistics of the worker's AdamW second moments too, the
same sync averages them, and every worker's moments become one shared estimate
(:mod:`farflung.parallel.moments`). Per-worker moments correlate with the worker's
own update; sharing them, with the sqrt(n) learning rate, halves the gap to
all-reduce for about 8% more bytes.

Why the thread never races the optimizer: it only reads the snapshot taken on the
training thread and writes its own result buffers; parameters are touched only on
the training thread, after it has waited for the result. Its collectives run on a
process group of their own over exactly the ranks of the algorithm's group (created
by those ranks only, with ``parallel.timeout_s``), so they cannot interleave with the
training thread's; and waiting for a result is bounded by the same timeout, so a
frozen peer ends the run instead of hanging it.

Two communicators used from two threads can deadlock on NCCL when ranks issue their
collectives in different orders. The order is made safe by construction: the training
thread issues collectives only between steps (telemetry, evaluation, checkpoints), and
on NCCL the loop calls :meth:`quiesce` first, so no sync is in flight at that moment
and every rank issues the same sequence. On gloo, whose groups have their own
connections and threads, the two may run at once.

Non-finite numbers: a rank whose loss or gradients are not finite skips its own step
and says so in its next sync; a rank whose delta is not finite poisons the round,
which every rank then drops (see :class:`~farflung.comm.sharded.PoisonedSync`), and
that rank restarts from ``x̄``. Either way every rank raises the same
:class:`~farflung.parallel.base.NonFiniteStep` at the same step.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from farflung.comm import Comm
from farflung.comm.dist import ReleasedGroup, subgroup_like
from farflung.comm.sharded import (
    OK,
    SKIPPED,
    PoisonedSync,
    ShardedAllReduce,
    SyncFaults,
    exact_average,
)
from farflung.compress import make_codec
from farflung.parallel.base import DataParallel, NonFiniteStep, register
from farflung.parallel.flat import (
    add_to_params,
    flat_params,
    set_params,
    swapped_params,
    trainable,
)
from farflung.parallel.moments import SharedMoments, average_stats

MASK_SEED = 0xC0C7

# (Δ, δ̂, faults, the workers' averaged second-moment statistics or None)
SyncResult = tuple[torch.Tensor | None, torch.Tensor | None, SyncFaults, torch.Tensor | None]


@register("cocktail")
class Cocktail(DataParallel):
    """CocktailSGD (REFERENCES.md section 1) as a data-parallel strategy."""

    replicas_identical = False
    default_codec = "cocktail"

    def setup(self) -> None:
        super().setup()
        self.params = trainable(self.model)
        self.global_flat = flat_params(self.params)
        # always a background Comm: its seconds are hidden, and the training thread's
        # wait for the result is what blocks (counted once, by _wait)
        self.sync_comm = Comm(self._sync_group(), self.comm.meter, background=True)
        codec = make_codec(self.cfg.codec or self.default_codec)
        self.op = ShardedAllReduce(
            self.sync_comm, self.global_flat.numel(), codec, self.cfg.error_feedback
        )
        # the sync's result buffers, reused: each result is applied before the next sync
        self.buffers = (torch.empty_like(self.global_flat), torch.empty_like(self.global_flat))
        self.delta = torch.empty_like(self.global_flat)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cocktail-sync")
        self.pending: Future | None = None
        self.report: SyncFaults | None = None
        self.syncs = 0
        self.moments = None
        # elastic training: called with (sync index, result) before a result is applied
        self.on_result: Callable[[int, SyncResult], None] | None = None
        if self.cfg.moment_sync_every:
            self.moments = SharedMoments(self.optimizer, self.params, self.cfg.moment_sync)

    @property
    def lr_scale(self) -> float:
        """``parallel.lr_scale``, or sqrt(workers) when it is 0 (the default)."""
        return self.cfg.lr_scale or math.sqrt(self.comm.size)

    def _sync_group(self):
        """The background thread's group: the same ranks as ``self.comm``'s (a
        pipeline stage's replicas, or the world), created by them alone."""
        if self.comm.size == 1:
            return None
        timeout = timedelta(seconds=self.cfg.timeout_s)
        return subgroup_like(self.comm.group, timeout=timeout)

    def sync_gradients(self, finite: bool = True) -> None:
        self.local_check(finite)

    def after_step(self, step: int) -> None:
        self._apply_pending()
        # one buffer serves every step: the sync reading it was waited for just above
        delta = flat_params(self.params, out=self.delta).sub_(self.global_flat)
        status = SKIPPED if self.skipped_since_sync else OK
        self.skipped_since_sync = False
        stats = None
        if self.moments is not None and step % self.cfg.moment_sync_every == 0:
            stats = self.moments.take()
        self.pending = self.executor.submit(self._sync, delta, self.syncs, status, stats)
        self.syncs += 1
        if not self.cfg.overlap:
            self._apply_pending()
        report, self.report = self.report, None
        if report is not None:  # raised last, so the next sync is already on its way
            ranks = self.global_ranks(report.bad or report.skipped)
            raise NonFiniteStep(ranks, dropped=report.dropped)

    def _sync(
        self, delta: torch.Tensor, k: int, status: int, stats: torch.Tensor | None
    ) -> SyncResult:
        """Runs on the background thread: (Δ, δ̂, faults, averaged moment statistics)
        for the snapshot ``delta`` (and ``stats``, when this step shares moments); Δ
        and δ̂ are None when the round was dropped."""
        try:
            if k < self.cfg.warmup_steps:  # uncompressed: δ̂ is the delta itself
                avg, faults = exact_average(self.sync_comm, delta, status)
                sent = delta
            else:
                avg, sent = self.op(delta, step=k, seed=MASK_SEED, out=self.buffers, status=status)
                faults = self.op.last_faults
        except PoisonedSync as e:
            return None, None, e.faults, None
        if stats is not None:
            # every rank decided the same (step % every), so every rank joins; a rank
            # that skipped its steps still has finite moments
            stats = average_stats(self.sync_comm, stats)
        return avg, sent, faults, stats

    def _wait(self) -> SyncResult | None:
        """The in-flight sync's result; the time spent waiting for it blocks training.
        Bounded: the sync's own collectives time out after ``parallel.timeout_s``, and
        this wait gives up a little after that."""
        if self.pending is None:
            return None
        t0 = time.perf_counter()
        try:
            result = self.pending.result(timeout=self.cfg.timeout_s + 10.0)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"cocktail: sync {self.syncs - 1} did not finish within "
                f"parallel.timeout_s = {self.cfg.timeout_s} s; a peer stopped responding "
                "or its link is down"
            ) from None
        self.comm.account("dp", time.perf_counter() - t0)
        return result

    def _apply_pending(self) -> None:
        result = self._wait()
        self.pending = None
        if result is None:
            return
        if self.on_result is not None:
            self.on_result(self.syncs - 1, result)
        avg, sent, faults, stats = result
        if faults.dropped or faults.skipped:
            self.report = faults
        if stats is not None and self.moments is not None:
            self.moments.apply(stats)
        if avg is None:  # dropped everywhere; the unsent delta stays in x_i
            if self.comm.rank in faults.bad:  # but ours is what went wrong: start over
                set_params(self.params, self.global_flat)
            return
        if self.cfg.delta_scale != 1.0:
            avg.mul_(self.cfg.delta_scale)  # the outer step s·Δ (in the result's buffer)
        self.global_flat.add_(avg)
        add_to_params(self.params, sent.neg_().add_(avg))  # s·Δ − δ̂, in sent's buffer

    # -- elastic training -------------------------------------------------------------
    def settled_step(self, step: int) -> int:
        # after_step(step) applied sync step-1 and launched sync step
        return step - 1 if self.cfg.overlap else step

    def shared_state(self) -> dict[str, Any]:
        return {"global": self.global_flat, "syncs": self.syncs}

    def elastic_state(self) -> dict[str, Any]:
        """As :meth:`state_dict` without waiting: the in-flight sync's result is
        attached later by :attr:`on_result` (the elastic worker keeps it)."""
        return {
            "global": self.global_flat,
            "syncs": self.syncs,
            "pending": None,
            "op": self.op.state_dict(),
            "moments": self.moments.state_dict() if self.moments is not None else None,
        }

    def load_elastic_state(self, state: dict[str, Any], same_group: bool) -> None:
        if not same_group:
            state = {**state, "op": {"server_ef": None}}
        self.load_state_dict(state)

    def quiesce(self) -> None:
        self._wait()  # the future keeps its result for _apply_pending

    @contextlib.contextmanager
    def eval_parameters(self) -> Iterator[nn.Module]:
        """The global model ``x̄`` (what all ranks agree on), swapped in temporarily."""
        with swapped_params(self.params, self.global_flat):
            yield self.model

    def state_dict(self) -> dict[str, Any]:
        result = self._wait()  # an in-flight sync is saved as its result, not applied
        pending = None
        if result is not None:
            avg, sent, faults, stats = result
            pending = [avg, sent, dataclasses.asdict(faults), stats]
        return {
            "global": self.global_flat.clone(),
            "syncs": self.syncs,
            "pending": pending,
            "op": self.op.state_dict(),
            "moments": self.moments.state_dict() if self.moments is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev = self.global_flat.device  # saved tensors come back on the CPU
        self.global_flat.copy_(state["global"])
        self.syncs = state["syncs"]
        self.op.load_state_dict(state["op"])
        self.pending = None
        if state["pending"] is not None:
            # checkpoints before 0.2 hold two items, before 0.3 three
            avg, sent, *rest = state["pending"]
            faults = SyncFaults(**rest[0]) if rest else SyncFaults()
            stats = rest[1] if len(rest) > 1 else None
            avg, sent, stats = (t.to(dev) if t is not None else None for t in (avg, sent, stats))
            self.pending = Future()
            self.pending.set_result((avg, sent, faults, stats))
        if self.moments is not None and state.get("moments"):
            moments = state["moments"]
            if moments["taken"] is not None:
                moments["taken"] = [t.to(dev) for t in moments["taken"]]
            self.moments.load_state_dict(moments)

    def close(self, abort: bool = False) -> None:
        """Wait for the last sync (its result stays pending, as in a checkpoint); on
        abort, leave it: its peers may be gone."""
        if not abort:
            self._wait()
        self.executor.shutdown(wait=not abort, cancel_futures=abort)
        if not abort:  # (on abort the thread may still be using it)
            # the background group goes with destroy_process_group(), its threads
            # joined there, not at interpreter exit (see ReleasedGroup)
            self.sync_comm.group = ReleasedGroup("cocktail's sync")
