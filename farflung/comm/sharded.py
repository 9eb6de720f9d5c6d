"""Compressed sharded all-reduce: CocktailSGD's sharded parameter server over any codec.

The flat vector is cut into ``n`` chunks (sizes differ by at most one element, so no
divisibility is assumed and nothing is padded); rank ``j`` owns chunk ``j``.

* Phase 1 (all-to-all): every rank encodes each chunk and sends chunk ``j`` to its
  owner. The owner decodes the ``n`` contributions, averages them, adds its server
  error buffer, and re-encodes the aggregate with the same codec context (so the same
  random-k mask).
* Phase 2 (all-gather, done as an all-to-all because payload sizes may differ): every
  owner sends its encoded aggregate to all ranks, which decode the full average.

Payloads travel as ``uint8`` tensors through :class:`Comm`, so the meter counts their
real sizes. When a codec's payload size is known from the element count alone (every
shipped codec) no lengths are exchanged; otherwise a small length exchange precedes
each phase.
"""

from __future__ import annotations

import time

import torch

from farflung.comm.collectives import Comm
from farflung.compress import Codec, CodecContext, ErrorFeedback
from farflung.compress.codec import derive_seed


def chunk_sizes(numel: int, parts: int) -> list[int]:
    """``parts`` sizes summing to ``numel``, the first ``numel % parts`` one larger."""
    base, extra = divmod(numel, parts)
    return [base + (1 if j < extra else 0) for j in range(parts)]


def chunk_contexts(step: int, seed: int, parts: int, rank: int = 0) -> list[CodecContext]:
    """One codec context per chunk: the same on every rank but for the rounding noise."""
    return [CodecContext(step=step, seed=derive_seed(seed, j), rank=rank) for j in range(parts)]


class ShardedAllReduce:
    """Average a flat float32 vector over the ranks of ``comm`` through ``codec``.

    ``server_feedback`` keeps the owner's re-compression error for its chunk and adds
    it to the next aggregate (CocktailSGD's server error buffer)."""

    def __init__(
        self,
        comm: Comm,
        numel: int,
        codec: Codec,
        server_feedback: bool = True,
        kind: str = "dp",
    ) -> None:
        self.comm, self.numel, self.codec, self.kind = comm, numel, codec, kind
        self.sizes = chunk_sizes(numel, comm.size)
        self.offsets = [sum(self.sizes[:j]) for j in range(comm.size)]
        self.server_ef = ErrorFeedback() if server_feedback else None

    def contexts(self, step: int, seed: int) -> list[CodecContext]:
        """One context per chunk: the same on every rank but for the rounding noise."""
        return [
            CodecContext(step=step, seed=derive_seed(seed, j), rank=self.comm.rank)
            for j in range(self.comm.size)
        ]

    def __call__(
        self,
        x: torch.Tensor,
        step: int,
        seed: int = 0,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(average, sent)``: the decoded global average, and what this rank's
        own contribution decodes to (for worker-side error feedback).

        ``out``: two flat float32 buffers of ``numel`` to write them into. A caller that
        syncs every step and is done with the previous results should pass the same
        two each time: fresh multi-megabyte tensors cost a page fault per 4 KiB, which
        was a fifth of the op's CPU time at 10M parameters."""
        if x.numel() != self.numel:
            raise ValueError(f"expected {self.numel} elements, got {x.numel()}")
        x = x.reshape(-1).float()
        n, r = self.comm.size, self.comm.rank
        if n == 1:  # nothing crosses a link
            return x.clone(), x.clone()
        # codec work is timed in CPU seconds of the calling thread for CPU tensors, so
        # a background sync preempted by training on a busy core is not charged for
        # the wait; in wall-clock seconds on GPUs, where the work runs off the CPU
        self._clock = time.perf_counter if x.is_cuda else time.thread_time
        started, self._exchange_s = self._clock(), 0.0
        ctxs = chunk_contexts(step, seed, n, r)
        payloads = [self.codec.encode(self._chunk(x, j), ctxs[j]) for j in range(n)]
        average, sent = out if out is not None else (torch.empty_like(x), torch.empty_like(x))
        for j in range(n):
            self.codec.decode(payloads[j], ctxs[j], out=self._chunk(sent, j))
        received = self._exchange(payloads, [self._expected(r, ctxs)] * n)
        mine = self._chunk(sent, r).clone()
        for i in range(n):
            if i != r:
                self.codec.decode(received[i], ctxs[r], out=mine, add=True)
        mine.div_(n)
        if self.server_ef is not None:
            mine = self.server_ef.compensate(mine)
        agg_payload = self.codec.encode(mine, ctxs[r])
        agg_mine = self.codec.decode(agg_payload, ctxs[r], out=self._chunk(average, r))
        if self.server_ef is not None:
            self.server_ef.update(mine, agg_mine)
        aggregates = self._exchange([agg_payload] * n, [self._expected(j, ctxs) for j in range(n)])
        for j in range(n):
            if j != r:
                self.codec.decode(aggregates[j], ctxs[j], out=self._chunk(average, j))
        # everything but the exchanges: encoding, decoding, averaging
        self.comm.meter.add_work("codec", self._clock() - started - self._exchange_s)
        return average, sent

    def state_dict(self) -> dict:
        return {"server_ef": self.server_ef.state_dict() if self.server_ef else None}

    def load_state_dict(self, state: dict) -> None:
        if self.server_ef is not None and state.get("server_ef") is not None:
            self.server_ef.load_state_dict(state["server_ef"])

    # -- helpers ---------------------------------------------------------------
    def _chunk(self, x: torch.Tensor, j: int) -> torch.Tensor:
        return x[self.offsets[j] : self.offsets[j] + self.sizes[j]]

    def _exchange(
        self, payloads: list[torch.Tensor], expect: list[int | None]
    ) -> list[torch.Tensor]:
        """Send ``payloads[j]`` to rank ``j``; return what each rank sent us.

        ``expect[i]`` is the size rank ``i``'s payload will have, from the codec's size
        formula; when any is unknown the sizes are exchanged first."""
        t0 = self._clock()
        n, r = self.comm.size, self.comm.rank
        in_len = [0 if j == r else payloads[j].numel() for j in range(n)]
        out_len = [0 if i == r else expect[i] for i in range(n)]
        if any(v is None for v in out_len):
            dev = payloads[r].device  # NCCL needs the lengths on the GPU too
            got = torch.empty(n, dtype=torch.int64, device=dev)
            lengths = torch.tensor(in_len, dtype=torch.int64, device=dev)
            self.comm.all_to_all(got, lengths, kind=self.kind)
            out_len = got.tolist()
        inp = torch.cat([payloads[j] for j in range(n) if j != r])
        out = torch.empty(sum(out_len), dtype=torch.uint8, device=inp.device)
        self.comm.all_to_all(out, inp, kind=self.kind, out_splits=out_len, in_splits=in_len)
        parts = list(torch.split(out, out_len))
        parts[r] = payloads[r]
        self._exchange_s += self._clock() - t0
        return parts

    def _expected(self, chunk: int, ctxs: list[CodecContext]) -> int | None:
        return self.codec.payload_nbytes(self.sizes[chunk], ctxs[chunk])
