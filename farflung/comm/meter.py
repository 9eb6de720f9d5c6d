"""Byte and time accounting for everything that crosses a link.

Counts come from the real tensors handed to torch.distributed (their ``numel() *
element_size()``), multiplied by the number of times the algorithm of the collective
moves them over a rank's link, never from a model of what "should" be sent."""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Traffic:
    """Bytes and seconds for one kind of traffic."""

    sent: int = 0
    recv: int = 0
    seconds: float = 0.0
    hidden_seconds: float = 0.0
    """Seconds spent by background threads, overlapped with compute."""
    calls: int = 0


@dataclass
class MeterSnapshot:
    """What a meter counted since it was last reset."""

    by_kind: dict[str, Traffic] = field(default_factory=dict)
    work: dict[str, float] = field(default_factory=dict)
    """Seconds of communication-related computation by name (e.g. ``codec``: encoding
    and decoding payloads), on any thread."""

    @property
    def sent(self) -> int:
        return sum(t.sent for t in self.by_kind.values())

    @property
    def recv(self) -> int:
        return sum(t.recv for t in self.by_kind.values())

    @property
    def seconds(self) -> float:
        """Seconds the calling code was blocked on communication."""
        return sum(t.seconds for t in self.by_kind.values())


class Meter:
    """Thread-safe counters of bytes sent/received and seconds blocked, by kind.

    Kinds name the purpose of the traffic: ``dp`` (data-parallel sync), ``pp_fwd`` /
    ``pp_bwd`` (pipeline activations and gradients), ``init`` (initial broadcast),
    ``ctrl`` (telemetry and bookkeeping)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: dict[str, Traffic] = defaultdict(Traffic)
        self._work: dict[str, float] = defaultdict(float)

    def record(self, kind: str, sent: int = 0, recv: int = 0, seconds: float = 0.0) -> None:
        with self._lock:
            t = self._kinds[kind]
            t.sent += int(sent)
            t.recv += int(recv)
            t.seconds += seconds
            t.calls += 1

    def add_seconds(self, kind: str, seconds: float, hidden: bool = False) -> None:
        """Account time for traffic whose bytes were recorded earlier: blocked time of
        the training thread, or ``hidden`` time of a background thread."""
        with self._lock:
            if hidden:
                self._kinds[kind].hidden_seconds += seconds
            else:
                self._kinds[kind].seconds += seconds

    def add_work(self, name: str, seconds: float) -> None:
        """Account computation done for communication (it is not traffic)."""
        with self._lock:
            self._work[name] += seconds

    def snapshot(self, reset: bool = False) -> MeterSnapshot:
        with self._lock:
            snap = MeterSnapshot(
                {
                    k: Traffic(v.sent, v.recv, v.seconds, v.hidden_seconds, v.calls)
                    for k, v in self._kinds.items()
                },
                dict(self._work),
            )
            if reset:
                self._kinds.clear()
                self._work.clear()
        return snap
