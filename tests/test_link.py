"""Link specifications: unit parsing, matrices, DT-FM scenarios, files, the in-process
link model."""

from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pytest

from farflung.netlab.link import (
    SCENARIOS,
    LinkMatrix,
    LinkModel,
    format_bandwidth,
    format_delay,
    parse_bandwidth,
    parse_delay,
)

# ---- units ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("100mbit", 100e6),
        ("1gbit", 1e9),
        ("1Gbit", 1e9),
        ("500kbit", 500e3),
        ("3.125gbit", 3.125e9),
        ("500Mbps", 500e6),
        ("1.25Gbps", 1.25e9),
        ("100 mbit", 100e6),
        ("  20mbit ", 20e6),
        ("64bit", 64.0),
        ("10Mbit/s", 10e6),
        ("12.5MB/s", 100e6),
        ("1MBps", 8e6),
        ("2Mibit", 2 * 2**20),
        ("1e9bit", 1e9),
        ("unlimited", math.inf),
        ("inf", math.inf),
        (250e6, 250e6),
        (10, 10.0),
        (math.inf, math.inf),
    ],
)
def test_parse_bandwidth(text, bps):
    assert parse_bandwidth(text) == pytest.approx(bps)


@pytest.mark.parametrize(
    "text", ["", "fast", "100", "mbit", "-5mbit", "0mbit", "10xbit", "100mbyte", "1,5gbit"]
)
def test_parse_bandwidth_rejects_with_clear_message(text):
    with pytest.raises(ValueError) as e:
        parse_bandwidth(text)
    msg = str(e.value)
    assert repr(text) in msg  # names the bad text
    assert "100mbit" in msg or "> 0" in msg  # and what is allowed


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), True, None, [1]])
def test_parse_bandwidth_rejects_bad_numbers(value):
    with pytest.raises(ValueError, match="bad bandwidth"):
        parse_bandwidth(value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("20ms", 0.02),
        ("0.1s", 0.1),
        ("500us", 0.0005),
        ("250 ms", 0.25),
        ("1sec", 1.0),
        ("0", 0.0),
        ("0ms", 0.0),
        (0.05, 0.05),
        (0, 0.0),
    ],
)
def test_parse_delay(text, seconds):
    assert parse_delay(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "20", "-5ms", "20 minutes", "ms", "5mbit"])
def test_parse_delay_rejects_with_clear_message(text):
    with pytest.raises(ValueError) as e:
        parse_delay(text)
    assert repr(text) in str(e.value)
    assert "20ms" in str(e.value)


@pytest.mark.parametrize("value", [-0.1, math.inf, float("nan"), False])
def test_parse_delay_rejects_bad_numbers(value):
    with pytest.raises(ValueError, match="bad delay"):
        parse_delay(value)


@pytest.mark.parametrize("bps", [64.0, 1.5e3, 100e6, 3.125e9, 2e12, math.inf])
def test_format_bandwidth_round_trips(bps):
    assert parse_bandwidth(format_bandwidth(bps)) == pytest.approx(bps)


@pytest.mark.parametrize("s", [0.0, 0.0005, 0.02, 0.238, 1.5])
def test_format_delay_round_trips(s):
    assert parse_delay(format_delay(s)) == pytest.approx(s)


# ---- matrices ---------------------------------------------------------------------------


def test_uniform():
    m = LinkMatrix.uniform(4, "100mbit", "20ms")
    assert m.n == 4 and m.hosts == ["h0", "h1", "h2", "h3"]
    for i, j in m.pairs():
        assert m.bandwidth(i, j) == 100e6 and m.delay(i, j) == pytest.approx(0.02)
    for i in range(4):  # diagonal ignored: stored as unshaped, no delay
        assert m.bandwidth(i, i) == math.inf and m.delay(i, i) == 0.0
    assert m.is_uniform() and m.is_symmetric()
    assert m.describe() == "4 hosts, bandwidth 100mbit, delay 20ms"
    assert LinkMatrix.uniform(1, "1gbit").describe() == "1 host"


def test_uniform_rejects_bad_n():
    for n in (0, -1, 2.5):
        with pytest.raises(ValueError, match="number of hosts"):
            LinkMatrix.uniform(n, "1gbit")


def test_matrix_validation_names_the_entry():
    with pytest.raises(ValueError, match="square"):
        LinkMatrix([[0, 1e6], [1e6]])
    with pytest.raises(ValueError, match="2 rows"):
        LinkMatrix([[0, 1e6], [1e6, 0]], delay_s=[[0, 0]])
    with pytest.raises(ValueError, match=r"bandwidth_bps\[0\]\[1\]"):
        LinkMatrix([[0, 0], [1e6, 0]])
    with pytest.raises(ValueError, match=r"delay_s\[1\]\[0\]"):
        LinkMatrix([[0, 1e6], [1e6, 0]], delay_s=[[0, 0], [-1, 0]])
    with pytest.raises(ValueError, match=r"bandwidth_bps\[1\]\[0\].*fast"):
        LinkMatrix([[0, 1e6], ["fast", 0]])
    with pytest.raises(ValueError, match="hosts"):
        LinkMatrix([[0, 1e6], [1e6, 0]], hosts=["a"])
    with pytest.raises(ValueError, match="distinct"):
        LinkMatrix([[0, 1e6], [1e6, 0]], hosts=["a", "a"])
    with pytest.raises(ValueError, match="at least one"):
        LinkMatrix([])


def test_matrix_accepts_units_numpy_and_ignores_diagonal():
    m = LinkMatrix(
        [["whatever", "20mbit"], [None, 0]], [[-5, "10ms"], ["0.1s", None]], hosts=["a", "b"]
    )
    assert m.bandwidth_bps == [[math.inf, 20e6], [math.inf, math.inf]]
    assert m.delay_s == [[0.0, 0.01], [0.1, 0.0]]
    assert not m.is_symmetric() and not m.is_uniform()
    a = np.full((3, 3), 1e8)
    assert LinkMatrix(a, np.zeros((3, 3))) == LinkMatrix.uniform(3, "100mbit")


# ---- scenarios --------------------------------------------------------------------------


def _groups(m: LinkMatrix) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, r in enumerate(m.regions):
        out.setdefault(r, []).append(i)
    return out


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("n", [1, 2, 3, 8, 13, 64])
def test_scenarios_are_valid_and_symmetric(name, n):
    m = LinkMatrix.scenario(name, n)
    assert m.n == n and len(m.regions) == n
    assert m.is_symmetric()
    for i, j in m.pairs():
        assert 0 < m.bandwidth(i, j) < math.inf and 0 <= m.delay(i, j) < 0.3
        same = m.regions[i] == m.regions[j]
        other = [k for k in range(n) if k != i]
        if same and other:  # a host's own group is at least as fast as anything else
            assert m.bandwidth(i, j) >= max(m.bandwidth(i, k) for k in other)


def test_scenario_datacenter_within_vs_across():
    m = LinkMatrix.scenario("datacenter", 16)  # 8 machines x 2 hosts
    assert [len(v) for v in _groups(m).values()] == [2] * 8
    assert m.bandwidth(0, 1) == 100e9 and m.delay(0, 1) == 0
    assert m.bandwidth(0, 2) == 3.125e9 and m.delay(0, 2) == 0
    assert len(set(LinkMatrix.scenario("datacenter", 8).regions)) == 8  # one per machine


def test_scenario_spot_keeps_proportions():
    m = LinkMatrix.scenario("spot", 64)
    sizes = [len(v) for v in _groups(m).values()]
    assert sizes == [4] * 8 + [1] * 32
    assert m.bandwidth(0, 3) == 100e9 and m.bandwidth(0, 4) == 1.25e9
    assert m.bandwidth(40, 41) == 1.25e9


def test_scenario_multi_university():
    m = LinkMatrix.scenario("multi-university", 4)
    assert m.regions == ["Ohio", "Ohio", "Virginia", "Virginia"]
    # DS3Lab/DT-FM scheduler/generate_sim_com_matrices.py gives round-trip ms; the
    # matrix holds one-way delay, half of it
    # Ohio–Ohio (within a site): 5 Gbps, 1 ms RTT
    assert (m.bandwidth(0, 1), m.delay(0, 1)) == (5e9, pytest.approx(0.0005))
    # Ohio–Virginia: 1.12 Gbps, 11 ms RTT
    assert (m.bandwidth(0, 2), m.delay(0, 2)) == (1.12e9, pytest.approx(0.0055))


def test_scenario_regional_figures_and_scaling():
    m = LinkMatrix.scenario("regional", 8)
    assert m.regions == ["Virginia"] * 2 + ["Oregon"] * 2 + ["California"] * 2 + ["Ohio"] * 2
    # within a region: 2 Gbps, 10 ms RTT (DS3Lab/DT-FM generate_sim_com_matrices.py)
    assert (m.bandwidth(0, 1), m.delay(0, 1)) == (2e9, pytest.approx(0.005))
    expect = {  # (Gbps, round-trip ms) from DS3Lab/DT-FM generate_sim_com_matrices.py
        (0, 2): (1.15, 67),  # Virginia–Oregon
        (0, 4): (1.05, 59),  # Virginia–California
        (0, 6): (1.12, 11),  # Virginia–Ohio
        (2, 4): (1.25, 12),  # Oregon–California
        (2, 6): (1.10, 49),  # Oregon–Ohio
        (4, 6): (1.02, 52),  # California–Ohio
    }
    for (i, j), (gbps, rtt_ms) in expect.items():
        assert m.bandwidth(i, j) == pytest.approx(gbps * 1e9)
        assert m.delay(i, j) == pytest.approx(rtt_ms / 2 * 1e-3)  # one-way = RTT / 2
    for n in (4, 12, 64):
        assert [len(v) for v in _groups(LinkMatrix.scenario("regional", n)).values()] == [
            n // 4
        ] * 4
    # fewer hosts than regions: one host each in the first regions
    assert LinkMatrix.scenario("regional", 3).regions == ["Virginia", "Oregon", "California"]
    # uneven: largest remainder, earlier regions first
    assert [len(v) for v in _groups(LinkMatrix.scenario("regional", 6)).values()] == [2, 2, 1, 1]


def test_scenario_world():
    m = LinkMatrix.scenario("world", 8)  # one host per region
    idx = {r: i for i, r in enumerate(m.regions)}
    assert len(idx) == 8
    expect = {  # (Gbps, round-trip ms) from DS3Lab/DT-FM generate_sim_com_matrices.py
        ("Oregon", "Virginia"): (0.79, 67),  # Oregon–Virginia
        ("Virginia", "Ohio"): (1.12, 11),  # Virginia–Ohio
        ("Seoul", "London"): (0.342, 238),  # Seoul–London
        ("Oregon", "Tokyo"): (0.523, 96),  # Oregon–Tokyo
        ("Virginia", "London"): (1.16, 76),  # Virginia–London
        ("Tokyo", "Seoul"): (1.10, 34),  # Tokyo–Seoul
        ("Seoul", "Ireland"): (0.335, 228),  # Seoul–Ireland
        ("Frankfurt", "Ireland"): (1.08, 24),  # Frankfurt–Ireland
    }
    for (a, b), (gbps, rtt_ms) in expect.items():
        for i, j in ((idx[a], idx[b]), (idx[b], idx[a])):
            assert m.bandwidth(i, j) == pytest.approx(gbps * 1e9)
            assert m.delay(i, j) == pytest.approx(rtt_ms / 2 * 1e-3)  # one-way = RTT / 2
    for i, j in m.pairs():  # every pair within the repository's range for these regions
        assert 0.335e9 <= m.bandwidth(i, j) <= 1.16e9
        assert 0.0055 - 1e-12 <= m.delay(i, j) <= 0.119 + 1e-12  # 11..238 ms RTT
    m16 = LinkMatrix.scenario("world", 16)
    # within a region: 2 Gbps, 10 ms RTT
    assert m16.bandwidth(0, 1) == 2e9 and m16.delay(0, 1) == pytest.approx(0.005)


def test_scenario_names_and_errors():
    assert LinkMatrix.scenario("world-wide", 4) == LinkMatrix.scenario("world", 4)
    assert LinkMatrix.scenario("Multi_University", 4) == LinkMatrix.scenario("multi-university", 4)
    assert LinkMatrix.scenario("data-centre", 4) == LinkMatrix.scenario("datacenter", 4)
    with pytest.raises(ValueError, match="unknown scenario 'moon'.*regional"):
        LinkMatrix.scenario("moon", 4)
    with pytest.raises(ValueError, match="number of hosts"):
        LinkMatrix.scenario("world", 0)
    assert "Virginia" in LinkMatrix.scenario_title("regional")


# ---- specs and files --------------------------------------------------------------------


def test_from_spec(tmp_path):
    assert LinkMatrix.from_spec("regional", 8) == LinkMatrix.scenario("regional", 8)
    assert LinkMatrix.from_spec("100mbit", 3) == LinkMatrix.uniform(3, "100mbit")
    u = LinkMatrix.uniform(3, "100mbit", "20ms")
    assert LinkMatrix.from_spec("100mbit,20ms", 3) == u
    assert LinkMatrix.from_spec("100mbit 20ms", 3) == u
    assert LinkMatrix.from_spec("delay=20ms, bandwidth=100mbit", 3) == u
    assert LinkMatrix.from_spec("12.5MB/s,20ms", 3) == u
    path = u.to_file(tmp_path / "m.json")
    assert LinkMatrix.from_spec(str(path)) == u
    assert LinkMatrix.from_spec(str(path), 3) == u
    with pytest.raises(ValueError, match="3 hosts but 4"):
        LinkMatrix.from_spec(str(path), 4)
    with pytest.raises(ValueError, match="needs the number of hosts"):
        LinkMatrix.from_spec("100mbit")
    with pytest.raises(ValueError, match="needs the number of hosts"):
        LinkMatrix.from_spec("world")
    with pytest.raises(ValueError, match="bad bandwidth 'fast'"):
        LinkMatrix.from_spec("fast", 2)
    with pytest.raises(ValueError, match="unknown key 'jitter'"):
        LinkMatrix.from_spec("100mbit,jitter=5ms", 2)
    with pytest.raises(ValueError, match="not found"):
        LinkMatrix.from_spec(str(tmp_path / "missing.json"), 2)


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_file_round_trip(tmp_path, suffix):
    m = LinkMatrix.scenario("world", 5)
    m.bandwidth_bps[0][1] = math.inf  # an unshaped pair survives the trip
    path = m.to_file(tmp_path / f"links{suffix}")
    back = LinkMatrix.from_file(path)
    assert back == m
    assert back.bandwidth_bps[0][1] == math.inf
    if suffix == ".json":
        raw = json.loads(path.read_text())
        assert set(raw) == {"hosts", "bandwidth_bps", "delay_s", "regions"}
        assert raw["bandwidth_bps"][0][1] == "unlimited"


def test_file_with_units_and_nulls(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(
        json.dumps(
            {
                "hosts": ["a", "b", "c"],
                "bandwidth_bps": [
                    [None, "20mbit", "80mbit"],
                    ["20mbit", None, None],
                    [8e7, 1e9, 0],
                ],
                "delay_s": [[0, "5ms", "50ms"], ["5ms", 0, 0], ["50ms", 0, 0]],
            }
        )
    )
    m = LinkMatrix.from_file(p)
    assert m.hosts == ["a", "b", "c"] and m.regions is None
    assert m.bandwidth(0, 1) == 20e6 and m.bandwidth(1, 2) == math.inf
    assert m.delay(0, 2) == pytest.approx(0.05)
    t = tmp_path / "m.toml"
    t.write_text(
        'bandwidth_bps = [[0, "1gbit"], ["1gbit", 0]]\ndelay_s = [[0, "1ms"], ["1ms", 0]]\n'
    )
    assert LinkMatrix.from_file(t) == LinkMatrix.uniform(2, "1gbit", "1ms")


def test_file_errors(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        LinkMatrix.from_file(p)
    p.write_text(json.dumps({"delay_s": [[0]]}))
    with pytest.raises(ValueError, match="needs 'bandwidth_bps'"):
        LinkMatrix.from_file(p)
    p.write_text(json.dumps({"bandwidth_bps": [[0]], "jitter": 1}))
    with pytest.raises(ValueError, match="unknown keys.*jitter"):
        LinkMatrix.from_file(p)
    p.write_text(json.dumps({"bandwidth_bps": [[0, "1gbit"], ["1 gigabit", 0]]}))
    with pytest.raises(ValueError, match=r"bad\.json: bandwidth_bps\[1\]\[0\]"):
        LinkMatrix.from_file(p)


# ---- the in-process link model -------------------------------------------------------------


def test_transfer_time_formula():
    m = LinkMatrix([[0, 100e6, math.inf], [1e9, 0, 1e6], [1e6, 1e6, 0]])
    m.delay_s[0][1], m.delay_s[1][0] = 0.02, 0.005
    lm = LinkModel(m)
    assert lm.transfer_time(0, 1, 1_000_000) == pytest.approx(0.02 + 8e6 / 100e6)
    assert lm.transfer_time(1, 0, 1_000_000) == pytest.approx(0.005 + 8e6 / 1e9)
    assert lm.transfer_time(0, 2, 10**12) == 0.0  # unlimited, no delay
    assert lm.transfer_time(1, 1, 10**9) == 0.0  # to itself
    assert lm.transfer_time(0, 1, 0) == pytest.approx(0.02)  # delay alone
    for i, j in itertools.permutations(range(3), 2):
        a, b = lm.transfer_time(i, j, 1000), lm.transfer_time(i, j, 2000)
        assert b >= a
    with pytest.raises(ValueError, match="nbytes"):
        lm.transfer_time(0, 1, -1)


def test_wait_for_with_a_fake_clock():
    now = [100.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s - 0.1 if len(slept) == 1 else s  # wakes early once: must sleep again

    lm = LinkModel(LinkMatrix.uniform(2, "8mbit", "10ms"), clock=lambda: now[0], sleep=sleep)
    # 1 MB at 8 mbit = 1 s + 10 ms; 0.4 s already spent on the real transfer
    now[0] = 100.4
    got = lm.wait_for(0, 1, 1_000_000, started_at=100.0)
    assert now[0] == pytest.approx(101.01, abs=1e-3)
    assert got == pytest.approx(0.61, abs=1e-3) and len(slept) == 2
    assert lm.wait_for(0, 1, 1_000_000, started_at=99.0) == 0.0  # already late: no sleep


def test_wait_for_sleeps_the_right_time():
    """Real sleeps: at least the modelled 50 ms from the start, only what is left of
    it, and not much more (bounds that hold however loaded the machine is, except for
    a generous allowance for waking late)."""
    lm = LinkModel(LinkMatrix.uniform(2, "8mbit", "20ms"))
    nbytes = 30_000  # 30 ms of transfer + 20 ms delay = 50 ms
    for already in (0.0, 0.030):  # time the real transfer already took counts toward it
        t0 = time.monotonic()
        time.sleep(already)
        before = time.monotonic()
        slept = lm.wait_for(0, 1, nbytes, started_at=t0)
        after = time.monotonic()
        left = max(0.0, 0.050 - (before - t0))  # of the 50 ms when it was called
        assert after - t0 >= 0.050
        assert 0.050 - (after - t0) <= slept <= after - before  # the seconds it slept
        assert after - before <= left + 0.5


def test_a_hosts_links_are_queues():
    lm = LinkModel(LinkMatrix.uniform(3, "8mbit", "10ms"))  # 1 MB = 1 s on the wire
    # two messages launched together out of host 0 leave one after the other
    assert lm.egress(0, 1, 1_000_000, not_before=5.0) == pytest.approx(6.0)
    assert lm.egress(0, 2, 1_000_000, not_before=5.0) == pytest.approx(7.0)
    # the same holds for messages coming into one host, whatever their sources
    assert lm.ingress(1, 2, 500_000, not_before=5.0) == pytest.approx(5.5)
    assert lm.ingress(0, 2, 500_000, not_before=5.0) == pytest.approx(6.0)
    # other hosts' links, and host 0's ingress, are not held up by host 0's egress
    assert lm.egress(1, 0, 1_000_000, not_before=5.0) == pytest.approx(6.0)
    assert lm.ingress(2, 0, 1_000_000, not_before=5.0) == pytest.approx(6.0)
    # a message launched after the queue has drained starts at its launch
    assert lm.egress(0, 1, 1_000_000, not_before=20.0) == pytest.approx(21.0)


def test_unlimited_pairs_bypass_the_queue():
    m = LinkMatrix([[0, 8e6, math.inf], [8e6, 0, 8e6], [8e6, 8e6, 0]])
    lm = LinkModel(m)
    assert lm.egress(0, 1, 1_000_000, not_before=0.0) == pytest.approx(1.0)
    assert lm.egress(0, 2, 10**9, not_before=0.5) == 0.5  # unshaped: no wait, no hold
    assert lm.egress(0, 1, 1_000_000, not_before=0.5) == pytest.approx(2.0)
    assert lm.serialization_time(0, 2, 10**9) == 0.0
    assert lm.serialization_time(1, 1, 10**9) == 0.0
