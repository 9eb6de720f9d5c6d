"""The run secret's channel: a peer without the key, or a frame that was tampered
with, replayed, reordered or oversized, is refused (real sockets, loopback)."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest

from farflung.comm.channel import (
    KEY_ENV,
    KEY_FILE_ENV,
    AuthError,
    Channel,
    load_key,
    new_key,
    sign,
    verify,
    write_key_file,
)

KEY = new_key()


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    return a, b


def _handshake(
    client: Callable[[socket.socket], Any], server: Callable[[socket.socket], Any]
) -> tuple[Any, Any]:
    """Run both ends at once; each result is the Channel or the exception raised."""
    a, b = _pair()
    out: dict[str, Any] = {}

    def run(name: str, fn: Callable[[socket.socket], Any], sock: socket.socket) -> None:
        try:
            out[name] = fn(sock)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out[name] = e
            sock.close()

    t = threading.Thread(target=run, args=("server", server, b))
    t.start()
    run("client", client, a)
    t.join(10)
    return out["client"], out["server"]


def _connected() -> tuple[Channel, Channel]:
    c, s = _handshake(
        lambda sock: Channel.client(sock, KEY, "coordinator"),
        lambda sock: Channel.server(sock, KEY, "coordinator"),
    )
    assert isinstance(c, Channel) and isinstance(s, Channel)
    return c, s


def test_round_trip_json_and_bytes():
    c, s = _connected()
    c.send({"op": "hello", "n": 1})
    assert s.recv() == {"op": "hello", "n": 1}
    s.send({"op": "welcome"})
    assert c.recv() == {"op": "welcome"}
    blob = os.urandom(300_000)
    sender = threading.Thread(target=s.send_bytes, args=(memoryview(blob),))
    sender.start()  # bigger than the socket buffer: the reader must run meanwhile
    assert c.recv_bytes(1 << 20) == blob
    sender.join(10)
    c.close()
    s.close()


def test_wrong_key_is_refused_on_both_sides():
    other = new_key()
    c, s = _handshake(
        lambda sock: Channel.client(sock, other, "coordinator"),
        lambda sock: Channel.server(sock, KEY, "coordinator"),
    )
    assert isinstance(c, AuthError) and isinstance(s, AuthError)
    # a server without the key cannot fool a client either (the client checks first)
    c, s = _handshake(
        lambda sock: Channel.client(sock, KEY, "coordinator"),
        lambda sock: Channel.server(sock, other, "coordinator"),
    )
    assert isinstance(c, AuthError) and "key" in str(c)
    assert isinstance(s, AuthError)


def test_role_mismatch_is_refused():
    c, s = _handshake(
        lambda sock: Channel.client(sock, KEY, "state"),
        lambda sock: Channel.server(sock, KEY, "coordinator"),
    )
    assert isinstance(s, AuthError) and "role" in str(s)
    assert isinstance(c, AuthError)


def test_silent_peer_times_out():
    a, b = _pair()
    with pytest.raises(AuthError, match="time"):
        Channel.server(b, KEY, "coordinator", timeout_s=0.3)
    a.close()
    b.close()


def test_reflection_attack_fails():
    """An attacker without the key opens two connections to the server and feeds
    each one's challenge to the other: the server's proofs are for the server
    direction only, so neither connection gets in."""
    attacker1, server1 = _pair()
    attacker2, server2 = _pair()
    results: dict[int, Any] = {}

    def serve(i: int, sock: socket.socket) -> None:
        try:
            results[i] = Channel.server(sock, KEY, "coordinator", timeout_s=3)
        except AuthError as e:
            results[i] = e

    threads = [threading.Thread(target=serve, args=(i, s)) for i, s in ((1, server1), (2, server2))]
    for t in threads:
        t.start()

    def send(sock: socket.socket, msg: bytes) -> None:
        sock.sendall(struct.pack("!I", len(msg)) + msg)

    def recv(sock: socket.socket) -> bytes:
        (n,) = struct.unpack("!I", sock.recv(4, socket.MSG_WAITALL))
        return sock.recv(n, socket.MSG_WAITALL)

    import json

    nonce = "a" * 64
    send(attacker1, json.dumps({"farflung": 1, "role": "coordinator", "nonce": nonce}).encode())
    reply1 = json.loads(recv(attacker1))
    # connection 2: the server's own nonce as the client nonce, hoping for a proof to reuse
    send(
        attacker2,
        json.dumps({"farflung": 1, "role": "coordinator", "nonce": reply1["nonce"]}).encode(),
    )
    reply2 = json.loads(recv(attacker2))
    # the best it has: the proofs the server made; offer them back as client proofs
    send(attacker1, json.dumps({"proof": reply1["proof"]}).encode())
    send(attacker2, json.dumps({"proof": reply2["proof"]}).encode())
    for t in threads:
        t.join(10)
    assert isinstance(results[1], AuthError) and isinstance(results[2], AuthError)
    for s in (attacker1, attacker2, server1, server2):
        s.close()


class _Capture:
    """Stands in for a client channel's socket: records each frame it sends and
    forwards it unless told not to."""

    def __init__(self, sock: socket.socket, forward: bool = True) -> None:
        self.sock, self.forward, self.sent = sock, forward, []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))
        if self.forward:
            self.sock.sendall(data)


class _Tap:
    """A connected pair whose client frames we capture and can inject raw."""

    def __init__(self, forward: bool = True) -> None:
        self.c, self.s = _connected()
        self.raw_sock = self.c.sock
        self.capture = _Capture(self.raw_sock, forward)
        self.c.sock = self.capture  # type: ignore[assignment]
        self.sent = self.capture.sent

    def raw(self, data: bytes) -> None:
        self.raw_sock.sendall(data)


def test_tampered_frame_is_refused():
    tap = _Tap(forward=False)
    tap.c.send({"step": 1})
    tap.raw(tap.sent[-1])
    assert tap.s.recv() == {"step": 1}
    tap.c.send({"step": 2})
    tampered = bytearray(tap.sent[-1])
    tampered[16] ^= 0x01  # a payload byte
    tap.raw(bytes(tampered))
    with pytest.raises(AuthError, match="MAC"):
        tap.s.recv()
    with pytest.raises(AuthError, match="broken"):
        tap.s.recv()


def test_replayed_frame_is_refused():
    tap = _Tap()
    tap.c.send({"op": "vote", "step": 3})
    assert tap.s.recv()["step"] == 3
    tap.raw(tap.sent[-1])  # the same bytes again
    with pytest.raises(AuthError, match="sequence"):
        tap.s.recv()


def test_reordered_frames_are_refused():
    tap = _Tap(forward=False)
    tap.c.send({"n": 0})
    tap.c.send({"n": 1})
    tap.raw(tap.sent[1])
    tap.raw(tap.sent[0])
    with pytest.raises(AuthError, match="sequence"):
        tap.s.recv()


def test_frame_of_another_connection_is_refused():
    """A frame recorded on one connection is worthless on another (session keys)."""
    tap = _Tap()
    tap.c.send({"n": 0})
    other = _Tap()
    other.raw(tap.sent[-1])
    with pytest.raises(AuthError, match="MAC"):
        other.s.recv()


def test_oversized_frame_is_refused_before_reading_it():
    c, s = _connected()
    c.send({"blob": "x" * 5000})
    with pytest.raises(AuthError, match="over the cap"):
        s.recv(max_bytes=1000)
    # a header claiming 4 GiB: refused from the header alone
    c2, s2 = _connected()
    socket.socket.sendall(c2.sock, struct.pack("!BQI", 1, 0, (1 << 32) - 1))
    with pytest.raises(AuthError, match="over the cap"):
        s2.recv()


def test_binary_frame_where_json_expected_is_refused():
    c, s = _connected()
    c.send_bytes(b"{}")
    with pytest.raises(AuthError, match="kind"):
        s.recv()


def test_sign_and_verify():
    fields = {"id": 3, "gen": 2, "restart": 10, "donor": 1}
    mac = sign(KEY, "ticket", fields)
    assert verify(KEY, "ticket", dict(reversed(list(fields.items()))), mac)
    assert not verify(KEY, "ticket", {**fields, "id": 4}, mac)
    assert not verify(KEY, "other", fields, mac)
    assert not verify(new_key(), "ticket", fields, mac)
    assert not verify(KEY, "ticket", fields, 12345)


def test_load_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    assert load_key() is None
    path = tmp_path / "run.key"
    key = write_key_file(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_key(path) == key
    with pytest.raises(FileExistsError):
        write_key_file(path)  # never over an existing key
    monkeypatch.setenv(KEY_ENV, "e" * 32)
    assert load_key() == "e" * 32
    monkeypatch.setenv(KEY_FILE_ENV, str(path))
    assert load_key() == key  # the file wins over the variable
    monkeypatch.setenv(KEY_ENV, "short")
    monkeypatch.delenv(KEY_FILE_ENV)
    with pytest.raises(ValueError, match=KEY_ENV):
        load_key()
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_key(path)
    with pytest.raises(ValueError, match="missing.key"):
        load_key(tmp_path / "missing.key")
