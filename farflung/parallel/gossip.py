"""Decentralized gossip: each rank averages with its ring neighbours only (CHOCO-gossip).

There is no global collective. Ranks sit on a ring; every ``gossip_every`` steps rank
``i`` exchanges point-to-point with ``i-1`` and ``i+1`` (mod ``n``; with two ranks that
is the one other rank, and a single rank does nothing). Traffic per rank is two
messages per round whatever the world size.

So that the messages can be compressed, each rank keeps *public copies* ``x̂``: its own
``x̂_i`` and one per neighbour ``x̂_j``, which every holder updates identically
(CHOCO-gossip, Koloskova et al. 2019):

    q_i  = C(x_i − x̂_i)                      sent to both neighbours
    x̂_k ← x̂_k + D(q_k)                       for k = i and each neighbour j
    x_i  ← x_i + γ Σ_j w (x̂_j − x̂_i)         w = 1 / (degree + 1), γ = ``gossip_gamma``

With the identity codec and γ = 1 this is exact neighbour averaging
``x_i ← mean(x_i, x_{i-1}, x_{i+1})``. With a lossy codec only the *change* since the
last round is compressed, and what was lost stays in ``x_i − x̂_i`` to be sent later;
lower γ for aggressive codecs. The mixing weights are symmetric, so a round leaves the
average of the ranks' models unchanged.

The public copies start equal to the common initial weights (every rank starts from
rank 0's), so the first round already sends only what training changed.

Ranks never hold identical weights (``replicas_identical = False``): the ring only
pulls them together. :meth:`eval_parameters` yields this rank's own model, so an
evaluation averages the ranks' losses over their own shards of the validation data
and the run's checkpointed model is rank 0's. How far apart the ranks are (the
consensus distance) shrinks with more frequent rounds and a larger γ.
"""

from __future__ import annotations

from typing import Any

import torch

from farflung.compress import CodecContext, make_codec
from farflung.parallel.base import DataParallel, register
from farflung.parallel.flat import add_to_params, flat_params, set_params, trainable

MASK_SEED = 0x6055
"""Seed of the codec contexts (random-k masks); the same on every rank."""


def ring_neighbours(rank: int, size: int) -> list[int]:
    """The distinct ring neighbours of ``rank`` (none alone, one with two ranks)."""
    return sorted({(rank - 1) % size, (rank + 1) % size} - {rank})


@register("gossip")
class Gossip(DataParallel):
    """Ring gossip with CHOCO compression as a data-parallel strategy."""

    replicas_identical = False
    default_codec = "identity"
    kind = "dp"

    def setup(self) -> None:
        super().setup()
        self.params = trainable(self.model)
        self.codec = make_codec(self.cfg.codec or self.default_codec)
        self.peers = ring_neighbours(self.comm.rank, self.comm.size)
        start = flat_params(self.params)
        self.public = start  # x̂_i
        self.peer_public = {p: start.clone() for p in self.peers}  # x̂_j

    def sync_gradients(self, finite: bool = True) -> None:
        self.local_check(finite)

    def after_step(self, step: int) -> None:
        if self.peers and step % self.cfg.gossip_every == 0:
            self.gossip(step // self.cfg.gossip_every)

    @torch.no_grad()
    def gossip(self, round_index: int) -> None:
        """One CHOCO-gossip round with the ring neighbours."""
        r = self.comm.rank
        ctx = CodecContext(step=round_index, seed=MASK_SEED, rank=r)
        x = flat_params(self.params).to(self.public.device)
        if not torch.isfinite(x).all():
            # a step we did not skip still overflowed: fall back to our public copy, so
            # nothing non-finite reaches the neighbours (they hold the same copy)
            set_params(self.params, self.public)
            x = self.public.clone()
        payload = self.codec.encode(x - self.public, ctx)
        self.codec.decode(payload, ctx, out=self.public, add=True)
        received = self._swap(payload, ctx)
        for peer, q in received.items():
            peer_ctx = CodecContext(step=round_index, seed=MASK_SEED, rank=peer)
            self.codec.decode(q, peer_ctx, out=self.peer_public[peer], add=True)
        mix = torch.zeros_like(self.public)
        for peer in self.peers:
            mix += self.peer_public[peer] - self.public
        mix *= self.cfg.gossip_gamma / (len(self.peers) + 1)
        add_to_params(self.params, mix)

    def _swap(self, payload: torch.Tensor, ctx: CodecContext) -> dict[int, torch.Tensor]:
        """Send ``payload`` to every neighbour and return theirs."""
        size = self.codec.payload_nbytes(self.public.numel(), ctx)
        if size is None:  # unknown in advance: tell the neighbours first
            lengths = {p: torch.empty(1, dtype=torch.int64) for p in self.peers}
            mine = torch.tensor([payload.numel()], dtype=torch.int64)
            self.comm.exchange({p: mine for p in self.peers}, lengths, kind=self.kind)
            sizes = {p: int(t.item()) for p, t in lengths.items()}
        else:
            sizes = dict.fromkeys(self.peers, size)
        recvs = {
            p: torch.empty(sizes[p], dtype=torch.uint8, device=payload.device) for p in self.peers
        }
        self.comm.exchange(dict.fromkeys(self.peers, payload), recvs, kind=self.kind)
        return recvs

    def state_dict(self) -> dict[str, Any]:
        return {
            "public": self.public.clone(),
            "peer_ranks": list(self.peers),
            "peer_public": [self.peer_public[p].clone() for p in self.peers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"public", "peer_ranks", "peer_public"} - set(state)
        if missing:
            raise ValueError(f"gossip state lacks {sorted(missing)}")
        if list(state["peer_ranks"]) != self.peers:
            raise ValueError(
                f"gossip state was saved with ring neighbours {state['peer_ranks']}, this rank "
                f"has {self.peers}"
            )
        if state["public"].numel() != self.public.numel():
            raise ValueError(
                f"gossip state holds {state['public'].numel()} elements, this model has "
                f"{self.public.numel()}"
            )
        with torch.no_grad():
            self.public.copy_(state["public"].reshape(-1))
            for p, t in zip(self.peers, state["peer_public"], strict=True):
                self.peer_public[p].copy_(t.reshape(-1))
