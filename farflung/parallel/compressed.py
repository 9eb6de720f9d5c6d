"""Synchronous gradient compression: every step the gradients are averaged through the
compressed sharded all-reduce, with worker- and server-side error feedback."""

from __future__ import annotations

from typing import Any

import torch

from farflung.comm.sharded import BAD, OK, PoisonedSync, ShardedAllReduce, exact_average
from farflung.compress import ErrorFeedback, make_codec
from farflung.parallel.base import DataParallel, NonFiniteStep, register
from farflung.parallel.flat import flat_grads, set_grads, trainable

MASK_SEED = 0x5EED  # all ranks derive random-k masks from (this, step)


@register("compressed")
class Compressed(DataParallel):
    """Gradient all-reduce through any codec (default 4-bit quantization).

    The first ``parallel.warmup_steps`` steps use a plain fp32 all-reduce."""

    default_codec = "quantize:bits=4"
    averages_gradients = True

    def setup(self) -> None:
        super().setup()
        self.params = trainable(self.model)
        numel = sum(p.numel() for p in self.params)
        self.codec = make_codec(self.cfg.codec or self.default_codec)
        self.op = ShardedAllReduce(self.comm, numel, self.codec, self.cfg.error_feedback)
        self.ef = ErrorFeedback() if self.cfg.error_feedback else None
        device = self.params[0].device
        # result buffers, reused: both are copied out every step
        self.buffers = (torch.empty(numel, device=device), torch.empty(numel, device=device))
        self.syncs = 0

    def sync_gradients(self, finite: bool = True) -> None:
        grads = flat_grads(self.params)
        self.syncs += 1  # a dropped round still used its step's masks
        status = OK if finite else BAD
        try:
            if self.syncs <= self.cfg.warmup_steps:
                avg, _ = exact_average(self.comm, grads, status)
            else:
                x = self.ef.compensate(grads) if self.ef else grads
                avg, sent = self.op(
                    x, step=self.syncs - 1, seed=MASK_SEED, out=self.buffers, status=status
                )
                if self.ef:
                    self.ef.update(x, sent)
        except PoisonedSync as e:  # the residual keeps its last good value
            bad = e.faults.bad or list(range(self.comm.size))
            raise NonFiniteStep(self.global_ranks(bad), True) from None
        set_grads(self.params, avg)

    def state_dict(self) -> dict[str, Any]:
        return {
            "syncs": self.syncs,
            "op": self.op.state_dict(),
            "ef": self.ef.state_dict() if self.ef else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.syncs = state["syncs"]
        self.op.load_state_dict(state["op"])
        if self.ef and state["ef"] is not None:
            self.ef.load_state_dict(state["ef"])
