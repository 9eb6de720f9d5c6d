"""A network lab on one Linux machine: one network namespace per host, joined by veth
pairs to a Linux bridge in a namespace of its own, with ``tc`` shaping each host's
egress to the rates of a :class:`~farflung.netlab.link.LinkMatrix`.

Safety rules this module keeps:

- everything it creates lives in namespaces it created; nothing is ever created,
  changed or shaped in the namespace it was started from (veth pairs are created
  inside the bridge namespace with their peer placed straight into the host
  namespace);
- every name carries a per-run prefix ``ffl<6 hex>`` (:data:`PREFIX_PATTERN`):
  namespaces ``<prefix>br`` (bridge) and ``<prefix>h<i>`` (hosts); interfaces
  ``<prefix>h<i>`` (in host i) and ``<prefix>p<i>`` / ``<prefix>br`` (in the bridge
  namespace);
- addresses come from 10.213.<k>.0/24, which exists only inside the lab;
- tear-down runs on ``with`` exit (also after an exception), at interpreter exit
  (atexit) and on SIGTERM; :func:`netlab_down` removes what crashed runs left behind
  (names matching the pattern whose owning process is gone) and nothing else.

One-way delay is not emulated here: this kernel has no ``netem``. The lab keeps the
delay matrix (:meth:`Lab.link_model`, and the file named by ``FARFLUNG_NETLAB_MATRIX``
in :meth:`Lab.env`) so the comm layer can sleep the delay in-process."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from farflung.netlab.housekeeping import (
    NS_PATTERN,
    PREFIX_PATTERN,
    STATE_DIR,
    NetlabError,
    available,
    delete_netns,
    list_netns,
    remove_state,
    run_batch,
    run_cmd,
    write_owner,
)
from farflung.netlab.link import LinkMatrix, LinkModel

__all__ = ["MAX_HOSTS", "Lab"]

MAX_HOSTS = 254
SHAPINGS = ("auto", "tbf", "htb")

# tc buckets, chosen by measurement (docs/netlab.md). Up to ~250 mbit: 1 ms of traffic,
# at least two full frames; that keeps steady goodput within ~1% of the wire rate and
# lets little through above the rate at the start of a transfer (a 32 KiB bucket made
# 50 ms transfers at 20 mbit look 27% fast; this one 2%). Faster: 2 ms, at least
# 96 KiB (buckets of 40-70 KiB lost 5-10% of goodput at 400-550 mbit).
_SMALL_BURST = (2 * 1514, 0.001)
_LARGE_BURST = (96 * 1024, 0.002)
_SMALL_BURST_MAX = 32 * 1024
_QUEUE_SECONDS = 0.050  # tbf's queue: 50 ms at the rate
_QUEUE_LATENCY = f"{round(_QUEUE_SECONDS * 1000)}ms"
# Pure TCP ACKs leave ahead of the data queued to the same destination, within the
# rate. A host sending to a peer while receiving from it holds the ACKs of the
# incoming stream in its egress queue; behind up to 50 ms of its own data, each
# direction ran at 0.83-0.95 of the configured rate (medians), with dips to 0.66;
# ACKs first, at 0.93-0.96 (docs/netlab.md). A pure ACK is an IPv4 packet without
# options carrying a TCP segment with no payload (total length = 20 + the TCP header
# length: one rule per header length) and flags ACK without PSH/SYN/FIN/RST/URG. Data
# must never take that path: matching "shorter than 128 bytes" let small data segments
# overtake queued data, arrive out of order and be retransmitted. ACKs sent unshaped
# (htb's direct queue) caused retransmissions too (a direction at 0.78 in 4 of 10
# runs), so they stay under the rate limit.
_PURE_ACK_MATCHES = [
    f"match ip protocol 6 0xff match u8 0x05 0x0f at 0 match u16 {20 + 4 * doff} 0xffff at 2 "
    f"match u8 {doff << 4:#04x} 0xf0 at 32 match u8 0x10 0x3f at 33"
    for doff in range(5, 16)
]
# The priority scheduler under each rate limit (tbf's, or an htb destination class)
# is an htb that never throttles (kernels without the prio/ets qdiscs, like this one,
# have htb): two classes far above the rate and with large buckets, prio 0 for ACKs,
# prio 1 (the default) for everything else.
_PRIO_HEADROOM = 10
_PRIO_QUANTUM = 65536
_PRIO_BURST = 4 * 65536  # a few GSO packets: the scheduler itself must never hold one
# A 64 KiB GSO super-packet takes 26 ms at 20 mbit; htb charges it as one unit, which
# made goodput swing by +-15% at 1-2 mbit. Hosts with a link this slow or slower send
# plain MTU-sized packets instead (gso_max_segs 1), which caps that host's fastest
# links at a few hundred Mbit/s of CPU-bound throughput.
_NO_GSO_BELOW_BPS = 20e6
# Above that, htb still lets one whole GSO packet out ahead of the rate (made 50 ms
# transfers at 50 mbit look 15% fast): GSO packets on htb hosts are cut to 2 ms of
# the host's slowest rate, at least 16 KiB (this costs CPU: with 16 KiB a host's
# unshaped links top out near 2 Gbit/s, smaller sizes cap them lower).
# tbf cuts GSO packets to its bucket by itself.
_GSO_SECONDS = 0.002
_GSO_MIN = 16 * 1024
_GSO_MAX = 65536


# ---- tear-down on exit and SIGTERM ---------------------------------------------------------

_LIVE: dict[str, Lab] = {}
_LIVE_LOCK = threading.Lock()
_PREV_SIGTERM: Any = None
_SIGTERM_INSTALLED = False


def _down_all() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE.values())
    for lab in labs:
        if lab._owner_pid == os.getpid():  # never from a forked child
            try:
                lab.down()
            except Exception:  # best effort while exiting
                pass


def _on_sigterm(signum: int, frame: Any) -> None:
    prev = _PREV_SIGTERM
    if callable(prev):
        # the program's own handler (the CLI's raises KeyboardInterrupt): it unwinds,
        # stopping what runs in the lab before the lab's `with` (or exit) takes it
        # down. Taking it down first would cut live workers' links, and a worker
        # blocked on a vanished link only ends at SIGKILL, seconds later.
        prev(signum, frame)
        return
    _down_all()
    if prev != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_sigterm() -> None:
    global _PREV_SIGTERM, _SIGTERM_INSTALLED
    if _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    _PREV_SIGTERM = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _SIGTERM_INSTALLED = True


atexit.register(_down_all)


# ---- the lab ---------------------------------------------------------------------------------


def _burst_bytes(rate_bps: float) -> int:
    floor, seconds = _SMALL_BURST
    burst = max(floor, int(rate_bps / 8 * seconds))
    if burst >= _SMALL_BURST_MAX:
        floor, seconds = _LARGE_BURST
        burst = max(floor, int(rate_bps / 8 * seconds))
    return burst


def _acks_first(dev: str, parent: str, major: int, rate: float) -> list[str]:
    """``tc`` lines for a strict-priority scheduler under ``parent`` (qdisc handle
    ``major``): class ``major:1`` for pure ACKs, ``major:2`` (the default) for the rest.
    Its classes never throttle; the rate limit above decides when anything leaves."""
    h, fast = f"{major:x}", int(rate * _PRIO_HEADROOM)
    lines = [f"qdisc add dev {dev} parent {parent} handle {h}: htb default 2"]
    lines += [
        f"class add dev {dev} parent {h}: classid {h}:{k} htb rate {fast}bit ceil {fast}bit "
        f"burst {_PRIO_BURST} cburst {_PRIO_BURST} prio {k - 1} quantum {_PRIO_QUANTUM}"
        for k in (1, 2)
    ]
    lines += [
        f"filter add dev {dev} parent {h}: protocol ip prio 1 u32 {m} flowid {h}:1"
        for m in _PURE_ACK_MATCHES
    ]
    return lines


class Lab:
    """Hosts in network namespaces with shaped links, as a context manager::

        with Lab(LinkMatrix.uniform(2, "100mbit")) as lab:
            p = lab.run(1, ["python", "server.py", lab.address(1)])
            lab.run(0, ["python", "client.py", lab.address(1)]).wait()

    ``shaping``: ``"auto"`` uses ``tbf`` when every pair has the same rate (each host's
    egress, shared by all its destinations, like a machine's uplink) and ``htb`` with
    one class per destination otherwise (each pair gets its own rate, independent of
    the host's other pairs). ``"htb"`` forces per-pair classes for a uniform matrix;
    ``"tbf"`` needs each host's rates to all destinations to be equal. Unlimited
    (``inf``) pairs are not shaped."""

    def __init__(self, matrix: LinkMatrix, prefix: str | None = None, *, shaping: str = "auto"):
        if not isinstance(matrix, LinkMatrix):
            raise TypeError(f"Lab needs a LinkMatrix, got {type(matrix).__name__}")
        if matrix.n > MAX_HOSTS:
            raise ValueError(f"the lab holds at most {MAX_HOSTS} hosts, got {matrix.n}")
        if prefix is None:
            prefix = f"ffl{secrets.token_hex(3)}"
        if not PREFIX_PATTERN.match(prefix):
            raise ValueError(
                f"prefix must look like 'ffl' + 6 lower-case hex digits, got {prefix!r}"
            )
        if shaping not in SHAPINGS:
            raise ValueError(f"shaping must be one of {SHAPINGS}, got {shaping!r}")
        self.matrix = matrix
        self.prefix = prefix
        self.shaping = self._choose_shaping(shaping)
        self._subnet_octet = int(prefix[3:], 16) % MAX_HOSTS + 1
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._owner_pid = os.getpid()
        self._up = False

    def _choose_shaping(self, requested: str) -> str:
        m = self.matrix
        finite = [
            m.bandwidth_bps[i][j] for i, j in m.pairs() if not math.isinf(m.bandwidth_bps[i][j])
        ]
        if not finite:
            return "none"
        if requested == "auto":
            rates = {m.bandwidth_bps[i][j] for i, j in m.pairs()}
            return "tbf" if len(rates) == 1 else "htb"
        if requested == "tbf":
            for i in range(m.n):
                row = {m.bandwidth_bps[i][j] for j in range(m.n) if j != i}
                if len(row) > 1:
                    raise ValueError(
                        f"shaping='tbf' shapes a host's whole egress at one rate, but host {i} "
                        "has different rates to different hosts; use 'htb' or 'auto'"
                    )
        return requested

    # ---- names ----------------------------------------------------------------------------

    @property
    def n(self) -> int:
        return self.matrix.n

    @property
    def bridge_netns(self) -> str:
        return f"{self.prefix}br"

    @property
    def subnet(self) -> str:
        return f"10.213.{self._subnet_octet}.0/24"

    def _check(self, i: int) -> int:
        if not isinstance(i, int) or not 0 <= i < self.n:
            raise IndexError(f"host index {i!r} out of range (the lab has {self.n} hosts)")
        return i

    def netns(self, i: int) -> str:
        """Name of host i's network namespace."""
        return f"{self.prefix}h{self._check(i)}"

    def iface(self, i: int) -> str:
        """Name of host i's interface inside its namespace (for ``GLOO_SOCKET_IFNAME``)."""
        return f"{self.prefix}h{self._check(i)}"

    def _port(self, i: int) -> str:
        return f"{self.prefix}p{i}"

    def address(self, i: int) -> str:
        """Host i's IPv4 address (reachable from the other lab hosts only)."""
        return f"10.213.{self._subnet_octet}.{self._check(i) + 1}"

    @property
    def hub_address(self) -> str:
        """The bridge's own address, in the bridge namespace: a service there (an
        elastic run's coordinator) reaches every host through that host's link, and a
        host cut off from the others is cut off from it too."""
        return f"10.213.{self._subnet_octet}.254"

    def link_down(self, i: int) -> None:
        """Cut host i's link (``ip link set ... down``), as a failing cable would."""
        run_cmd(["ip", "-n", self.netns(i), "link", "set", self.iface(i), "down"])

    def link_up(self, i: int) -> None:
        """Restore host i's link after :meth:`link_down` (address and shaping stay)."""
        run_cmd(["ip", "-n", self.netns(i), "link", "set", self.iface(i), "up"])

    def exec_prefix(self, i: int) -> list[str]:
        """``["ip", "netns", "exec", <netns>]``: put it in front of a command line."""
        return ["ip", "netns", "exec", self.netns(i)]

    def env(self, i: int) -> dict[str, str]:
        """Environment for a process in host i: the gloo interface, the host index and
        the matrix file (for in-process delay emulation)."""
        self._check(i)
        return {
            "GLOO_SOCKET_IFNAME": self.iface(i),
            "FARFLUNG_NETLAB_HOST": str(i),
            "FARFLUNG_NETLAB_PREFIX": self.prefix,
            "FARFLUNG_NETLAB_MATRIX": str(STATE_DIR / f"{self.prefix}.matrix.json"),
        }

    def link_model(self) -> LinkModel:
        """The in-process model of the same matrix (it carries the delays tc cannot)."""
        return LinkModel(self.matrix)

    def run(self, i: int, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside host i. The lab terminates it on :meth:`down` if it is
        still running then."""
        if not self._up:
            raise NetlabError("the lab is not up")
        proc = subprocess.Popen([*self.exec_prefix(i), *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    # ---- tc -------------------------------------------------------------------------------

    def tc_commands(self, i: int) -> list[str]:
        """The ``tc`` batch lines that shape host i's egress (empty when unshaped)."""
        m, dev = self.matrix, self.iface(i)
        rates = {j: m.bandwidth_bps[i][j] for j in range(self.n) if j != i}
        finite = {j: r for j, r in rates.items() if not math.isinf(r)}
        if not finite or self.shaping == "none":
            return []
        if self.shaping == "tbf":
            rate = next(iter(finite.values()))
            burst = _burst_bytes(rate)
            return [
                f"qdisc add dev {dev} root handle 1: tbf rate {int(rate)}bit "
                f"burst {burst} latency {_QUEUE_LATENCY}",
                *_acks_first(dev, "1:1", 0x10, rate),
                # the data queue holds what tbf's own would have: 50 ms at the rate + bucket
                f"qdisc add dev {dev} parent 10:2 bfifo limit "
                f"{int(rate / 8 * _QUEUE_SECONDS) + burst}",
            ]
        # htb: one class per shaped destination; unclassified traffic (unlimited pairs,
        # ARP) bypasses shaping because there is no default class. Under each class,
        # pure ACKs to that destination leave ahead of the data to it.
        lines = [f"qdisc add dev {dev} root handle 1: htb"]
        for j, rate in sorted(finite.items()):
            burst = _burst_bytes(rate)
            quantum = max(1514, min(200_000, burst))
            lines.append(
                f"class add dev {dev} parent 1: classid 1:{j + 1:x} htb rate {int(rate)}bit "
                f"ceil {int(rate)}bit burst {burst} cburst {burst} quantum {quantum}"
            )
            lines.append(
                f"filter add dev {dev} parent 1: protocol ip prio 1 u32 "
                f"match ip dst {self.address(j)}/32 flowid 1:{j + 1:x}"
            )
            lines += _acks_first(dev, f"1:{j + 1:x}", j + 2, rate)
        return lines

    # ---- life cycle ------------------------------------------------------------------------

    def _write_state(self) -> None:
        write_owner(self.prefix, hosts=self.n, shaping=self.shaping, created_at=time.time())
        self.matrix.to_file(STATE_DIR / f"{self.prefix}.matrix.json")

    def up(self) -> Lab:
        """Create namespaces, links, addresses and shaping. Idempotent."""
        if self._up:
            return self
        ok, why = available()
        if not ok:
            raise NetlabError(f"the network lab is not available: {why}")
        taken = [n for n in list_netns() if n.startswith(self.prefix)]
        if taken:
            raise NetlabError(f"namespaces with prefix {self.prefix} exist already: {taken}")
        with _LIVE_LOCK:
            _LIVE[self.prefix] = self
        _install_sigterm()
        self._up = True
        try:
            self._write_state()
            self._create()
        except BaseException:
            self.down()
            raise
        return self

    def _create(self) -> None:
        names = [self.bridge_netns] + [self.netns(i) for i in range(self.n)]
        for name in names:  # one by one, so a failure leaves a precise record
            run_cmd(["ip", "netns", "add", name])
            self._created.append(name)
        if Path("/proc/sys/net/ipv6").is_dir() and shutil.which("sysctl"):
            # IPv4 only inside the lab: no IPv6 chatter on shaped links, and gloo cannot
            # pick a link-local IPv6 address of GLOO_SOCKET_IFNAME (set before the links
            # exist, so they inherit it)
            off = "net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1"
            sysctls = [f"netns exec {name} sysctl -q -w {off}" for name in names]
            run_batch(["ip"], sysctls, check=False)
        br = self.bridge_netns  # the bridge device shares the namespace's name
        lines = ["link set lo up", f"link add {br} type bridge", f"link set {br} up"]
        lines += [f"addr add {self.hub_address}/24 dev {br}"]
        for i in range(self.n):
            # the veth is born in the bridge namespace with its peer straight in host i
            lines += [
                f"link add {self._port(i)} type veth "
                f"peer name {self.iface(i)} netns {self.netns(i)}",
                f"link set {self._port(i)} master {br}",
                f"link set {self._port(i)} up",
            ]
        run_batch(["ip", "-n", br], lines)
        for i in range(self.n):
            lines = [
                "link set lo up",
                f"addr add {self.address(i)}/24 dev {self.iface(i)}",
                f"link set {self.iface(i)} up",
            ]
            lines += self._gso_commands(i)
            run_batch(["ip", "-n", self.netns(i)], lines)
            run_batch(["tc", "-n", self.netns(i)], self.tc_commands(i))

    def _gso_commands(self, i: int) -> list[str]:
        """``ip link`` lines that limit GSO on host i's interface (see the constants)."""
        if self.shaping == "none":
            return []
        slowest = min(
            [self.matrix.bandwidth_bps[i][j] for j in range(self.n) if j != i] or [math.inf]
        )
        if slowest <= _NO_GSO_BELOW_BPS:
            return [f"link set dev {self.iface(i)} gso_max_segs 1"]
        if self.shaping == "htb":
            size = int(min(_GSO_MAX, max(_GSO_MIN, slowest / 8 * _GSO_SECONDS)))
            if size < _GSO_MAX:
                return [f"link set dev {self.iface(i)} gso_max_size {size}"]
        return []

    def down(self) -> None:
        """Stop processes started by :meth:`run`, delete every namespace this lab made."""
        if not self._up:
            return
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
        self._procs.clear()
        ours = [n for n in list_netns() if NS_PATTERN.match(n) and n.startswith(self.prefix)]
        gone = set(delete_netns(ours))
        left = [n for n in ours if n not in gone]
        self._created = []
        self._up = False
        with _LIVE_LOCK:
            _LIVE.pop(self.prefix, None)
        if left:
            raise NetlabError(f"could not delete namespaces {left}; run netlab_down()")
        remove_state(self.prefix)

    def detach(self) -> str:
        """Let the lab outlive this process (``farflung netlab up``): it is no longer
        torn down at exit or on SIGTERM, processes started by :meth:`run` are left
        running, and :func:`netlab_down` removes it once this process has ended (or
        ``Lab.attach(prefix).down()`` at any time). Returns the prefix."""
        if not self._up:
            raise NetlabError("the lab is not up")
        with _LIVE_LOCK:
            _LIVE.pop(self.prefix, None)
        self._procs.clear()
        return self.prefix

    @classmethod
    def attach(cls, prefix: str) -> Lab:
        """A handle on a lab that is up already (made by another process, detached).
        The handle does not tear it down at exit; call :meth:`down` to remove it."""
        if not PREFIX_PATTERN.match(prefix):
            raise ValueError(f"not a farflung lab prefix: {prefix!r}")
        try:
            state = json.loads((STATE_DIR / f"{prefix}.json").read_text())
            matrix = LinkMatrix.from_file(STATE_DIR / f"{prefix}.matrix.json")
        except (OSError, ValueError) as e:
            raise NetlabError(f"no lab {prefix} here: {e}") from None
        lab = cls(matrix, prefix, shaping="auto")
        lab.shaping = str(state.get("shaping", lab.shaping))
        missing = {lab.bridge_netns, *(lab.netns(i) for i in range(lab.n))} - set(list_netns())
        if missing:
            raise NetlabError(f"lab {prefix} is incomplete, missing {sorted(missing)}")
        lab._up = True
        return lab

    @property
    def is_up(self) -> bool:
        return self._up

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def __repr__(self) -> str:
        state = "up" if self._up else "down"
        return f"Lab({self.prefix}, {self.matrix.describe()}, shaping={self.shaping}, {state})"


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the calling thread inside network namespace ``name`` for the block:
    sockets created there stay in it (e.g. a server listening in the lab's bridge
    namespace while the rest of the process lives outside)."""
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet = 0x40000000
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(there, clone_newnet) != 0:
            raise NetlabError(
                f"cannot enter network namespace {name}: {os.strerror(ctypes.get_errno())}"
            )
        try:
            yield
        finally:
            libc.setns(here, clone_newnet)
    finally:
        os.close(here)
        os.close(there)
