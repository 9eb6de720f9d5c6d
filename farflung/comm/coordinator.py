"""The coordinator of an elastic run: who is a member, which steps are committed.

One process (farflung's launcher, or ``farflung coordinator`` on a host of its own)
runs it. Workers keep one TCP connection to it and talk in JSON lines
(:mod:`farflung.comm.member` is the other end):

- a crash is seen at once: the kernel closes a dead process's connection;
- a freeze or a cut link is seen when a worker has sent nothing for ``heartbeat_s``
  (workers beat five times per bound, from a thread of their own);
- a step ``s`` is *committed* once every member of the current generation has voted
  that its contribution to ``s`` was averaged; votes carry the member's sample ids,
  its metrics row and a hash of the state it shares with the others;
- when a member is lost (or a joiner is ready), the coordinator starts a new
  *generation*: the live members (plus joiners) in a fixed order, told to roll back
  to the state after the last committed step and go on from there. A generation's
  process group meets in the coordinator's own TCPStore, under the prefix
  ``gen<g>/``.

Quorum: a member lost by silence may be alive behind a cut link, so the survivors
go on without it only when they are a strict majority of the generation; otherwise
the run waits (commits nothing) until the silence ends or the run is stopped. A
closed connection is a certain death, and needs no majority.

The coordinator decides alone, so two sides of a partition can never both commit.
It is the run's single point of failure: when it goes, every worker stops within
``heartbeat_s`` (it, too, beats), and the run continues with ``--resume`` from its
last checkpoint (docs/fault-tolerance.md)."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch.distributed as dist

BEATS_PER_BOUND = 5
"""Beats (both ways) per ``heartbeat_s``: a silence of the whole bound is five missed
beats, so a beat delayed behind bulk traffic on a slow link is not a death."""


class Handler(Protocol):
    """What the run does with the coordinator's decisions (the training layer's)."""

    def on_commit(self, step: int, gen: int, members: list[int], votes: dict[int, dict]) -> None:
        """Step ``step`` is committed; ``votes`` by member id."""

    def on_event(self, record: dict[str, Any]) -> None:
        """A membership change, once its recovery is known (or the run ends)."""

    def on_finish(self, done: dict[int, dict]) -> None:
        """Every member has finished; ``done`` holds each one's last message."""

    def rewind(self) -> int:
        """Every member is lost: go back to the last checkpoint (0: the start), drop
        what was committed after it, and return its step."""


def send_line(sock: socket.socket, lock: threading.Lock, msg: dict[str, Any]) -> None:
    data = (json.dumps(msg) + "\n").encode()
    with lock:
        sock.sendall(data)


def read_lines(sock: socket.socket) -> Any:
    """Yield the JSON messages arriving on ``sock`` until it closes."""
    buf = b""
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line:
                yield json.loads(line)


@dataclass
class _Conn:
    """One worker's connection, as the coordinator sees it."""

    id: int
    sock: socket.socket
    addr: str  # where its state server listens (host:port), for joiners
    joiner: bool
    step: int  # the step its state is at, when it said hello
    last_seen: float
    outbox: queue.Queue = field(default_factory=queue.Queue)
    alive: bool = True
    joined: float = field(default_factory=time.monotonic)
    writer: threading.Thread | None = None

    def send(self, msg: dict[str, Any]) -> None:
        if self.alive:
            self.outbox.put(msg)


@dataclass
class _Change:
    """A membership change waiting for its recovery time (the new generation's first
    commit) before it is written."""

    records: list[dict[str, Any]]
    decided: float


class Coordinator:
    """Serve an elastic run of ``expected`` initial workers; see the module docstring.

    ``replay``: a membership log to reproduce, for reference runs: records
    ``{"event": "left" | "joined", "id", "committed"}`` as ``events.jsonl`` holds them.
    A leaver is told to leave once ``committed`` is; a joiner is admitted only then,
    and no later step commits before it is."""

    def __init__(
        self,
        expected: int,
        heartbeat_s: float,
        handler: Handler,
        *,
        min_workers: int = 1,
        host: str = "0.0.0.0",
        port: int = 0,
        replay: list[dict[str, int]] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.expected, self.heartbeat_s, self.handler = expected, heartbeat_s, handler
        self.min_workers = min_workers
        # a joiner lost before it entered changed nothing
        self.replay = [dict(r) for r in replay or [] if r.get("member", True)]
        self.log = log or (lambda msg: None)
        self.listener = socket.create_server((host, port), reuse_port=False)
        self.port = self.listener.getsockname()[1]
        # the generations' rendezvous: a store of its own, served from this process
        self.store = dist.TCPStore(host, 0, None, is_master=True, wait_for_workers=False)
        self.store_port = self.store.port
        self.lock = threading.RLock()
        self.conns: dict[int, _Conn] = {}
        self.members: list[int] = []
        self.quorum_base: list[int] = []  # the last generation that committed a step
        # who holds the state after the last commit: the members that committed it,
        # and joiners that fetched it since (a donor must be one of them)
        self.stateful: set[int] = set()
        self.gen_committed = False
        self.joiners: list[int] = []
        self.gen = -1
        self.committed = 0
        self.votes: dict[int, dict[int, dict]] = {}
        self.done: dict[int, dict] = {}
        self.fault_since: float | None = None
        self.stalled = ""
        self.change: _Change | None = None
        self.finished = threading.Event()
        self.closed = threading.Event()
        self.threads: list[threading.Thread] = []

    # -- life cycle -----------------------------------------------------------------
    def start(self) -> Coordinator:
        for target in (self._accept_loop, self._monitor_loop):
            self._thread(target)
        return self

    def _thread(self, target: Callable, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def close(self, drain_s: float = 5.0) -> None:
        """Stop serving; what is queued for the workers (the last commit, "finish")
        is still sent, for up to ``drain_s``."""
        self.closed.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self.lock:
            if self.change is not None:  # changes not yet recovered from are still logged
                for r in self.change.records:
                    self.handler.on_event({**r, "recovery_s": None})
                self.change = None
            conns = list(self.conns.values())
            for c in conns:
                if c.alive:
                    self._close(c, drain=True)
        deadline = time.monotonic() + drain_s
        for c in conns:
            if c.writer is not None:
                c.writer.join(timeout=max(0.0, deadline - time.monotonic()))
            self._shut(c.sock)

    def describe(self) -> str:
        """The membership state in a few lines (``kill -USR1`` on the launcher)."""
        with self.lock:
            votes = {step: sorted(v) for step, v in sorted(self.votes.items())}
            conns = {i: ("alive" if c.alive else "gone") for i, c in sorted(self.conns.items())}
            return (
                f"generation {self.gen}: members {self.members}, committed {self.committed}, "
                f"votes {votes}, joiners {self.joiners}, replay {self.replay[:2]}, "
                f"stalled {self.stalled or 'no'}, connections {conns}"
            )

    # -- connections ----------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self.closed.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._thread(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        conn = None
        try:
            for msg in read_lines(sock):
                if conn is None:
                    conn = self._hello(sock, msg)
                    continue
                conn.last_seen = time.monotonic()
                self._dispatch(conn, msg)
        except (OSError, ValueError):
            pass
        if conn is not None and not self.finished.is_set():
            with self.lock:
                if conn.alive:
                    self._lose(conn, "crash", "its connection closed")

    def _writer(self, conn: _Conn) -> None:
        lock = threading.Lock()
        while True:
            msg = conn.outbox.get()
            if msg is None:
                self._shut(conn.sock)
                return
            try:
                send_line(conn.sock, lock, msg)
            except OSError:
                return

    def _close(self, conn: _Conn, drain: bool = False) -> None:
        """Stop talking to a worker; ``drain``: after what is queued for it is sent."""
        conn.alive = False
        conn.outbox.put(None)
        if not drain:
            self._shut(conn.sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _hello(self, sock: socket.socket, msg: dict[str, Any]) -> _Conn:
        with self.lock:
            # before the first generation every worker is an initial member, however
            # it was started (`farflung coordinator` + `--join` on each machine)
            joiner = self.gen >= 0
            wid = msg.get("id")
            if wid is None or wid in self.conns:
                wid = max(self.expected - 1 if joiner else -1, *self.conns, -1) + 1
            conn = _Conn(
                wid, sock, msg.get("addr", ""), joiner, msg.get("step", 0), time.monotonic()
            )
            self.conns[wid] = conn
            self._thread(self._writer, conn)
            conn.writer = self.threads[-1]
            conn.send({"op": "welcome", "id": wid, "heartbeat_s": self.heartbeat_s})
            if joiner:
                self.joiners.append(wid)
                self.log(f"worker {wid} asks to join")
                if not self._replay_due():
                    self._reconsider()
            else:
                self._form_first()
        return conn

    def _form_first(self) -> None:
        """Generation 0: the ``expected`` initial workers, all at the same step (0, or
        a checkpoint's when resuming)."""
        first = sorted(c.id for c in self.conns.values() if not c.joiner and c.alive)
        if len(first) < self.expected:
            return
        steps = {self.conns[i].step for i in first}
        if len(steps) != 1:
            self.log(f"initial workers hold different steps {sorted(steps)}; using the lowest")
        self.committed = min(steps)
        self.stateful = set(first)
        self._new_generation(first, donor=None)
        self._replay_due()  # a replayed change before the first commit

    def _dispatch(self, conn: _Conn, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        with self.lock:
            if op == "vote" and msg.get("gen") == self.gen and conn.id in self.members:
                # one message per settled stretch (a DiLoCo round): committed together
                for vote in msg["votes"]:
                    self.votes.setdefault(vote["step"], {})[conn.id] = vote
                self._try_commit()
            elif op == "healed":
                if conn.id in self.members:
                    self.stateful.add(conn.id)
                for r in self.change.records if self.change else []:
                    if r["event"] == "joined" and r["id"] == conn.id:
                        r.update(state_bytes=msg["bytes"], transfer_s=round(msg["seconds"], 3))
            elif op == "fault" and msg.get("gen") == self.gen:
                self.fault_since = self.fault_since or time.monotonic()
            elif op == "done" and msg.get("gen") == self.gen and conn.id in self.members:
                self.done[conn.id] = msg
                if set(self.members) <= set(self.done):
                    self.handler.on_finish(dict(self.done))
                    self._flush_change()
                    for i in self.members:
                        self.conns[i].send({"op": "finish"})
                    self.finished.set()

    # -- decisions ------------------------------------------------------------------
    def _try_commit(self) -> None:
        while True:
            step = self.committed + 1
            votes = self.votes.get(step, {})
            if not set(self.members) <= set(votes):
                return
            if self.replay and self.replay[0]["committed"] < step:
                return  # a replayed change comes first (a join still on its way)
            self.handler.on_commit(step, self.gen, list(self.members), votes)
            self.quorum_base = list(self.members)
            self.stateful = set(self.members)
            self.gen_committed = True
            del self.votes[step]
            self.committed = step
            self._flush_change()
            for i in self.members:
                self.conns[i].send({"op": "commit", "step": step})
            if self._replay_due():
                return

    def _replay_due(self) -> bool:
        """Act on the replayed log's changes due now; True when the group changed."""
        changed = False
        while self.replay and self.replay[0]["committed"] == self.committed:
            entry = self.replay[0]
            if entry["event"] == "joined":
                if not any(self.conns[i].alive for i in self.joiners):
                    break  # wait for it: commits are held meanwhile
                self._reconsider()  # admits it: the log's next change is this join
                self.replay.pop(0)
                return True
            self.replay.pop(0)
            leaver = self.conns.get(entry["id"])
            if leaver is not None and leaver.alive:
                leaver.send({"op": "leave"})
                step = self.committed
                self._lose(leaver, "replay", f"the replayed log has it leave after step {step}")
                changed = True
        return changed

    def _lose(self, conn: _Conn, why: str, detail: str, decide: bool = True) -> None:
        silent = time.monotonic() - conn.last_seen
        self._close(conn, drain=why == "replay")
        was_member = conn.id in self.members
        if conn.id in self.joiners:
            self.joiners.remove(conn.id)
        self.log(f"worker {conn.id} lost ({why}: {detail})")
        record = {
            "event": "left",
            "id": conn.id,
            "why": why,
            "detail": detail,
            "member": was_member,
            "committed": self.committed,
            "silent_s": round(silent, 3),
            "at": time.time(),
            # steps some member had already voted and will now redo
            "steps_redone": max(self.votes, default=self.committed) - self.committed,
        }
        if not was_member:  # a joiner that never entered: nothing to recover from
            self.handler.on_event({**record, "gen": self.gen, "restart": None})
            return
        self._pending_records().append(record)
        if decide:
            self._reconsider()

    def _pending_records(self) -> list[dict[str, Any]]:
        if self.change is None:
            self.change = _Change([], time.monotonic())
        return self.change.records

    def _reconsider(self) -> None:
        """Start a new generation when the membership changed and may go on."""
        if self.gen < 0 or self.finished.is_set():
            return
        live = [i for i in self.members if self.conns[i].alive]
        # joiners come in bursts (a launcher restarting several): one generation for
        # the burst, once no new one has arrived for a beat
        settle = self.heartbeat_s / BEATS_PER_BOUND
        newest = max((self.conns[i].joined for i in self.joiners), default=0.0)
        ready = [i for i in self.joiners if self.conns[i].alive]
        if ready and time.monotonic() - newest < settle:
            ready = []
        if live == self.members and not ready and self.fault_since is None:
            return
        lost = [i for i in self.members if not self.conns[i].alive]
        holders = [i for i in live if i in self.stateful]
        if not holders:  # members left, but none holds the committed state
            ready = live + ready
            if not ready:
                return self._stall("every member is lost; waiting for joiners to resume")
            step = self.handler.rewind()  # nobody holds the state: a checkpoint does
            self._pending_records().append(
                {"event": "rewound", "id": None, "committed": self.committed, "to_step": step}
            )
            self.log(f"no live worker holds the state: resuming from the checkpoint of step {step}")
            self.committed = step
            self.stateful = set()
            new = [i for i in ready if i in self.joiners]
            self.joiners = [i for i in self.joiners if i not in ready]
            for i in new:
                self._pending_records().append(
                    {"event": "joined", "id": i, "committed": step, "at": time.time()}
                )
            return self._new_generation(ready, donor=None)
        certain = all(r.get("why") in ("crash", "replay") for r in self._lost_records(lost))
        # majority of the last generation that made progress (one lost by one, a
        # partition would otherwise shrink it step by step); returning members (a
        # healed partition) come back as joiners and count
        base = self.quorum_base or self.members
        if lost and not certain and 2 * (len(live) + len(ready)) <= len(base):
            return self._stall(
                f"only {len(live)} of {len(base)} members answer: no majority "
                "(a partition?), waiting"
            )
        if len(live) + len(ready) < self.min_workers:
            return self._stall(
                f"{len(live) + len(ready)} live workers, fewer than elastic.min_workers = "
                f"{self.min_workers}; waiting for joiners"
            )
        if self.replay and ready and lost == []:
            nxt = self.replay[0]
            if nxt["event"] != "joined" or nxt["committed"] != self.committed:
                return  # a replayed join enters where the log has it, not before
        self.joiners = [i for i in self.joiners if i not in ready]
        for i in ready:
            self._pending_records().append(
                {"event": "joined", "id": i, "committed": self.committed, "at": time.time()}
            )
        self._new_generation(live + ready, donor=holders[0])

    def _lost_records(self, lost: list[int]) -> list[dict[str, Any]]:
        records = self.change.records if self.change else []
        return [r for r in records if r["event"] == "left" and r["id"] in lost]

    def _stall(self, why: str) -> None:
        if why != self.stalled:
            self.stalled = why
            self.log(f"stalled: {why}")

    def _new_generation(self, members: list[int], donor: int | None) -> None:
        self.gen += 1
        self.gen_committed = False
        self.members = list(members)
        self.votes.clear()
        self.done.clear()
        self.fault_since = None
        self.stalled = ""
        restart = self.committed + 1
        if self.change is not None:
            self.change.decided = time.monotonic()
            for r in self.change.records:
                r.setdefault("gen", self.gen)
                r.setdefault("restart", restart)
                r.setdefault("members", list(members))
        self.log(f"generation {self.gen}: members {members}, from step {restart}")
        donor_addr = self.conns[donor].addr if donor is not None else ""
        for i in members:
            self.conns[i].send(
                {
                    "op": "gen",
                    "gen": self.gen,
                    "members": list(members),
                    "restart": restart,
                    "store_port": self.store_port,
                    "donor": donor,
                    "donor_addr": donor_addr,
                }
            )

    def _flush_change(self) -> None:
        """The new generation committed a step (or finished): the change is over."""
        if self.change is None or self.gen < 0:
            return
        if any(r.get("gen") is None for r in self.change.records):
            return  # not yet acted on
        recovered = time.monotonic() - self.change.decided
        for r in self.change.records:
            r["recovery_s"] = round(recovered, 3)
            self.handler.on_event(r)
        self.change = None

    def _monitor_loop(self) -> None:
        period = self.heartbeat_s / BEATS_PER_BOUND
        while not self.closed.wait(period / 2) and not self.finished.is_set():
            now = time.monotonic()
            with self.lock:
                silent = []
                # until a generation has committed, its members may be busy meeting
                # (process groups, state transfers, start-up on a loaded host): three
                # bounds then, one once it runs
                bound = self.heartbeat_s * (1 if self.gen_committed else 3)
                for c in list(self.conns.values()):
                    if c.alive:
                        c.send({"op": "tick"})
                        if now - c.last_seen > bound:
                            silent.append(c)
                for c in silent:  # all of this tick's losses, then one decision
                    self._lose(
                        c, "silent", f"no message for {now - c.last_seen:.1f} s", decide=False
                    )
                if silent:
                    self._reconsider()
                # a failed collective with no loss seen within a beat: the group broke
                # (a link flapped) while everyone is alive; re-form it as it was
                if self.fault_since is not None and now - self.fault_since > period:
                    self._reconsider()
                elif self.joiners:  # admitted once their burst has settled
                    self._reconsider()
