"""Heartbeats that catch a frozen peer or a cut link, whatever the algorithm.

Why this exists: gloo notices a *dead* peer at once (its socket closes), but a frozen
one (SIGSTOP, a hung host) or a cut link only when a collective times out, and a
local-step method (diloco) may run no collective for minutes. So every rank runs two
daemon threads on a client connection of its own to the job's rendezvous store:

- the beat thread, every ``period_s``, writes its next count to ``hb/<rank>`` and
  reads every rank's counter and ``done`` flag in one ``multi_get``;
- the watch thread decides: a peer whose counter has not advanced for ``timeout_s``
  is lost; so is the store's host when no store round has completed for ``timeout_s``.

The store takes any client (torch's TCPStore has no authentication), so a value read
back may not be ours: one that is not a counter is a *protocol error* naming the key
and the value, and stops the run as such; it is never taken for a dead peer. Each
rank only writes its own keys (``set``, ``compare_set``) and nobody parses values but
this module: the store's own ``add`` on a foreign value would make the store drop
that client's connection, which would look like its host dying.

They are two threads because a TCPStore read never returns while the store's host is
frozen or its link is down (no client-side read timeout; measured with torch 2.13),
so the decision cannot wait on the I/O. Counters are compared, not clocks: hosts'
clocks need not agree.

On a loss (or a protocol error) the watch thread prints one line naming the lost
rank(s) (or the key), calls
``on_lost`` (the trainer writes its report for the launcher there) and ends the
process with :data:`EXIT_PEER_LOST` through ``os._exit``: the training thread may be
blocked inside a collective in C++, where no Python exception would reach it.

Limits: a training thread that holds the GIL longer than ``timeout_s`` (a long C call
that does not release it) starves the beat thread and looks frozen to its peers."""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from farflung.comm.errors import say

__all__ = [
    "EXIT_PEER_LOST",
    "Lost",
    "StoreInfo",
    "Watchdog",
    "active",
    "connect_store",
    "start_watchdog",
]

EXIT_PEER_LOST = 3
"""Exit code of a rank that lost a peer or its link (heartbeat silence or a failed
collective)."""

# A peer counts as silent for a diagnosis after this many missed beats (used when a
# collective has already failed and we only need to know whom to blame).
_SILENT_BEATS = 3
# How long a rank hosting the store keeps it up at the end for its peers' last beats.
_LINGER_S = 5.0
# Beats a rank that found a foreign value waits before it exits (see _fire)
_PROTOCOL_GRACE_BEATS = 2
# What a counter or a flag looks like in the store: this module writes nothing else
_COUNTER = re.compile(rb"[0-9]{1,18}")


@dataclass(frozen=True)
class Lost:
    """What the watchdog concluded: the ranks lost (``[]`` when the store's host is not
    a rank, as under torchrun), how long each has been silent, ``via`` ``"heartbeat"``
    (a peer's counter stopped while the store answered), ``"store"`` (the store's
    host stopped answering) or ``"protocol"`` (the store held a value this module
    never writes: no rank is lost, someone else wrote to the store), and a one-line
    ``message``."""

    ranks: list[int]
    silent_s: dict[int, float]
    via: str
    message: str


@dataclass
class _Seen:
    """What the beat thread last saw of one peer."""

    count: int = -1
    changed: float = 0.0  # local monotonic time the counter last moved
    done: bool = False


@dataclass
class StoreInfo:
    """Where the heartbeat store lives and who hosts it, for messages."""

    address: str
    host_rank: int | None  # the rank whose process hosts it; None: torchrun's agent
    separate: bool = True  # a client of its own (False: the default group's store)
    hosted_here: bool = False
    prefix: str = ""  # the PrefixStore's prefix, to name a key as the store holds it

    def key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self) -> str:
        if self.host_rank is None:
            return f"the rendezvous store at {self.address} (torchrun's agent on the first node)"
        return f"rank {self.host_rank}'s rendezvous store at {self.address}"


def connect_store(timeout_s: float) -> tuple[dist.Store, StoreInfo]:
    """A client connection of its own to the job's rendezvous store, under a key prefix
    unique to this attempt (torchrun keeps its store across restarts).

    Falls back to the default group's store (the training thread's connection, shared)
    when a new client cannot connect."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    rank = int(os.environ.get("RANK", "0"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"farflung/{attempt}"  # PrefixStore adds the "/"
    info = StoreInfo(
        f"{addr}:{port}", None if agent else 0, hosted_here=not agent and rank == 0, prefix=prefix
    )
    try:
        # world_size None: a plain client, not counted among the store's workers
        base = dist.TCPStore(
            addr,
            port,
            None,
            is_master=False,
            timeout=timedelta(seconds=min(timeout_s, 60.0)),
            wait_for_workers=False,
        )
    except dist.DistError:
        base = dist.distributed_c10d._get_default_store()
        info.separate = False
    return dist.PrefixStore(prefix, base), info


class Watchdog:
    """Heartbeats of ``rank`` among ``world`` ranks through ``store``; see the module
    docstring. ``exit`` ends the process (tests pass a recorder instead)."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world: int,
        timeout_s: float,
        *,
        store_info: StoreInfo | None = None,
        period_s: float | None = None,
        on_lost: Callable[[Lost], None] | None = None,
        exit: Callable[[int], object] = os._exit,
    ) -> None:
        self.store, self.rank, self.world = store, rank, world
        self.timeout_s = timeout_s
        # several beats per timeout, so a loss is seen within a beat of the deadline
        self.period_s = period_s or min(1.0, timeout_s / 5)
        self.store_info = store_info or StoreInfo("?", 0)
        self.on_lost, self._exit = on_lost, exit
        self.peers = [r for r in range(world) if r != rank]
        self._keys = [f"hb/{r}" for r in range(world)] + [f"done/{r}" for r in range(world)]
        self._lock = threading.Lock()
        self._seen: dict[int, _Seen] = {}
        self._last_ok = 0.0
        self._io_error: str | None = None
        self._malformed: Lost | None = None
        self._count = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.lost: Lost | None = None

    # -- life cycle ---------------------------------------------------------------
    def start(self) -> Watchdog:
        self._reset(time.monotonic())
        for target, name in ((self._beat_loop, "beat"), (self._watch_loop, "watch")):
            t = threading.Thread(target=target, name=f"farflung-watchdog-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, wait_s: float = 2 * _LINGER_S) -> None:
        """Publish this rank's ``done`` flag (so slower peers never report it as lost)
        and stop both threads. Never blocks longer than ``wait_s``: the store may be
        gone already."""
        self._stop.set()
        deadline = time.monotonic() + wait_s
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        global _active
        if _active is self:
            _active = None

    # -- the beat thread ------------------------------------------------------------
    def _beat_loop(self) -> None:
        try:
            for key in self._keys:  # create every key, so multi_get never waits for one
                self.store.compare_set(key, "", "0")  # sets it only where it is missing
            while not self._stop.is_set():
                self._beat()
                self._observe(self.store.multi_get(self._keys))
                self._stop.wait(self.period_s)
            self.store.set(f"done/{self.rank}", "1")
            if self.store_info.hosted_here:
                self._linger()
        except _Malformed as e:
            with self._lock:  # the watch thread stops the run with it
                self._malformed = self._protocol_error(e)
        except dist.DistError as e:
            # the connection broke (its host died): a client does not reconnect, and
            # retrying would only print more C++ warnings; the watch thread blames the
            # host once the silence has lasted timeout_s
            lines = str(e).strip().splitlines()
            with self._lock:
                self._io_error = lines[0][:120] if lines else type(e).__name__

    def _beat(self) -> None:
        """Move this rank's counter on, from the value it wrote last: only this rank
        writes its key, so finding anything else there means someone else did."""
        key, old, new = f"hb/{self.rank}", str(self._count), str(self._count + 1)
        found = self.store.compare_set(key, old, new)
        if found != new.encode():
            raise _Malformed(key, found, expected=old)
        self._count += 1

    def _observe(self, values: list[bytes]) -> None:
        counts = [self._counter(k, v) for k, v in zip(self._keys, values, strict=True)]
        now = time.monotonic()
        with self._lock:
            for r in self.peers:
                count, seen = counts[r], self._seen[r]
                if count != seen.count:
                    seen.count, seen.changed = count, now
                seen.done = counts[self.world + r] > 0
            self._last_ok = now

    @staticmethod
    def _counter(key: str, value: bytes) -> int:
        """``value`` as the counter this module writes, or :class:`_Malformed`."""
        if not _COUNTER.fullmatch(value):
            raise _Malformed(key, value)
        return int(value)

    def _protocol_error(self, e: _Malformed) -> Lost:
        info = self.store_info
        shown = e.value[:40]
        more = f" (first 40 of {len(e.value)} bytes)" if len(e.value) > 40 else ""
        what = "not a counter" if e.expected is None else f"not {e.expected.encode()!r}"
        msg = (
            f"protocol error: heartbeat key {info.key(e.key)!r} in {info.describe()} "
            f"holds {shown!r}{more}, {what}: something other than this run's workers "
            "wrote it (the store accepts any client; see docs/security.md)"
        )
        return Lost([], {}, "protocol", msg)

    def _linger(self) -> None:
        """This process hosts the store: keep it up until every peer has said done, so
        their last beats do not hit a closed socket (bounded: peers may be dead)."""
        deadline = time.monotonic() + _LINGER_S
        while time.monotonic() < deadline:
            flags = self.store.multi_get(self._keys[self.world :])
            if all(v == b"1" for v in flags):  # a foreign value: wait out the deadline
                return
            time.sleep(0.05)

    # -- the watch thread -----------------------------------------------------------
    def _watch_loop(self) -> None:
        # a tick much later than asked means this process was stopped or starved
        # itself: its peers are not to blame for that pause
        suspended = max(3 * self.period_s, self.timeout_s / 2)
        prev = time.monotonic()
        while not self._stop.wait(self.period_s / 2):
            now = time.monotonic()
            if now - prev > suspended:
                self._reset(now)
            prev = now
            lost = self.judge(self.timeout_s, now)
            if lost is not None and not self._stop.is_set():
                self._fire(lost)
                return

    def _reset(self, now: float) -> None:
        with self._lock:
            for r in self.peers:
                seen = self._seen.setdefault(r, _Seen())
                seen.changed = now
            self._last_ok = now

    def judge(self, threshold_s: float, now: float | None = None) -> Lost | None:
        """Who has been silent for ``threshold_s`` or more, or None. The store's host
        comes first: when the store does not answer, no peer's silence means anything."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._malformed is not None:  # no silence means anything after that
                return self._malformed
            store_silent = now - self._last_ok
            # a peer's silence as of the last read that came back: while the store
            # does not answer, nothing is known of the peers
            ages = {
                r: self._last_ok - s.changed
                for r, s in self._seen.items()
                if not s.done and r != self.rank
            }
            io_error = self._io_error
        if store_silent >= threshold_s:
            return self._store_lost(store_silent, io_error)
        silent = {r: a for r, a in sorted(ages.items()) if a >= threshold_s}
        if not silent:
            return None
        who = "rank" if len(silent) == 1 else "ranks"
        ranks = ", ".join(str(r) for r in silent)
        secs = ", ".join(f"{a:.1f} s" for a in silent.values())
        msg = f"{who} {ranks} stopped responding (no heartbeat for {secs})"
        return Lost(list(silent), silent, "heartbeat", msg)

    def _store_lost(self, silent_s: float, io_error: str | None) -> Lost:
        info = self.store_info
        why = f"; {io_error}" if io_error else ""
        if info.host_rank is None:
            msg = (
                f"lost contact with {info.describe()} (no answer for {silent_s:.1f} s{why}): "
                "that node or the link to it is down"
            )
            return Lost([], {}, "store", msg)
        r = info.host_rank
        msg = (
            f"rank {r} stopped responding ({info.describe()} did not answer for "
            f"{silent_s:.1f} s{why})"
        )
        return Lost([r], {r: silent_s}, "store", msg)

    def _fire(self, lost: Lost) -> None:
        self.lost = lost
        say(f"farflung: rank {self.rank}: {lost.message}; stopping")
        if self.on_lost is not None:
            try:
                self.on_lost(lost)
            except Exception as e:  # the exit matters more than the report
                say(f"farflung: rank {self.rank}: could not report: {e}")
        sys.stdout.flush()
        sys.stderr.flush()
        if lost.via == "protocol":
            # every peer reads the same keys at its next beat: staying up (and the
            # store with us) that long lets each name the value itself, rather than
            # see a collective fail on a peer that left without a word
            time.sleep(_PROTOCOL_GRACE_BEATS * self.period_s)
        self._exit(EXIT_PEER_LOST)

    # -- after a failed collective ------------------------------------------------------
    def diagnose(self, grace_s: float | None = None) -> Lost | None:
        """Whom to blame for a collective that just failed: a peer (or the store's
        host) silent for a few beats. A peer killed a moment ago is not silent yet, so
        this waits up to ``grace_s`` (default: a few beats) for it to become so."""
        threshold = _SILENT_BEATS * self.period_s
        deadline = time.monotonic() + (threshold + self.period_s if grace_s is None else grace_s)
        while True:
            lost = self.judge(threshold)
            if lost is not None or time.monotonic() >= deadline:
                return lost
            time.sleep(self.period_s / 2)


class _Malformed(Exception):
    """A heartbeat key holds a value this module never writes."""

    def __init__(self, key: str, value: bytes, expected: str | None = None) -> None:
        super().__init__(key)
        self.key, self.value, self.expected = key, value, expected


_active: Watchdog | None = None


def active() -> Watchdog | None:
    """The watchdog this process runs, if any (to explain a failed collective)."""
    return _active


def start_watchdog(
    rank: int,
    world: int,
    timeout_s: float,
    on_lost: Callable[[Lost], None] | None = None,
) -> Watchdog | None:
    """Start heartbeats for this rank after ``init_distributed``; None in a world of
    one. Every rank of the job must start one, each with the same ``timeout_s``."""
    global _active
    if world < 2:
        return None
    store, info = connect_store(timeout_s)
    if not info.separate:
        print(
            f"farflung: rank {rank}: heartbeats share the training connection to the "
            "rendezvous store (a separate one could not connect)",
            file=sys.stderr,
        )
    _active = Watchdog(store, rank, world, timeout_s, store_info=info, on_lost=on_lost).start()
    return _active
