"""CocktailSGD: local steps, compressed model-delta sync, overlapped, one step stale.

Every rank steps its own optimizer on its own model ``x_i`` every iteration and keeps
a copy of the global model ``x̄``. After step ``t`` it snapshots
``δ_i = x_i − x̄`` and hands it to a background thread, which averages it through the
compressed sharded all-reduce (random-k → top-k → 4-bit by default) while step
``t+1``'s forward and backward run. After step ``t+1`` the result ``Δ`` (the decoded
average) and ``δ̂_i`` (what this rank's contribution decoded to) are applied:

    x̄ ← x̄ + Δ           x_i ← x_i + Δ − δ̂_i

so ``x_i − x̄`` keeps exactly what was not sent yet (worker-side error feedback is
implicit), while the owner of each chunk keeps its re-compression error (server-side
error feedback).

Why the thread never races the optimizer: it only reads the snapshot taken on the
training thread and writes its own result buffers; parameters are touched only on
the training thread, after it has waited for the result. Its collectives run on a
process group of their own, so they cannot interleave with the training thread's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from farflung.comm import Comm
from farflung.comm.sharded import ShardedAllReduce
from farflung.compress import make_codec
from farflung.parallel.base import DataParallel, register
from farflung.parallel.flat import add_to_params, flat_params, swapped_params, trainable

MASK_SEED = 0xC0C7


@register("cocktail")
class Cocktail(DataParallel):
    """CocktailSGD (REFERENCES.md section 1) as a data-parallel strategy."""

    replicas_identical = False
    default_codec = "cocktail"

    def setup(self) -> None:
        super().setup()
        self.params = trainable(self.model)
        self.global_flat = flat_params(self.params)
        group = dist.new_group(backend=dist.get_backend()) if self.comm.size > 1 else None
        self.sync_comm = Comm(group, self.comm.meter, background=self.cfg.overlap)
        codec = make_codec(self.cfg.codec or self.default_codec)
        self.op = ShardedAllReduce(
            self.sync_comm, self.global_flat.numel(), codec, self.cfg.error_feedback
        )
        # the sync's result buffers, reused: each result is applied before the next sync
        self.buffers = (torch.empty_like(self.global_flat), torch.empty_like(self.global_flat))
        self.delta = torch.empty_like(self.global_flat)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cocktail-sync")
        self.pending: Future | None = None
        self.syncs = 0

    def after_step(self, step: int) -> None:
        self._apply_pending()
        # one buffer serves every step: the sync reading it was waited for just above
        delta = flat_params(self.params, out=self.delta).sub_(self.global_flat)
        self.pending = self.executor.submit(self._sync, delta, self.syncs)
        self.syncs += 1
        if not self.cfg.overlap:
            self._apply_pending()

    def _sync(self, delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs on the background thread: (Δ, δ̂) for the snapshot ``delta``."""
        if k < self.cfg.warmup_steps:
            avg = delta.clone()
            self.sync_comm.all_reduce(avg, kind="dp")
            return avg.div_(self.sync_comm.size), delta
        return self.op(delta, step=k, seed=MASK_SEED, out=self.buffers)

    def _wait(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The in-flight sync's result; the time spent waiting for it blocks training."""
        if self.pending is None:
            return None
        t0 = time.perf_counter()
        result = self.pending.result()
        self.comm.account("dp", time.perf_counter() - t0)
        return result

    def _apply_pending(self) -> None:
        result = self._wait()
        if result is None:
            return
        avg, sent = result
        self.global_flat.add_(avg)
        add_to_params(self.params, sent.neg_().add_(avg))  # Δ − δ̂, in sent's buffer
        self.pending = None

    @contextlib.contextmanager
    def eval_parameters(self) -> Iterator[nn.Module]:
        """The global model ``x̄`` (what all ranks agree on), swapped in temporarily."""
        with swapped_params(self.params, self.global_flat):
            yield self.model

    def state_dict(self) -> dict[str, Any]:
        result = self._wait()  # an in-flight sync is saved as its result, not applied
        return {
            "global": self.global_flat.clone(),
            "syncs": self.syncs,
            "pending": list(result) if result is not None else None,
            "op": self.op.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_flat.copy_(state["global"])
        self.syncs = state["syncs"]
        self.op.load_state_dict(state["op"])
        self.pending = None
        if state["pending"] is not None:
            self.pending = Future()
            self.pending.set_result(tuple(state["pending"]))

    def close(self) -> None:
        """Wait for the last sync (its result stays pending, as in a checkpoint)."""
        self._wait()
        self.executor.shutdown(wait=True)
