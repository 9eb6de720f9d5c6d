"""The coordinator of an elastic run: who is a member, which steps are committed.

One process (farflung's launcher, or ``farflung coordinator`` on a host of its own)
runs it. Workers keep one connection to it (:mod:`farflung.membership.member` is the other
end), authenticated with the run key (:class:`~farflung.comm.channel.Channel`, role
``"coordinator"``): a peer that does not prove the key within
:data:`~farflung.membership.protocol.HANDSHAKE_S` is closed and reported
(``events.jsonl``: ``refused``), and never becomes a member. Every message is checked
(its type and fields, :func:`~farflung.membership.protocol.check_message`) before it is
used; a member that sends a malformed one is evicted (why ``protocol``), never crashes
the coordinator. Messages are capped at
:data:`~farflung.membership.protocol.MAX_MESSAGE`, connections at ``4 * expected + 16``
(:mod:`farflung.membership.connections` serves them; this module decides).

- a crash is seen at once: the kernel closes a dead process's connection;
- a freeze or a cut link is seen when a worker has sent nothing for ``heartbeat_s``
  (workers beat five times per bound, from a thread of their own);
- a step ``s`` is *committed* once every member of the current generation has voted
  that its contribution to ``s`` was averaged; votes carry the member's sample ids,
  its metrics row and a hash of the state it shares with the others. The step
  commits with the state of the members whose hash is the majority's; a member whose
  hash differs is evicted (why ``diverged``) and heals as a joiner from an agreeing
  donor. Without a strict majority nobody can say which state is right: every member
  rolls back to the last committed step and redoes it (a transient fault such as a
  flipped bit does not recur); after :data:`MAX_ROLLBACKS` such rollbacks in a row
  the run stops with a message;
- when a member is lost (or a joiner is ready), the coordinator starts a new
  *generation*: the live members (plus joiners) in a fixed order, told to roll back
  to the state after the last committed step and go on from there. A generation's
  process group meets in the coordinator's own TCPStore, under the prefix
  ``gen<g>/``; each member says ``met`` once it arrived there, and a member that has
  not within the meeting deadline is evicted (why ``meeting``), so that no member can
  hold the others forever: a newcomer (a joiner, which meets as soon as it is told)
  has ``3 * heartbeat_s`` plus twice the slowest step seen, a member that trained
  before (it may be inside a long step) ``patience_s`` (``parallel.timeout_s``).
  A joiner gets a ticket the coordinator signed for its donor (the state server
  serves only a ticket holder) and the hash recorded at the last commit (it refuses a
  state that does not match).

Quorum: a member lost by silence may be alive behind a cut link, so the survivors
go on without it only when they are a strict majority of the generation; otherwise
the run waits (commits nothing) until the silence ends or the run is stopped. A
closed connection is a certain death, and an eviction a decision; neither needs a
majority.

The coordinator decides alone, so two sides of a partition can never both commit.
It is the run's single point of failure: when it goes, every worker stops within
``heartbeat_s`` (it, too, beats), and the run continues with ``--resume`` from its
last checkpoint (docs/fault-tolerance.md). An error of its own (writing the run's
files) stops the run with a message naming the file; it never evicts a worker."""

from __future__ import annotations

import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from farflung.comm.binding import serve_store
from farflung.comm.channel import Channel, sign
from farflung.membership.connections import Connection, Server
from farflung.membership.protocol import BEATS_PER_BOUND, HANDSHAKE_S, MAX_AHEAD

MAX_ROLLBACKS = 3
"""Steps without a majority state hash in a row before the run stops."""


class Handler(Protocol):
    """What the run does with the coordinator's decisions (the training layer's).

    An OSError from any of these is the coordinator's own fault (its disk): the run
    stops with a message naming it (:attr:`Coordinator.error`)."""

    def on_start(self, step: int) -> None:
        """Generation 0 formed; the workers resume from ``step`` (0: a fresh run)."""

    def on_commit(self, step: int, gen: int, members: list[int], votes: dict[int, dict]) -> None:
        """Step ``step`` is committed; ``votes`` by member id."""

    def on_event(self, record: dict[str, Any]) -> None:
        """A membership change, once its recovery is known (or the run ends), or a
        refused connection (``{"event": "refused", "address", "reason"}``)."""

    def on_finish(self, done: dict[int, dict]) -> None:
        """Every member has finished; ``done`` holds each one's last message."""

    def rewind(self) -> int:
        """Every member is lost: go back to the last checkpoint (0: the start), drop
        what was committed after it, and return its step."""


@dataclass
class _Change:
    """A membership change waiting for its recovery time (the new generation's first
    commit) before it is written."""

    records: list[dict[str, Any]]
    decided: float


class Coordinator:
    """Serve an elastic run of ``expected`` initial workers; see the module docstring.

    ``key``: the run key every connection must prove. ``host``, ``port``,
    ``port_range``: where the coordinator and its rendezvous store listen
    (:func:`farflung.comm.binding.listen`). ``patience_s``: how long a member that has
    trained in a generation before may take to meet the next (it may be inside a long
    step; ``parallel.timeout_s``). ``replay``: a membership log to reproduce,
    for reference runs: records ``{"event": "left" | "joined", "id", "committed"}`` as
    ``events.jsonl`` holds them. A leaver is told to leave once ``committed`` is; a
    joiner is admitted only then, and no later step commits before it is.
    ``handshake_s``: how long a connection has to prove the key and say hello."""

    def __init__(
        self,
        expected: int,
        heartbeat_s: float,
        handler: Handler,
        *,
        key: str,
        min_workers: int = 1,
        host: str = "0.0.0.0",
        port: int = 0,
        port_range: tuple[int, int] | None = None,
        replay: list[dict[str, int]] | None = None,
        log: Callable[[str], None] | None = None,
        patience_s: float = 120.0,
        handshake_s: float = HANDSHAKE_S,
    ) -> None:
        self.expected, self.heartbeat_s, self.handler = expected, heartbeat_s, handler
        self.patience_s = patience_s
        self.key = key
        self.min_workers = min_workers
        # a joiner lost before it entered changed nothing
        self.replay = [dict(r) for r in replay or [] if r.get("member", True)]
        self.log = log or (lambda msg: None)
        self.lock = threading.RLock()
        self.finished = threading.Event()  # the run ended: finished, or stopped (error)
        # who may connect, and each member's reader and writer
        self.server = Server(
            self,
            key,
            host_addr=host,
            port=port,
            port_range=port_range,
            max_conns=4 * expected + 16,
            heartbeat_s=heartbeat_s,
            handshake_s=handshake_s,
            log=self.log,
        )
        self.port = self.server.port
        # the generations' rendezvous: a store of its own, served from this process,
        # bound where the coordinator is
        self.store = serve_store(host, 0, port_range)
        self.store_port = self.store.port
        self.conns: dict[int, Connection] = {}
        self.members: list[int] = []
        self.quorum_base: list[int] = []  # the last generation that committed a step
        # who holds the state after the last commit: the members that committed it,
        # and joiners that fetched it since (a donor must be one of them)
        self.stateful: set[int] = set()
        self.gen_committed = False
        self.gen_started = time.monotonic()
        self.met: set[int] = set()  # members that reached this generation's meeting
        self.trained: set[int] = set()  # members that met a generation before
        self.slowest_step_s = 0.0  # between two commits of one generation
        self.last_commit_at: float | None = None
        self.joiners: list[int] = []
        self.gen = -1
        self.committed = 0
        self.committed_hash: tuple[int, str] | None = None  # (step, majority hash)
        self.rollbacks = 0  # steps without a majority hash, in a row
        self.votes: dict[int, dict[int, dict]] = {}
        self.done: dict[int, dict] = {}
        self.fault_since: float | None = None
        self.stalled = ""
        self.change: _Change | None = None
        self.error: str | None = None  # why the coordinator stopped the run itself

    # -- life cycle -----------------------------------------------------------------
    def start(self) -> Coordinator:
        self.server.start()
        self.server.thread(self._monitor_loop)
        return self

    def close(self, drain_s: float = 5.0) -> None:
        """Stop serving; what is queued for the workers (the last commit, "finish")
        is still sent, for up to ``drain_s``."""
        self.server.stop()
        with self.lock:
            if self.change is not None:  # changes not yet recovered from are still logged
                for r in self.change.records:
                    self._call(self.handler.on_event, {**r, "recovery_s": None})
                self.change = None
            for record in self.server.unlogged():  # the count of the refusals not logged
                self._call(self.handler.on_event, record)
            conns = list(self.conns.values())
            for c in conns:
                if c.alive:
                    c.close(drain=True)
        deadline = time.monotonic() + drain_s
        for c in conns:
            if c.writer is not None:
                c.writer.join(timeout=max(0.0, deadline - time.monotonic()))
            c.ch.close()

    def describe(self) -> str:
        """The membership state in a few lines (``kill -USR1`` on the launcher)."""
        with self.lock:
            votes = {step: sorted(v) for step, v in sorted(self.votes.items())}
            conns = {
                i: (f"alive {c.addr}" if c.alive else "gone") for i, c in sorted(self.conns.items())
            }
            return (
                f"generation {self.gen}: members {self.members}, committed {self.committed}, "
                f"votes {votes}, joiners {self.joiners}, replay {self.replay[:2]}, "
                f"stalled {self.stalled or 'no'}, connections {conns}, "
                f"open sockets {self.server.open_conns}/{self.server.max_conns}"
            )

    # -- the run's files: errors there are the coordinator's own ---------------------------
    def _call(self, fn: Callable[..., Any], *args: Any) -> bool:
        """``fn(*args)`` on the handler; any error stops the run (see :meth:`_stop`),
        it is never a worker's fault. True when it went well."""
        try:
            fn(*args)
            return True
        except OSError as e:
            self._stop(f"cannot write the run's files: {e}")
        except Exception as e:  # a bug of ours: stop with the trace, blame no worker
            traceback.print_exc()
            self._stop(f"{fn.__name__} failed: {e!r}")
        return False

    def _stop(self, why: str) -> None:
        """End the run: every worker is told why and let go (they exit), the launcher
        or `farflung coordinator` sees :attr:`error` and reports it."""
        if self.error is not None:
            return
        self.error = why
        self.log(f"stopping the run: {why}")
        for c in self.conns.values():
            if c.alive:
                c.send({"op": "stop", "why": why})
                c.close(drain=True)
        self.finished.set()

    # -- connections (the Server's Host) ---------------------------------------------
    def refused(self, record: dict[str, Any]) -> None:
        self._call(self.handler.on_event, record)

    def hello(self, ch: Channel, msg: dict[str, Any]) -> Connection:
        # before the first generation every worker is an initial member, however
        # it was started (`farflung coordinator` + `--join` on each machine)
        joiner = self.gen >= 0
        wid = msg["id"]
        # the local launcher numbers its initial workers; anything else gets the next id
        if joiner:  # a joiner's id is new: the log never confuses it with one gone
            wid = max(self.expected - 1, *self.conns) + 1
        elif wid is None or not 0 <= wid < self.expected or wid in self.conns:
            wid = next(i for i in range(len(self.conns) + 1) if i not in self.conns)
        # a joiner fetches from the address this connection came from, not one it names
        addr = f"{ch.peer[0]}:{msg['state_port']}"
        conn = Connection(wid, ch, addr, joiner, msg["step"], time.monotonic())
        self.conns[wid] = conn
        conn.writer = self.server.thread(conn.write)
        conn.send({"op": "welcome", "id": wid, "heartbeat_s": self.heartbeat_s})
        if joiner:
            self.joiners.append(wid)
            self.log(f"worker {wid} ({addr}) asks to join")
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
        if not self._call(self.handler.on_start, self.committed):
            return
        self.stateful = set(first)
        self._new_generation(first, donor=None)
        self._replay_due()  # a replayed change before the first commit

    def dispatch(self, conn: Connection, msg: dict[str, Any]) -> None:
        op = msg["op"]
        with self.lock:
            if self.finished.is_set() or not conn.alive:
                return
            current = msg.get("gen") == self.gen and conn.id in self.members
            if op == "vote" and current:
                self._take_votes(conn, msg["votes"])
            elif op == "met" and current:
                self.met.add(conn.id)
                self.trained.add(conn.id)
            elif op == "healed":
                if conn.id in self.members:
                    self.stateful.add(conn.id)
                for r in self.change.records if self.change else []:
                    if r["event"] == "joined" and r["id"] == conn.id:
                        r.update(state_bytes=msg["bytes"], transfer_s=round(msg["seconds"], 3))
            elif op == "fault" and current:  # only a member of this generation can
                self.fault_since = self.fault_since or time.monotonic()
            elif op == "done" and current:
                self.done[conn.id] = msg
                if set(self.members) <= set(self.done):
                    self._finish()

    def _take_votes(self, conn: Connection, votes: list[dict[str, Any]]) -> None:
        """One message per settled stretch (a DiLoCo round): committed together."""
        for vote in votes:
            step = vote["step"]
            if step > self.committed + MAX_AHEAD:
                self.lose(conn, "protocol", f"a vote for step {step}, far beyond the commits")
                return
            if step > self.committed:  # older ones are committed already
                self.votes.setdefault(step, {})[conn.id] = vote
        self._try_commit()

    def _finish(self) -> None:
        if not self._call(self.handler.on_finish, dict(self.done)):
            return
        self._flush_change()
        for i in self.members:
            self.conns[i].send({"op": "finish"})
        self.finished.set()

    # -- decisions ------------------------------------------------------------------
    def _try_commit(self) -> None:
        while not self.finished.is_set():
            step = self.committed + 1
            votes = self.votes.get(step, {})
            if not set(self.members) <= set(votes):
                return
            if self.replay and self.replay[0]["committed"] < step:
                return  # a replayed change comes first (a join still on its way)
            verdict = self._judge(votes)
            if verdict is None:
                return self._roll_back(step, votes)
            majority, diverged = verdict
            # every member trained its share of the step (a state diverges after its
            # update): the samples and rows are all the members'; the state is the
            # majority's
            members = list(self.members)
            if not self._call(self.handler.on_commit, step, self.gen, members, votes):
                return
            self._committed(step, majority, [i for i in members if i not in diverged])
            for i in diverged:
                detail = (
                    f"its state hash at step {step} ({votes[i]['hash'][:16]}) differs from "
                    f"the majority's ({str(majority)[:16]})"
                )
                self.lose(self.conns[i], "diverged", detail, decide=False)
            for i in self.members:
                self.conns[i].send({"op": "commit", "step": step})
            if diverged:
                return self._reconsider()
            if self._replay_due():
                return

    def _committed(self, step: int, majority: str | None, holders: list[int]) -> None:
        now = time.monotonic()
        if self.gen_committed and self.last_commit_at is not None:
            self.slowest_step_s = max(self.slowest_step_s, now - self.last_commit_at)
        self.last_commit_at = now
        self.quorum_base = list(self.members)
        self.stateful = set(holders)
        self.gen_committed = True
        self.rollbacks = 0
        del self.votes[step]
        self.committed = step
        if majority is not None:
            self.committed_hash = (step, majority)
        self._flush_change()

    def _judge(self, votes: dict[int, dict]) -> tuple[str | None, list[int]] | None:
        """The majority's state hash and the members that differ from it; None when
        no hash has a strict majority. A step whose votes carry no hash (inside a
        settled stretch) is not judged."""
        hashes = {i: votes[i].get("hash") for i in self.members}
        if any(h is None for h in hashes.values()):
            return None, []
        top, n = Counter(hashes.values()).most_common(1)[0]
        if 2 * n <= len(hashes):
            return None
        return top, [i for i, h in hashes.items() if h != top]

    def _roll_back(self, step: int, votes: dict[int, dict]) -> None:
        """No strict majority agrees on the state after ``step``: every member rolls
        back to the last committed step and redoes it, up to :data:`MAX_ROLLBACKS`
        times in a row; then the run stops."""
        self.rollbacks += 1
        hashes = {i: votes[i]["hash"][:16] for i in self.members}
        detail = f"no strict majority of the members' state hashes at step {step}: {hashes}"
        if self.rollbacks > MAX_ROLLBACKS:
            return self._stop(
                f"{detail}, {self.rollbacks} times in a row: the workers keep computing "
                "different states; continue from the last checkpoint with --resume"
            )
        self.log(f"{detail}; every member redoes it from step {self.committed}")
        self._pending_records().append(
            {"event": "diverged", "id": None, "committed": self.committed, "detail": detail}
        )
        self._new_generation(list(self.members), donor=None)

    def _replay_due(self) -> bool:
        """Act on the replayed log's changes due now; True when the group changed."""
        changed = False
        while self.replay and self.replay[0]["committed"] == self.committed:
            entry = self.replay[0]
            if entry["event"] == "joined":
                gen = self.gen
                self._reconsider()  # admits a joiner whose burst has settled, if any
                if self.gen == gen:
                    break  # none yet: commits are held until a tick admits one
                return True
            self.replay.pop(0)
            leaver = self.conns.get(entry["id"])
            if leaver is not None and leaver.alive:
                leaver.send({"op": "leave"})
                step = self.committed
                self.lose(leaver, "replay", f"the replayed log has it leave after step {step}")
                changed = True
        return changed

    def lose(self, conn: Connection, why: str, detail: str, decide: bool = True) -> None:
        """Lose a member or joiner (``why``: the ``left`` record's); ``decide``: act on
        it now (a caller losing several decides once, after the last)."""
        silent = time.monotonic() - conn.last_seen
        conn.close(drain=why == "replay")
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
            self._call(self.handler.on_event, {**record, "gen": self.gen, "restart": None})
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
            return self._rewind(live + ready)
        # a death or a decision of ours is certain; a silence may be a partition
        decided = ("crash", "replay", "diverged", "meeting", "protocol")
        certain = all(r.get("why") in decided for r in self._lost_records(lost))
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
        if self.replay and ready:
            nxt = self.replay[0]
            due = nxt["event"] == "joined" and nxt["committed"] == self.committed
            if lost == [] and not due:
                return  # a replayed join enters where the log has it, not before
            if due:  # off the log only now that it is admitted: a joiner still
                # settling when its commit came holds the commits after it until a
                # tick admits it
                self.replay.pop(0)
        self.joiners = [i for i in self.joiners if i not in ready]
        for i in ready:
            self._pending_records().append(
                {"event": "joined", "id": i, "committed": self.committed, "at": time.time()}
            )
        self._new_generation(live + ready, donor=holders[0])

    def _rewind(self, ready: list[int]) -> None:
        """No live worker holds the committed state: the workers there are resume
        from the last checkpoint."""
        if not ready:
            return self._stall("every member is lost; waiting for joiners to resume")
        try:
            step = self.handler.rewind()  # nobody holds the state: a checkpoint does
        except Exception as e:  # the run's files or checkpoints: not a worker's fault
            return self._stop(f"cannot rewind the run to its last checkpoint: {e}")
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
        self._new_generation(ready, donor=None)

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
        self.gen_started = time.monotonic()
        self.met = set()
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
        recorded = self.committed_hash
        msg = {
            "op": "gen",
            "gen": self.gen,
            "members": list(members),
            "restart": restart,
            "store_port": self.store_port,
            "donor": donor,
            "donor_addr": self.conns[donor].addr if donor is not None else "",
            # what a joiner's restored state must hash to
            "state_hash": recorded[1] if recorded and recorded[0] == self.committed else None,
        }
        for i in members:
            ticket = {}
            if donor is not None and i not in self.stateful:  # it must fetch the state
                fields = {"id": i, "gen": self.gen, "restart": restart, "donor": donor}
                ticket = {"ticket": {**fields, "mac": sign(self.key, "ticket", fields)}}
            self.conns[i].send({**msg, **ticket})

    def _flush_change(self) -> None:
        """The new generation committed a step (or finished): the change is over."""
        if self.change is None or self.gen < 0:
            return
        if any(r.get("gen") is None for r in self.change.records):
            return  # not yet acted on
        recovered = time.monotonic() - self.change.decided
        records, self.change = self.change.records, None
        for r in records:
            r["recovery_s"] = round(recovered, 3)
            if not self._call(self.handler.on_event, r):
                return

    def meet_deadline_s(self, member: int) -> float:
        """How long ``member`` has to meet this generation: a newcomer meets as soon
        as it is told (three heartbeat bounds, for start-up on a loaded host, plus
        twice the slowest step seen); a member that trained before may be inside a
        long step when the generation changes (``patience_s``)."""
        quick = 3 * self.heartbeat_s + 2 * self.slowest_step_s
        return max(quick, self.patience_s) if member in self.trained else quick

    def _monitor_loop(self) -> None:
        period = self.heartbeat_s / BEATS_PER_BOUND
        while not self.server.closed.wait(period / 2) and not self.finished.is_set():
            with self.lock:
                if not self.finished.is_set():
                    self._check_liveness(period)

    def _check_liveness(self, period: float) -> None:
        now = time.monotonic()
        # until a generation has committed, its members may be busy meeting
        # (process groups, state transfers, start-up on a loaded host): three bounds
        # then, one once it runs
        bound = self.heartbeat_s * (1 if self.gen_committed else 3)
        silent = []
        for c in list(self.conns.values()):
            if c.alive:
                c.send({"op": "tick"})
                if now - c.last_seen > bound:
                    silent.append(c)
        for c in silent:  # all of this tick's losses, then one decision
            self.lose(c, "silent", f"no message for {now - c.last_seen:.1f} s", decide=False)
        late = self._late_to_meet(now)
        for i in late:
            waited = now - self.gen_started
            detail = f"it did not meet generation {self.gen} within {waited:.1f} s"
            self.lose(self.conns[i], "meeting", detail, decide=False)
        if silent or late:
            self._reconsider()
        # a failed collective with no loss seen within a beat: the group broke (a
        # link flapped) while everyone is alive; re-form it as it was
        if self.fault_since is not None and now - self.fault_since > period:
            self._reconsider()
        elif self.joiners:  # admitted once their burst has settled
            self._reconsider()

    def _late_to_meet(self, now: float) -> list[int]:
        """Live members of a generation past its meeting deadline that have not met
        (one that says hello and beats but never meets would hold the others)."""
        if self.gen < 0 or self.gen_committed:
            return []
        waited = now - self.gen_started
        return [
            i
            for i in self.members
            if self.conns[i].alive and i not in self.met and waited > self.meet_deadline_s(i)
        ]
