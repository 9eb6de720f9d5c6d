"""Telemetry leaves the critical path: no step waits for a round trip to report."""

from __future__ import annotations

import json

from procs import end_run
from tiny_runs import train_tiny

from farflung.train.metrics import read_jsonl


def test_diloco_between_syncs_waits_on_no_link(tiny):  # noqa: F811
    """DiLoCo with more local steps than the run has: nothing needs the 300 ms link
    between steps, so no step may be charged a link delay (the old per-step all-gather
    cost each step one: 12 x 0.3 s of blocked time). The gather launched at step 10 is
    collected after step 12, when it has long arrived."""
    out = tiny / "telemetry_diloco"
    args = ["--quiet", "--link-model", "100mbit,300ms", "--set", "parallel.algorithm=diloco"]
    args += ["--set", "parallel.local_steps=100", "--set", "train.eval_every=0"]
    try:
        r = train_tiny(tiny, out, *args, "--set", "train.checkpoint_every=0")
    finally:
        end_run(out)
    assert r.returncode == 0, r.stderr
    records = read_jsonl(out / "metrics.jsonl")
    assert [rec["step"] for rec in records] == list(range(1, 13))
    assert sum(rec["comm_s"] for rec in records[1:]) < 0.3
    # and steps' walls cover all the time between them: nothing (such as a gather
    # measured after the step) falls outside every step
    between = records[-1]["elapsed_s"] - records[1]["elapsed_s"]
    # (the old per-step gather left 11 x 0.3 s out; max over ranks blurs a little)
    assert abs(between - sum(rec["wall_s"] for rec in records[2:])) < 1.0
    ctrl = sum(rec["bytes_by_kind"]["ctrl"] for rec in records)
    assert ctrl > 0  # the gather did cross the link, in the background
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bytes_sent_total"] == sum(rec["bytes_sent"] for rec in records)
