"""Training and probing through the network lab: workers in namespaces behind tc.

Needs root, `ip` and `tc`; skipped with the reason otherwise (the in-process link
model, tested in test_emulation.py, is what runs then)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from procs import end_run, processes_of
from tiny_runs import farflung, train_tiny

from farflung.netlab import available
from farflung.netlab.link import LinkMatrix
from farflung.train.metrics import read_jsonl

OK, REASON = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"network lab unavailable: {REASON}")


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_training_crosses_the_shaped_link(tiny):  # noqa: F811
    before = namespaces()
    out = tiny / "netlab_run"
    try:
        r = train_tiny(tiny, out, "--netlab", "20mbit,5ms", "--set", "train.steps=6", "--quiet")
    finally:
        end_run(out)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert "netlab" in summary["network"]
    for rec in read_jsonl(out / "metrics.jsonl"):
        # each rank's share of the all-reduce cannot cross a 20 Mbit/s link faster
        per_rank = rec["bytes_by_kind"]["dp"] / 2
        assert rec["comm_s"] >= 8 * per_rank / 20e6
    assert namespaces() == before  # torn down


def test_probe_in_the_lab_recovers_the_configured_link(tiny):  # noqa: F811
    out = tiny / "probed.json"
    try:
        r = farflung("probe", "--workers", "2", "--netlab", "40mbit,10ms", "--out", str(out))
    finally:
        end_run(out)  # its workers are told --out OUT
    assert r.returncode == 0, r.stderr
    m = LinkMatrix.from_file(out)
    for i, j in m.pairs():
        assert m.bandwidth(i, j) == pytest.approx(40e6, rel=0.15)
        assert m.delay(i, j) == pytest.approx(0.010, abs=0.003)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_run_tears_the_lab_down(tiny, sig):  # noqa: F811
    """Ctrl+C or SIGTERM during `train --netlab` stops the workers and removes the lab."""
    before = namespaces()
    out = tiny / f"interrupted_{sig.name}"
    cmd = [sys.executable, "-m", "farflung.cli.main", "train", str(tiny / "tiny.toml")]
    cmd += ["--workers", "2", "--out", str(out), "--netlab", "5mbit", "--quiet"]
    cli = subprocess.Popen(cmd + ["--set", "train.steps=100000"], stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().strip()):  # training is under way
            assert cli.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        assert len(namespaces() - before) == 3  # two hosts and the bridge
        cli.send_signal(sig)
        _, err = cli.communicate(timeout=60)
        assert cli.returncode != 0
        assert "interrupted" in err
        assert namespaces() == before
        assert processes_of(out) == []  # no worker left running
    finally:
        end_run(out, cli)


def test_netlab_cli_up_status_down(tiny):  # noqa: F811
    before = namespaces()
    up = farflung("netlab", "up", "10mbit,5ms", "--hosts", "3", "--seconds", "0.5")
    assert up.returncode == 0, up.stderr
    assert up.stdout.count("ip netns exec") == 3 and "torn down" in up.stdout
    assert namespaces() == before
    status = farflung("netlab", "status")
    assert status.returncode == 0
    bad = farflung("netlab", "up", "10 parsecs")
    assert bad.returncode == 2 and "10 parsecs" in bad.stderr
