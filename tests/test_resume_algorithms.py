"""Exact resume from checkpoint files for the algorithms whose ranks hold different
weights (cocktail, diloco, gossip), through the CLI with real worker processes.

Each run is compared with an uninterrupted run of the same config: a rank is killed
at step 6 (after the step-4 checkpoint), the run is resumed with ``--resume``, and
every per-step loss and the final validation loss must come out bit for bit the same.
What makes this hard is the state that lives outside the model: cocktail's global
model, its in-flight sync (with shared moments) and its server error buffers; diloco's
global model and
outer momentum between outer steps (``local_steps=3``, so the step-4 checkpoint lies
inside an outer round); gossip's public copies of itself and its neighbour. cocktail
runs in fp16 with an overflow at step 2 (the loss scale the checkpoint holds is
halved), diloco in bf16, gossip in fp32.

The runs are independent of each other except a resume of its own cut run, and each
spends most of its time starting processes, so the module starts them all at once in
a small thread pool (only the algorithms the selected tests name).
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

# the tiny corpus and CLI helpers are shared with the CLI tests; importing the fixture
# into this module's namespace is how pytest shares a fixture without a conftest entry
from tiny_runs import selected, train_tiny

from farflung.train.metrics import read_jsonl

STEPS, EVERY, FAIL_STEP = 10, 4, 6
OVERFLOW = "0:2:HUGE"  # rank 0's fp16 gradients overflow at step 2 (fp32, bf16: no effect)

ALGORITHMS = {
    # defaults: overlap on, so the step-4 checkpoint holds an in-flight sync result;
    # no warm-up, so the server error buffers are non-zero when it is written; moments
    # shared every 2 steps, so that result carries them and the checkpoint holds the
    # moments they were taken from
    "cocktail": ("--set", "parallel.moment_sync_every=2", "--set", "train.precision=fp16"),
    # outer steps at 3, 6, 9: the checkpoint at 4 falls between two of them
    "diloco": (
        "--set",
        "parallel.local_steps=3",
        "--set",
        "parallel.codec=cocktail",
        "--set",
        "train.precision=bf16",
    ),
    # a lossy codec, so the public copies x̂ differ from the models they track
    "gossip": (
        "--set",
        "parallel.codec=topk:ratio=0.3+quantize:bits=4",
        "--set",
        "parallel.gossip_gamma=0.5",
    ),
}


def _args(name: str) -> tuple[str, ...]:
    return (
        "--quiet",
        "--set",
        f"parallel.algorithm={name}",
        "--set",
        f"train.steps={STEPS}",
        "--set",
        f"train.checkpoint_every={EVERY}",
        "--set",
        f"train.eval_every={EVERY}",
        *ALGORITHMS[name],
    )


def _losses_by_step(run: Path) -> dict[int, float]:
    # telemetry may be written every few steps and out of order: key on `step`
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl")}


def _final_val(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["final_val_loss"]


Procs = tuple[subprocess.CompletedProcess, subprocess.CompletedProcess, int]


def _cut_and_resume(tiny: Path, name: str) -> Procs:  # noqa: F811
    """The run killed at ``FAIL_STEP``, the last step it logged, and its resume."""
    cut = tiny / f"{name}_cut"
    env = {"FARFLUNG_FAULTS": f"{OVERFLOW},1:{FAIL_STEP + 1}:EXIT"}
    killed = train_tiny(tiny, cut, *_args(name), env=env)
    logged = max(_losses_by_step(cut), default=0)
    return killed, train_tiny(tiny, cut, *_args(name), "--resume"), logged


@pytest.fixture(scope="module")
def runs(tiny, request) -> dict[str, tuple[Future, Future]]:  # noqa: F811
    """Per algorithm: the uninterrupted run, and the cut run with its resume."""
    wanted = selected(request, "runs", "name")
    with ThreadPoolExecutor(3) as pool:
        yield {
            name: (
                pool.submit(
                    train_tiny,
                    tiny,
                    tiny / f"{name}_whole",
                    *_args(name),
                    env={"FARFLUNG_FAULTS": OVERFLOW},
                ),
                pool.submit(_cut_and_resume, tiny, name),
            )
            for name in wanted
        }


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_resume_from_checkpoint_files_is_exact(tiny, runs, name):  # noqa: F811
    whole, cut = tiny / f"{name}_whole", tiny / f"{name}_cut"
    r = runs[name][0].result()
    assert r.returncode == 0, r.stderr
    expected = _losses_by_step(whole)
    assert sorted(expected) == list(range(1, STEPS + 1))

    killed, r, logged = runs[name][1].result()
    assert killed.returncode != 0
    assert logged <= FAIL_STEP

    assert r.returncode == 0, r.stderr
    # it really resumed from the step-4 checkpoint (a restart from scratch would match
    # the uninterrupted run trivially)
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["steps_this_run"] == STEPS - EVERY
    got = _losses_by_step(cut)
    assert sorted(got) == list(range(1, STEPS + 1))
    diffs = {s: (got[s], expected[s]) for s in expected if got[s] != expected[s]}
    assert not diffs, f"{name}: per-step losses differ after resume: {diffs}"
    assert _final_val(cut) == _final_val(whole)
    # fp16's loss scale came back with the checkpoint: halved once, good steps counted on
    scale = json.loads((whole / "summary.json").read_text())["loss_scale"]
    assert summary["loss_scale"] == scale
    if "train.precision=fp16" in ALGORITHMS[name]:
        assert scale == {"scale": 2.0**15, "good_steps": STEPS - 2, "overflows": 1}
