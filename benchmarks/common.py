"""What the benchmark scripts share: one `farflung train` run and its records."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(
    config: str,
    workers: int,
    steps: int,
    out: Path,
    overrides: Sequence[str] = (),
    extra_args: Sequence[str] = (),
) -> tuple[list[dict], dict]:
    """Run ``farflung train`` (no periodic eval or checkpoints, one eval at the end);
    return its metrics records and summary."""
    cmd = [
        sys.executable,
        "-m",
        "farflung.cli.main",
        "train",
        config,
        "--workers",
        str(workers),
        "--out",
        str(out),
        "--quiet",
        "--force",
        "--set",
        f"train.steps={steps}",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.checkpoint_every=0",
        "--set",
        "train.eval_batches=1",
        *extra_args,
    ]
    for item in overrides:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True, cwd=ROOT)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads((out / "summary.json").read_text())
