"""One pipeline stage at work: its schedule over point-to-point messages.

A :class:`StageRunner` runs one training step of its stage: for every action of the
schedule it receives what the action needs (activations from the previous stage for a
forward, activation gradients from the next stage for a backward), computes, and sends
the result on. Everything crosses the link through :class:`~farflung.comm.Comm`'s
``send_async``/``recv_async`` (``isend``/``irecv``), so every byte is metered (kinds
``pp_fwd`` and ``pp_bwd``, the packed payload sizes) and the link model or the
network lab applies.

Overlap: the receive for the next micro-batch of each direction is posted before the
current action computes, and sends are waited on only at the end of the step, so
transfers run while the stage computes. Payloads are sized in advance: every codec's
payload size follows from the shape and, for AQ-SGD, from which samples are on their
first visit, which both sides fix at the start of the step from their (identical)
buffers.

The targets are not sent to the last stage: every worker holds the token shards (the
launcher prepares them on every node), and the sample ids of a step follow from the
step number, so the last stage reads the targets of the same samples itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from farflung.comm import Comm, Handle
from farflung.comm.errors import PeerLostError, first_line
from farflung.compress import CodecContext
from farflung.compress.activations import BoundaryCodec
from farflung.plan.schedule import make_schedule

FWD_TAG, BWD_TAG, EVAL_TAG = 11, 12, 13


@dataclass
class MicroBatch:
    """What a stage needs of one micro-batch: the token ids (first stage), the targets
    (last stage) and the sample ids (AQ-SGD buffers are indexed by them)."""

    ids: np.ndarray
    x: Tensor | None = None
    y: Tensor | None = None
    scale: float | None = None
    """Gradient weight of this micro-batch's loss on the last stage when its targets
    are masked (fine-tuning data: its counted tokens' share of the global batch's);
    None: 1/M."""
    share: float | None = None
    """With ``scale``: this micro-batch's weight in the step's reported loss (a sum);
    in an evaluation, its counted targets (None: its samples)."""


@dataclass
class Boundary:
    """One neighbour of this stage: the codec for what this stage sends to it, the
    codec for what it receives from it, and a Comm per direction whose group holds the
    two ranks of the boundary (see :mod:`farflung.parallel.pipeline.mesh` for why
    two)."""

    stage: int
    send: BoundaryCodec
    recv: BoundaryCodec
    fwd: Comm
    bwd: Comm

    @property
    def peer(self) -> int:
        """The neighbour's rank in the boundary's groups (the other one of two)."""
        return 1 - self.fwd.rank

    @property
    def global_rank(self) -> int:
        """The neighbour's rank in the world."""
        return self.fwd.global_rank(self.peer)


@dataclass
class StepStats:
    """What the last step did, for tests and metrics."""

    peak_live: int = 0
    losses: list[float] = field(default_factory=list)


@dataclass
class _Step:
    """One training step's bookkeeping: the micro-batches, which of their samples are
    on a first AQ-SGD visit (received / sent), the receives posted ahead, the
    activations held for backward, and the sends in flight."""

    mbs: Sequence[MicroBatch]
    step: int
    fresh_in: list
    fresh_out: list
    poison: float
    posted: dict = field(default_factory=dict)
    saved: dict = field(default_factory=dict)
    sends: list = field(default_factory=list)


class StageRunner:
    """Runs ``module`` (a :class:`~farflung.model.GPTStage`) as stage ``stage`` of
    ``stages`` under ``schedule``.

    ``prev``/``next`` describe the neighbours (None at the ends); the forward codecs
    are ``prev.recv`` and ``next.send``, the backward ones ``next.recv`` and
    ``prev.send``. ``shape`` is a micro-batch's hidden-state shape [b, T, d]."""

    def __init__(
        self,
        module: nn.Module,
        comm: Comm,
        stage: int,
        stages: int,
        prev: Boundary | None,
        next: Boundary | None,
        schedule: str,
        shape: tuple[int, int, int],
        device: torch.device,
        seed: int = 0,
        compute: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.module, self.comm, self.stage, self.stages = module, comm, stage, stages
        self.prev, self.next, self.schedule = prev, next, schedule
        self.shape, self.device, self.seed = shape, device, seed
        self.compute = compute  # the context each forward runs in (autocast)
        self.loss_scale = 1.0  # what the last stage multiplies its losses by (fp16)
        self.stats = StepStats()

    @property
    def is_first(self) -> bool:
        return self.prev is None

    @property
    def is_last(self) -> bool:
        return self.next is None

    # -- training ------------------------------------------------------------------
    def train_step(self, mbs: Sequence[MicroBatch], step: int, poison: float = 1.0) -> float:
        """Forward and backward of every micro-batch; gradients accumulate in the
        module (each micro-batch's loss weighted 1/M). Returns the mean loss on the
        last stage, 0.0 elsewhere. ``poison`` (fault injection) multiplies this stage's
        outputs (the loss on the last stage) by it: NaN, or a huge factor."""
        actions = make_schedule(self.schedule, self.stage, self.stages, len(mbs))
        st = _Step(
            mbs,
            step,
            self._fresh(self.prev.recv if self.prev else None, mbs),
            self._fresh(self.next.send if self.next else None, mbs),
            poison,
        )
        self.stats = StepStats()
        for i, (kind, mb) in enumerate(actions):
            for ahead in actions[i : i + 3]:  # this action's input, and the next ones'
                self._post(ahead, st.posted, st.fresh_in)
            if kind == "F":
                self._forward_action(st, mb)
            else:
                self._backward_action(st, mb)
            self.stats.peak_live = max(self.stats.peak_live, len(st.saved))
        for handle, _ in st.sends:
            self._wait(handle, "sending to")
        losses = self.stats.losses
        if not losses:
            return 0.0
        return sum(losses) if mbs[0].share is not None else sum(losses) / len(losses)

    def _forward_action(self, st: _Step, mb: int) -> None:
        inp, out = self._forward(st.mbs[mb], st.posted.pop(("F", mb), None), st.fresh_in[mb])
        if st.poison != 1.0:  # NaN != 1.0 too
            out = out * st.poison
        st.saved[mb] = (inp, out)
        if not self.is_last:
            payload = self._encode(self.next.send, out, st.mbs[mb], st.fresh_out[mb])
            self._send(st.sends, self.next.fwd, self.next.peer, payload, "pp_fwd", FWD_TAG)

    def _backward_action(self, st: _Step, mb: int) -> None:
        inp, out = st.saved.pop(mb)
        if self.is_last:
            share = st.mbs[mb].share
            self.stats.losses.append(out.item() * (1.0 if share is None else share))
        self._backward(out, st.posted.pop(("B", mb), None), st.mbs[mb], len(st.mbs))
        if not self.is_first:
            # stochastic rounding draws from a stream of its own per step and micro-batch
            ctx = CodecContext(st.step * len(st.mbs) + mb, self.seed, self.comm.rank)
            payload = self._encode(self.prev.send, inp.grad, st.mbs[mb], None, ctx)
            self._send(st.sends, self.prev.bwd, self.prev.peer, payload, "pp_bwd", BWD_TAG)

    def _send(self, sends: list, comm: Comm, peer: int, payload: Tensor, kind: str, tag: int):
        """Send without waiting; keep at most ``stages`` sends (and their payloads) in
        flight, so a stage holds no more payloads than activations under 1F1B."""
        sends.append((comm.send_async(payload, peer, kind, tag), payload))
        while len(sends) > self.stages:
            self._wait(sends.pop(0)[0], "sending to")

    def _fresh(self, codec: BoundaryCodec | None, mbs: Sequence[MicroBatch]) -> list:
        """Per micro-batch, which samples are on their first AQ-SGD visit, fixed at the
        start of the step (both sides' buffers agree on it)."""
        if codec is None or codec.buffer is None:
            return [None] * len(mbs)
        return [~codec.buffer.seen(mb.ids) for mb in mbs]

    def _post(self, action, posted: dict, fresh_in: list) -> None:
        """Post the receive ``action`` needs, once."""
        kind, mb = action
        if (kind, mb) in posted:
            return
        if kind == "F" and self.prev is not None:
            size = self.prev.recv.payload_nbytes(self.shape, fresh_in[mb])
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            posted[action] = (self.prev.fwd.recv_async(buf, self.prev.peer, "pp_fwd", FWD_TAG), buf)
        elif kind == "B" and self.next is not None:
            size = self.next.recv.payload_nbytes(self.shape)
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            posted[action] = (self.next.bwd.recv_async(buf, self.next.peer, "pp_bwd", BWD_TAG), buf)

    def _forward(self, mb: MicroBatch, got, fresh) -> tuple[Tensor | None, Tensor]:
        """Returns (the input hidden states whose gradient goes back, or None on the
        first stage; the output hidden states, or the loss on the last stage)."""
        if self.is_first:
            inp, x = None, mb.x.to(self.device)
        else:
            handle, buf = got
            self._wait(handle, "receiving from")
            t0 = time.perf_counter()
            inp = self.prev.recv.decode(buf, self.shape, mb.ids, fresh).to(self.device)
            self.comm.meter.add_work("codec", time.perf_counter() - t0)
            x = inp.requires_grad_(True)
        with self.compute():
            if self.is_last:
                _, loss = self.module(x, mb.y.to(self.device))
                return inp, loss
            return inp, self.module(x)

    def _backward(self, out: Tensor, got, mb: MicroBatch, micro_batches: int) -> None:
        if self.is_last:
            loss = out / micro_batches if mb.scale is None else out * mb.scale
            (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
            return
        handle, buf = got
        self._wait(handle, "receiving from")
        t0 = time.perf_counter()
        grad = self.next.recv.decode(buf, self.shape).to(self.device)
        self.comm.meter.add_work("codec", time.perf_counter() - t0)
        out.backward(grad)

    def _encode(self, codec: BoundaryCodec, t: Tensor, mb: MicroBatch, fresh, ctx=None) -> Tensor:
        t0 = time.perf_counter()
        payload = codec.encode(t.detach(), mb.ids, fresh, ctx)
        self.comm.meter.add_work("codec", time.perf_counter() - t0)
        return payload

    def _wait(self, handle: Handle, what: str) -> None:
        """Wait for a point-to-point transfer; a failed one names the neighbour."""
        try:
            handle.wait()
        except RuntimeError as e:  # gloo raises plain RuntimeErrors, NCCL DistErrors
            raise self._peer_error(what, e) from e

    def _peer_error(self, what: str, e: BaseException) -> PeerLostError:
        peers = [b for b in (self.prev, self.next) if b is not None]
        names = " or ".join(f"stage {b.stage} (rank {b.global_rank})" for b in peers)
        return PeerLostError(
            f"pipeline stage {self.stage}: {what} its neighbour {names} failed: {first_line(e)}"
        )

    # -- evaluation ------------------------------------------------------------------
    @torch.no_grad()
    def eval_forward(
        self, module: nn.Module, mbs: Sequence[MicroBatch], codec_prev, codec_next
    ) -> float:
        """Forward only through ``module`` (this stage's weights to evaluate),
        micro-batch after micro-batch; returns the summed loss times samples on the last
        stage (0 elsewhere). Activations cross in the given (stateless) codecs."""
        recvs = []
        if not self.is_first:
            size = codec_prev.payload_nbytes(self.shape)
            for _ in mbs:
                buf = torch.empty(size, dtype=torch.uint8, device=self.device)
                recvs.append(
                    (self.prev.fwd.recv_async(buf, self.prev.peer, "pp_fwd", EVAL_TAG), buf)
                )
        sends, total = [], 0.0
        for i, mb in enumerate(mbs):
            if self.is_first:
                x = mb.x.to(self.device)
            else:
                handle, buf = recvs[i]
                self._wait(handle, "receiving from")
                x = codec_prev.decode(buf, self.shape).to(self.device)
            if self.is_last:
                _, loss = module(x, mb.y.to(self.device))
                total += loss.item() * (len(mb.ids) if mb.share is None else mb.share)
            else:
                payload = codec_next.encode(module(x))
                sends.append(
                    (self.next.fwd.send_async(payload, self.next.peer, "pp_fwd", EVAL_TAG), payload)
                )
        for handle, _ in sends:
            self._wait(handle, "sending to")
        return total
