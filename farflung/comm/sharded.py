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

Every payload starts with a status: one byte in phase 1 (the sender's verdict on its
own input), a bitmap in phase 2 (the owner's verdict on the round). A rank whose input
holds NaN/Inf (or values its codec cannot represent) does not fail alone, which would
leave its peers blocked in the exchange: it sends zeros flagged as bad, both phases
complete on every rank, and every rank raises :class:`PoisonedSync` naming the same
ranks. Nothing from a poisoned round is applied, not even to the server error buffer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from farflung.comm.collectives import Comm
from farflung.compress import Codec, CodecContext, CodecError, ErrorFeedback
from farflung.compress.codec import derive_seed

OK, BAD, SKIPPED = 0, 1, 2
"""A sender's status byte: its input is fine; its input is non-finite (or beyond what
the codec can encode), so the round must be dropped; its input is fine but it skipped a
non-finite step of its own since the last round (reported, nothing dropped)."""


@dataclass
class SyncFaults:
    """What one round of the sharded all-reduce found, the same on every rank."""

    bad: list[int] = field(default_factory=list)
    """Ranks whose contribution was non-finite (the round is dropped)."""
    skipped: list[int] = field(default_factory=list)
    """Ranks that reported a locally skipped non-finite step."""
    aggregate: bool = False
    """An average came out non-finite although every input was finite (overflow)."""

    @property
    def dropped(self) -> bool:
        return bool(self.bad) or self.aggregate


class PoisonedSync(RuntimeError):
    """A round was dropped on every rank because of non-finite numbers."""

    def __init__(self, faults: SyncFaults) -> None:
        what = f"ranks {faults.bad} sent non-finite values" if faults.bad else ""
        what = what or "the average overflowed to non-finite values"
        super().__init__(f"sharded all-reduce dropped: {what}")
        self.faults = faults


def chunk_sizes(numel: int, parts: int) -> list[int]:
    """``parts`` sizes summing to ``numel``, the first ``numel % parts`` one larger."""
    base, extra = divmod(numel, parts)
    return [base + (1 if j < extra else 0) for j in range(parts)]


def chunk_contexts(step: int, seed: int, parts: int, rank: int = 0) -> list[CodecContext]:
    """One codec context per chunk: the same on every rank but for the rounding noise."""
    return [CodecContext(step=step, seed=derive_seed(seed, j), rank=rank) for j in range(parts)]


def exact_average(
    comm: Comm, x: torch.Tensor, status: int = OK, kind: str = "dp"
) -> tuple[torch.Tensor, SyncFaults]:
    """The uncompressed counterpart of :class:`ShardedAllReduce` (warm-up rounds): a
    plain all-reduce average of ``x``, one status slot per rank riding in the same
    message, with the same verdicts. Raises :class:`PoisonedSync` on every rank when
    any input is not finite or declared :data:`BAD`."""
    n = comm.size
    codes = x.new_zeros(n, dtype=torch.float32)
    finite = status != BAD and bool(torch.isfinite(x).all())
    codes[comm.rank] = status if finite else BAD
    buf = torch.cat([x.reshape(-1).float(), codes])
    comm.all_reduce(buf, kind=kind)
    summed = buf[-n:].tolist()
    faults = SyncFaults(
        bad=[r for r, c in enumerate(summed) if c == BAD],
        skipped=[r for r, c in enumerate(summed) if c == SKIPPED],
    )
    if faults.dropped:
        raise PoisonedSync(faults)
    return buf[:-n].div_(n), faults


def status_nbytes(phase: int, world: int) -> int:
    """Bytes of status in front of each payload: one in phase 1; in phase 2 two bitmaps
    of ``world`` bits (bad, skipped) and one overflow bit."""
    return 1 if phase == 1 else (2 * world + 1 + 7) // 8


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
        self.last_faults = SyncFaults()

    def __call__(
        self,
        x: torch.Tensor,
        step: int,
        seed: int = 0,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
        status: int = OK,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(average, sent)``: the decoded global average, and what this rank's
        own contribution decodes to (for worker-side error feedback).

        ``out``: two flat float32 buffers of ``numel`` to write them into. A caller that
        syncs every step and is done with the previous results should pass the same
        two each time: fresh multi-megabyte tensors cost a page fault per 4 KiB, which
        was a fifth of the op's CPU time at 10M parameters.

        ``status``: what the caller knows of its input: :data:`BAD` drops the round
        (e.g. the loss behind it was not finite), :data:`SKIPPED` reports a locally
        skipped step; every rank then finds it in :attr:`last_faults`. Raises
        :class:`PoisonedSync` on every rank when any input or average is non-finite."""
        if x.numel() != self.numel:
            raise ValueError(f"expected {self.numel} elements, got {x.numel()}")
        x = x.reshape(-1).float()
        n, r = self.comm.size, self.comm.rank
        if n == 1:  # nothing crosses a link
            return self._alone(x, status)
        # codec work is timed in CPU seconds of the calling thread for CPU tensors, so
        # a background sync preempted by training on a busy core is not charged for
        # the wait; in wall-clock seconds on GPUs, where the work runs off the CPU
        self._clock = time.perf_counter if x.is_cuda else time.thread_time
        started, self._exchange_s, self._device = self._clock(), 0.0, x.device
        ctxs = chunk_contexts(step, seed, n, r)
        average, sent = out if out is not None else (torch.empty_like(x), torch.empty_like(x))
        payloads, code = self._encode_all(x, ctxs, sent, status == BAD)
        code = status if code == OK else code
        got = self._exchange(payloads, [bytes([code])] * n, [self._expected(r, ctxs)] * n)
        faults = SyncFaults(
            bad=[i for i, (s, _) in enumerate(got) if s[0] == BAD],
            skipped=[i for i, (s, _) in enumerate(got) if s[0] == SKIPPED],
        )
        agg_payload, ef_update = self._reduce_own(got, ctxs, sent, average, faults)
        head = _bitmap(faults, n)
        expect = [self._expected(j, ctxs) for j in range(n)]
        aggregates = self._exchange([agg_payload] * n, [head] * n, expect)
        faults = _merge([_unbitmap(s, n) for s, _ in aggregates])
        if not faults.dropped:
            for j in range(n):
                if j != r:
                    self.codec.decode(aggregates[j][1], ctxs[j], out=self._chunk(average, j))
            # identical bytes decode identically everywhere, so every rank agrees here
            faults.aggregate = not bool(torch.isfinite(average).all())
        if not faults.dropped and ef_update is not None:
            self.server_ef.update(*ef_update)  # a dropped round leaves the buffer as it was
        self.last_faults = faults
        # everything but the exchanges: encoding, decoding, averaging
        self.comm.meter.add_work("codec", self._clock() - started - self._exchange_s)
        if faults.dropped:
            raise PoisonedSync(faults)
        return average, sent

    def state_dict(self) -> dict:
        return {"server_ef": self.server_ef.state_dict() if self.server_ef else None}

    def load_state_dict(self, state: dict) -> None:
        if self.server_ef is not None and state.get("server_ef") is not None:
            self.server_ef.load_state_dict(state["server_ef"])

    # -- helpers ---------------------------------------------------------------
    def _chunk(self, x: torch.Tensor, j: int) -> torch.Tensor:
        return x[self.offsets[j] : self.offsets[j] + self.sizes[j]]

    def _alone(self, x: torch.Tensor, status: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A world of one: the average is the input, with the same verdicts."""
        faults = SyncFaults(skipped=[0] if status == SKIPPED else [])
        faults.bad = [] if status != BAD and torch.isfinite(x).all() else [0]
        self.last_faults = faults
        if faults.dropped:
            raise PoisonedSync(faults)
        return x.clone(), x.clone()

    def _encode_all(
        self, x: torch.Tensor, ctxs: list[CodecContext], sent: torch.Tensor, bad: bool
    ) -> tuple[list[torch.Tensor], int]:
        """Each chunk's payload, and ``sent`` filled with what they decode to; blanks
        and :data:`BAD` when ``x`` cannot (or must not) be sent."""
        n = self.comm.size
        if not bad and torch.isfinite(x).all():
            try:
                payloads = [self.codec.encode(self._chunk(x, j), ctxs[j]) for j in range(n)]
                for j in range(n):
                    self.codec.decode(payloads[j], ctxs[j], out=self._chunk(sent, j))
                return payloads, OK
            except CodecError:
                pass  # finite but beyond the codec's range (fp16 scales): same verdict
        return [self._blank(j, ctxs) for j in range(n)], BAD

    def _reduce_own(
        self,
        got: list[tuple[bytes, torch.Tensor]],
        ctxs: list[CodecContext],
        sent: torch.Tensor,
        average: torch.Tensor,
        faults: SyncFaults,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The owner's part: average the contributions to its chunk, add the server
        error, re-encode. Returns the aggregate's payload and the error-buffer update
        to make once the round is known to be kept."""
        n, r = self.comm.size, self.comm.rank
        if faults.bad:
            return self._blank(r, ctxs), None
        mine = self._chunk(sent, r).clone()
        for i in range(n):
            if i != r:
                self.codec.decode(got[i][1], ctxs[r], out=mine, add=True)
        mine.div_(n)
        if self.server_ef is not None:
            mine = self.server_ef.compensate(mine)
        try:
            if not torch.isfinite(mine).all():
                raise CodecError("non-finite average")
            payload = self.codec.encode(mine, ctxs[r])
        except CodecError:  # overflow: every rank learns it from our status
            faults.aggregate = True
            return self._blank(r, ctxs), None
        decoded = self.codec.decode(payload, ctxs[r], out=self._chunk(average, r))
        return payload, ((mine, decoded) if self.server_ef is not None else None)

    def _blank(self, j: int, ctxs: list[CodecContext]) -> torch.Tensor:
        """A stand-in for chunk ``j``'s payload, of the size its receivers expect."""
        return torch.zeros(self._expected(j, ctxs) or 0, dtype=torch.uint8, device=self._device)

    def _exchange(
        self, payloads: list[torch.Tensor], heads: list[bytes], expect: list[int | None]
    ) -> list[tuple[bytes, torch.Tensor]]:
        """Send ``heads[j]`` (the status) and ``payloads[j]`` to rank ``j``; return what
        each rank sent us as ``(status, payload)``.

        ``expect[i]`` is the size rank ``i``'s payload will have, from the codec's size
        formula; when any is unknown the sizes are exchanged first."""
        t0 = self._clock()
        n, r = self.comm.size, self.comm.rank
        head, dev = len(heads[r]), self._device
        in_len = [0 if j == r else head + payloads[j].numel() for j in range(n)]
        if any(expect[i] is None for i in range(n) if i != r):
            got = torch.empty(n, dtype=torch.int64, device=dev)  # NCCL: lengths on the GPU
            lengths = torch.tensor(in_len, dtype=torch.int64, device=dev)
            self.comm.all_to_all(got, lengths, kind=self.kind)
            out_len = got.tolist()
        else:
            out_len = [0 if i == r else head + expect[i] for i in range(n)]
        parts = []
        for j in range(n):
            if j != r:
                status = torch.frombuffer(bytearray(heads[j]), dtype=torch.uint8)
                parts += [status.to(dev), payloads[j]]
        inp = torch.cat(parts)
        out = torch.empty(sum(out_len), dtype=torch.uint8, device=dev)
        self.comm.all_to_all(out, inp, kind=self.kind, out_splits=out_len, in_splits=in_len)
        pieces = torch.split(out, out_len)
        result = [
            (heads[r], payloads[r])
            if i == r
            else (bytes(pieces[i][:head].cpu().tolist()), pieces[i][head:])
            for i in range(n)
        ]
        self._exchange_s += self._clock() - t0
        return result

    def _expected(self, chunk: int, ctxs: list[CodecContext]) -> int | None:
        return self.codec.payload_nbytes(self.sizes[chunk], ctxs[chunk])


def _bitmap(faults: SyncFaults, n: int) -> bytes:
    """Phase 2's status: bit ``i`` = rank i bad, bit ``n + i`` = rank i skipped, bit
    ``2n`` = overflow."""
    bits = 0
    for i in faults.bad:
        bits |= 1 << i
    for i in faults.skipped:
        bits |= 1 << (n + i)
    if faults.aggregate:
        bits |= 1 << (2 * n)
    return bits.to_bytes(status_nbytes(2, n), "little")


def _unbitmap(head: bytes, n: int) -> SyncFaults:
    bits = int.from_bytes(head, "little")
    return SyncFaults(
        bad=[i for i in range(n) if bits >> i & 1],
        skipped=[i for i in range(n) if bits >> (n + i) & 1],
        aggregate=bool(bits >> (2 * n) & 1),
    )


def _merge(all_faults: list[SyncFaults]) -> SyncFaults:
    """Every owner's verdict on its chunk, as one verdict on the round."""
    return SyncFaults(
        bad=sorted({i for f in all_faults for i in f.bad}),
        skipped=sorted({i for f in all_faults for i in f.skipped}),
        aggregate=any(f.aggregate for f in all_faults),
    )
