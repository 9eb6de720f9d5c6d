"""NaN/Inf during training: found on every rank at the same step, never applied.

Real 2-worker runs; ``FARFLUNG_FAULTS=RANK:STEP:NAN`` makes that rank's loss (and so its
gradients) NaN at that step."""

from __future__ import annotations

import pytest
import torch
from procs import end_run
from safetensors.torch import load_file
from tiny_runs import train_tiny

from farflung.train.metrics import read_jsonl

NAN_RANK1_STEP5 = {"FARFLUNG_FAULTS": "1:5:NAN"}
STEPS = 8  # steps 6-8 show the run going on after the skipped step 5
ALGORITHMS = {
    "allreduce": [],
    "compressed": ["--set", "parallel.algorithm=compressed"],
    "cocktail": ["--set", "parallel.algorithm=cocktail"],
    "diloco": ["--set", "parallel.algorithm=diloco", "--set", "parallel.local_steps=2"],
}


def weights_finite(run) -> bool:
    for ckpt in (run / "checkpoints").iterdir():
        for t in load_file(str(ckpt / "model.safetensors")).values():
            if not torch.isfinite(t).all():
                return False
    return True


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_skip_mode_drops_the_update_and_goes_on(tiny, algorithm):  # noqa: F811
    out = tiny / f"nan_skip_{algorithm}"
    args = ["--quiet", "--set", f"train.steps={STEPS}", *ALGORITHMS[algorithm]]
    try:
        r = train_tiny(tiny, out, *args, env=NAN_RANK1_STEP5)
    finally:
        end_run(out)
    assert r.returncode == 0, r.stderr
    assert "rank(s) [1]" in r.stderr  # rank 0 names the rank at fault
    records = {rec["step"]: rec for rec in read_jsonl(out / "metrics.jsonl")}
    assert sorted(records) == list(range(1, STEPS + 1))
    # gradient-averaging methods drop the step everywhere; local-step ones only on rank 1
    assert records[5]["skipped_ranks"] == (2 if algorithm in ("allreduce", "compressed") else 1)
    assert all(records[s]["skipped_ranks"] == 0 for s in records if s != 5)
    assert records[STEPS]["loss"] is not None and records[STEPS]["loss"] < records[1]["loss"]
    assert weights_finite(out)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_stop_mode_stops_every_rank_naming_step_and_rank(tiny, algorithm):  # noqa: F811
    out = tiny / f"nan_stop_{algorithm}"
    args = ["--quiet", "--set", "train.on_nonfinite=stop", *ALGORITHMS[algorithm]]
    try:
        r = train_tiny(tiny, out, *args, env=NAN_RANK1_STEP5)
    finally:
        end_run(out)
    assert r.returncode == 4, r.stderr
    assert "non-finite loss or gradients from rank(s) [1] at step" in r.stderr
    # a sync-every-step method knows at step 5; cocktail and diloco at their next sync
    step = int(r.stderr.split("at step ")[1].split(";")[0])
    assert step == {"allreduce": 5, "compressed": 5, "cocktail": 6, "diloco": 6}[algorithm]
    assert "Traceback" not in r.stderr
    assert weights_finite(out)  # the step-4 checkpoint, nothing after it
