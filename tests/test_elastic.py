"""Elastic runs with real faults: a worker SIGKILLed or SIGSTOPped mid-run, the run
goes on, every step committed once with exactly its global batch, and replaying the
membership log gives the same model bit for bit."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from test_train_cli import farflung, tiny  # noqa: F401  (fixture)

from farflung.config import load_config
from farflung.data import SampleSet, ShardIndex, TokenStream
from farflung.train.elastic_run import check_samples
from farflung.train.metrics import read_jsonl

STEPS = 16


def elastic_run(tiny: Path, out: Path, *sets: str, env: dict | None = None, replay: Path | None = None):  # noqa: F811
    args = ["train", str(tiny / "tiny.toml"), "--workers", "3", "--out", str(out), "--quiet"]
    args += ["--set", "elastic.enabled=true", "--set", "elastic.heartbeat_s=1.5"]
    args += ["--set", "train.batch_size=12", "--set", f"train.steps={STEPS}"]
    args += ["--set", "train.checkpoint_every=0", "--set", "train.eval_every=8"]
    for s in sets:
        args += ["--set", s]
    if replay is not None:
        args += ["--replay", str(replay)]
    return farflung(*args, env=env, timeout=240)


def model_digest(run: Path) -> str:
    (path,) = sorted(run.glob("checkpoints/step_*/model.safetensors"))[-1:]
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_run(run: Path) -> list[dict]:
    """What every elastic run must hold; returns its membership events."""
    cfg = load_config(run / "config.toml")
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["tokens"] == STEPS * 12 * cfg.model.context
    assert summary["elastic"]["hash_disagreements"] == 0
    n = len(SampleSet(TokenStream(ShardIndex.load(cfg.data.dir), "train"), cfg.model.context))
    assert check_samples(run / "samples.jsonl", cfg, n) == []
    return read_jsonl(run / "events.jsonl")


@pytest.mark.parametrize(
    ("algorithm", "sig", "sets"),
    [
        ("allreduce", "SIGKILL", ()),
        ("cocktail", "SIGSTOP", ()),
        ("diloco", "SIGKILL", ("parallel.local_steps=4",)),
    ],
)
def test_fault_then_replay_is_bit_identical(tiny, tmp_path, algorithm, sig, sets):  # noqa: F811
    step = random.Random().randint(3, STEPS - 4)
    sets = (f"parallel.algorithm={algorithm}", *sets)
    faulted = tmp_path / "faulted"
    r = elastic_run(tiny, faulted, *sets, env={"FARFLUNG_FAULTS": f"1:{step}:{sig}"})
    assert r.returncode == 0, f"fault at step {step}: {r.stderr}"
    events = check_run(faulted)
    left = [e for e in events if e["event"] == "left"]
    assert [(e["id"], e["why"]) for e in left] == [(1, "crash" if sig == "SIGKILL" else "silent")]
    assert left[0]["committed"] < step  # the step in flight was redone, not skipped
    reference = tmp_path / "reference"
    r = elastic_run(tiny, reference, *sets, replay=faulted / "events.jsonl")
    assert r.returncode == 0, r.stderr
    replayed = check_run(reference)
    key = [(e["event"], e["id"], e["committed"], e["members"]) for e in events]
    assert [(e["event"], e["id"], e["committed"], e["members"]) for e in replayed] == key
    assert model_digest(faulted) == model_digest(reference)
