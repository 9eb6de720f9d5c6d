"""A worker's side of an elastic run: its connection to the coordinator
(:mod:`farflung.comm.coordinator`) and the state server joiners fetch from.

The connection has two threads of its own: a reader that applies the coordinator's
messages (a new generation, a commit, the end), and a beater that sends a beat five
times per ``heartbeat_s`` and notices when the coordinator itself falls silent.
Every change of generation moves :attr:`Member.epoch` on; collectives of an older
epoch stop waiting (see :func:`farflung.comm.collectives.set_epoch_source`)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from farflung.comm.coordinator import BEATS_PER_BOUND, read_lines, send_line
from farflung.comm.errors import Reconfigure


class MembershipLost(RuntimeError):
    """This worker is no longer part of the run: the coordinator closed its connection
    (it was evicted, or the coordinator stopped) or fell silent. ``leave``: it was told
    to leave (a replayed log)."""

    def __init__(self, message: str, leave: bool = False) -> None:
        super().__init__(message)
        self.leave = leave


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host, int(port)


class Member:
    """Connect to the coordinator at ``address`` and say hello.

    ``wid``: the id the launcher gave this worker (None: the coordinator picks one);
    ``join``: enter a running job; ``step``: the step this worker's state is at;
    ``state_addr``: where its state server listens."""

    def __init__(
        self,
        address: str,
        *,
        wid: int | None,
        join: bool,
        step: int,
        state_port: int,
        connect_timeout_s: float = 30.0,
    ) -> None:
        host, port = split_address(address)
        deadline = time.monotonic() + connect_timeout_s
        while True:
            try:
                self.sock = socket.create_connection((host, port), timeout=5.0)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise MembershipLost(
                        f"cannot reach the coordinator at {address}: {e}"
                    ) from None
                time.sleep(0.2)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host = self.sock.getsockname()[0]  # this worker's address as the job sees it
        self.coordinator_host = host
        self.send_lock = threading.Lock()
        self.cond = threading.Condition()
        self.epoch = 0
        self.gen: dict[str, Any] | None = None
        self.gen_epoch: dict[int, int] = {}  # the epoch each generation began
        self.committed = 0
        self.finished = False
        self.lost: MembershipLost | None = None
        self.last_recv = time.monotonic()
        self.id: int | None = None
        self.heartbeat_s = 0.0
        hello = {"op": "hello", "id": wid, "join": join, "step": step}
        hello["addr"] = f"{self.host}:{state_port}"
        send_line(self.sock, self.send_lock, hello)
        self._lines = read_lines(self.sock)
        welcome = next(self._lines)
        self.id, self.heartbeat_s = welcome["id"], welcome["heartbeat_s"]
        self._stop = threading.Event()
        for target in (self._read_loop, self._beat_loop):
            threading.Thread(target=target, daemon=True).start()

    # -- threads ------------------------------------------------------------------
    def _read_loop(self) -> None:
        try:
            for msg in self._lines:
                self.last_recv = time.monotonic()
                self._apply(msg)
        except (OSError, ValueError):
            pass
        self._set_lost("the coordinator closed this worker's connection (evicted, or it stopped)")

    def _apply(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        with self.cond:
            if op == "gen":
                self.gen, self.epoch = msg, self.epoch + 1
                self.gen_epoch[msg["gen"]] = self.epoch
                # everything before the restart step is committed (a joiner never saw it)
                self.committed = max(self.committed, msg["restart"] - 1)
            elif op == "commit":
                self.committed = max(self.committed, msg["step"])
            elif op == "finish":
                self.finished = True
            elif op == "leave":
                self.lost = MembershipLost(
                    "the replayed membership log has this worker leave", True
                )
                self.epoch += 1
            self.cond.notify_all()

    def _beat_loop(self) -> None:
        period = self.heartbeat_s / BEATS_PER_BOUND
        while not self._stop.wait(period):
            silent = time.monotonic() - self.last_recv
            if silent > self.heartbeat_s:
                self._set_lost(f"the coordinator has been silent for {silent:.1f} s")
                return
            try:
                self.send({"op": "beat"})
            except OSError:
                self._set_lost("the connection to the coordinator broke")
                return

    def _set_lost(self, why: str) -> None:
        with self.cond:
            if self.lost is None and not self._stop.is_set() and not self.finished:
                self.lost = MembershipLost(why)
                self.epoch += 1
            self.cond.notify_all()

    # -- the training thread's calls ------------------------------------------------
    def send(self, msg: dict[str, Any]) -> None:
        send_line(self.sock, self.send_lock, msg)

    def current_epoch(self) -> int:
        return self.epoch

    def vote(self, gen: int, votes: list[dict[str, Any]]) -> None:
        """Steps settled here (each ``{"step", ...}``), committed once every member
        has voted them."""
        self._safe_send({"op": "vote", "gen": gen, "votes": votes})

    def fault(self, gen: int, why: str) -> None:
        self._safe_send({"op": "fault", "gen": gen, "why": why})

    def done(self, gen: int, payload: dict[str, Any]) -> None:
        self._safe_send({"op": "done", "gen": gen, **payload})

    def tell(self, msg: dict[str, Any]) -> None:
        """Send ``msg``; a broken connection makes this worker lost, not a crash."""
        self._safe_send(msg)

    def _safe_send(self, msg: dict[str, Any]) -> None:
        try:
            self.send(msg)
        except OSError:
            self._set_lost("the connection to the coordinator broke")

    def next_generation(self, after: int) -> dict[str, Any]:
        """Block until a generation newer than ``after`` that includes this worker."""
        with self.cond:
            while True:
                if self.lost is not None:
                    raise self.lost
                if self.gen is not None and self.gen["gen"] > after:
                    return self.gen
                self.cond.wait(1.0)

    def wait_committed(
        self, step: int, epoch: int, until: Callable[[], bool] | None = None
    ) -> None:
        """Block until ``step`` is committed (or ``until()``); Reconfigure when the
        generation changes first."""
        with self.cond:
            while self.committed < step and not (until and until()):
                if self.lost is not None:
                    raise self.lost
                if self.epoch != epoch:
                    raise Reconfigure("membership changed while waiting for a commit")
                self.cond.wait(0.5)

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class StateServer:
    """Serves this worker's state to joiners: a joiner sends the step it wants
    (8 bytes), the server answers with the state's length and bytes (length 0: no
    such state here). ``provide(step)`` builds the bytes on the server's thread, so
    training goes on meanwhile."""

    def __init__(self, provide: Callable[[int], bytes | None]) -> None:
        self.provide = provide
        self.listener = socket.create_server(("0.0.0.0", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            with sock:
                (step,) = struct.unpack("!q", _recv_exact(sock, 8))
                data = self.provide(step) or b""
                sock.sendall(struct.pack("!q", len(data)))
                sock.sendall(data)
        except OSError:
            pass  # the joiner went away: it harms no one

    def close(self) -> None:
        self.listener.close()


def fetch_state(address: str, step: int, timeout_s: float) -> bytes:
    """The state a peer's :class:`StateServer` holds for ``step``; OSError on failure."""
    host, port = split_address(address)
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(struct.pack("!q", step))
        (n,) = struct.unpack("!q", _recv_exact(sock, 8))
        if n == 0:
            raise OSError(f"{address} holds no state for step {step}")
        return _recv_exact(sock, n)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise OSError("connection closed mid-transfer")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
