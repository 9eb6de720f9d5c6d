"""farflung's codecs as a PyTorch DDP communication hook.

    state, hook = codec_hook("quantize:bits=4")
    ddp_model.register_comm_hook(state, hook)

Each DDP gradient bucket is averaged through the compressed sharded all-reduce with
worker- and server-side error feedback, and its bytes are counted in
``state.comm.meter``. The hook runs the exchange synchronously inside backward and
hands DDP an already completed future.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from farflung.comm import Comm
from farflung.comm.sharded import ShardedAllReduce
from farflung.compress import Codec, ErrorFeedback, make_codec

MASK_SEED = 0xDD9


@dataclass
class CodecHookState:
    """Per-bucket codec state: the sharded op, worker error feedback, step count."""

    codec: Codec
    comm: Comm
    error_feedback: bool = True
    ops: dict[int, ShardedAllReduce] = field(default_factory=dict)
    feedback: dict[int, ErrorFeedback] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)

    def op_for(self, index: int, numel: int) -> ShardedAllReduce:
        op = self.ops.get(index)
        if op is None or op.numel != numel:  # DDP rebuilds its buckets after step 1
            op = ShardedAllReduce(self.comm, numel, self.codec, self.error_feedback)
            self.ops[index] = op
            self.feedback[index] = ErrorFeedback()
            self.steps[index] = 0
        return op


def codec_hook(
    spec: str = "quantize:bits=4",
    process_group: dist.ProcessGroup | None = None,
    error_feedback: bool = True,
) -> tuple["CodecHookState", object]:
    """A ``(state, hook)`` pair for ``DistributedDataParallel.register_comm_hook``."""
    state = CodecHookState(make_codec(spec), Comm(process_group), error_feedback)
    return state, _hook


# DDP inspects these annotations at registration, so they must stay real objects
# (no `from __future__ import annotations` in this module).
def _hook(state: CodecHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    grads = bucket.buffer()
    index = bucket.index()
    op = state.op_for(index, grads.numel())
    ef = state.feedback[index]
    x = ef.compensate(grads) if state.error_feedback else grads.float()
    avg, sent = op(x, step=state.steps[index], seed=MASK_SEED)
    if state.error_feedback:
        ef.update(x, sent)
    state.steps[index] += 1
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(avg.to(grads.dtype).view_as(grads))
    return fut
