"""DiLoCo: many local steps, then one outer Nesterov step on the averaged pseudo-gradient.

Every rank trains its own copy ``x_i`` of the model with the inner optimizer (the
AdamW the training loop steps) and keeps a flat fp32 copy of the *global* model
``x̄``, the same on every rank. Every ``local_steps`` (H) steps:

    Δ_i = x̄ − x_i                          the pseudo-gradient (flat)
    Δ   = mean_i C(Δ_i)                     sharded all-reduce through the codec
    x̄  ← OuterSGD(x̄, grad=Δ)              Nesterov, lr ``outer_lr``, ``outer_momentum``
    x_i ← x̄ (− the unsent residual)        every rank restarts from the global model

With ``outer_lr = 1`` and no momentum this is plain model averaging every H steps.
Traffic is one pseudo-gradient every H steps instead of one gradient every step.

With a lossy codec and ``error_feedback``, what compression dropped from a worker's
pseudo-gradient stays in its model: the worker restarts from ``x̄ − (Δ_i − δ̂_i)``
(``δ̂_i`` = what its contribution decoded to) instead of ``x̄``, so its next
pseudo-gradient carries the unsent part exactly once. This is CocktailSGD's implicit
worker-side error feedback. An explicit buffer added to the next pseudo-gradient
while the worker restarts from ``x̄`` would count the unsent progress twice (the
worker learns it again), and it diverged with the cocktail codec (loss 14 after 150
steps of ``configs/small.toml``). The owner of each chunk keeps its re-compression
error (server side, see :class:`~farflung.comm.sharded.ShardedAllReduce`). The
identity codec (the default) is exact and keeps no error buffers.

The inner optimizer's state is kept across outer steps, as in DiLoCo. Between syncs
the ranks hold different weights; :meth:`eval_parameters` swaps the global weights in,
so evaluation and the run's checkpointed model are the last synced global model (the
inner steps since then are not in it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from farflung.comm.sharded import OK, SKIPPED, PoisonedSync, ShardedAllReduce
from farflung.compress import make_codec
from farflung.parallel.base import DataParallel, NonFiniteStep, register
from farflung.parallel.flat import flat_params, set_params, swapped_params, trainable

MASK_SEED = 0xD110C0
"""Seed of the codec contexts (random-k masks); the same on every rank."""


@register("diloco")
class DiLoCo(DataParallel):
    """DiLoCo (REFERENCES.md section 5) as a data-parallel strategy."""

    replicas_identical = False
    default_codec = "identity"
    kind = "dp"

    def setup(self) -> None:
        super().setup()  # everyone starts from rank 0's weights
        cfg = self.cfg
        self.params = trainable(self.model)
        self.global_flat = flat_params(self.params)
        self.codec = make_codec(cfg.codec or self.default_codec)
        lossy = self.codec.spec != "identity"
        feedback = lossy and cfg.error_feedback
        self.keep_residual = feedback  # worker side, implicit (see the module docstring)
        self.op = ShardedAllReduce(
            self.comm,
            self.global_flat.numel(),
            self.codec,
            server_feedback=feedback,
            kind=self.kind,
        )
        momentum = cfg.outer_momentum
        # Nesterov needs a non-zero momentum; with none the outer step is plain SGD
        self.outer_optimizer = torch.optim.SGD(
            [self.global_flat], lr=cfg.outer_lr, momentum=momentum, nesterov=momentum > 0
        )

    @property
    def lr_scale(self) -> float:
        """``parallel.lr_scale`` for the inner steps; 0 (the default) means 1 here: the
        sqrt(workers) that helps cocktail gained only 1.6% over 600 demo steps
        (docs/data-parallel.md)."""
        return self.cfg.lr_scale or 1.0

    def sync_gradients(self, finite: bool = True) -> None:
        self.local_check(finite)

    def after_step(self, step: int) -> None:
        if step % self.cfg.local_steps == 0:
            self.outer_step(step // self.cfg.local_steps)

    @torch.no_grad()
    def outer_step(self, round_index: int) -> None:
        """Average the pseudo-gradients, step the global model, restart from it.

        A round with a non-finite pseudo-gradient is dropped on every rank: ``x̄`` and
        the outer momentum stay as they were, the rank at fault restarts from ``x̄``
        and the others keep training their own models into the next round."""
        pseudo = self.global_flat - flat_params(self.params).to(self.global_flat.device)
        status = SKIPPED if self.skipped_since_sync else OK
        self.skipped_since_sync = False
        try:
            average, sent = self.op(pseudo, step=round_index, seed=MASK_SEED, status=status)
        except PoisonedSync as e:
            if self.comm.rank in e.faults.bad:
                set_params(self.params, self.global_flat)
            ranks = self.global_ranks(e.faults.bad or e.faults.skipped)
            raise NonFiniteStep(ranks, dropped=True) from None
        self._outer_update(pseudo, average, sent)
        if self.op.last_faults.skipped:
            raise NonFiniteStep(self.global_ranks(self.op.last_faults.skipped), dropped=False)

    def _outer_update(
        self, pseudo: torch.Tensor, average: torch.Tensor, sent: torch.Tensor
    ) -> None:
        """The outer optimizer's step on ``x̄``, then every rank restarts from it."""
        self.global_flat.grad = average
        self.outer_optimizer.step()
        self.global_flat.grad = None
        if self.keep_residual:
            set_params(self.params, self.global_flat - (pseudo - sent))
        else:
            set_params(self.params, self.global_flat)

    @property
    def settle_every(self) -> int:
        return self.cfg.local_steps

    def settled_step(self, step: int) -> int:
        return step - step % self.cfg.local_steps

    def shared_state(self) -> dict[str, Any]:
        return {"global": self.global_flat, "outer_optimizer": self.outer_optimizer.state_dict()}

    def load_elastic_state(self, state: dict[str, Any], same_group: bool) -> None:
        if not same_group:  # per-chunk error feedback does not fit another split
            state = {**state, "sharded": {"server_ef": None}}
        self.load_state_dict(state)

    @contextlib.contextmanager
    def eval_parameters(self) -> Iterator[nn.Module]:
        """The model with the global weights; the local weights come back afterwards."""
        with swapped_params(self.params, self.global_flat):
            yield self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "global": self.global_flat.detach().clone(),
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "sharded": self.op.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"global", "outer_optimizer", "sharded"} - set(state)
        if missing:
            raise ValueError(f"diloco state lacks {sorted(missing)}")
        saved = state["global"]
        if saved.numel() != self.global_flat.numel():
            raise ValueError(
                f"diloco state holds a global model of {saved.numel()} elements, this model "
                f"has {self.global_flat.numel()}"
            )
        with torch.no_grad():
            self.global_flat.copy_(saved.reshape(-1))
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.op.load_state_dict(state["sharded"])
