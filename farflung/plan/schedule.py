"""Pipeline schedules: the order in which one stage runs its micro-batches.

An action is ``("F", i)`` (forward of micro-batch ``i``) or ``("B", i)`` (its backward).
A stage's schedule is a pure function of (schedule, stage, stages, micro-batches), so
every stage knows what its neighbours will send and when, without talking about it.

- GPipe: all forwards, then all backwards (in reverse order, as autograd would free
  them). Every micro-batch's activations are held at once: memory grows with M.
- 1F1B (PipeDream-flush): stage ``s`` runs ``stages - s - 1`` warm-up forwards, then
  alternates one forward and one backward, then drains the remaining backwards. A
  stage holds at most ``stages - s`` micro-batches of activations: memory bounded by
  the number of stages, not M, for the same bubble as GPipe.
"""

from __future__ import annotations

Action = tuple[str, int]
SCHEDULES = ("gpipe", "1f1b")


def gpipe(micro_batches: int) -> list[Action]:
    """All forwards in order, then all backwards in reverse order."""
    return [("F", i) for i in range(micro_batches)] + [
        ("B", i) for i in reversed(range(micro_batches))
    ]


def one_f_one_b(stage: int, stages: int, micro_batches: int) -> list[Action]:
    """Warm-up forwards, steady one-forward-one-backward, cool-down backwards."""
    warm = min(stages - stage - 1, micro_batches)
    actions: list[Action] = [("F", i) for i in range(warm)]
    f, b = warm, 0
    while f < micro_batches:
        actions += [("F", f), ("B", b)]
        f, b = f + 1, b + 1
    return actions + [("B", i) for i in range(b, micro_batches)]


def make_schedule(name: str, stage: int, stages: int, micro_batches: int) -> list[Action]:
    """The actions of ``stage`` (0-based) under the schedule ``name``."""
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is not in [0, {stages})")
    if name == "gpipe":
        return gpipe(micro_batches)
    if name == "1f1b":
        return one_f_one_b(stage, stages, micro_batches)
    raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")


def peak_in_flight(actions: list[Action]) -> int:
    """Most micro-batches whose forward has run and backward has not, at any moment."""
    live = peak = 0
    for kind, _ in actions:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak
