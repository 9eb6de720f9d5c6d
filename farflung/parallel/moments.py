"""Shared second moments for local-step Adam (issue 11; the project's own idea).

With local steps each worker's Adam divides by the second moments ``v_i`` of its own
gradients. They differ across workers, and where a worker's gradient was large, both
its ``m_i`` and its ``v_i`` are large: the per-worker normalisation correlates with
the update it normalises, and the averaged model moves less than Adam on the averaged
gradient would. Replacing every ``v_i`` by one estimate of the workers' mean
removes both effects (measured in docs/data-parallel.md).

Sending ``v`` itself would cost as much as the model. The factored estimate of
Adafactor (Shazeer & Stern, 2018) costs ``rows + cols`` numbers per matrix: for
``V`` of shape (a, b), the row sums ``r`` and column sums ``c`` give
``V̂ = r cᵀ / sum(r)``, exact for a rank-1 ``V``. Row and column sums are linear in
``V``, so the average of the workers' sums is the sums of their mean, and one small
all-reduce gives every worker the same ``V̂`` of the mean. Vectors (biases, norms) are
sent whole: they are small. ``full`` mode sends ``v`` whole, as the reference that
factoring is measured against.

The statistics are taken on the training thread after step t and arrive after step
t+1 (the sync runs in the background like the model delta), when ``v_i`` already holds
step t+1's local update. Overwriting it would drop that update, and the next
statistics would then describe the estimate itself rather than new gradients (that
froze ``v`` and diverged in the first measurement). So :class:`SharedMoments` keeps
the ``v_i`` it described and applies the estimate ``V̂`` as if it had replaced ``v_i``
at step t, followed by the k local steps taken since:
``v_i ← v_i + β2^k (V̂ − v_i(t))``, which is exact for Adam's update
``v ← β2 v + (1 − β2) g²``.
"""

from __future__ import annotations

from typing import Any

import torch


def _second_moments(optimizer: torch.optim.Optimizer, params: list) -> list[torch.Tensor] | None:
    """Each parameter's ``exp_avg_sq`` (Adam, AdamW), or None before the first step."""
    out = []
    for p in params:
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            return None
        out.append(state["exp_avg_sq"])
    return out


def _factored(v: torch.Tensor, mode: str) -> bool:
    return mode == "factored" and v.dim() >= 2


def moment_stats(
    optimizer: torch.optim.Optimizer, params: list, mode: str = "factored"
) -> torch.Tensor | None:
    """This worker's statistics of its second moments as one flat fp32 vector: per
    matrix its row and column sums (over the last dimension and all the others), per
    vector the vector; everything in ``full`` mode. None before the first step."""
    moments = _second_moments(optimizer, params)
    if moments is None:
        return None
    parts = []
    for v in moments:
        v = v.detach().float()
        if _factored(v, mode):
            m = v.reshape(-1, v.shape[-1])
            parts += [m.sum(dim=1), m.sum(dim=0)]
        else:
            parts.append(v.reshape(-1))
    return torch.cat(parts)


def stats_numel(params: list, mode: str = "factored") -> int:
    """How many numbers :func:`moment_stats` sends for ``params``."""
    n = 0
    for p in params:
        n += p.numel() // p.shape[-1] + p.shape[-1] if _factored(p, mode) else p.numel()
    return n


def estimates(stats: torch.Tensor, like: list[torch.Tensor], mode: str = "factored"):
    """The second moments that ``stats`` describes, one tensor shaped as each of
    ``like``: the factored estimate ``r cᵀ / sum(r)`` for matrices, else the numbers."""
    offset = 0
    for v in like:
        if not _factored(v, mode):
            yield stats[offset : offset + v.numel()].view_as(v)
            offset += v.numel()
            continue
        cols = v.shape[-1]
        rows = v.numel() // cols
        r = stats[offset : offset + rows]
        c = stats[offset + rows : offset + rows + cols]
        offset += rows + cols
        total = r.sum()
        est = torch.outer(r, c).div_(total) if total > 0 else torch.zeros(rows, cols)
        yield est.view_as(v)
    if offset != stats.numel():
        raise ValueError(f"moment statistics have {stats.numel()} numbers, expected {offset}")


def average_stats(comm: Any, stats: torch.Tensor, kind: str = "dp") -> torch.Tensor:
    """The average of every rank's ``stats`` over ``comm`` (a :class:`Comm`), sent in
    bfloat16: it halves the bytes, its 8-bit mantissa is ample for an estimate and
    its range is fp32's."""
    wire = stats.div(comm.size).to(torch.bfloat16)
    comm.all_reduce(wire, kind=kind)
    return wire.float()


class SharedMoments:
    """Takes a worker's statistics after one step and applies the workers' average
    some steps later, as if it had been applied when taken (see the module's doc)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list, mode: str) -> None:
        self.optimizer, self.params, self.mode = optimizer, params, mode
        self.taken: list[torch.Tensor] | None = None  # v_i when the statistics were taken
        self.taken_at: list[int] = []  # and each parameter's Adam step count then

    def _steps(self) -> list[int]:
        return [int(self.optimizer.state[p]["step"]) for p in self.params]

    def _beta2(self) -> dict[int, float]:
        return {
            id(p): group["betas"][1]
            for group in self.optimizer.param_groups
            for p in group["params"]
        }

    def take(self) -> torch.Tensor | None:
        """This worker's statistics (None before the first step); remembers ``v_i``."""
        stats = moment_stats(self.optimizer, self.params, self.mode)
        if stats is not None:
            self.taken = [v.detach().clone() for v in _second_moments(self.optimizer, self.params)]
            self.taken_at = self._steps()
        return stats

    def apply(self, average: torch.Tensor) -> None:
        """``v_i ← v_i + β2^k (V̂ − v_i(taken))``, with ``V̂`` the estimate of the
        workers' ``average`` statistics and k the steps taken since :meth:`take`."""
        if self.taken is None:
            raise ValueError("shared moments arrived without statistics taken")
        moments = _second_moments(self.optimizer, self.params)
        beta2 = self._beta2()
        ests = estimates(average, moments, self.mode)
        rows = zip(
            self.params, moments, self.taken, ests, self._steps(), self.taken_at, strict=True
        )
        with torch.no_grad():
            for p, v, old, est, now, then in rows:
                v.add_(est.sub(old).mul_(beta2[id(p)] ** (now - then))).clamp_min_(0.0)
        self.taken, self.taken_at = None, []

    def state_dict(self) -> dict[str, Any]:
        return {"taken": self.taken, "taken_at": list(self.taken_at)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.taken, self.taken_at = state["taken"], list(state["taken_at"])
