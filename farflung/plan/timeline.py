"""How long one pipeline step takes: the stages' schedules played out in time.

Each stage runs its actions (:mod:`farflung.plan.schedule`) one after another; a
forward of micro-batch i on stage s > 0 waits for its activations, a backward on
s < last waits for its gradient. Every boundary has two one-way links (activations
down, gradients up, as farflung's runtime gives each direction its own process
group), each a FIFO server: a message occupies its link for ``link_s`` (bytes /
bandwidth) from when it was computed or the link became free, and arrives
``delay_s`` later. Sends are asynchronous, so a stage never waits for its own sends.

This is the planner's step model (the "schedule" cost model); it replaces DT-FM's
sum of boundary costs, which charges every boundary's full transfer in sequence even
though boundaries and micro-batches overlap. For GPipe it equals the closed form of a
flow shop with identical jobs; 1F1B has no simple closed form (its warm-up bounds
how many micro-batches are in flight, so the round trip through the later stages can
gate the rate), hence the simulation. Cost: O(stages x micro-batches) per call."""

from __future__ import annotations

from collections.abc import Sequence

from farflung.plan.schedule import make_schedule

__all__ = ["step_time"]


def step_time(
    fwd_s: Sequence[float],
    bwd_s: Sequence[float],
    link_s: Sequence[float],
    delay_s: Sequence[float],
    micro_batches: int,
    schedule: str,
) -> float:
    """Seconds from the first forward to the last backward of one step.

    ``fwd_s[k]``/``bwd_s[k]``: compute per micro-batch of pipeline position k;
    ``link_s[k]``/``delay_s[k]``: occupancy and latency of one micro-batch's message
    across boundary k (between positions k and k + 1), the same both ways."""
    pp = len(fwd_s)
    if len(bwd_s) != pp or len(link_s) != pp - 1 or len(delay_s) != pp - 1:
        raise ValueError("need one fwd/bwd time per stage and one link per boundary")
    actions = [make_schedule(schedule, s, pp, micro_batches) for s in range(pp)]
    pos, clock = [0] * pp, [0.0] * pp
    down_free, up_free = [0.0] * pp, [0.0] * pp
    acts: list[dict[int, float]] = [{} for _ in range(pp)]  # stage -> micro-batch -> arrival
    grads: list[dict[int, float]] = [{} for _ in range(pp)]
    left = sum(len(a) for a in actions)
    while left:
        moved = False
        for s in range(pp):
            mine = actions[s]
            while pos[s] < len(mine):
                kind, i = mine[pos[s]]
                if kind == "F":
                    ready = acts[s].pop(i, None) if s else 0.0
                    if ready is None:
                        break
                    done = clock[s] = max(clock[s], ready) + fwd_s[s]
                    if s + 1 < pp:
                        start = max(down_free[s], done)
                        down_free[s] = start + link_s[s]
                        acts[s + 1][i] = down_free[s] + delay_s[s]
                else:
                    ready = grads[s].pop(i, None) if s + 1 < pp else 0.0
                    if ready is None:
                        break
                    done = clock[s] = max(clock[s], ready) + bwd_s[s]
                    if s:
                        start = max(up_free[s - 1], done)
                        up_free[s - 1] = start + link_s[s - 1]
                        grads[s - 1][i] = up_free[s - 1] + delay_s[s - 1]
                pos[s] += 1
                left -= 1
                moved = True
        if not moved:  # cannot happen for the schedules above; guards a future one
            raise RuntimeError(f"schedule {schedule!r} deadlocks")
    return max(clock)
