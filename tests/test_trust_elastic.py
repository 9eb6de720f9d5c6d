"""Only the run's own machines get into an elastic run, and none of them can stop it.

Two halves. The coordinator alone, in this process, with scripted members that hold
the key (fast, exact): ids, message checks, the meeting deadline, hash enforcement, a
disk error of its own. Then a real local run (`farflung train --workers 2`) that
strangers and members without manners attack while it trains: it commits every
step, exactly once, with exactly its batch, and every refused peer is in
``events.jsonl``. Loopback only; every loop bounded in count and time."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from procs import end_run

from farflung.comm.channel import Channel, new_key, verify
from farflung.config import Config, load_config
from farflung.data import SampleSet, ShardIndex, TokenStream
from farflung.membership.coordinator import MAX_ROLLBACKS, Coordinator
from farflung.train.elastic_run import RunLog, check_samples
from farflung.train.metrics import read_jsonl

KEY = new_key()
HANDSHAKE_S = 2.0  # the coordinators' deadline for the handshake and hello (default 5 s)


# -- the coordinator alone, with scripted members ---------------------------------------------
class Recorder:
    """A Handler that keeps what it is told; ``fail_commit``: on_commit raises it."""

    def __init__(self, fail_commit: OSError | None = None) -> None:
        self.commits: list[tuple[int, list[int]]] = []
        self.events: list[dict[str, Any]] = []
        self.fail_commit = fail_commit
        self.finished = False

    def on_start(self, step: int) -> None:
        pass

    def on_commit(self, step: int, gen: int, members: list[int], votes: dict) -> None:
        if self.fail_commit is not None:
            raise self.fail_commit
        self.commits.append((step, list(members)))

    def on_event(self, record: dict[str, Any]) -> None:
        self.events.append(record)

    def on_finish(self, done: dict) -> None:
        self.finished = True

    def rewind(self) -> int:
        return 0


class Fake:
    """A member played by the test: it holds the key (or not), says hello, and beats
    from a thread of its own when ``beat`` (or stays silent)."""

    def __init__(
        self,
        coord: Coordinator,
        wid: Any = None,
        *,
        key: str = KEY,
        state_port: int = 4321,
        beat: bool = True,
        hello: dict[str, Any] | None = None,
    ) -> None:
        sock = socket.create_connection(("127.0.0.1", coord.port), timeout=10)
        self.ch = Channel.client(sock, key, "coordinator")
        self.ch.settimeout(10)
        msg = {"op": "hello", "id": wid, "join": False, "step": 0, "state_port": state_port}
        self.ch.send(hello if hello is not None else msg)
        self.inbox: list[dict[str, Any]] = []
        self.welcome = self.ch.recv()
        self.id = self.welcome.get("id")
        self.stop = threading.Event()
        if beat:
            threading.Thread(target=self._beat, args=(coord.heartbeat_s / 5,), daemon=True).start()

    def _beat(self, period: float) -> None:
        while not self.stop.wait(period):
            try:
                self.ch.send({"op": "beat"})
            except OSError:
                return

    def next(self, op: str, timeout: float = 20) -> dict[str, Any]:
        """The next message ``op`` from the coordinator (ticks skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.ch.recv()
            if msg["op"] == op:
                return msg
            assert msg["op"] in ("tick", "commit", "gen"), msg
        raise AssertionError(f"no {op} message within {timeout} s")

    def closed(self, timeout: float = 20) -> bool:
        """Whether the coordinator closes this connection (other messages skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.ch.recv()
            except OSError:
                return True
        return False

    def vote(self, gen: int, step: int, digest: str | None = "h") -> None:
        vote = {"step": step, "samples": [step], "row": [0.0, 1.0]}
        if digest is not None:
            vote["hash"] = digest
        self.ch.send({"op": "vote", "gen": gen, "votes": [vote]})

    def close(self) -> None:
        self.stop.set()
        self.ch.close()


@pytest.fixture
def coordinator():
    made: list[Coordinator] = []

    def make(
        expected: int, handler: Recorder, heartbeat_s: float = 5.0, patience_s: float = 120.0
    ) -> Coordinator:
        coord = Coordinator(
            expected,
            heartbeat_s,
            handler,
            key=KEY,
            host="127.0.0.1",
            patience_s=patience_s,
            handshake_s=HANDSHAKE_S,
        ).start()
        made.append(coord)
        return coord

    yield make
    for c in made:
        c.close(drain_s=0.5)


def _group(coord: Coordinator, n: int, **kw: Any) -> tuple[list[Fake], dict[str, Any]]:
    fakes = [Fake(coord, i, **kw) for i in range(n)]
    gens = [f.next("gen") for f in fakes]
    for f in fakes:
        f.ch.send({"op": "met", "gen": gens[0]["gen"]})
    return fakes, gens[0]


def _left(coord: Coordinator, handler: Recorder) -> list[dict[str, Any]]:
    """Members lost so far: logged, or waiting for their recovery to be timed."""
    with coord.lock:
        pending = list(coord.change.records) if coord.change else []
    return [e for e in handler.events + pending if e["event"] == "left"]


def _wait(cond, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_ids_are_the_coordinators(coordinator):
    """A requested id is honoured only when it is an int in range and free; a hello
    with ``"id": "x"`` is refused and breaks nothing (it made every later hello fail)."""
    handler = Recorder()
    coord = coordinator(3, handler)
    bad = Fake(coord, "x")
    assert bad.welcome["op"] == "refused" and "id" in bad.welcome["why"]
    a = Fake(coord, -5)  # negative ids sorted first: it would have become the donor
    b = Fake(coord, 2)
    c = Fake(coord, 2)  # taken
    assert (a.id, b.id, c.id) == (0, 2, 1)
    gen = a.next("gen")
    assert gen["members"] == [0, 1, 2]
    refused = [e for e in handler.events if e["event"] == "refused"]
    assert len(refused) == 1 and "bad hello" in refused[0]["reason"]
    assert refused[0]["address"].startswith("127.0.0.1:")


def test_a_peer_without_the_key_is_refused_and_logged(coordinator):
    handler = Recorder()
    coord = coordinator(1, handler)
    with pytest.raises(OSError):
        Fake(coord, 0, key=new_key())
    plain = socket.create_connection(("127.0.0.1", coord.port), timeout=10)
    plain.sendall(b'{"op": "hello", "id": -1, "addr": "127.0.0.1:1"}\n')  # the old protocol
    assert plain.recv(100) == b""  # closed
    silent = socket.create_connection(("127.0.0.1", coord.port), timeout=10)
    assert silent.recv(100) == b""  # closed within the handshake deadline
    _wait(lambda: len(handler.events) == 3)
    reasons = [e["reason"] for e in handler.events]
    assert all(e["event"] == "refused" and e["address"] for e in handler.events)
    assert "handshake" in reasons[0] and "time" in reasons[2], reasons
    assert coord.conns == {}  # none of them became a member


def test_bad_messages_evict_the_sender_not_the_coordinator(coordinator):
    """Malformed messages from a member holding the key: that member is lost with
    the reason, and the coordinator goes on (a new member still gets in)."""
    for bad in (
        {"op": "vote", "gen": 0, "votes": [{"step": "x", "samples": [], "row": [1.0]}]},
        {"op": "vote", "gen": 0, "votes": "all"},
        {"op": "healed", "bytes": "many", "seconds": 1},
        {"op": "launch_missiles"},
        {"op": "vote", "gen": 0, "votes": [{"step": 10**9, "samples": [1], "row": [1.0]}]},
    ):
        handler = Recorder()
        coord = coordinator(1, handler)
        (member,), _ = _group(coord, 1)
        member.ch.send(bad)
        assert member.closed()
        _wait(lambda h=handler, c=coord: _left(c, h))
        (left,) = _left(coord, handler)
        assert left["why"] == "protocol", left
        Fake(coord)  # the coordinator still serves
        assert coord.error is None


def test_fault_counts_only_from_members_of_the_generation(coordinator):
    handler = Recorder()
    coord = coordinator(2, handler)
    fakes, gen = _group(coord, 2)
    outsider = Fake(coord)  # a joiner: not a member of this generation yet
    outsider.ch.send({"op": "fault", "gen": gen["gen"], "why": "forged"})
    time.sleep(0.3)
    assert coord.fault_since is None
    fakes[0].ch.send({"op": "fault", "gen": gen["gen"], "why": "a collective failed"})
    _wait(lambda: coord.fault_since is not None or coord.gen > gen["gen"])


def test_a_member_that_never_meets_is_evicted(coordinator):
    """It says hello and beats but never meets the group: the others would wait on
    it forever; after the deadline it is evicted and a generation without it forms."""
    handler = Recorder()
    coord = coordinator(3, handler, heartbeat_s=0.5)
    fakes = [Fake(coord, i) for i in range(3)]
    gen = fakes[0].next("gen")
    for f in fakes[:2]:
        f.ch.send({"op": "met", "gen": gen["gen"]})
    new = fakes[0].next("gen", timeout=30)
    assert new["members"] == [0, 1]
    assert fakes[2].closed()
    _wait(lambda: coord.change is None or coord.change.records)
    for f in fakes[:2]:
        f.ch.send({"op": "met", "gen": new["gen"]})
        f.vote(new["gen"], 1)
    _wait(lambda: handler.commits)
    left = next(e for e in handler.events if e["event"] == "left")
    assert left["id"] == 2 and left["why"] == "meeting"


def test_a_member_that_trained_before_has_patience_to_meet(coordinator):
    """A member inside a long step when a joiner arrives meets late: it is not evicted
    at the newcomers' deadline, only after ``patience_s``."""
    handler = Recorder()
    coord = coordinator(2, handler, heartbeat_s=0.5, patience_s=3.0)
    fakes, gen = _group(coord, 2)
    for f in fakes:
        f.vote(gen["gen"], 1)
    _wait(lambda: handler.commits)
    joiner = Fake(coord)
    gen1 = joiner.next("gen")
    newcomer_s = coord.meet_deadline_s(joiner.id)  # 1.5 s + twice the slowest step
    assert newcomer_s < 3.0 - 1.0  # the patience is what keeps member 0
    for f in (fakes[1], joiner):  # member 0 is busy in its step
        f.ch.send({"op": "met", "gen": gen1["gen"]})
    # past a newcomer's deadline, a few checks later
    _wait(lambda: time.monotonic() - coord.gen_started > newcomer_s + 0.3)
    assert coord.gen == gen1["gen"] and coord.conns[0].alive
    new = joiner.next("gen", timeout=20)  # then patience ends: evicted after all
    assert new["members"] == [1, joiner.id]
    assert [e["why"] for e in _left(coord, handler)] == ["meeting"]


def test_the_majority_hash_commits_and_the_diverged_member_is_evicted(coordinator):
    handler = Recorder()
    coord = coordinator(3, handler)
    fakes, gen = _group(coord, 3)
    for f, digest in zip(fakes, ("good", "good", "bad"), strict=True):
        f.vote(gen["gen"], 1, digest)
    new = fakes[0].next("gen")
    assert handler.commits == [(1, [0, 1, 2])]  # every member trained its share of it
    assert new["members"] == [0, 1] and new["restart"] == 2 and new["state_hash"] == "good"
    assert fakes[2].closed()
    (left,) = _left(coord, handler)
    assert left["why"] == "diverged" and left["id"] == 2
    # it comes back as a joiner: it gets a ticket for an agreeing donor, signed
    joiner = Fake(coord, state_port=5555)
    time.sleep(1.2)  # its burst settles (a beat)
    gen3 = joiner.next("gen")
    ticket = gen3["ticket"]
    assert ticket["id"] == joiner.id and ticket["donor"] in (0, 1)
    assert gen3["donor_addr"] == "127.0.0.1:4321"  # the address seen, its state port
    fields = {k: ticket[k] for k in ("id", "gen", "restart", "donor")}
    assert verify(KEY, "ticket", fields, ticket["mac"])
    assert gen3["state_hash"] == "good" and gen3["restart"] == 2
    assert "ticket" not in fakes[0].next("gen")  # a holder of the state gets none


def test_without_a_majority_every_member_redoes_the_step_then_the_run_stops(coordinator):
    handler = Recorder()
    coord = coordinator(2, handler)
    fakes, gen = _group(coord, 2)
    for attempt in range(MAX_ROLLBACKS + 1):
        for f, digest in zip(fakes, ("a", "b"), strict=True):
            f.vote(gen["gen"], 1, digest)
        if attempt == MAX_ROLLBACKS:
            break
        gen = fakes[0].next("gen")
        fakes[1].next("gen")
        assert gen["members"] == [0, 1] and gen["restart"] == 1  # no one is blamed
        for f in fakes:
            f.ch.send({"op": "met", "gen": gen["gen"]})
    stop = fakes[0].next("stop")
    assert "majority" in stop["why"] and "--resume" in stop["why"]
    assert coord.error and coord.finished.is_set()
    assert handler.commits == []
    assert not any(e["event"] == "left" for e in handler.events)


def test_a_disk_error_stops_the_run_and_blames_no_worker(coordinator):
    """on_commit fails to write (ENOSPC): the coordinator stops the run naming the
    file and the error; the voter is not evicted (it was, as a crash)."""
    err = OSError(28, "No space left on device")
    handler = Recorder(fail_commit=OSError(28, f"cannot write /run/metrics.jsonl: {err}"))
    coord = coordinator(2, handler)
    fakes, gen = _group(coord, 2)
    for f in fakes:
        f.vote(gen["gen"], 1)
    stop = fakes[0].next("stop")
    assert "metrics.jsonl" in stop["why"] and "No space left" in stop["why"]
    assert "metrics.jsonl" in coord.error
    assert not any(e["event"] == "left" for e in handler.events)
    assert all(c.id in coord.members for c in coord.conns.values())


def test_the_run_logs_write_errors_name_the_file(tmp_path):
    """What the coordinator's stop message quotes: the file and the error."""
    log = RunLog(Config(), tmp_path)
    (tmp_path / "events.jsonl").mkdir()  # unwritable as a file
    with pytest.raises(OSError, match=r"cannot write .*events\.jsonl"):
        log.on_event({"event": "refused", "address": "x", "reason": "y"})


def test_connections_are_capped(coordinator):
    handler = Recorder()
    coord = coordinator(1, handler)
    socks = []
    try:
        for _ in range(coord.server.max_conns + 20):  # held open, none says anything
            socks.append(socket.create_connection(("127.0.0.1", coord.port), timeout=10))
        _wait(lambda: any("too many" in e.get("reason", "") for e in handler.events))
        assert coord.server.open_conns <= coord.server.max_conns
    finally:
        for s in socks:
            s.close()
    _wait(lambda: coord.server.open_conns == 0)
    (member,) = [Fake(coord, 0)]  # room again once they are gone
    assert member.welcome["op"] == "welcome"


# -- a real run under attack --------------------------------------------------------------------
STEPS = 40
SLOW_STEPS = range(6, 12)  # a worker sleeps 1 s in each: the attacks begin while it runs


def _launch(tiny: Path, out: Path) -> subprocess.Popen:  # noqa: F811
    sets = ["elastic.enabled=true", "elastic.heartbeat_s=2", "train.batch_size=12"]
    sets += [f"train.steps={STEPS}", "train.checkpoint_every=0", "train.eval_every=0"]
    cmd = [sys.executable, "-m", "farflung.cli.main", "train", str(tiny / "tiny.toml")]
    cmd += ["--workers", "2", "--out", str(out), "--quiet"]
    cmd += [a for s in sets for a in ("--set", s)]
    faults = ",".join(f"1:{t}:SLEEP1" for t in SLOW_STEPS)
    return subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=open(out.parent / "launcher.log", "w"),  # noqa: SIM115
        env={**os.environ, "FARFLUNG_FAULTS": faults},
    )


def _address(out: Path, deadline: float) -> tuple[str, int]:
    while not (out / "coordinator.json").is_file():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    host, port = json.loads((out / "coordinator.json").read_text())["address"].rsplit(":", 1)
    return host, int(port)


def _stranger(address: tuple[str, int], payload: bytes, beats: int = 0) -> bytes:
    """A plain client: connect, send ``payload``, keep 'beating' the old protocol; what
    it got back before the coordinator closed it."""
    with socket.create_connection(address, timeout=10) as s:
        got = b""
        try:
            s.sendall(payload)
            for _ in range(beats):
                s.sendall(b'{"op": "beat"}\n')
                time.sleep(0.1)
            while chunk := s.recv(4096):
                got += chunk
        except OSError:
            pass
        return got


def _fuzz_messages(rng: random.Random) -> list[bytes]:
    """One connection's worth of hostile bytes: random, truncated, oversized, and
    plausible JSON of the wrong shape."""
    hello = json.dumps({"farflung": 1, "role": "coordinator", "nonce": "a" * 64}).encode()
    kind = rng.randrange(6)
    if kind == 0:
        return [os.urandom(rng.randrange(1, 512))]
    if kind == 1:  # a handshake message cut short
        return [struct.pack("!I", len(hello)) + hello[: rng.randrange(len(hello))]]
    if kind == 2:  # a length prefix promising far more than the cap
        return [struct.pack("!I", rng.choice([4097, 1 << 20, 1 << 31])) + b"{" * 100]
    if kind == 3:  # the old line protocol, huge or wrong
        return [b'{"op": "hello", "id": "x"}\n', b"x" * rng.randrange(1, 1 << 16)]
    if kind == 4:  # valid framing, wrong key's proof
        return [
            struct.pack("!I", len(hello)) + hello,
            struct.pack("!I", 20) + b'{"proof": "00"}   ',
        ]
    return [json.dumps({"op": rng.choice(["hello", "vote", "fault"]), "gen": "0"}).encode()]


def _junk(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value: what a buggy or hostile key holder might send."""
    pool: list[Any] = [None, True, -1, 0, 2**63, 1e308, "x" * rng.randrange(40), "0", []]
    if depth < 2:
        pool += [[_junk(rng, depth + 1) for _ in range(3)], {"step": _junk(rng, depth + 1)}]
    return rng.choice(pool)


def _keyed_fuzz(address: tuple[str, int], key: str, rng: random.Random) -> int:
    """A connection that proves the key, then sends malformed messages where its hello
    belongs (never a hello: one that is valid would make it a member); all refused."""
    op = rng.choice(["vote", "met", "beat", "fault", "done", "healed", "nop", 7])
    msg = {"op": op, **{k: _junk(rng) for k in ("gen", "votes", "why", "bytes", "id")}}
    try:
        with socket.create_connection(address, timeout=5) as sock:
            ch = Channel.client(sock, key, "coordinator")
            ch.send(msg)
            ch.recv()  # "refused", then closed
            ch.recv()
    except OSError:
        pass
    return 1


def _fuzz(address: tuple[str, int], seconds: float, seed: int, key: str | None = None) -> int:
    """Hostile connections for at most ``seconds``; the number of messages sent.
    With ``key``: one connection in four proves it first."""
    rng, sent = random.Random(seed), 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and sent < 2600:
        if key is not None and rng.random() < 0.25:
            sent += _keyed_fuzz(address, key, rng)
            continue
        try:
            with socket.create_connection(address, timeout=5) as s:
                for msg in _fuzz_messages(rng):
                    s.sendall(msg)
                    sent += 1
                s.shutdown(socket.SHUT_WR)
                while s.recv(4096):
                    pass
        except OSError:
            sent += 1  # refused or reset mid-message: the coordinator closed it
    return sent


def _authenticated(address: tuple[str, int], key: str, hello: dict) -> Channel:
    sock = socket.create_connection(address, timeout=10)
    ch = Channel.client(sock, key, "coordinator")
    ch.send(hello)
    return ch


def test_a_run_under_attack_commits_every_step_exactly(tiny, tmp_path):  # noqa: F811
    """Strangers before and after the workers, a bad id, an endless line, a member
    that never meets, a flood, and >= 10,000 fuzzed messages to the coordinator and a
    worker's state server: none becomes a member, the run commits every step with
    exactly its batch, and the refused are in events.jsonl."""
    out = tmp_path / "run"
    launcher = _launch(tiny, out)
    stall_stop = threading.Event()
    try:
        deadline = time.monotonic() + 120
        address = _address(out, deadline)
        # first, before any worker said hello (they take seconds to start)
        first = _stranger(address, b'{"op": "hello", "id": -1, "join": false}\n', beats=3)
        assert first == b""  # no welcome, no generation: closed
        while len(read_jsonl(out / "metrics.jsonl")) < 5:
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        key = (out / "run.key").read_text().strip()
        # a member holding the key that says hello and beats but never meets: nothing
        # commits until it is evicted (the run is live through what follows)
        staller = _authenticated(
            address, key, {"op": "hello", "id": None, "join": True, "step": 0, "state_port": 9}
        )
        threading.Thread(target=_beat, args=(staller, stall_stop), daemon=True).start()
        # after the workers: the old protocol with a bad id, a line without end
        assert _stranger(address, b'{"op": "hello", "id": "x"}\n', beats=5) == b""
        rss = _rss_kb(launcher.pid)
        assert _stranger(address, b"x" * (8 << 20)) == b""  # closed long before 8 MiB
        flood = []  # a flood of connections, held open
        for _ in range(60):
            try:
                flood.append(socket.create_connection(address, timeout=5))
            except OSError:
                break
        time.sleep(0.5)
        for s in flood:
            s.close()
        # fuzz the coordinator and worker 0's state server, a few sockets in parallel
        targets = [address] * 3 + [("127.0.0.1", _state_port(launcher, tmp_path, 0))]
        counts: list[int] = []
        fuzzers = [  # the coordinator's fuzzers also send malformed messages with the key
            threading.Thread(
                target=lambda a=a, i=i: counts.append(_fuzz(a, 30, i, key if i < 3 else None))
            )
            for i, a in enumerate(targets)
        ]
        for t in fuzzers:
            t.start()
        for t in fuzzers:
            t.join(60)
        assert launcher.poll() is None, "the run ended before the attacks did"
        assert sum(counts) >= 10_000, counts
        assert _rss_kb(launcher.pid) - rss < 100_000  # bounded: no attacker's bytes kept
        assert launcher.wait(timeout=180) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    finally:  # the launcher stops its workers; any it could not are killed
        stall_stop.set()
        end_run(out, launcher)
    cfg = load_config(out / "config.toml")
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, STEPS + 1))
    n = len(SampleSet(TokenStream(ShardIndex.load(cfg.data.dir), "train"), cfg.model.context))
    assert check_samples(out / "samples.jsonl", cfg, n) == []
    events = read_jsonl(out / "events.jsonl")
    refused = [e for e in events if e["event"] == "refused"]
    assert refused and all(e["address"].startswith("127.0.0.1") and e["reason"] for e in refused)
    assert any("too many" in e["reason"] for e in refused)
    left = [e for e in events if e["event"] == "left"]
    assert [(e["id"], e["why"]) for e in left] == [(2, "meeting")], left  # the staller only
    members = {m for r in read_jsonl(out / "samples.jsonl") for m in r["members"]}
    assert members == {0, 1}  # no stranger ever trained a step


def _state_port(launcher: subprocess.Popen, tmp_path: Path, wid: int) -> int:
    """Worker ``wid``'s state server port, as the coordinator knows it (the launcher
    prints the membership on SIGUSR1)."""
    log = tmp_path / "launcher.log"
    launcher.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.findall(rf"{wid}: 'alive 127\.0\.0\.1:(\d+)'", log.read_text())
        if found:
            return int(found[-1])
        time.sleep(0.05)
    raise AssertionError(f"no state port for worker {wid} in {log}")


def _beat(ch: Channel, stop: threading.Event) -> None:
    while not stop.wait(0.3):
        try:
            ch.send({"op": "beat"})
        except OSError:
            return


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
