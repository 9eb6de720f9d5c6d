"""farflung's codecs as a PyTorch DDP communication hook.

    state, hook = codec_hook("quantize:bits=4", model=ddp_model)
    ddp_model.register_comm_hook(state, hook)

Each DDP gradient bucket is averaged through the compressed sharded all-reduce with
worker- and server-side error feedback, and its bytes are counted in
``state.comm.meter``. The hook runs the exchange synchronously inside backward and
hands DDP an already completed future.

Error feedback belongs to parameters, not to bucket indices. DDP cuts its buckets
once at construction and again after the first iteration (in the order gradients
became ready), and a DDP rebuilt after a restart cuts them the initial way again. So
when a bucket index shows up with other parameters than before, every bucket's
residuals are handed back to their parameters, and each new bucket collects its own:

* the worker residual (what this rank's compressed gradients have not delivered yet)
  by parameter, without communication;
* the server residual (what the owner of a chunk dropped when re-compressing the
  average) is held for the positions a rank owned; after a re-cut other ranks may own
  them, so the new bucket's server residuals are summed over the ranks (each position
  is held by at most one rank) and each new owner keeps its chunk. That costs one
  fp32 all-reduce of the bucket, only when buckets are re-cut or state is loaded.

Between re-cuts the residuals live in one flat buffer per bucket, updated in place.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from farflung.comm import Comm
from farflung.comm.sharded import ShardedAllReduce
from farflung.compress import Codec, make_codec

MASK_SEED = 0xDD9


@dataclass
class _Bucket:
    """One DDP bucket as last seen: its parameters and their places in its buffer."""

    keys: tuple[int, ...]  # id() of each parameter, in buffer order
    spans: tuple[tuple[int, int], ...]  # (offset, numel) of each parameter in the buffer
    op: ShardedAllReduce
    residual: torch.Tensor | None  # worker residual over the whole buffer (fp32)


@dataclass
class CodecHookState:
    """The hook's state: codec, communicator, error-feedback residuals by parameter,
    and the iteration count that drives the codec's random-k masks.

    ``model`` (the DDP model or the module it wraps) names the parameters in
    :meth:`state_dict`; training works without it, saving does not."""

    codec: Codec
    comm: Comm
    error_feedback: bool = True
    model: nn.Module | None = None
    step: int = 0
    """Iterations so far (counted at DDP's last bucket): the codec's mask step."""
    buckets: dict[int, _Bucket] = field(default_factory=dict, init=False, repr=False)
    # residuals handed back by re-cut buckets (or loaded), not yet claimed by a new one:
    # worker: id(param) -> flat residual; server: id(param) -> (start, values), the
    # contiguous part of the parameter this rank owned
    _worker_pool: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _server_pool: dict[int, tuple[int, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )
    # True once any rank may hold server residuals outside a bucket: new buckets then
    # gather them. It is set by re-cuts and loads, which every rank sees alike, so all
    # ranks agree on whether the gathering all-reduce runs
    _gather_server: bool = field(default=False, init=False, repr=False)

    def bucket_for(self, index: int, params: list[torch.Tensor], numel: int) -> _Bucket:
        """The state of bucket ``index``; handed back and rebuilt when DDP re-cut it."""
        keys = tuple(id(p) for p in params)
        bucket = self.buckets.get(index)
        if bucket is not None and bucket.keys != keys:
            self._release_all()
        if index not in self.buckets:
            self.buckets[index] = self._build(keys, params, numel)
        return self.buckets[index]

    # -- checkpoints -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's residuals keyed by parameter index in ``model.parameters()``
        order (so a restarted DDP, whatever its buckets, gets them back), and the step.

        Save one per rank next to the model and optimizer; restore into a state made
        with the same codec, world size and rank."""
        index = self._param_index()
        worker, server = dict(self._worker_pool), dict(self._server_pool)
        for bucket in self.buckets.values():
            w, s = self._split(bucket)
            worker.update(w)
            server.update(s)
        return {
            "codec": self.codec.spec,
            "world_size": self.comm.size,
            "rank": self.comm.rank,
            "error_feedback": self.error_feedback,
            "step": self.step,
            "worker": {index[k]: v.detach().cpu().clone() for k, v in worker.items()},
            "server": {
                index[k]: {"start": start, "values": v.detach().cpu().clone()}
                for k, (start, v) in server.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the buckets are rebuilt on next use."""
        mine = {
            "codec": self.codec.spec,
            "world_size": self.comm.size,
            "rank": self.comm.rank,
            "error_feedback": self.error_feedback,
        }
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(
                    f"DDP hook state was saved with {key} = {state.get(key)!r}, this hook "
                    f"has {value!r}"
                )
        params = self._params()
        spans = [(i, 0, v.numel(), True) for i, v in state["worker"].items()]
        spans += [(i, s["start"], s["values"].numel(), False) for i, s in state["server"].items()]
        for i, start, n, whole in spans:
            fits = 0 <= i < len(params) and 0 <= start and start + n <= params[i].numel()
            if not fits or (whole and n != params[i].numel()):
                raise ValueError(f"DDP hook state does not fit parameter {i} of this model")
        self.buckets.clear()
        self.step = state["step"]
        self._worker_pool = {
            id(params[i]): v.reshape(-1).float().clone() for i, v in state["worker"].items()
        }
        self._server_pool = {
            id(params[i]): (s["start"], s["values"].reshape(-1).float().clone())
            for i, s in state["server"].items()
        }
        self._gather_server = True

    # -- helpers ---------------------------------------------------------------
    def _build(self, keys: tuple[int, ...], params: list[torch.Tensor], numel: int) -> _Bucket:
        spans, offset = [], 0
        for p in params:
            spans.append((offset, p.numel()))
            offset += p.numel()
        if offset != numel:  # the hook relies on DDP's dense, unpadded bucket layout
            raise ValueError(f"DDP bucket of {numel} elements holds parameters of {offset}")
        op = ShardedAllReduce(self.comm, numel, self.codec, self.error_feedback)
        bucket = _Bucket(keys, tuple(spans), op, None)
        if not self.error_feedback:
            return bucket
        device = params[0].device
        bucket.residual = torch.zeros(numel, dtype=torch.float32, device=device)
        for key, (off, n) in zip(keys, spans, strict=True):
            old = self._worker_pool.pop(key, None)
            if old is not None:
                bucket.residual[off : off + n] = old
        if self._gather_server and self.comm.size > 1:
            held = torch.zeros(numel, dtype=torch.float32, device=device)
            for key, (off, _) in zip(keys, spans, strict=True):
                if key in self._server_pool:
                    start, values = self._server_pool.pop(key)
                    held[off + start : off + start + values.numel()] = values
            # each position's residual is held by one rank at most: the sum is all of it
            self.comm.all_reduce(held, kind="dp")
            r = self.comm.rank
            chunk = held[op.offsets[r] : op.offsets[r] + op.sizes[r]]
            op.load_state_dict({"server_ef": {"error": chunk.clone()}})
        return bucket

    def _split(
        self, bucket: _Bucket
    ) -> tuple[dict[int, torch.Tensor], dict[int, tuple[int, torch.Tensor]]]:
        """A bucket's residuals by parameter: worker (whole) and server (owned part)."""
        worker, server = {}, {}
        if bucket.residual is None:
            return worker, server
        for key, (off, n) in zip(bucket.keys, bucket.spans, strict=True):
            worker[key] = bucket.residual[off : off + n]
        error = bucket.op.state_dict()["server_ef"]
        error = None if error is None else error["error"]
        if error is not None:
            r = bucket.op.comm.rank
            lo, hi = bucket.op.offsets[r], bucket.op.offsets[r] + bucket.op.sizes[r]
            for key, (off, n) in zip(bucket.keys, bucket.spans, strict=True):
                a, b = max(lo, off), min(hi, off + n)
                if a < b:  # this parameter overlaps the chunk this rank owns
                    server[key] = (a - off, error[a - lo : b - lo])
        return worker, server

    def _release_all(self) -> None:
        """Hand every bucket's residuals back to their parameters (DDP re-cut them)."""
        for bucket in self.buckets.values():
            worker, server = self._split(bucket)
            self._worker_pool.update(worker)
            self._server_pool.update(server)
        self.buckets.clear()
        self._gather_server = True

    def _params(self) -> list[nn.Parameter]:
        if self.model is None:
            raise ValueError(
                "saving or loading the DDP hook's state needs its model: "
                "codec_hook(spec, model=ddp_model)"
            )
        return list(self.model.parameters())

    def _param_index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(self._params())}


def codec_hook(
    spec: str = "quantize:bits=4",
    process_group: dist.ProcessGroup | None = None,
    error_feedback: bool = True,
    model: nn.Module | None = None,
) -> tuple[CodecHookState, object]:
    """A ``(state, hook)`` pair for ``DistributedDataParallel.register_comm_hook``.

    ``process_group``: the one DDP was given; left out, the DDP ``model``'s own (or the
    world). The hook averages over its ranks only. ``model`` (the DDP model) is needed
    for ``state.state_dict()`` and ``state.load_state_dict()``."""
    group = _ddp_group(process_group, model)
    state = CodecHookState(make_codec(spec), Comm(group), error_feedback, model)
    return state, _hook


def _ddp_group(
    process_group: dist.ProcessGroup | None, model: nn.Module | None
) -> dist.ProcessGroup | None:
    """The group to average over: the hook must use DDP's, or a DDP on a pipeline
    stage's replicas would have its buckets averaged with every stage's."""
    own = getattr(model, "process_group", None)  # set by DistributedDataParallel
    if process_group is None:
        return own
    if own is not None and dist.get_process_group_ranks(own) != dist.get_process_group_ranks(
        process_group
    ):
        raise ValueError("codec_hook: process_group differs from the DDP model's")
    return process_group


# DDP inspects these annotations at registration, so they must stay real objects
# (no `from __future__ import annotations` in this module).
def _hook(state: CodecHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    grads = bucket.buffer()
    b = state.bucket_for(bucket.index(), bucket.parameters(), grads.numel())
    if b.residual is not None:
        x = grads.float() + b.residual  # worker error feedback: add what is still owed
    else:
        x = grads.float()
    avg, sent = b.op(x, step=state.step, seed=MASK_SEED)
    if b.residual is not None:
        torch.sub(x, sent, out=b.residual)
    if bucket.is_last():  # DDP hands over buckets in index order, once per iteration
        state.step += 1
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(avg.to(grads.dtype).view_as(grads))
    return fut
