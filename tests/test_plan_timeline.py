"""The planner's step timeline (farflung.plan.timeline) against hand-played schedules
and the closed form of a flow shop with identical jobs (GPipe)."""

from __future__ import annotations

import numpy as np
import pytest

from farflung.plan.timeline import step_time


def flow_shop_gpipe(f, b, x, a, m) -> float:
    """GPipe as two flow shops with identical jobs, forward then backward: each job
    passes every machine (stages and links), the makespan is one job's passage plus
    (M - 1) x the busiest machine; delays add to the passage only."""
    f, b, x, a = map(np.asarray, (f, b, x, a))
    through = x.sum() + a.sum()
    top = x.max() if len(x) else 0.0
    fwd = f.sum() + through + (m - 1) * max(f.max(), top)
    bwd = b.sum() + through + (m - 1) * max(b.max(), top)
    return float(fwd + bwd)


@pytest.mark.parametrize("seed", range(5))
def test_gpipe_equals_flow_shop(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        pp, m = int(rng.integers(1, 6)), int(rng.integers(1, 9))
        f = rng.uniform(0.01, 1.0, pp)
        b = 2 * f * rng.uniform(0.8, 1.2, pp)
        x = rng.uniform(0.0, 2.0, pp - 1) * rng.choice([0.1, 1.0, 5.0])
        a = rng.uniform(0.0, 0.5, pp - 1)
        assert step_time(f, b, x, a, m, "gpipe") == pytest.approx(flow_shop_gpipe(f, b, x, a, m))


def test_1f1b_by_hand_uses_both_directions():
    # stage 0: F0 F1 B0 B1; stage 1: F0 B0 F1 B1. f = 1, b = 2, 3 s a message, 0.5 s delay.
    # down link: act0 1-4 (arrives 4.5), act1 4-7 (7.5); stage 1: F0 4.5-5.5, B0 5.5-7.5,
    # F1 7.5-8.5, B1 8.5-10.5; up link: grad0 7.5-10.5 (11), grad1 10.5-13.5 (14);
    # stage 0: B0 11-13, B1 14-16
    assert step_time([1, 1], [2, 2], [3], [0.5], 2, "1f1b") == pytest.approx(16.0)
    # GPipe sends every activation before any gradient: 19 s (flow shop)
    assert step_time([1, 1], [2, 2], [3], [0.5], 2, "gpipe") == pytest.approx(19.0)


def test_equal_stages_free_links():
    for sched in ("gpipe", "1f1b"):
        t = step_time([0.1] * 4, [0.2] * 4, [0.0] * 3, [0.0] * 3, 8, sched)
        assert t == pytest.approx((8 + 4 - 1) * 0.3)


def test_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one link per boundary"):
        step_time([1, 1], [2, 2], [], [], 2, "gpipe")
