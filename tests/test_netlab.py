"""The network lab: namespaces, veth, bridge, tc shaping, and tear-down.

Tests that create namespaces need root and iproute2; they are skipped with the reason
``available()`` gives otherwise. Each throughput measurement moves a few MB (< 2 s)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from farflung.netlab import (
    NS_PATTERN,
    Lab,
    available,
    housekeeping,
    list_labs,
    measure_duplex,
    measure_pairs,
    measure_throughput,
    netlab_down,
)
from farflung.netlab import lab as lab_module
from farflung.netlab.link import LinkMatrix

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
    # only the shaped pair 1 -> 0 gets a class, and under it a scheduler (qdisc 2:)
    # that sends pure ACKs (class 2:1) ahead of the rest (2:2, the default)
    tc1 = lab.tc_commands(1)
    assert tc1[:4] == [
        "qdisc add dev ffl00beefh1 root handle 1: htb",
        "class add dev ffl00beefh1 parent 1: classid 1:1 htb rate 20000000bit "
        "ceil 20000000bit burst 3028 cburst 3028 quantum 3028",
        f"filter add dev ffl00beefh1 parent 1: protocol ip prio 1 u32 "
        f"match ip dst 10.213.{k}.1/32 flowid 1:1",
        "qdisc add dev ffl00beefh1 parent 1:1 handle 2: htb default 2",
    ]
    assert "classid 2:1 htb" in tc1[4] and "prio 0" in tc1[4]
    assert "classid 2:2 htb" in tc1[5] and "prio 1" in tc1[5]
    # pure ACK: IPv4 without options, TCP, no payload (total length 20 + TCP header
    # length, one rule per header length), flags ACK without PSH/SYN/FIN/RST/URG
    acks = [c for c in tc1 if c.endswith("flowid 2:1")]
    assert len(acks) == 11 == len(tc1) - 6
    assert acks[3] == (
        "filter add dev ffl00beefh1 parent 2: protocol ip prio 1 u32 match ip protocol 6 0xff "
        "match u8 0x05 0x0f at 0 match u16 52 0xffff at 2 match u8 0x80 0xf0 at 32 "
        "match u8 0x10 0x3f at 33 flowid 2:1"
    )
    assert lab._gso_commands(0) == ["link set dev ffl00beefh0 gso_max_segs 1"]
    assert lab._gso_commands(2) == ["link set dev ffl00beefh2 gso_max_size 20000"]
    assert lab.link_model().transfer_time(0, 1, 2_500_000) == pytest.approx(1.0)
    uni = Lab(LinkMatrix.uniform(3, "50mbit"))
    tbf = uni.tc_commands(0)
    assert uni.shaping == "tbf" and "root handle 1: tbf rate 50000000bit burst 6250" in tbf[0]
    assert "parent 1:1 handle 10: htb default 2" in tbf[1]
    matches = [c.split(" u32 ")[1].split(" flowid ")[0] for c in acks]
    assert [c.split(" u32 ")[1] for c in tbf[4:15]] == [f"{m} flowid 10:1" for m in matches]
    assert tbf[15].endswith("parent 10:2 bfifo limit 318750")  # 50 ms at the rate + bucket
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
    from farflung.netlab.link import LinkMatrix
    from farflung.netlab import Lab
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


def _ack_stats(lab: Lab, i: int, cls: str) -> tuple[int, int]:
    """Bytes and packets host i sent through tc class ``cls``."""
    out = subprocess.run(
        [*lab.exec_prefix(i), "tc", "-s", "class", "show", "dev", lab.iface(i)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()
    for k, line in enumerate(lines):
        if line.startswith(f"class htb {cls} "):
            words = lines[k + 1].split()  # " Sent 1234 bytes 56 pkt ..."
            return int(words[1]), int(words[3])
    raise AssertionError(f"no class {cls} on host {i}:\n{out}")


@needs_lab
@pytest.mark.parametrize("shaping", ["tbf", "htb"])
def test_both_directions_at_once_keep_the_rate(shaping):
    """Two hosts sending to each other at once, over one TCP connection (as gloo does)
    and over two: each direction keeps >= 0.85 of the rate. Each direction's ACKs
    leave through the other direction's shaped egress, but ahead of its data (behind
    it, in a 50 ms FIFO, single transfers dipped to 0.66-0.72 here). The ACK path
    really carried the ACKs: many packets, each under 128 bytes."""
    rate, nbytes = 50e6, 4_000_000  # ~0.7 s each way
    with Lab(LinkMatrix.uniform(2, "50mbit"), shaping=shaping) as lab:
        results = []
        for _ in range(2):  # a second try only after a bad one: the 2-core host is shared
            one = measure_duplex(lab, 0, 1, nbytes, timeout=8)
            two = measure_pairs(lab, [(0, 1), (1, 0)], nbytes, timeout=8)
            results.append((*one, *two))
            if min(r.bits_per_s for r in results[-1]) >= 0.85 * rate:
                break
        # host 0's ACK class: under tbf, or under its htb class for host 1
        ack_bytes, ack_packets = _ack_stats(lab, 0, "10:1" if shaping == "tbf" else "3:1")
    for r in (r for tries in results for r in tries):
        assert r.complete, r
    best = max(results, key=lambda tries: min(r.bits_per_s for r in tries))
    assert min(r.bits_per_s for r in best) >= 0.85 * rate, best
    # host 0 received 2 x nbytes; even stretch ACKs (one per 64 KiB, as GRO and delayed
    # ACKs make on a loaded host; 497 were counted once) number over nbytes / 32 KiB,
    # where ACKs that bypass this class count none
    assert ack_packets > 2 * nbytes // 65536 and ack_bytes < 128 * ack_packets


_BOTH_WAYS = textwrap.dedent(
    """
    import json, sys, time
    from datetime import timedelta
    import torch, torch.distributed as dist
    from farflung.comm import Comm

    rank, master = int(sys.argv[1]), sys.argv[2]
    nbytes, skew = int(sys.argv[3]), float(sys.argv[4])
    peer = 1 - rank
    dist.init_process_group(
        "gloo", init_method=f"tcp://{master}:29500", rank=rank, world_size=2,
        timeout=timedelta(seconds=60),
    )
    comm = Comm()
    u8 = torch.uint8
    mine, theirs = torch.full((nbytes,), rank, dtype=u8), torch.empty(nbytes, dtype=u8)
    both, got = torch.full((2 * nbytes,), rank, dtype=u8), torch.empty(2 * nbytes, dtype=u8)

    def wait(*works):
        for w in works:
            w.wait()

    modes = {
        "recv_first": lambda: wait(dist.irecv(theirs, peer), dist.isend(mine, peer)),
        "send_first": lambda: wait(dist.isend(mine, peer), dist.irecv(theirs, peer)),
        "exchange": lambda: comm.exchange({peer: mine}, {peer: theirs}, "t"),
        "all_to_all": lambda: comm.all_to_all(got, both, "t"),
    }
    seconds = {}
    for name, fn in modes.items():
        seconds[name] = []
        for _ in range(2):
            dist.barrier()
            if rank == 1:
                time.sleep(skew)  # rank 1 is the late one, by design
            t0 = time.monotonic()
            fn()
            seconds[name].append(time.monotonic() - t0)
    assert int(theirs[0]) == peer and int(got[peer * nbytes]) == peer
    print(json.dumps(seconds), flush=True)
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def both_ways_seconds() -> dict[str, float]:
    """Seconds the late rank spent in each way of moving 3 MB each way over 50 mbit
    with gloo (best of two), rank 1 starting 0.1 s after rank 0."""
    if not OK:
        pytest.skip(f"network lab unavailable: {WHY}")
    with Lab(LinkMatrix.uniform(2, "50mbit")) as lab:
        procs = [
            lab.run(
                i,
                [sys.executable, "-c", _BOTH_WAYS, str(i), lab.address(0), "3000000", "0.1"],
                env={**os.environ, **lab.env(i)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        outs = [p.communicate(timeout=90) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return {mode: min(ts) for mode, ts in json.loads(outs[1][0]).items()}


BOTH_WAYS_RATE = 0.8 * 50e6


@needs_lab
def test_gloo_moves_both_ways_at_once_when_receives_are_posted_first(both_ways_seconds):
    """With its receive posted before its send, each rank announces "ready to receive"
    before its own payload, and both directions share the link's time."""
    assert 8 * 3_000_000 / both_ways_seconds["recv_first"] >= BOTH_WAYS_RATE, both_ways_seconds


@needs_lab
def test_gloo_send_before_receive_serialises_the_directions(both_ways_seconds):
    """Why gloo's all-to-all ran at half rate (issue 8, item 5): gloo sends a payload
    only once the peer has said it is ready to receive, and that notice travels in
    the same TCP stream as the data. A late rank that posts its send first finds the
    peer ready, sends all of its payload, and only then says it is ready itself: the
    directions take turns. Not the lab's doing; any link shows it."""
    t = both_ways_seconds
    assert t["send_first"] >= 1.6 * t["recv_first"], t


@needs_lab
@pytest.mark.parametrize("mode", ["exchange", "all_to_all"])
def test_comm_moves_both_ways_at_once(both_ways_seconds, mode):
    assert 8 * 3_000_000 / both_ways_seconds[mode] >= BOTH_WAYS_RATE, both_ways_seconds
