"""The tiny training setup many test modules share: ``farflung`` as a subprocess, a
tiny prepared corpus with its config (:func:`write_tiny`), and ``farflung train`` on
it. The corpus and one uninterrupted 2-worker run are session fixtures in
tests/conftest.py (``tiny``, ``run_a``): a test that damages a run copies it first,
and every test names its own run folder under ``tiny``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from procs import end_run

from farflung.data import prepare
from farflung.train.metrics import read_jsonl


def farflung(*args: str, env: dict | None = None, timeout: float = 180):
    """``farflung ARGS`` as its own process: for runs that launch workers (what needs
    no process of its own runs in-process, with :func:`cli.run_cli`)."""
    return subprocess.run(
        [sys.executable, "-m", "farflung.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def train_tiny(tiny: Path, out: Path, *args: str, workers: int = 2, env: dict | None = None):
    """``farflung train`` on the tiny config; whatever the run leaves (a launcher killed
    by the timeout leaves its workers) is ended before this returns."""
    cfg = str(tiny / "tiny.toml")
    try:
        return farflung("train", cfg, "--workers", str(workers), "--out", str(out), *args, env=env)
    finally:
        end_run(out)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]


def write_tiny(root: Path) -> Path:
    """A tiny prepared corpus in ``root`` and ``root/tiny.toml``, a config that trains
    on it in seconds (12 steps, checkpoints at 4, 8 and 12)."""
    words = (
        "the quick brown fox jumps over lazy dogs while seven wizards quietly "
        "judge boxing matches near old river banks"
    ).split()
    for i in range(40):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(300))
        (root / "corpus").mkdir(exist_ok=True)
        (root / "corpus" / f"doc{i:02d}.txt").write_text(text + ".\n")
    prepare(
        [str(root / "corpus")],
        root / "data",
        vocab_size=300,
        val_fraction=0.1,
        shard_tokens=2048,
        seed=0,
        progress=False,
    )
    (root / "tiny.toml").write_text(f"""
[model]
n_layer = 2
n_head = 2
d_model = 32
context = 16
[data]
dir = "{root / "data"}"
[optim]
lr = 3e-3
warmup_steps = 2
[train]
steps = 12
batch_size = 8
micro_batch_size = 2
eval_every = 4
eval_batches = 2
checkpoint_every = 4
keep_checkpoints = 2
threads = 1
""")
    return root


def selected(request: pytest.FixtureRequest, fixture: str, param: str) -> list[str]:
    """The values of ``param`` in the selected tests of the requesting module that use
    ``fixture``: what a module-scoped pool of runs has to start (and nothing more)."""
    return sorted(
        {
            item.callspec.params[param]
            for item in request.session.items
            if item.module is request.module
            and fixture in item.fixturenames
            and param in getattr(getattr(item, "callspec", None), "params", {})
        }
    )
