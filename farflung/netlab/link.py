"""Link specifications: who can send to whom, how fast, and how late.

A :class:`LinkMatrix` holds, for N hosts, the bandwidth (bits/s) and the one-way
delay (seconds) of every ordered pair. The same object drives the network lab
(:mod:`farflung.netlab`, real traffic shaping in network namespaces), the
in-process emulation (:class:`LinkModel`, sleeps), and the placement planner.

Human units are parsed by :func:`parse_bandwidth` (``100mbit``, ``1gbit``,
``500Mbps``, ``12.5MB/s``, ``unlimited``) and :func:`parse_delay` (``20ms``,
``0.1s``, ``500us``). Bandwidth prefixes are decimal (``mbit`` = 10**6 bit/s) unless
written binary (``Mibit``); a unit with an upper-case ``B`` or the word ``byte``
counts bytes (``MB/s``, ``MBps``), otherwise bits (``Mbps``, ``mbit``)."""

from __future__ import annotations

import json
import math
import re
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from farflung.netlab.scenarios import SCENARIO_TABLE, SCENARIOS, allocate, scenario_key

__all__ = [
    "SCENARIOS",
    "LinkMatrix",
    "LinkModel",
    "format_bandwidth",
    "format_delay",
    "parse_bandwidth",
    "parse_delay",
]

INF = math.inf

BANDWIDTH_FORMS = (
    "a positive number with a unit, e.g. 100mbit, 1gbit, 500kbit, 500Mbps, 1.25Gbps, "
    "12.5MB/s, 2Mibit, or 'unlimited'"
)
DELAY_FORMS = "a non-negative number with a unit, e.g. 20ms, 0.1s, 500us, or 0"

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_SCALE = {
    "": 1.0,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "t": 1e12,
    "ki": 2.0**10,
    "mi": 2.0**20,
    "gi": 2.0**30,
    "ti": 2.0**40,
}
# longest first, so "bit/s" is not read as prefix "bit" + suffix "/s"
_BIT_SUFFIXES = ("bits/s", "bit/s", "bits", "bit")
_RATE_SUFFIXES = ("bytes/s", "byte/s", "bps", "b/s")
_UNLIMITED = {"unlimited", "inf", "infinity", "unshaped", "none"}
_DELAY_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "usec": 1e-6,
    "ms": 1e-3,
    "msec": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
}


def parse_bandwidth(value: str | float | int) -> float:
    """Bits per second from ``"100mbit"``, ``"500Mbps"``, ``"12.5MB/s"``, ``"unlimited"``.

    Numbers (int/float) are taken as bits/s already. ``inf`` means unshaped."""
    if isinstance(value, bool):
        raise ValueError(f"bad bandwidth {value!r}: expected {BANDWIDTH_FORMS}")
    if isinstance(value, int | float):
        bps = float(value)
        if math.isnan(bps) or bps <= 0:
            raise ValueError(f"bad bandwidth {value!r}: must be > 0 bits/s (or inf)")
        return bps
    if not isinstance(value, str):
        raise ValueError(f"bad bandwidth {value!r}: expected {BANDWIDTH_FORMS}")
    text = value.strip()
    if text.lower() in _UNLIMITED:
        return INF
    if re.fullmatch(_NUMBER, text):
        raise ValueError(f"bad bandwidth {value!r}: a unit is required; expected {BANDWIDTH_FORMS}")
    m = re.fullmatch(_NUMBER + r"\s*([A-Za-zµ/]+)", text)
    if not m:
        raise ValueError(f"bad bandwidth {value!r}: expected {BANDWIDTH_FORMS}")
    number, unit = float(m.group(1)), m.group(2)
    low = unit.lower()
    for suffix in _BIT_SUFFIXES + _RATE_SUFFIXES:
        if low.endswith(suffix):
            prefix = low[: -len(suffix)]
            break
    else:
        raise ValueError(
            f"bad bandwidth {value!r}: unknown unit {unit!r}; expected {BANDWIDTH_FORMS}"
        )
    if prefix not in _SCALE:
        raise ValueError(
            f"bad bandwidth {value!r}: unknown prefix {prefix!r} in {unit!r} "
            f"(allowed: k, m, g, t, ki, mi, gi, ti); expected {BANDWIDTH_FORMS}"
        )
    counts_bytes = suffix in _RATE_SUFFIXES and ("B" in unit or "byte" in low)
    bps = number * _SCALE[prefix] * (8.0 if counts_bytes else 1.0)
    if bps <= 0:
        raise ValueError(f"bad bandwidth {value!r}: must be > 0; expected {BANDWIDTH_FORMS}")
    return bps


def parse_delay(value: str | float | int) -> float:
    """Seconds from ``"20ms"``, ``"0.1s"``, ``"500us"``; numbers are seconds already."""
    if isinstance(value, bool):
        raise ValueError(f"bad delay {value!r}: expected {DELAY_FORMS}")
    if isinstance(value, int | float):
        s = float(value)
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"bad delay {value!r}: must be finite and >= 0 seconds")
        return s
    if not isinstance(value, str):
        raise ValueError(f"bad delay {value!r}: expected {DELAY_FORMS}")
    text = value.strip()
    m = re.fullmatch(_NUMBER + r"\s*([A-Za-zµ]*)", text)
    if not m:
        raise ValueError(f"bad delay {value!r}: expected {DELAY_FORMS}")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit == "":
        if number == 0:
            return 0.0
        raise ValueError(
            f"bad delay {value!r}: a unit is required (ms, s, us); expected {DELAY_FORMS}"
        )
    if unit not in _DELAY_UNITS:
        raise ValueError(f"bad delay {value!r}: unknown unit {unit!r}; expected {DELAY_FORMS}")
    return number * _DELAY_UNITS[unit]


def format_bandwidth(bps: float) -> str:
    """The inverse of :func:`parse_bandwidth`, in tc-style decimal units."""
    if math.isinf(bps):
        return "unlimited"
    for unit, scale in (("tbit", 1e12), ("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.6g}{unit}"
    return f"{bps:.6g}bit"


def format_delay(seconds: float) -> str:
    """``0.02`` → ``"20ms"``."""
    if seconds >= 1:
        return f"{seconds:.6g}s"
    return f"{seconds * 1e3:.6g}ms"


def _as_matrix(name: str, rows: Any, n: int, parse: Callable[[Any], float], diag: float):
    if hasattr(rows, "tolist"):  # numpy arrays, torch tensors
        rows = rows.tolist()
    if not isinstance(rows, Sequence) or isinstance(rows, str) or len(rows) != n:
        got = len(rows) if isinstance(rows, Sequence) and not isinstance(rows, str) else rows
        raise ValueError(f"{name} must be a list of {n} rows (one per host), got {got!r}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Sequence) or isinstance(row, str) or len(row) != n:
            raise ValueError(
                f"{name}[{i}] must be a list of {n} values (square matrix), got {row!r}"
            )
        vals = []
        for j, v in enumerate(row):
            if i == j:
                vals.append(diag)  # the diagonal is ignored
                continue
            if v is None and name == "bandwidth_bps":
                vals.append(INF)
                continue
            try:
                vals.append(parse(v))
            except ValueError as e:
                raise ValueError(f"{name}[{i}][{j}]: {e}") from None
        out.append(vals)
    return out


class LinkMatrix:
    """Bandwidth (bits/s) and one-way delay (s) for every ordered pair of N hosts.

    ``bandwidth_bps[i][j]`` is the rate of the link from host i to host j (``inf`` =
    unshaped); ``delay_s[i][j]`` its one-way delay. The diagonal is ignored (stored as
    inf / 0). ``regions`` optionally names the site of every host (scenarios set it)."""

    def __init__(
        self,
        bandwidth_bps: Sequence[Sequence[float | str | None]],
        delay_s: Sequence[Sequence[float | str]] | None = None,
        hosts: Sequence[str] | None = None,
        regions: Sequence[str] | None = None,
    ) -> None:
        if hasattr(bandwidth_bps, "tolist"):
            bandwidth_bps = bandwidth_bps.tolist()
        if not isinstance(bandwidth_bps, Sequence) or isinstance(bandwidth_bps, str):
            raise ValueError(f"bandwidth_bps must be a square list of lists, got {bandwidth_bps!r}")
        n = len(bandwidth_bps)
        if n < 1:
            raise ValueError("a link matrix needs at least one host")
        if hosts is None:
            hosts = [f"h{i}" for i in range(n)]
        hosts = list(hosts)
        if len(hosts) != n:
            raise ValueError(f"hosts has {len(hosts)} names but the matrices have {n} rows")
        if any(not isinstance(h, str) or not h for h in hosts) or len(set(hosts)) != n:
            raise ValueError(f"hosts must be distinct non-empty strings, got {hosts!r}")
        if delay_s is None:
            delay_s = [[0.0] * n for _ in range(n)]
        self.hosts: list[str] = hosts
        self.bandwidth_bps: list[list[float]] = _as_matrix(
            "bandwidth_bps", bandwidth_bps, n, parse_bandwidth, INF
        )
        self.delay_s: list[list[float]] = _as_matrix("delay_s", delay_s, n, parse_delay, 0.0)
        if regions is not None:
            regions = [str(r) for r in regions]
            if len(regions) != n:
                raise ValueError(f"regions has {len(regions)} entries, expected {n}")
        self.regions: list[str] | None = regions

    # ---- construction -----------------------------------------------------------------

    @classmethod
    def uniform(cls, n: int, bandwidth: float | str, delay: float | str = 0.0) -> LinkMatrix:
        """Every pair of ``n`` hosts at the same bandwidth and delay."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"number of hosts must be an integer >= 1, got {n!r}")
        bw, d = parse_bandwidth(bandwidth), parse_delay(delay)
        return cls([[bw] * n for _ in range(n)], [[d] * n for _ in range(n)])

    @classmethod
    def scenario(cls, name: str, n: int) -> LinkMatrix:
        """One of the DT-FM scenarios (:data:`SCENARIOS`) scaled to ``n`` hosts.

        Hosts are split over the scenario's machines/regions in proportion to their
        device counts in the paper (largest remainder), in contiguous blocks: with
        ``regional`` and n=8, h0-h1 are Virginia, h2-h3 Oregon, and so on. Hosts in the
        same group get the within-group figures, others the across-group ones."""
        key = scenario_key(name)
        if key is None:
            raise ValueError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"number of hosts must be an integer >= 1, got {n!r}")
        sc = SCENARIO_TABLE[key]
        sizes = allocate(n, [w for _, w in sc.groups])
        regions = [g for (g, _), size in zip(sc.groups, sizes, strict=True) for _ in range(size)]
        bw = [[INF] * n for _ in range(n)]
        delay = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                if regions[i] == regions[j]:
                    gbps, ms = sc.within
                else:
                    gbps, ms = sc.across(regions[i], regions[j])
                bw[i][j] = gbps * 1e9
                delay[i][j] = ms * 1e-3
        return cls(bw, delay, regions=regions)

    @staticmethod
    def scenario_title(name: str) -> str:
        key = scenario_key(name)
        if key is None:
            raise ValueError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
        return SCENARIO_TABLE[key].title

    @classmethod
    def from_spec(cls, spec: str, n: int | None = None) -> LinkMatrix:
        """A matrix from one string, the form a command line takes:

        - a scenario name (``regional``), needs ``n``;
        - a path to a matrix file (``.json`` or ``.toml``);
        - ``BANDWIDTH[,DELAY]`` or ``bandwidth=100mbit,delay=20ms`` for a uniform
          matrix, needs ``n``."""
        text = spec.strip()
        if not text:
            raise ValueError("empty link spec")
        if scenario_key(text) is not None:
            if n is None:
                raise ValueError(f"scenario {text!r} needs the number of hosts")
            return cls.scenario(text, n)
        path = Path(text)
        if path.suffix.lower() in (".json", ".toml") or path.is_file():
            m = cls.from_file(path)
            if n is not None and m.n != n:
                raise ValueError(f"{path} describes {m.n} hosts but {n} were asked for")
            return m
        fields: dict[str, str] = {}
        positional = ["bandwidth", "delay"]
        for token in [t for t in re.split(r"[,\s]+", text) if t]:
            if "=" in token:
                key, _, val = token.partition("=")
                key = {"bw": "bandwidth", "rate": "bandwidth", "latency": "delay"}.get(
                    key.strip().lower(), key.strip().lower()
                )
                if key not in ("bandwidth", "delay"):
                    raise ValueError(f"bad link spec {spec!r}: unknown key {key!r}")
                fields[key] = val
            elif positional:
                fields.setdefault(positional.pop(0), token)
            else:
                raise ValueError(f"bad link spec {spec!r}: too many values")
        if "bandwidth" not in fields:
            raise ValueError(
                f"bad link spec {spec!r}: expected a scenario ({', '.join(SCENARIOS)}), "
                "a .json/.toml matrix file, or BANDWIDTH[,DELAY] such as 100mbit,20ms"
            )
        if n is None:
            raise ValueError(f"link spec {spec!r} needs the number of hosts")
        return cls.uniform(n, fields["bandwidth"], fields.get("delay", 0.0))

    # ---- files --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values; unshaped links are written as ``"unlimited"``."""
        d: dict[str, Any] = {
            "hosts": list(self.hosts),
            "bandwidth_bps": [
                [("unlimited" if math.isinf(v) else v) for v in row] for row in self.bandwidth_bps
            ],
            "delay_s": [list(row) for row in self.delay_s],
        }
        if self.regions is not None:
            d["regions"] = list(self.regions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinkMatrix:
        if not isinstance(d, dict):
            raise ValueError(f"a link matrix must be a table/object, got {type(d).__name__}")
        unknown = set(d) - {"hosts", "bandwidth_bps", "delay_s", "regions"}
        if unknown:
            raise ValueError(
                f"unknown keys {sorted(unknown)} (allowed: hosts, bandwidth_bps, delay_s, regions)"
            )
        if "bandwidth_bps" not in d:
            raise ValueError("a link matrix needs 'bandwidth_bps'")
        return cls(d["bandwidth_bps"], d.get("delay_s"), d.get("hosts"), d.get("regions"))

    def to_file(self, path: str | Path) -> Path:
        """Write JSON, or TOML when the name ends in ``.toml``."""
        p = Path(path)
        if p.suffix.lower() == ".toml":
            p.write_text(self._to_toml())
        else:
            p.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return p

    @classmethod
    def from_file(cls, path: str | Path) -> LinkMatrix:
        """Read the JSON (or TOML) format written by :meth:`to_file`. Values may also be
        strings with units (``"100mbit"``, ``"20ms"``); ``null`` bandwidth = unlimited."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"link matrix file not found: {p}")
        text = p.read_text()
        try:
            if p.suffix.lower() == ".toml":
                raw = tomllib.loads(text)
            else:
                raw = json.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{p}: cannot parse: {e}") from None
        try:
            return cls.from_dict(raw)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None

    def _to_toml(self) -> str:
        def num(v: float) -> str:
            return "inf" if math.isinf(v) else repr(float(v))

        lines = ["hosts = [" + ", ".join(json.dumps(h) for h in self.hosts) + "]"]
        if self.regions is not None:
            lines.append("regions = [" + ", ".join(json.dumps(r) for r in self.regions) + "]")
        for key, mat in (("bandwidth_bps", self.bandwidth_bps), ("delay_s", self.delay_s)):
            lines.append(f"{key} = [")
            lines += ["  [" + ", ".join(num(v) for v in row) + "]," for row in mat]
            lines.append("]")
        return "\n".join(lines) + "\n"

    # ---- queries --------------------------------------------------------------------------

    @property
    def n(self) -> int:
        return len(self.hosts)

    def bandwidth(self, src: int, dst: int) -> float:
        return self.bandwidth_bps[src][dst]

    def delay(self, src: int, dst: int) -> float:
        return self.delay_s[src][dst]

    def pairs(self):
        """Every ordered pair ``(i, j)`` with ``i != j``."""
        return ((i, j) for i in range(self.n) for j in range(self.n) if i != j)

    def is_uniform(self) -> bool:
        """All off-diagonal bandwidths equal and all off-diagonal delays equal."""
        bws = {self.bandwidth_bps[i][j] for i, j in self.pairs()}
        ds = {self.delay_s[i][j] for i, j in self.pairs()}
        return len(bws) <= 1 and len(ds) <= 1

    def is_symmetric(self) -> bool:
        return all(
            self.bandwidth_bps[i][j] == self.bandwidth_bps[j][i]
            and self.delay_s[i][j] == self.delay_s[j][i]
            for i, j in self.pairs()
        )

    def describe(self) -> str:
        """One line for logs: ``4 hosts, 100mbit, 20ms`` or ranges."""
        if self.n == 1:
            return "1 host"
        bws = sorted({self.bandwidth_bps[i][j] for i, j in self.pairs()})
        ds = sorted({self.delay_s[i][j] for i, j in self.pairs()})
        bw = format_bandwidth(bws[0]) + ("" if len(bws) == 1 else f"..{format_bandwidth(bws[-1])}")
        d = format_delay(ds[0]) + ("" if len(ds) == 1 else f"..{format_delay(ds[-1])}")
        return f"{self.n} hosts, bandwidth {bw}, delay {d}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LinkMatrix):
            return NotImplemented
        return (
            self.hosts == other.hosts
            and self.bandwidth_bps == other.bandwidth_bps
            and self.delay_s == other.delay_s
            and self.regions == other.regions
        )

    def __repr__(self) -> str:
        return f"LinkMatrix({self.describe()})"


class LinkModel:
    """In-process emulation of a :class:`LinkMatrix`: how long messages should take,
    and sleeping until they have.

    One process is one rank. The model keeps two FIFO queues per host, its egress
    (uplink) and its ingress (downlink), each as the time it is next free; every
    :class:`~farflung.comm.collectives.Comm` of the process, from any thread, queues on
    the same ones. A message of ``nbytes`` from ``src`` to ``dst`` is serialized
    (``8 * nbytes / bandwidth[src][dst]`` seconds) once it is launched and the queue is
    free, and arrives ``delay[src][dst]`` after its last byte left: messages sharing a
    host's link take the sum of their times, not the maximum. The sender queues on its
    egress, the receiver on its ingress, each at the pair's rate, so with per-pair
    rates a host's link runs at whichever pair's rate the current message uses.
    Unlimited pairs bypass the queues (as unshaped pairs bypass the lab's ``htb``).

    What it still does not model: TCP slow start, loss and retransmission; header
    overhead (a link of rate R carries about 0.956 R of TCP payload at MTU 1500, the
    model moves payload at R); contention inside the network between different host
    pairs (only each host's own two links are queues); and fair sharing: messages
    queued on one link go one after the other, where TCP would interleave them. The
    queues exist only in this process, so a receiver knows nothing of its sender's
    egress queue.

    Ranks placed on one host (:func:`~farflung.comm.collectives.set_rank_hosts`)
    exchange data for free: from a host to itself there is no delay and no
    serialization, and such messages take no place in the queues. Each of those ranks
    is still its own process with its own queues, so their traffic to other hosts
    does not queue behind each other's as it would on one shared uplink (the lab's tc
    does share it)."""

    def __init__(
        self,
        matrix: LinkMatrix,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.matrix = matrix
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()  # the queues are shared by every thread's Comm
        self._free: dict[tuple[str, int], float] = {}  # (link, host) -> next free time

    def now(self) -> float:
        """The model's clock (``time.monotonic`` unless given another)."""
        return self._clock()

    def serialization_time(self, src: int, dst: int, nbytes: int | float) -> float:
        """``8 * nbytes / bandwidth`` seconds (0 if unlimited or from a host to itself)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        bw = self.matrix.bandwidth_bps[src][dst]
        return 0.0 if src == dst or math.isinf(bw) else 8.0 * nbytes / bw

    def transfer_time(self, src: int, dst: int, nbytes: int | float) -> float:
        """``delay + 8 * nbytes / bandwidth`` seconds on idle links (0 to itself)."""
        ser = self.serialization_time(src, dst, nbytes)
        return 0.0 if src == dst else self.matrix.delay_s[src][dst] + ser

    def egress(self, src: int, dst: int, nbytes: int | float, not_before: float) -> float:
        """Queue a message on ``src``'s egress; returns when its last byte has left
        (add ``matrix.delay(src, dst)`` for its arrival)."""
        return self._enqueue("egress", src, src, dst, nbytes, not_before)

    def ingress(self, src: int, dst: int, nbytes: int | float, not_before: float) -> float:
        """Queue a message on ``dst``'s ingress; returns when its last byte has come in
        at the link's rate (add ``matrix.delay(src, dst)`` for its arrival)."""
        return self._enqueue("ingress", dst, src, dst, nbytes, not_before)

    def _enqueue(
        self, link: str, host: int, src: int, dst: int, nbytes: int | float, not_before: float
    ) -> float:
        seconds = self.serialization_time(src, dst, nbytes)
        if seconds == 0.0:
            return not_before
        with self._lock:
            start = max(not_before, self._free.get((link, host), not_before))
            self._free[(link, host)] = end = start + seconds
        return end

    def sleep_until(self, deadline: float) -> float:
        """Sleep until the model's clock reads ``deadline``; returns the seconds slept."""
        first = now = self._clock()
        while now < deadline:
            self._sleep(deadline - now)
            now = self._clock()
        return now - first

    def wait_for(self, src: int, dst: int, nbytes: int | float, started_at: float) -> float:
        """Sleep until :meth:`transfer_time` has passed since ``started_at`` (a value of
        :meth:`now` taken when the real transfer began), so the real time the transfer
        took counts toward it. Returns the seconds slept (0 if already late). Ignores
        the queues: for one message on idle links."""
        return self.sleep_until(started_at + self.transfer_time(src, dst, nbytes))
