"""Training and probing through the network lab: workers in namespaces behind tc.

Needs root, `ip` and `tc`; skipped with the reason otherwise (the in-process link
model, tested in test_emulation.py, is what runs then)."""

from __future__ import annotations

import json
import subprocess

import pytest
from test_train_cli import farflung, tiny  # noqa: F401  (fixture)

from farflung.comm.link import LinkMatrix
from farflung.comm.netlab import available
from farflung.train.metrics import read_jsonl

OK, REASON = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"network lab unavailable: {REASON}")


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_training_crosses_the_shaped_link(tiny):  # noqa: F811
    before = namespaces()
    out = tiny / "netlab_run"
    r = farflung(
        "train",
        str(tiny / "tiny.toml"),
        "--workers",
        "2",
        "--out",
        str(out),
        "--netlab",
        "20mbit,5ms",
        "--set",
        "train.steps=6",
        "--quiet",
    )
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
    r = farflung("probe", "--workers", "2", "--netlab", "40mbit,10ms", "--out", str(out))
    assert r.returncode == 0, r.stderr
    m = LinkMatrix.from_file(out)
    for i, j in m.pairs():
        assert m.bandwidth(i, j) == pytest.approx(40e6, rel=0.15)
        assert m.delay(i, j) == pytest.approx(0.010, abs=0.003)
