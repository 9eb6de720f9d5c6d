"""Elastic runs in the network lab: cut links (`ip link set ... down`), partitions,
and nothing left behind."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import pytest
from procs import end_run
from test_elastic import STEPS, check_run, elastic_run, workers_of

from farflung.netlab import available
from farflung.netlab.housekeeping import owner_alive

OK, REASON = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"network lab unavailable: {REASON}")


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize(
    ("cut", "majority"),
    [((3,), True), ((2, 3), False)],
    ids=["3+1", "2+2"],
)
def test_partition_commits_on_the_majority_side_only(tiny, tmp_path, cut, majority):  # noqa: F811
    """Four workers; the links of ``cut`` go down for 4 s (twice the heartbeat bound)
    at step 6. With a majority left (3+1) the run goes on without the cut worker; with
    none (2+2) nothing is committed until the links are back. Either way the cut
    workers come back as joiners, and the run ends exact, with no process, namespace
    or port left."""
    before = namespaces()
    out = tmp_path / "run"
    faults = ",".join(f"{w}:6:LINKFLAP4" for w in cut)
    hold = None
    if majority:  # the run waits at step 10 until the cut worker is back (a replayed join)
        hold = tmp_path / "hold.jsonl"
        hold.write_text(json.dumps({"event": "joined", "id": 4, "committed": 10}) + "\n")
    sets = ("elastic.heartbeat_s=2", "train.batch_size=12")
    env = {"FARFLUNG_FAULTS": faults}
    try:
        r = elastic_run(tiny, out, *sets, workers=4, netlab="40mbit", env=env, replay=hold)
    finally:  # a timeout leaves no worker behind (their launcher was killed)
        left_behind = end_run(out)
    assert r.returncode == 0, r.stderr
    assert left_behind == []
    events = check_run(out)
    left = [e for e in events if e["event"] == "left"]
    joined = [e for e in events if e["event"] == "joined"]
    assert sorted(e["id"] for e in left) == sorted(cut)
    assert all(e["why"] == "silent" for e in left)
    assert len(joined) == len(cut)
    cut_at = max(e["committed"] for e in left)
    back_at = min(e["committed"] for e in joined)
    if majority:  # the three went on while the fourth was away
        assert back_at == 10 > cut_at
    else:  # no side had a majority: nothing was committed in between
        assert back_at == cut_at
    assert not workers_of(out)
    # none of its namespaces is left: a lab that appeared meanwhile and is still up
    # belongs to a live owner (another run on this machine), never to this finished one
    assert not {n for n in namespaces() - before if not owner_alive(n[:9])}
    address = json.loads((out / "coordinator.json").read_text())["address"]
    assert_closed_or_reused(int(address.rsplit(":", 1)[1]), out)
    assert STEPS == json.loads((out / "summary.json").read_text())["steps"]


def assert_closed_or_reused(port: int, out) -> None:
    """The run's coordinator no longer listens on ``port``: nothing accepts there, or
    what does is another live process that took the freed port (the suite runs two
    test processes at once), never one of this run's."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return
    found = subprocess.run(
        ["ss", "-H", "-ltnp", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    owners = [int(p) for p in re.findall(r"pid=(\d+)", found)]
    assert owners, f"port {port} accepts, but no process listens there:\n{found}"
    for pid in owners:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert str(out) not in argv, f"port {port} is still this run's: {argv}"
