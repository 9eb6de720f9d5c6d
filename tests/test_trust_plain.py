"""Plain and torchrun runs against a stranger on the same machine (issue 22): what rank
0's store listens on, a foreign value in the heartbeat store, and no pickle in the
collectives that carry Python values between ranks."""

from __future__ import annotations

import ast
import ipaddress
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from distributed import run_distributed
from test_faults import kill_all, start_training, wait_until_training, worker_pids

from farflung.comm.dist import JSON_LIMIT, all_gather_json
from farflung.comm.watchdog import EXIT_PEER_LOST, StoreInfo, Watchdog

ROOT = Path(__file__).resolve().parents[1]

# torch.distributed's collectives that pickle Python objects (and unpickle the peers')
_PICKLING = {
    "all_gather_object",
    "gather_object",
    "broadcast_object_list",
    "scatter_object_list",
    "send_object_list",
    "recv_object_list",
}


def _uses(tree: ast.AST) -> list[tuple[int, str]]:
    """Where code names one of them (an attribute, a name, an import), not prose."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in _PICKLING:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Name) and node.id in _PICKLING:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, a.name) for a in node.names if a.name in _PICKLING]
    return found


def test_no_pickling_collectives_in_farflung():
    found = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in sorted((ROOT / "farflung").rglob("*.py"))
        for line, name in _uses(ast.parse(path.read_text()))
    ]
    assert not found, "pickling collectives (use farflung.comm.dist.all_gather_json): " + (
        ", ".join(found)
    )
    # the guard itself sees a use
    assert _uses(ast.parse("import torch.distributed as d\nd.all_gather_object([], 1)"))


# ---------------------------------------------------------------- all_gather_json


def _gather(rank: int, world: int) -> dict:
    got = all_gather_json({"rank": rank, "steps": list(range(rank * 3)), "t": ("é", None)})
    try:
        all_gather_json("x" * (JSON_LIMIT + 1) if rank == 1 else "small")
        oversized = None
    except ValueError as e:
        oversized = str(e)
    return {"got": got, "oversized": oversized}


def test_all_gather_json_exchanges_values_of_any_size_and_refuses_oversized_ones():
    results = run_distributed(_gather, 2)
    expected = [{"rank": r, "steps": list(range(r * 3)), "t": ["é", None]} for r in range(2)]
    for r in results:
        assert r["got"] == expected
        # every rank refuses, not only the sender: nobody is left waiting
        assert r["oversized"] is not None and "rank(s) [1]" in r["oversized"]


# ---------------------------------------------------------------- the heartbeat store


def _client(port: int, prefix: str) -> dist.Store:
    c = dist.TCPStore("127.0.0.1", port, None, is_master=False, timeout=timedelta(seconds=5),
                      wait_for_workers=False)  # fmt: skip
    return dist.PrefixStore(prefix, c)


def _watch(store: dist.Store, rank: int, port: int, fired: list) -> Watchdog:
    info = StoreInfo(f"127.0.0.1:{port}", 0, prefix="p")
    return Watchdog(store, rank, 2, 30.0, store_info=info, period_s=0.1,
                    on_lost=fired.append, exit=fired.append)  # fmt: skip


def _wait_fired(fired: list) -> None:
    deadline = time.monotonic() + 20  # generous; the decision takes one beat
    while len(fired) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("who", ["reader", "owner"])
def test_a_foreign_heartbeat_value_is_a_protocol_error_not_a_dead_peer(who):
    """``reader``: rank 0 reads a garbage counter at rank 1's key; ``owner``: rank 1
    finds a number it did not write at its own key. Both name the key and the value."""
    server = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=5), wait_for_workers=False)
    fired: list = []
    rank = 0 if who == "reader" else 1
    dog = _watch(_client(server.port, "p"), rank, server.port, fired).start()
    try:
        time.sleep(0.5)  # a few beats: the keys exist and the counter moves
        assert fired == []
        # the owner's: a number, but one its counter cannot hold yet (a loaded host
        # beats fewer times than 5 in its first 0.5 s, so "7" could be its own)
        garbage = "x" * 100 if who == "reader" else "987654321"
        server.set("p/hb/1", garbage)
        _wait_fired(fired)
    finally:
        dog.stop(wait_s=1)
    assert len(fired) == 2, fired  # the report, then the exit code
    lost, code = fired
    assert code == EXIT_PEER_LOST and lost.via == "protocol" and lost.ranks == []
    assert "protocol error: heartbeat key 'p/hb/1'" in lost.message
    shown = "b'" + "x" * 40 + "' (first 40 of 100 bytes), not a counter"
    assert (shown if who == "reader" else "holds b'987654321', not b'") in lost.message
    assert "stopped responding" not in lost.message and "down" not in lost.message


# ---------------------------------------------------------------- a real local run


def _listeners(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses process ``pid`` listens on, from /proc (sockets it holds that
    are in state LISTEN in its network namespace's tables)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                host, port = fields[1].split(":")
                found.add((_proc_address(host), int(port, 16)))
    return found


def _proc_address(hexa: str) -> str:
    """/proc/net/tcp's address: 32-bit words in host (little-endian) order."""
    raw = b"".join(bytes.fromhex(hexa[i : i + 8])[::-1] for i in range(0, len(hexa), 8))
    return str(ipaddress.ip_address(raw))


def test_local_run_listens_on_loopback_and_names_a_foreign_heartbeat(tiny):  # noqa: F811
    """A 2-worker `farflung train`: every socket its workers listen on is on loopback
    (rank 0's store included, which torch would open on every interface); then a
    stranger writes garbage into rank 0's store and the run stops naming the key."""
    out = tiny / "stranger"
    cli = start_training(tiny, out, "parallel.timeout_s=60")
    pids: dict[int, int] = {}
    try:
        wait_until_training(cli, out)
        pids = worker_pids(cli)
        environ = Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")
        port = int(next(e[12:] for e in environ if e.startswith(b"MASTER_PORT=")))
        listening = {rank: _listeners(pid) for rank, pid in pids.items()}
        assert ("127.0.0.1", port) in listening[0], listening
        everything = set().union(*listening.values())
        assert all(ipaddress.ip_address(h).is_loopback for h, _ in everything), listening

        stranger = dist.TCPStore("127.0.0.1", port, None, is_master=False,
                                 timeout=timedelta(seconds=10), wait_for_workers=False)  # fmt: skip
        stranger.set("farflung/0/hb/1", "x")  # the heartbeat's own key (no prefix)
        _, err = cli.communicate(timeout=120)
    finally:  # its workers by pid, then whatever else still works for the run
        kill_all(cli, pids, out)
    assert cli.returncode == EXIT_PEER_LOST, err
    # the launcher's verdict, and each rank's own line: the value, never a lost peer
    said = [line for line in err.splitlines() if line.startswith("farflung: ")]
    verdict = "farflung: protocol error: heartbeat key 'farflung/0/hb/1' in rank 0's rendezvous"
    assert any(line.startswith(verdict) and "holds b'x'" in line for line in said), err
    for rank in (0, 1):
        mine = [line for line in said if line.startswith(f"farflung: rank {rank}: ")]
        assert mine and all("protocol error" in line for line in mine), said
    assert not [line for line in said if "stopped responding" in line or "down" in line], said
