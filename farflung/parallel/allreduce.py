"""Plain data parallelism: bucketed all-reduce of gradients, averaged."""

from __future__ import annotations

import torch

from farflung.parallel.base import DataParallel, NonFiniteStep, register
from farflung.parallel.flat import all_finite, grads_finite, make_buckets


@register("allreduce")
class AllReduce(DataParallel):
    """Every step, all-reduce the gradients in flat buckets and divide by the world size.

    Buckets are launched asynchronously one after another so that copying the next
    bucket overlaps the transfer of the previous one. The last bucket carries one extra
    element per rank, set by that rank when its loss or gradients were not finite: the
    sum tells every rank the same thing, and who."""

    averages_gradients = True

    def setup(self) -> None:
        super().setup()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.buckets = make_buckets(params, int(self.cfg.bucket_mb * (1 << 20)))
        n = self.comm.size
        self.flats = [
            torch.empty(
                sum(p.numel() for p in b) + (n if i == len(self.buckets) - 1 else 0),
                dtype=b[0].dtype,
                device=b[0].device,
            )
            for i, b in enumerate(self.buckets)
        ]

    def sync_gradients(self, finite: bool = True) -> None:
        if self.comm.size == 1:  # the average of one: no copies into buckets and back
            if not (finite and (self.tolerate_overflow or grads_finite(self.model))):
                raise NonFiniteStep(self.global_ranks([0]), dropped=True)
            return
        handles, n = [], self.comm.size
        for i, (bucket, flat) in enumerate(zip(self.buckets, self.flats, strict=True)):
            offset = 0
            for p in bucket:
                k = p.numel()
                dst = flat[offset : offset + k]
                if p.grad is None:
                    dst.zero_()
                else:
                    dst.copy_(p.grad.reshape(-1))
                offset += k
            if not self.tolerate_overflow:
                finite = finite and all_finite([flat[:offset]])
            if i == len(self.buckets) - 1:
                flags = flat[offset:]
                flags.zero_()
                flags[self.comm.rank] = 0.0 if finite else 1.0
            handles.append(self.comm.all_reduce_async(flat, kind="dp"))
        for h in handles:
            h.wait()
        bad = [r for r, v in enumerate(self.flats[-1][-n:].tolist()) if v != 0.0]
        if bad:  # NaN + x is NaN: the average is useless to everyone
            raise NonFiniteStep(self.global_ranks(bad), dropped=True)
        inv = 1.0 / n
        for bucket, flat in zip(self.buckets, self.flats, strict=True):
            flat.mul_(inv)
            offset = 0
            for p in bucket:
                k = p.numel()
                view = flat[offset : offset + k].view_as(p)
                if p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)
                offset += k
