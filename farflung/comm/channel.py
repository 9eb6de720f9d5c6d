"""Authenticated connections between a run's own processes (the run secret).

Every connection to the coordinator and to a worker's state server starts with a
mutual HMAC-SHA256 challenge-response over the run key: the client sends a fresh
nonce and the role it wants to talk to, the server answers with a nonce of its own
and a proof over both nonces, the client proves the key in the other direction. A
proof names the role and its direction, so a proof made for one role or one side is
worth nothing for another (no reflection, no cross-role replay). Then each direction
gets a session key derived from both nonces, and every frame carries a sequence
number and a MAC under it: a tampered, replayed, reordered or oversized frame, or a
frame from another connection, is an :class:`AuthError`.

A frame: ``kind`` (1 byte: JSON or binary), ``seq`` (8 bytes), ``length`` (4 bytes),
the payload, then a 32-byte MAC over header and payload. A receiver checks
``length`` against its cap before reading the payload, so no peer makes it allocate
more than it asked for.

The key is text (``new_key()`` gives 64 hex characters). It comes from
``--key-file`` / ``FARFLUNG_KEY_FILE`` or ``FARFLUNG_RUN_KEY``, never from a config
(configs are copied into run folders)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any

KEY_ENV = "FARFLUNG_RUN_KEY"
"""The run secret itself (text, at least :data:`MIN_KEY_CHARS` characters)."""
KEY_FILE_ENV = "FARFLUNG_KEY_FILE"
"""Path of a file holding the run secret (what ``--key-file`` passes to workers)."""
MAX_FRAME = 1 << 20
"""Default cap of one JSON frame (1 MiB)."""
MIN_KEY_CHARS = 16
ROLES = ("coordinator", "state")

_HELLO_CAP = 4096  # handshake messages are a few hundred bytes
_HEADER = struct.Struct("!BQI")  # kind, seq, payload length
_MAC_LEN = 32
_JSON, _BYTES = 1, 2


class AuthError(ConnectionError):
    """The peer did not prove the run key, or a frame failed its MAC, sequence or size
    check. The connection must be closed."""


class WrongKey(AuthError):
    """The peer answered the challenge, with a proof of another key."""


class ChannelClosed(ConnectionError):
    """The peer closed the connection."""


# -- keys ----------------------------------------------------------------------------
def new_key() -> str:
    """A fresh run key: 64 hex characters (256 bits) from :mod:`secrets`."""
    return secrets.token_hex(32)


def write_key_file(path: Path) -> str:
    """Write a new key to ``path`` with mode 0600 (never over an existing file) and
    return it."""
    key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def load_key(key_file: str | Path | None = None) -> str | None:
    """The run key: ``key_file`` (``--key-file``) wins, then the file named by
    ``FARFLUNG_KEY_FILE``, then ``FARFLUNG_RUN_KEY``; None when none is given. A
    ValueError names the file (or variable) when it is unreadable, too short, or a file
    that group or others may read."""
    path = key_file or os.environ.get(KEY_FILE_ENV)
    if path:
        return _read_key_file(Path(path))
    key = os.environ.get(KEY_ENV)
    if key is None:
        return None
    return _checked(key.strip(), f"${KEY_ENV}")


def _read_key_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the run key file {path}: {e}") from None
    if mode & 0o077:
        raise ValueError(
            f"the run key file {path} is accessible to group or others "
            f"(mode {stat.filemode(mode)}); run: chmod 600 {path}"
        )
    return _checked(text.strip(), str(path))


def _checked(key: str, source: str) -> str:
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(
            f"the run key in {source} has {len(key)} characters; it needs at least "
            f"{MIN_KEY_CHARS} (make one with: python -c 'import secrets; "
            "print(secrets.token_hex(32))')"
        )
    return key


# -- signatures over JSON fields ---------------------------------------------------------
def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def sign(key: str, purpose: str, fields: dict[str, Any]) -> str:
    """Hex HMAC-SHA256 of ``purpose`` and the canonical JSON of ``fields``: a ticket
    or record only the run's own processes can make."""
    msg = purpose.encode() + b"\0" + _canonical(fields)
    return hmac.new(key.encode(), msg, hashlib.sha256).hexdigest()


def verify(key: str, purpose: str, fields: dict[str, Any], mac: Any) -> bool:
    """Whether ``mac`` is :func:`sign`'s for these fields (constant-time)."""
    if not isinstance(mac, str):
        return False
    try:
        expected = sign(key, purpose, fields)
    except (TypeError, ValueError):  # fields a peer sent that are not JSON-able
        return False
    return hmac.compare_digest(expected, mac)


# -- the channel -------------------------------------------------------------------------
def _derive(key: str, label: str, role: str, c_nonce: str, s_nonce: str) -> bytes:
    msg = "\0".join(("farflung/1", label, role, c_nonce, s_nonce)).encode()
    return hmac.new(key.encode(), msg, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytearray:
    """``n`` bytes from ``sock``; with a deadline every read is bounded by the time
    left (TimeoutError when it passes), so a peer dribbling bytes cannot hold us."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the peer did not finish the handshake in time")
            sock.settimeout(left)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ChannelClosed("the peer closed the connection")
        got += k
    return buf


class Channel:
    """A socket after a mutual HMAC-SHA256 challenge-response; every frame then
    carries a sequence number and a MAC (session key derived from both nonces, one per
    direction). Build one with :meth:`client` or :meth:`server`. After any error
    from :meth:`recv` the channel is broken and must be closed."""

    def __init__(
        self, sock: socket.socket, send_key: bytes, recv_key: bytes, timeout: float | None
    ) -> None:
        self.sock = sock
        self.peer: tuple[str, int] = sock.getpeername()[:2]
        self._send_key, self._recv_key = send_key, recv_key
        self._send_seq = self._recv_seq = 0
        self._send_lock, self._recv_lock = threading.Lock(), threading.Lock()
        self._broken: BaseException | None = None
        sock.settimeout(timeout)

    # -- handshake ---------------------------------------------------------------------
    @classmethod
    def client(cls, sock: socket.socket, key: str, role: str, timeout_s: float = 5.0) -> Channel:
        """Authenticate to a server of ``role`` over ``sock`` within ``timeout_s``."""
        before = sock.gettimeout()
        deadline = time.monotonic() + timeout_s
        c_nonce = secrets.token_hex(32)
        try:
            _send_plain(sock, {"farflung": 1, "role": role, "nonce": c_nonce}, deadline)
            reply = _recv_plain(sock, deadline)
            s_nonce = _field(reply, "nonce")
            proof = _derive(key, "server-proof", role, c_nonce, s_nonce).hex()
            if not hmac.compare_digest(proof, _field(reply, "proof")):
                raise WrongKey(f"the server does not hold this run's key (role {role!r})")
            mine = _derive(key, "client-proof", role, c_nonce, s_nonce).hex()
            _send_plain(sock, {"proof": mine}, deadline)
            if _field(_recv_plain(sock, deadline), "ok") != "ok":
                raise AuthError("the server refused the handshake")
        except OSError as e:
            raise _handshake_error(e) from None
        send_key = _derive(key, "client-to-server", role, c_nonce, s_nonce)
        recv_key = _derive(key, "server-to-client", role, c_nonce, s_nonce)
        return cls(sock, send_key, recv_key, before)

    @classmethod
    def server(cls, sock: socket.socket, key: str, role: str, timeout_s: float = 5.0) -> Channel:
        """Accept a client that proves the run key for ``role`` within ``timeout_s``;
        AuthError (with the reason) otherwise."""
        before = sock.gettimeout()
        deadline = time.monotonic() + timeout_s
        try:
            hello = _recv_plain(sock, deadline)
            if hello.get("farflung") != 1:
                raise AuthError("not a farflung handshake")
            asked = _field(hello, "role")
            if asked != role:
                raise AuthError(f"the client asked for role {asked!r}, this is {role!r}")
            c_nonce = _field(hello, "nonce")
            s_nonce = secrets.token_hex(32)
            proof = _derive(key, "server-proof", role, c_nonce, s_nonce).hex()
            _send_plain(sock, {"nonce": s_nonce, "proof": proof}, deadline)
            expected = _derive(key, "client-proof", role, c_nonce, s_nonce).hex()
            if not hmac.compare_digest(expected, _field(_recv_plain(sock, deadline), "proof")):
                raise WrongKey("the client does not hold this run's key")
            _send_plain(sock, {"ok": "ok"}, deadline)
        except OSError as e:
            raise _handshake_error(e) from None
        send_key = _derive(key, "server-to-client", role, c_nonce, s_nonce)
        recv_key = _derive(key, "client-to-server", role, c_nonce, s_nonce)
        return cls(sock, send_key, recv_key, before)

    # -- frames ------------------------------------------------------------------------
    def send(self, msg: dict[str, Any]) -> None:
        """One JSON frame (thread-safe)."""
        self._send(_JSON, json.dumps(msg).encode())  # a NaN loss travels as NaN

    def send_bytes(self, data: bytes | memoryview) -> None:
        """One binary frame (bulk data; the receiver caps its size)."""
        self._send(_BYTES, data)

    def _send(self, kind: int, payload: bytes | memoryview) -> None:
        n = len(payload) if isinstance(payload, bytes) else payload.nbytes
        if n >= 1 << 32:
            raise ValueError(f"a frame of {n} bytes is over the 4 GiB frame limit")
        with self._send_lock:
            header = _HEADER.pack(kind, self._send_seq, n)
            self._send_seq += 1
            mac = hmac.new(self._send_key, header, hashlib.sha256)
            mac.update(payload)
            if n <= 1 << 16:
                self.sock.sendall(header + bytes(payload) + mac.digest())
            else:  # no copy of bulk data
                self.sock.sendall(header)
                self.sock.sendall(payload)
                self.sock.sendall(mac.digest())

    def recv(self, max_bytes: int = MAX_FRAME) -> dict[str, Any]:
        """The next JSON frame, a dict. AuthError on a bad MAC, sequence, kind or size
        (or a payload that is not a JSON object); ChannelClosed when the peer closed."""
        payload = self._recv(_JSON, max_bytes)
        try:
            msg = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            msg = None
        if not isinstance(msg, dict):
            raise self._fail(AuthError("a frame is not a JSON object"))
        return msg

    def recv_bytes(self, max_bytes: int) -> bytes:
        """The next binary frame, at most ``max_bytes`` long."""
        return bytes(self._recv(_BYTES, max_bytes))

    def _recv(self, kind: int, max_bytes: int) -> bytearray:
        with self._recv_lock:
            if self._broken is not None:
                raise AuthError(f"the channel is broken ({self._broken})")
            try:
                header = _recv_exact(self.sock, _HEADER.size, None)
                got_kind, seq, n = _HEADER.unpack(header)
                if n > max_bytes:
                    raise AuthError(f"a frame of {n} bytes is over the cap of {max_bytes}")
                payload = _recv_exact(self.sock, n, None)
                mac = _recv_exact(self.sock, _MAC_LEN, None)
            except OSError as e:
                raise self._fail(e) from None
            check = hmac.new(self._recv_key, header, hashlib.sha256)
            check.update(payload)
            if not hmac.compare_digest(check.digest(), bytes(mac)):
                raise self._fail(AuthError("a frame failed its MAC check"))
            if seq != self._recv_seq:
                raise self._fail(
                    AuthError(f"frame sequence {seq}, expected {self._recv_seq} (replayed?)")
                )
            if got_kind != kind:
                raise self._fail(AuthError(f"a frame of kind {got_kind}, expected {kind}"))
            self._recv_seq += 1
            return payload

    def _fail(self, e: BaseException) -> BaseException:
        self._broken = e
        return e

    def settimeout(self, t: float | None) -> None:
        self.sock.settimeout(t)

    def close(self) -> None:
        close_socket(self.sock)


def shutdown_socket(sock: socket.socket) -> None:
    """Wake whatever reads or writes ``sock`` (it then sees the connection end); the
    descriptor stays open for the thread that owns it to close."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected


def close_socket(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways and close it."""
    shutdown_socket(sock)
    sock.close()


# -- the handshake's own (unauthenticated, small) frames ------------------------------------
def _send_plain(sock: socket.socket, msg: dict[str, Any], deadline: float) -> None:
    data = json.dumps(msg).encode()
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv_plain(sock: socket.socket, deadline: float) -> dict[str, Any]:
    (n,) = struct.unpack("!I", _recv_exact(sock, 4, deadline))
    if n > _HELLO_CAP:
        raise AuthError(f"a handshake message of {n} bytes (at most {_HELLO_CAP})")
    try:
        msg = json.loads(_recv_exact(sock, n, deadline))
    except (ValueError, UnicodeDecodeError):
        msg = None
    if not isinstance(msg, dict):
        raise AuthError("a handshake message that is not a JSON object")
    return msg


def _handshake_error(e: OSError) -> AuthError:
    """Every way a handshake fails is an AuthError with the reason."""
    if isinstance(e, AuthError):
        return e
    if isinstance(e, TimeoutError):
        return AuthError("no complete handshake within the time allowed")
    if isinstance(e, ChannelClosed):
        return AuthError("the peer closed the connection during the handshake (another key?)")
    return AuthError(f"the handshake failed: {e}")


def _field(msg: dict[str, Any], name: str) -> str:
    value = msg.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise AuthError(f"a handshake message without a valid {name!r}")
    return value
