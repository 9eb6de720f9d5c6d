"""State transfer between elastic workers: nothing executable crosses, only ticket
holders get state, a flood builds nothing, a forged state is refused by its hash, and
a worker whose state silently diverges (``CORRUPT``) is evicted and heals as a joiner.

Real processes and loopback sockets throughout: the state server under attack runs
in a process of its own, the algorithms' snapshots come from real gloo groups."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed import run_distributed
from procs import end_run
from safetensors.torch import load_file
from test_elastic import STEPS, check_run, elastic_run
from tiny_runs import farflung

from farflung.comm.binding import serve_store
from farflung.comm.channel import AuthError, Channel, new_key, sign
from farflung.comm.errors import PeerLostError
from farflung.comm.tensor_tree import decode, encode
from farflung.membership.state_transfer import (
    FRAME_BYTES,
    MAX_CONNECTIONS,
    StateTransferError,
    fetch_state,
)

# -- the encoding ------------------------------------------------------------------------


def same_tree(a: Any, b: Any, path: str = "") -> None:
    """``b`` is ``a``: the same types (tuple is not list, bool is not int), keys in the
    same order with the same types, tensors of the same dtype, shape and bits."""
    assert type(a) is type(b), f"{path}: {type(a)} became {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], path
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), path
        for k in a:
            same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_tree(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def test_a_tree_round_trips_exactly():
    w = torch.randn(3, 4)
    tree = {
        "model": {"a.weight": w, "tied": w, "n": torch.arange(5), "flag": torch.tensor(True)},
        0: {"step": torch.tensor(3.0), "half": torch.randn(2, dtype=torch.bfloat16)},
        "groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1], "foreach": None}],
        "odd": (math.nan, -math.inf, math.inf, 2**80, -0.0, "text", False, torch.empty(0, 3)),
        "a/b": torch.ones(2),  # a key that looks like a path ...
        "a": {"b": torch.zeros(2)},  # ... and the path itself
    }
    back = decode(encode(tree).to_bytes())
    same_tree(tree, back)
    assert back["model"]["tied"] is back["model"]["a.weight"]  # stored once, tied again
    assert math.copysign(1.0, back["odd"][4]) == -1.0


def test_what_is_not_a_tree_is_refused_with_its_path():
    class Opaque:
        pass

    for bad, where in [
        ({"a": [1, Opaque()]}, "a/1"),
        ({"x": {"y": {1, 2}}}, "x/y"),
        ({"n": torch.zeros(2).numpy()}, "n"),
        ({(1, 2): 3}, "(1, 2)"),
        ({"c": torch.zeros(2, dtype=torch.complex64)}, "c"),
    ]:
        with pytest.raises(TypeError, match=__import__("re").escape(where)):
            encode(bad)


def test_bytes_that_are_not_a_state_are_refused_cleanly(tmp_path):
    """A pickle (one that would run code when unpickled), torch.save's zip, garbage,
    a header that lies, a skeleton naming tensors that are not there: a ValueError,
    and nothing runs."""
    marker = tmp_path / "pwned"
    bomb = pickle.dumps(_Bomb(str(marker)))
    saved = tmp_path / "s.pt"
    torch.save({"w": torch.ones(2)}, saved)
    good = encode({"w": torch.ones(2)}).to_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    header["__metadata__"]["farflung.tree"] = json.dumps({"D": [[{"S": "w"}, {"T": "nope"}]]})
    lying = json.dumps(header).encode()
    lying = struct.pack("<Q", len(lying)) + lying + good[8 + n :]
    bad = [bomb, saved.read_bytes(), b"\x00" * 7, b"\xff" * 64, lying]
    for depth in (100, 100_000):  # past the decoder's limit; past Python's own
        header["__metadata__"]["farflung.tree"] = '{"L":[' * depth + "]}" * depth
        nested = json.dumps(header).encode()
        bad.append(struct.pack("<Q", len(nested)) + nested + good[8 + n :])
    for data in bad:
        with pytest.raises(ValueError):
            decode(data)
    assert not marker.exists()


class _Bomb:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# -- real snapshots of every data-parallel algorithm ---------------------------------------

ALGORITHMS = {
    "allreduce": {},
    "compressed": {"codec": "topk:ratio=0.3+quantize:bits=4"},
    # overlap on: each vote comes a step late, and a snapshot holds an in-flight result
    "cocktail": {"moment_sync_every": 2},
    "diloco": {"local_steps": 2},
    "gossip": {"codec": "topk:ratio=0.3+quantize:bits=4", "gossip_gamma": 0.5},
}
TRAIN_STEPS = 5


class FakeMember:
    """The coordinator's side as an ElasticWorker sees it, for one process: it
    records votes and commits nothing (every snapshot stays)."""

    def __init__(self, wid: int, store_port: int) -> None:
        self.id, self.coordinator_host, self.heartbeat_s = wid, "127.0.0.1", 10.0
        self.gen: dict[str, Any] | None = None
        self.gen_epoch: dict[int, int] = {}
        self.committed, self.lost, self.finished = 0, None, False
        self.votes: dict[int, str] = {}
        self.told: list[dict] = []
        self.store_port = store_port

    def enter(self, gen_no: int, **fields: Any) -> dict[str, Any]:
        gen = {"gen": gen_no, "members": [self.id], "store_port": self.store_port, **fields}
        self.gen, self.gen_epoch[gen_no] = gen, gen_no + 1
        return gen

    def vote(self, gen: int, votes: list[dict]) -> None:
        self.votes[votes[-1]["step"]] = votes[-1]["hash"]

    def tell(self, msg: dict) -> None:
        self.told.append(msg)

    def met(self, gen: int) -> None:
        pass

    def current_epoch(self) -> int:
        return max(self.gen_epoch.values(), default=0)


def _config(cfg_path: str, name: str, pcfg: dict[str, Any]):
    from dataclasses import replace

    from farflung.config import load_config

    cfg = load_config(cfg_path)
    cfg = replace(cfg, parallel=replace(cfg.parallel, algorithm=name, **pcfg))
    return replace(cfg, train=replace(cfg.train, checkpoint_every=0, eval_every=0, batch_size=8))


def _worker(cfg, out: str, member, gen: dict, key: str, members: list[int]):
    from farflung.train.elastic_worker import ElasticWorker, LeftGroups, join_group

    gen["members"] = members
    left = LeftGroups(grace_s=60.0)
    info = join_group(member, gen, "gloo", 60.0, left)
    return ElasticWorker(cfg, Path(out), info, member, gen, key, left)


def _train(w, steps: int) -> None:
    """``steps`` of ElasticWorker.run's loop, without its waits for commits."""
    w.t_start = w.mark = time.perf_counter()
    for _ in range(steps):
        w.train_step()
        w._boundary()


def snapshots_of_every_algorithm(rank: int, world: int, store_port: int, cfg_path: str, out: str):
    """Each algorithm trains a few steps on a real group; every snapshot must come
    back from its encoding unchanged, and restored into a fresh worker (a joiner),
    it must hash as the vote for the step before it did."""
    torch.set_num_threads(1)
    key = new_key()
    report = {}
    member = FakeMember(rank, store_port)
    gen_no = 0
    for name, pcfg in ALGORITHMS.items():
        cfg = _config(cfg_path, name, pcfg)
        member.votes.clear()
        gen = member.enter(gen_no, restart=1, donor=None)
        w = _worker(cfg, f"{out}/{name}{rank}", member, gen, key, list(range(world)))
        _train(w, TRAIN_STEPS)
        w.algo.quiesce()
        voted = dict(member.votes)
        assert voted, name
        states = {t: w.snapshots[t] for t in sorted(w.snapshots) if t - 1 in voted}
        states[0] = w._state(w.algo.state_dict())  # the checkpoint form too
        params = sum(p.numel() * p.element_size() for p in w.model.parameters())
        sizes = []
        for snap in states.values():
            encoded = encode(snap)
            sizes.append(encoded.nbytes / params)
            same_tree(snap, decode(encoded.to_bytes()))
        # a joiner: a fresh worker in a generation of its own
        gen_no += 1
        gen = member.enter(gen_no, restart=1, donor=None)
        joiner = _worker(cfg, f"{out}/{name}{rank}j", member, gen, key, list(range(world)))
        hashes = {}
        for t, snap in states.items():
            if t == 0:
                continue
            joiner._restore(decode(encode(snap).to_bytes()))
            hashes[t - 1] = (voted[t - 1], joiner._shared_hash(t - 1))
        report[name] = {"hashes": hashes, "size_ratio": max(sizes), "voted": sorted(voted)}
        w.algo.close()
        joiner.algo.close()
        gen_no += 1
    return report


@pytest.fixture
def store():
    """A rendezvous store of the test's own (generation numbers start again at 0)."""
    s = serve_store("127.0.0.1")
    yield s
    del s


def test_every_algorithm_snapshot_round_trips_and_hashes_as_voted(tiny, tmp_path, store):  # noqa: F811
    from farflung.train.elastic_worker import STATE_CAP_FACTOR

    reports = run_distributed(
        snapshots_of_every_algorithm, 2, store.port, str(tiny / "tiny.toml"), str(tmp_path)
    )
    for rank, report in enumerate(reports):
        assert sorted(report) == sorted(ALGORITHMS)
        for name, r in report.items():
            assert r["hashes"], (rank, name)
            for step, (voted, restored) in r["hashes"].items():
                assert voted == restored, (
                    f"{name} rank {rank} step {step}: vote and snapshot differ"
                )
            # the joiner's cap on a donor's state holds every algorithm's snapshot
            assert r["size_ratio"] < STATE_CAP_FACTOR, (name, r["size_ratio"])
    # the votes of every rank agree (shared state is shared), and DiLoCo votes only at
    # its outer steps, cocktail one step late
    for name in ALGORITHMS:
        a, b = (r[name]["hashes"] for r in reports)
        assert {s: v for s, (v, _) in a.items()} == {s: v for s, (v, _) in b.items()}, name
    print({name: round(r["size_ratio"], 2) for name, r in reports[0].items()})
    assert reports[0]["diloco"]["voted"] == [2, 4]
    assert reports[0]["cocktail"]["voted"] == list(range(1, TRAIN_STEPS))


# -- a forged donor ---------------------------------------------------------------------------


def forged_donor(rank: int, world: int, store_port: int, cfg_path: str, out: str):
    """A joiner sent to a donor that holds the key and a valid ticket but serves
    wrong tensors (the biases set to 42): refused by hash, nothing kept; the same
    joiner sent to an honest donor gets exactly the donor's state."""
    from farflung.membership.state_transfer import StateServer

    torch.set_num_threads(1)
    key = new_key()
    cfg = _config(cfg_path, "allreduce", {})
    member = FakeMember(0, store_port)
    w = _worker(cfg, f"{out}/donor", member, member.enter(0, restart=1, donor=None), key, [0])
    initial = copy.deepcopy(w.model.state_dict())
    _train(w, 2)
    genuine, expected = w.snapshots[3], member.votes[2]
    forged = copy.deepcopy(genuine)
    names = [n for n in forged["model"] if n.endswith("bias")] or [next(iter(forged["model"]))]
    for n in names:
        forged["model"][n].fill_(42.0)
    served = {"snap": forged}
    server = StateServer(lambda s: served["snap"] if s == 3 else None, key, host="127.0.0.1")
    server.donor_id = 5

    def joining(gen_no: int) -> dict[str, Any]:
        fields = {"id": 0, "gen": gen_no, "restart": 3, "donor": 5}
        ticket = {**fields, "mac": sign(key, "ticket", fields)}
        addr = f"127.0.0.1:{server.port}"
        return member.enter(
            gen_no, restart=3, donor=5, donor_addr=addr, ticket=ticket, state_hash=expected
        )

    result: dict[str, Any] = {"expected": expected}
    # a joiner process: its first generation
    try:
        _worker(cfg, f"{out}/joiner", member, joining(1), key, [0])
    except PeerLostError as e:
        result["refused"] = str(e)
    # a member entering a generation without the state for its restart step
    del w.snapshots[3]
    try:
        w.enter(joining(2))
    except PeerLostError as e:
        result["refused_member"] = str(e)
    result["model_after"] = {k: v.clone() for k, v in w.model.state_dict().items()}
    result["initial"] = initial
    result["forged_names"] = names
    # the honest donor: accepted, and the joiner holds exactly its state
    served["snap"] = genuine
    joiner = _worker(cfg, f"{out}/joiner2", member, joining(3), key, [0])
    result["joined_model"] = joiner.model.state_dict()
    result["genuine_model"] = genuine["model"]
    result["joined_hash"] = joiner._shared_hash(2)
    result["healed"] = [m for m in member.told if m.get("op") == "healed"]
    server.close()
    return result


def test_a_forged_donor_state_is_refused_by_hash(tiny, tmp_path, store):  # noqa: F811
    (r,) = run_distributed(forged_donor, 1, store.port, str(tiny / "tiny.toml"), str(tmp_path))
    for why in (r.get("refused"), r.get("refused_member")):
        assert why is not None, "the forged state was accepted"
        assert "donor 5" in why and r["expected"] in why and "refused" in why
        got = why.split("hashes to ")[1].split(",")[0]
        assert got != r["expected"] and len(got) == len(r["expected"])
    for name in r["forged_names"]:  # nor in the model: back to the worker's own start
        assert not (r["model_after"][name] == 42.0).any()
    same_tree(dict(r["initial"]), r["model_after"])
    same_tree(r["genuine_model"], r["joined_model"])
    assert r["joined_hash"] == r["expected"]
    assert len(r["healed"]) == 1 and r["healed"][0]["bytes"] > 0


# -- the state server under attack, in a process of its own ----------------------------------

STATE_MIB = 32
HANDSHAKE_S = 2.0  # the server's deadline for a handshake and its request (default 5 s)
SERVER = f"""
import json, sys, threading, torch
from farflung.comm.channel import load_key
from farflung.membership.state_transfer import StateServer
torch.manual_seed(0)
state = {{"model": {{"w": torch.randn({STATE_MIB} << 18)}}, "step": 7, "t": (1, 2.5)}}
calls = []
def provide(step):
    calls.append(step)
    return state if step == 8 else None
srv = StateServer(provide, load_key(), host="127.0.0.1", handshake_s={HANDSHAKE_S})
srv.donor_id = 1
print(srv.port, flush=True)
for line in sys.stdin:
    rss = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmRSS"))
    print(json.dumps({{"rss_mib": rss / 1024, "calls": calls, "served": srv.served,
                      "refused": srv.refused, "threads": threading.active_count()}}), flush=True)
"""


class Server:
    def __init__(self, key: str) -> None:
        self.key = key
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "FARFLUNG_RUN_KEY": key},
        )
        try:
            self.port = int(self.proc.stdout.readline())
        except BaseException:  # it did not start: leave no process behind
            self.close()
            raise
        self.addr = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stats(self) -> dict[str, Any]:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def ticket(self, restart: int = 8, donor: int = 1, key: str | None = None) -> dict:
        fields = {"id": 9, "gen": 3, "restart": restart, "donor": donor}
        return {**fields, "mac": sign(key or self.key, "ticket", fields)}


@pytest.fixture(scope="module")
def server():
    s = Server(new_key())
    try:
        yield s
    finally:
        s.close()


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends before it closes ``sock`` (within ``seconds``)."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(1 << 16):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def test_a_stranger_cannot_fetch_state(server):
    """Without the key: the old protocol's 8-byte request, a handshake that stops
    half-way (a byte at a time would do the same), a handshake with another key. Each
    is closed within the server's handshake deadline with nothing sent, and no state
    is built."""
    before = server.stats()
    half = socket.create_connection(("127.0.0.1", server.port))
    half.sendall(b'\x00\x00\x00\x40{"farflung": 1, "ro')  # ... and nothing more
    t0 = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(struct.pack("!q", 8))
    assert _closed_within(sock, 10) == b""
    sock.close()
    with pytest.raises(AuthError):
        fetch_state(server.addr, new_key(), server.ticket(), timeout_s=10)
    assert _closed_within(half, 10) == b""
    # the server's deadline, with room for a loaded machine
    assert time.monotonic() - t0 < HANDSHAKE_S + 3
    half.close()
    # each is counted once its server thread is done with it, maybe after we saw it closed
    deadline = time.monotonic() + 10
    while server.stats()["refused"] < before["refused"] + 3:
        assert time.monotonic() < deadline, server.stats()
        time.sleep(0.05)
    assert server.stats()["calls"] == before["calls"]  # the state was never asked for


def test_a_key_holder_without_a_valid_ticket_gets_nothing(server):
    before = server.stats()
    good = server.ticket()
    bad_tickets = [
        None,
        {k: v for k, v in good.items() if k != "mac"},
        {**good, "restart": 9},  # fields changed after signing
        server.ticket(key=new_key()),  # signed with another key
        server.ticket(donor=2),  # a valid ticket for another donor
        {**good, "gen": "3"},
    ]
    for ticket in bad_tickets:
        with pytest.raises(StateTransferError, match="refused"):
            fetch_state(server.addr, server.key, ticket, timeout_s=10)
    assert server.stats()["calls"] == before["calls"]
    # a valid ticket for a step this donor does not hold: asked, and refused
    with pytest.raises(StateTransferError, match="no state for step 5"):
        fetch_state(server.addr, server.key, server.ticket(restart=5), timeout_s=10)


def test_a_flood_of_requests_builds_nothing(server):
    """16 key holders with a ticket for another donor, then 40 connections at once
    (old-style requests, half-open handshakes): the server builds no state for any
    of them, its memory and threads stay bounded, and a ticket holder is served
    after. (The old server built a copy of the state for every 8-byte request.)"""
    before = server.stats()
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_refused_fetch, args=(server, server.ticket(donor=2), errors))
        for _ in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(errors) == 16 and all(isinstance(e, OSError) for e in errors), errors
    socks = []
    for i in range(40):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(struct.pack("!q", 8) if i % 2 else b'\x00\x00\x00\x40{"farflung": 1')
        socks.append(s)
    during = server.stats()
    for s in socks:
        s.close()
    assert during["calls"] == before["calls"]
    deadline = time.monotonic() + 30
    while server.stats()["refused"] < before["refused"] + 16 + 40:  # each one told off
        assert time.monotonic() < deadline, server.stats()
        time.sleep(0.05)
    # bounded connections: a thread and a deadline timer for each one served
    assert during["threads"] <= before["threads"] + 2 * MAX_CONNECTIONS
    assert during["rss_mib"] - before["rss_mib"] < STATE_MIB / 2
    state, nbytes = fetch_state(server.addr, server.key, server.ticket(), timeout_s=30)
    assert nbytes > STATE_MIB << 20  # the size on the wire, the tensors and their skeleton
    torch.manual_seed(0)
    assert torch.equal(state["model"]["w"], torch.randn(STATE_MIB << 18))
    assert state["step"] == 7 and state["t"] == (1, 2.5)
    after = server.stats()
    # serving streams from the state itself: no copy of it is built
    assert after["rss_mib"] - before["rss_mib"] < STATE_MIB / 2
    assert after["served"] == before["served"] + 1
    print(
        f"server RSS {before['rss_mib']:.0f} -> {during['rss_mib']:.0f} (flood) -> "
        f"{after['rss_mib']:.0f} MiB (served {STATE_MIB} MiB)"
    )


def _refused_fetch(server: Server, ticket: dict, errors: list[BaseException]) -> None:
    try:
        fetch_state(server.addr, server.key, ticket, timeout_s=30)
    except BaseException as e:  # noqa: BLE001  (the test looks at what it was)
        errors.append(e)


def test_one_transfer_at_a_time(server):
    """A joiner that asks and then does not read holds the transfer; another is told
    ``busy`` instead of making the server hold a second transfer."""
    asked = server.stats()["calls"].count(8)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    ch = Channel.client(sock, server.key, "state")
    ch.send({"op": "fetch", "ticket": server.ticket()})
    deadline = time.monotonic() + 30
    while server.stats()["calls"].count(8) == asked:  # the stalled transfer has begun
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(StateTransferError, match="busy"):
        fetch_state(server.addr, server.key, server.ticket(), timeout_s=30)
    ch.close()


# -- a donor that sends what it should not --------------------------------------------------


def _fake_donor(key: str, announce: dict, payload: bytes) -> tuple[str, threading.Thread]:
    """A donor that holds the key but answers any request with ``announce`` and
    ``payload`` (in frames)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        sock, _ = listener.accept()
        with sock, listener:
            ch = Channel.server(sock, key, "state")
            ch.recv()
            ch.send(announce)
            for i in range(0, len(payload), FRAME_BYTES):
                ch.send_bytes(payload[i : i + FRAME_BYTES])
            _closed_within(sock, 10)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return f"127.0.0.1:{listener.getsockname()[1]}", t


def test_a_donor_payload_cannot_execute_code(tmp_path):
    key = new_key()
    marker = tmp_path / "pwned"
    bomb = pickle.dumps({"model": _Bomb(str(marker))})
    addr, t = _fake_donor(key, {"op": "state", "bytes": len(bomb)}, bomb)
    with pytest.raises(StateTransferError, match="cannot be read"):
        fetch_state(addr, key, {"id": 1}, timeout_s=10)
    t.join(timeout=10)
    assert not marker.exists()
    # a state announced larger than the joiner accepts is refused before it is read
    addr, t = _fake_donor(key, {"op": "state", "bytes": 1 << 40}, b"")
    with pytest.raises(StateTransferError, match="at most"):
        fetch_state(addr, key, {"id": 1}, timeout_s=10, max_bytes=1 << 30)
    t.join(timeout=10)
    # a valid state that is not a dict
    data = encode([torch.ones(2)]).to_bytes()
    addr, t = _fake_donor(key, {"op": "state", "bytes": len(data)}, data)
    with pytest.raises(StateTransferError, match="not a state dict"):
        fetch_state(addr, key, {"id": 1}, timeout_s=10)
    t.join(timeout=10)


# -- a worker whose state silently diverges -------------------------------------------------


def _final_model(run: Path) -> dict[str, torch.Tensor]:
    (path,) = sorted(run.glob("checkpoints/step_*/model.safetensors"))[-1:]
    return load_file(str(path))


# what elastic_run trains, without elastic membership
CLEAN_SETS = ["train.batch_size=12", f"train.steps={STEPS}", "train.checkpoint_every=0"]
CLEAN_SETS += ["train.eval_every=8"]


def test_a_corrupt_worker_is_evicted_and_heals(tiny, tmp_path):  # noqa: F811
    """Worker 1 adds 1.0 to one weight after step 5: its state hash disagrees with
    the majority's at that commit, it is evicted ("diverged") and comes back as a
    joiner that fetches the state from an agreeing donor and checks its hash; the run
    commits every step with exactly its batch and ends where a clean run ends: a
    plain one-process run of the same steps, trained beside it. (The run waits for the
    joiner, a new process, instead of ending first: a replayed join after step 5
    holds the commits until one is admitted.)"""
    faulted, clean = tmp_path / "faulted", tmp_path / "clean"
    hold = tmp_path / "hold.jsonl"
    hold.write_text(json.dumps({"event": "joined", "id": 3, "committed": 5}) + "\n")
    reference: list[subprocess.CompletedProcess] = []
    plain = ["train", str(tiny / "tiny.toml"), "--out", str(clean), "--quiet"]
    plain += [a for s in CLEAN_SETS for a in ("--set", s)]
    beside = threading.Thread(target=lambda: reference.append(farflung(*plain, timeout=240)))
    beside.start()
    try:
        r = elastic_run(tiny, faulted, env={"FARFLUNG_FAULTS": "1:5:CORRUPT"}, replay=hold)
        beside.join(timeout=300)
    finally:  # a failure or a timeout leaves no worker of either run behind
        end_run(faulted)
        end_run(clean)
        beside.join(timeout=60)
    assert r.returncode == 0, r.stderr
    summary = json.loads((faulted / "summary.json").read_text())
    assert summary["elastic"]["hash_disagreements"] == 1  # step 5's, and no other
    summary["elastic"]["hash_disagreements"] = 0
    (faulted / "summary.json").write_text(json.dumps(summary))
    events = check_run(faulted)  # every step once, exactly its batch
    left = [e for e in events if e["event"] == "left"]
    assert [(e["id"], e["why"], e["committed"]) for e in left] == [(1, "diverged", 5)]
    joined = [e for e in events if e["event"] == "joined"]
    assert len(joined) == 1 and joined[0]["state_bytes"] > 0 and joined[0]["committed"] == 5
    assert sorted(joined[0]["members"]) == [0, 2, joined[0]["id"]]
    assert reference and reference[0].returncode == 0, reference and reference[0].stderr
    a, b = _final_model(faulted), _final_model(clean)
    assert sorted(a) == sorted(b)
    for name in a:  # members and shares changed: sums in another order, nothing else
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    # a port the kernel could give an outgoing connection before the worker binds it
    # is a race a busy machine loses now and then (EADDRINUSE at the worker's store)
    from farflung.comm.binding import _ephemeral_range, free_port

    lo, hi = _ephemeral_range()
    for _ in range(20):
        port = free_port()
        assert not lo <= port <= hi
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
