"""Plain data parallelism: bucketed all-reduce of gradients, averaged."""

from __future__ import annotations

import torch

from farflung.parallel.base import DataParallel, register


def make_buckets(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[list]:
    """Group parameters (in reverse order, as backward produces them) into buckets of
    at most ``bucket_bytes`` (a larger parameter gets a bucket of its own)."""
    buckets: list[list] = []
    current: list = []
    size = 0
    for p in reversed(params):
        b = p.numel() * p.element_size()
        if current and size + b > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += b
    if current:
        buckets.append(current)
    return buckets


@register("allreduce")
class AllReduce(DataParallel):
    """Every step, all-reduce the gradients in flat buckets and divide by the world size.

    Buckets are launched asynchronously one after another so that copying the next
    bucket overlaps the transfer of the previous one."""

    def setup(self) -> None:
        super().setup()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.buckets = make_buckets(params, int(self.cfg.bucket_mb * (1 << 20)))
        self.flats = [
            torch.empty(sum(p.numel() for p in b), dtype=b[0].dtype, device=b[0].device)
            for b in self.buckets
        ]

    def sync_gradients(self) -> None:
        handles = []
        for bucket, flat in zip(self.buckets, self.flats, strict=True):
            offset = 0
            for p in bucket:
                n = p.numel()
                dst = flat[offset : offset + n]
                if p.grad is None:
                    dst.zero_()
                else:
                    dst.copy_(p.grad.reshape(-1))
                offset += n
            handles.append(self.comm.all_reduce_async(flat, kind="dp"))
        inv = 1.0 / self.comm.size
        for bucket, flat, h in zip(self.buckets, self.flats, handles, strict=True):
            h.wait()
            flat.mul_(inv)
            offset = 0
            for p in bucket:
                n = p.numel()
                view = flat[offset : offset + n].view_as(p)
                if p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)
                offset += n
