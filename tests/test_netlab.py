"""The network lab: namespaces, veth, bridge, tc shaping, and tear-down.

Tests that create namespaces need root and iproute2; they are skipped with the reason
``available()`` gives otherwise. Each throughput measurement moves a few MB (< 2 s)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from farflung.comm.link import LinkMatrix
from farflung.comm.netlab import (
    NS_PATTERN,
    Lab,
    available,
    housekeeping,
    list_labs,
    measure_pairs,
    measure_throughput,
    netlab_down,
)
from farflung.comm.netlab import lab as lab_module

OK, WHY = available()
needs_lab = pytest.mark.skipif(not OK, reason=f"network lab unavailable: {WHY}")
TOLERANCE = 0.15


def _ours_elsewhere(name: str) -> bool:
    """A namespace of a lab that another live process owns (a concurrent test run)."""
    m = NS_PATTERN.match(name)
    return bool(m) and m.group(1) not in lab_module._LIVE and housekeeping.owner_alive(m.group(1))


def snapshot() -> tuple[frozenset[str], frozenset[str]]:
    """Namespaces (minus other live labs) and the links of the namespace we run in."""
    ns = frozenset(n for n in housekeeping.list_netns() if not _ours_elsewhere(n))
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    links = frozenset(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())
    return ns, links


def with_prefix(prefix: str) -> list[str]:
    return [n for n in housekeeping.list_netns() if n.startswith(prefix)]


# ---- no root needed -------------------------------------------------------------------------


def test_available_gives_a_reason():
    ok, why = available()
    assert isinstance(ok, bool) and isinstance(why, str) and why


def test_available_explains_what_is_missing(monkeypatch):
    probe = available.__wrapped__  # the uncached check
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert probe() == (False, "the network lab needs root (ip netns, tc); run as root")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(housekeeping.shutil, "which", lambda tool: None)
    ok, why = probe()
    assert not ok and "'ip' (iproute2) not found" in why


def test_names_addresses_and_tc_plan():
    m = LinkMatrix([[0, "20mbit", "80mbit"], ["20mbit", 0, None], ["80mbit", None, 0]])
    lab = Lab(m, prefix="ffl00beef")
    assert lab.shaping == "htb" and not lab.is_up
    assert lab.netns(2) == "ffl00beefh2" == lab.iface(2) and len(lab.iface(2)) <= 15
    assert lab.bridge_netns == "ffl00beefbr"
    assert lab.exec_prefix(1) == ["ip", "netns", "exec", "ffl00beefh1"]
    k = int("00beef", 16) % 254 + 1
    assert lab.address(0) == f"10.213.{k}.1" and lab.subnet == f"10.213.{k}.0/24"
    env = lab.env(1)
    assert env["GLOO_SOCKET_IFNAME"] == "ffl00beefh1" and env["FARFLUNG_NETLAB_HOST"] == "1"
    tc0 = lab.tc_commands(0)
    assert tc0[0] == "qdisc add dev ffl00beefh0 root handle 1: htb"
    assert any("classid 1:2 htb rate 20000000bit ceil 20000000bit" in c for c in tc0)
    assert any(f"match ip dst 10.213.{k}.3/32 flowid 1:3" in c for c in tc0)
    assert len(lab.tc_commands(1)) == 3  # only the shaped pair 1 -> 0 gets a class
    # a host with a 20 mbit link sends plain frames; an 80 mbit one cuts GSO packets
    assert lab._gso_commands(0) == ["link set dev ffl00beefh0 gso_max_segs 1"]
    assert lab._gso_commands(2) == ["link set dev ffl00beefh2 gso_max_size 20000"]
    assert lab.link_model().transfer_time(0, 1, 2_500_000) == pytest.approx(1.0)
    uni = Lab(LinkMatrix.uniform(3, "50mbit"))
    assert uni.shaping == "tbf" and "tbf rate 50000000bit" in uni.tc_commands(0)[0]
    assert Lab(LinkMatrix.uniform(3, "50mbit"), shaping="htb").shaping == "htb"
    assert Lab(LinkMatrix.uniform(2, "unlimited")).tc_commands(0) == []
    with pytest.raises(IndexError):
        lab.netns(3)
    with pytest.raises(ValueError, match="prefix"):
        Lab(m, prefix="lab1")
    with pytest.raises(ValueError, match="tbf"):
        Lab(m, shaping="tbf")
    with pytest.raises(ValueError, match="at most 254"):
        Lab(LinkMatrix.uniform(255, "1gbit"))


# ---- root needed -----------------------------------------------------------------------------


@needs_lab
def test_up_down_leaves_nothing_behind():
    before = snapshot()
    with Lab(LinkMatrix.uniform(3, "50mbit")) as lab:
        assert sorted(with_prefix(lab.prefix)) == sorted(
            [lab.bridge_netns] + [lab.netns(i) for i in range(3)]
        )
        out = subprocess.run(
            [*lab.exec_prefix(1), "ip", "-o", "addr", "show", "dev", lab.iface(1)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"{lab.address(1)}/24" in out
        assert lab.iface(1) not in snapshot()[1]  # nothing appears where we run
        assert measure_throughput(lab, 2, 1, 100_000).complete  # hosts reach each other
        assert os.path.exists(lab.env(0)["FARFLUNG_NETLAB_MATRIX"])
    assert not with_prefix(lab.prefix)
    assert snapshot() == before
    assert not os.path.exists(lab.env(0)["FARFLUNG_NETLAB_MATRIX"])


@needs_lab
def test_exception_inside_with_tears_down():
    before = snapshot()
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(LinkMatrix.uniform(2, "10mbit")) as lab:
            proc = lab.run(0, ["sleep", "30"])
            raise RuntimeError("boom")
    assert proc.poll() is not None  # processes the lab started are stopped
    assert not with_prefix(lab.prefix)
    assert snapshot() == before


@needs_lab
def test_detach_and_attach():
    before = snapshot()
    lab = Lab(LinkMatrix([[0, "30mbit"], ["10mbit", 0]]), shaping="htb").up()
    try:
        prefix = lab.detach()
        assert prefix not in lab_module._LIVE  # no longer torn down at exit
        mine = [x for x in list_labs() if x["prefix"] == prefix]
        assert mine and mine[0]["hosts"] == 2 and mine[0]["owner_alive"]
        assert not [n for n in netlab_down() if n.startswith(prefix)]  # owner alive
        again = Lab.attach(prefix)
        assert again.is_up and again.matrix == lab.matrix and again.shaping == "htb"
        assert again.address(1) == lab.address(1)
        assert measure_throughput(again, 1, 0, 100_000).complete
        again.down()
        assert not with_prefix(prefix)
        with pytest.raises(housekeeping.NetlabError, match="no lab"):
            Lab.attach(prefix)
    finally:
        lab.down()
    assert snapshot() == before


_CREATOR = textwrap.dedent(
    """
    import time
    from farflung.comm.link import LinkMatrix
    from farflung.comm.netlab import Lab
    lab = Lab(LinkMatrix.uniform(2, "10mbit")).up()
    print(lab.prefix, flush=True)
    time.sleep(60)
    """
)


def _start_creator() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CREATOR], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    if not ready:
        proc.kill()
        pytest.fail("the lab creator process did not report its prefix")
    prefix = proc.stdout.readline().strip()
    if not prefix:
        proc.wait()
        pytest.fail(f"lab creator failed: {proc.stderr.read()}")
    return proc, prefix


@needs_lab
def test_sigkill_then_netlab_down_removes_leftovers():
    before = snapshot()
    proc, prefix = _start_creator()
    try:
        assert len(with_prefix(prefix)) == 3
        with Lab(LinkMatrix.uniform(2, "10mbit")) as live:
            # the owner is alive: netlab_down leaves its lab (and ours) alone
            assert not [n for n in netlab_down() if n.startswith((prefix, live.prefix))]
            assert len(with_prefix(prefix)) == 3
            proc.send_signal(signal.SIGKILL)
            deadline = time.monotonic() + 10
            while housekeeping.start_time(proc.pid) is not None:  # dead, not yet reaped
                assert time.monotonic() < deadline, "the killed process did not die"
                time.sleep(0.01)
            assert len(with_prefix(prefix)) == 3  # no chance to clean up
            removed = netlab_down()  # a zombie owner counts as gone
            proc.wait(timeout=10)
            assert sorted(prefix + s for s in ("br", "h0", "h1")) == sorted(
                n for n in removed if n.startswith(prefix)
            )
            assert not with_prefix(prefix)
            assert len(with_prefix(live.prefix)) == 3  # a live lab survives
        assert snapshot() == before
        assert not (housekeeping.STATE_DIR / f"{prefix}.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@needs_lab
def test_sigterm_tears_down():
    before = snapshot()
    proc, prefix = _start_creator()
    try:
        assert len(with_prefix(prefix)) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM
        assert not with_prefix(prefix)
        assert snapshot() == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@needs_lab
def test_uniform_rate_is_shaped():
    rate = 50e6
    with Lab(LinkMatrix.uniform(2, "50mbit")) as lab:
        assert lab.shaping == "tbf"
        r = measure_throughput(lab, 0, 1, nbytes=6_000_000, timeout=5)  # ~1 s
    assert r.complete
    assert r.bits_per_s == pytest.approx(rate, rel=TOLERANCE)


@needs_lab
def test_per_pair_rates_differ_as_configured():
    m = LinkMatrix(
        [[0, "20mbit", "80mbit"], ["20mbit", 0, "unlimited"], ["80mbit", "unlimited", 0]]
    )
    with Lab(m) as lab:
        assert lab.shaping == "htb"
        # both at once: each destination class keeps its own rate (~1.3 s each)
        slow, fast = measure_pairs(lab, [(0, 1), (0, 2)], nbytes=3_000_000, timeout=5)
        slow_alone = measure_throughput(lab, 0, 1, nbytes=3_000_000, timeout=5)
        fast_alone = measure_throughput(lab, 0, 2, nbytes=12_000_000, timeout=5)
        # host 2's slowest link is 80mbit, so it keeps GSO: its unlimited pair runs free
        free = measure_throughput(lab, 2, 1, nbytes=50_000_000, timeout=5)
    for r, rate in ((slow, 20e6), (slow_alone, 20e6), (fast_alone, 80e6)):
        assert r.complete
        assert r.bits_per_s == pytest.approx(rate, rel=TOLERANCE), r
    assert fast.bits_per_s > 2.5 * slow.bits_per_s
    assert free.complete and free.bits_per_s > 500e6  # an unlimited pair is not shaped


@needs_lab
def test_throughput_tool_stops_by_itself():
    with Lab(LinkMatrix.uniform(2, "1mbit")) as lab:
        t0 = time.monotonic()
        r = measure_throughput(lab, 0, 1, nbytes=50_000_000, timeout=1.0)  # would need 400 s
        assert time.monotonic() - t0 < 8
    assert not r.complete and 0 < r.bytes < 50_000_000


_GLOO_WORKER = textwrap.dedent(
    """
    import sys, time, torch, torch.distributed as dist
    rank, master = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://{master}:29500", rank=rank, world_size=2)
    x = torch.full((1_000_000,), float(rank + 1))  # 4 MB
    dist.all_reduce(x)  # warm-up connections
    t0 = time.monotonic()
    dist.all_reduce(x)
    print(x[0].item(), time.monotonic() - t0, flush=True)
    dist.destroy_process_group()
    """
)


@needs_lab
def test_gloo_runs_over_the_shaped_links():
    with Lab(LinkMatrix.uniform(2, "100mbit")) as lab:
        procs = [
            lab.run(
                i,
                [sys.executable, "-c", _GLOO_WORKER, str(i), lab.address(0)],
                env={**os.environ, **lab.env(i)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        value, seconds = map(float, out.split())
        assert value == 6.0  # (1 + 2), then summed again: 3 + 3
        # ring all-reduce of 4 MB on 2 ranks sends 4 MB per rank: ~0.33 s at 100mbit
        assert 0.25 < seconds < 1.5
