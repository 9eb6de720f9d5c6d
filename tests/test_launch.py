"""The local launcher and torchrun both run the same worker entry."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
from test_faults import kill_all, wait_until_training, worker_pids
from tiny_runs import losses


def test_ctrl_c_stops_every_worker(tiny):  # noqa: F811
    out = tiny / "interrupted"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "farflung.cli.main",
            "train",
            str(tiny / "tiny.toml"),
            "--workers",
            "2",
            "--out",
            str(out),
            "--quiet",
            "--set",
            "train.steps=100000",
            "--set",
            "train.checkpoint_every=0",
            "--set",
            "train.eval_every=0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (out / "metrics.jsonl").exists(), "training never started"
    children = worker_pids(proc).values()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in err
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


def test_torchrun_runs_the_same_worker(tiny, run_a):  # noqa: F811
    out = tiny / "torchrun"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run(
        [
            torchrun,
            "--nnodes=1",
            "--nproc-per-node=2",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=127.0.0.1:0",
            "-m",
            "farflung.train",
            str(tiny / "tiny.toml"),
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    assert losses(out) == losses(run_a)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_torchrun_worker_names_a_frozen_peer(tiny):  # noqa: F811
    """Under torchrun (whose agent hosts the store) the worker's own line names the
    frozen rank within the timeout; torchrun's shutdown afterwards is its own."""
    timeout_s = 5  # as tests/test_faults.py's FAULT_TIMEOUT_S (why 5 is safe: there)
    out = tiny / "torchrun_frozen"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
           "--rdzv-endpoint=127.0.0.1:0", "-m", "farflung.train", str(tiny / "tiny.toml"),
           "--out", str(out), "--quiet"]  # fmt: skip
    for item in ("train.steps=100000", "train.eval_every=0", "train.checkpoint_every=25",
                 f"parallel.timeout_s={timeout_s}"):  # fmt: skip
        cmd += ["--set", item]
    agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in agent.stderr], daemon=True).start()
    pids: dict[int, int] = {}
    try:
        wait_until_training(agent, out)
        pids = worker_pids(agent)
        os.kill(pids[1], signal.SIGSTOP)
        frozen = time.monotonic()
        seen = []
        while time.monotonic() - frozen < timeout_s + 20:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            if "rank 1 stopped responding" in seen[-1]:
                break
        took = time.monotonic() - frozen
        assert "rank 1 stopped responding" in seen[-1], "".join(seen)[-3000:]
        assert seen[-1].startswith("farflung: rank 0: rank 1 stopped responding (no heartbeat")
        assert timeout_s - 2 <= took <= timeout_s + 10, f"named {took:.1f} s after the freeze"
    finally:
        kill_all(agent, pids, out)
