"""The coordinator's connections: who may connect, and one reader and one writer per
member. What the messages mean is decided elsewhere (the :class:`Host`, the
coordinator). Here a peer proves the run key and says a valid hello within the
handshake deadline (:data:`~farflung.membership.protocol.HANDSHAKE_S`) or is refused
(and logged, at most :data:`REFUSALS_LOGGED` a minute per address); connections are
capped; every message is checked before the host sees it; and a connection that
closes or sends a bad message is reported as lost."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from farflung.comm.binding import listen
from farflung.comm.channel import AuthError, Channel, close_socket
from farflung.membership.protocol import MAX_MESSAGE, check_message

REFUSALS_LOGGED = 10
"""Refused connections logged per address per minute; the rest are counted."""


@dataclass
class Connection:
    """One worker's connection, as the coordinator sees it."""

    id: int
    ch: Channel
    addr: str  # its state server: the address its connection came from, its state port
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

    def close(self, drain: bool = False) -> None:
        """Stop talking to the worker; ``drain``: after what is queued for it is sent."""
        self.alive = False
        self.outbox.put(None)
        if not drain:
            close_socket(self.ch.sock)

    def write(self) -> None:
        """The writer thread: the outbox, in order, until it is closed."""
        while True:
            msg = self.outbox.get()
            if msg is None:
                close_socket(self.ch.sock)
                return
            try:
                self.ch.send(msg)
            except OSError:
                close_socket(self.ch.sock)  # its reader sees it and reports the loss
                return


class Host(Protocol):
    """What the connections report to (the coordinator). ``lock`` is held around every
    call but :meth:`dispatch` (which takes it itself); ``finished``: the run ended,
    nothing more is admitted or reported lost."""

    lock: threading.RLock
    finished: threading.Event

    def hello(self, ch: Channel, msg: dict[str, Any]) -> Connection:
        """A peer that proved the key said a valid hello: it is a connection now (its
        writer started with :meth:`Server.thread`)."""

    def dispatch(self, conn: Connection, msg: dict[str, Any]) -> None:
        """A valid message from ``conn``."""

    def lose(self, conn: Connection, why: str, detail: str) -> None:
        """``conn`` closed (``crash``) or broke the protocol (``protocol``)."""

    def refused(self, record: dict[str, Any]) -> None:
        """A refused peer, for ``events.jsonl``."""


class Server:
    """Accept and serve connections for ``host`` on ``host_addr``/``port`` (``port_range``:
    :func:`farflung.comm.binding.listen`), at most ``max_conns`` open at once, members
    or not. ``handshake_s``: the deadline for the handshake and the hello together;
    ``heartbeat_s`` bounds a blocked write (see :meth:`_admit`)."""

    def __init__(
        self,
        host: Host,
        key: str,
        *,
        host_addr: str,
        port: int,
        port_range: tuple[int, int] | None,
        max_conns: int,
        heartbeat_s: float,
        handshake_s: float,
        log: Callable[[str], None],
    ) -> None:
        self.host, self.key, self.log = host, key, log
        self.heartbeat_s, self.handshake_s = heartbeat_s, handshake_s
        self.listener = listen(host_addr, port, port_range)
        self.port = self.listener.getsockname()[1]
        self.max_conns = max_conns
        self.open_conns = 0  # sockets accepted and not yet closed, members or not
        self.refusals: dict[str, list[float]] = {}  # by host: [window start, logged, hidden]
        self.closed = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> Server:
        self.thread(self._accept_loop)
        return self

    def thread(self, target: Callable, *args: Any) -> threading.Thread:
        """``target(*args)`` in a daemon thread of the server's."""
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self.threads = [x for x in self.threads if x.is_alive()]
        self.threads.append(t)
        return t

    def stop(self) -> None:
        """Accept no more connections (those open stay until closed)."""
        self.closed.set()
        try:
            self.listener.close()
        except OSError:
            pass

    def unlogged(self) -> list[dict[str, Any]]:
        """A ``refused`` record per address whose refusals were counted, not logged."""
        return [
            {
                "event": "refused",
                "address": host,
                "reason": f"{int(hidden)} more refused connections, not logged one by one",
                "at": time.time(),
            }
            for host, (_, _, hidden) in self.refusals.items()
            if hidden
        ]

    def _accept_loop(self) -> None:
        while not self.closed.is_set():
            try:
                sock, peer = self.listener.accept()
            except OSError as e:
                if self.closed.is_set() or self.listener.fileno() < 0:
                    return
                self.log(f"accept failed ({e}); retrying")  # out of descriptors: passes
                time.sleep(0.1)
                continue
            with self.host.lock:
                full = self.open_conns >= self.max_conns
                if not full:
                    self.open_conns += 1
            if full:  # refused before any thread or buffer is spent on it
                close_socket(sock)
                self._refused(peer, f"too many connections (at most {self.max_conns})")
                continue
            self.thread(self._serve, sock, peer)

    def _refused(self, peer: Any, reason: str) -> None:
        """Report a refused peer, at most :data:`REFUSALS_LOGGED` a minute per address;
        the rest are counted."""
        host = str(peer[0])
        now = time.monotonic()
        with self.host.lock:
            window = self.refusals.get(host)
            if window is None or now - window[0] > 60:
                hidden = int(window[2]) if window else 0
                window = self.refusals[host] = [now, 0, 0]
            else:
                hidden = 0
            if window[1] >= REFUSALS_LOGGED:
                window[2] += 1
                return
            window[1] += 1
            if len(self.refusals) > 4096:  # addresses seen long ago
                self.refusals = {h: w for h, w in self.refusals.items() if now - w[0] <= 60}
            record = {"event": "refused", "address": f"{host}:{peer[1]}", "reason": reason}
            record.update({"at": time.time()}, **({"not_logged_before": hidden} if hidden else {}))
            self.log(f"refused {record['address']}: {reason}")
            self.host.refused(record)

    def _serve(self, sock: socket.socket, peer: Any) -> None:
        conn = None
        try:
            conn = self._admit(sock, peer)
            if conn is None:
                return
            while True:
                msg = conn.ch.recv(MAX_MESSAGE)
                problem = check_message(msg)
                if problem is not None:
                    with self.host.lock:
                        if conn.alive and not self.host.finished.is_set():
                            self.host.lose(conn, "protocol", f"a bad message ({problem})")
                    return
                conn.last_seen = time.monotonic()
                self.host.dispatch(conn, msg)
        except OSError as e:  # the connection closed or broke, or a frame was bad
            if conn is not None and not self.host.finished.is_set():
                why = "protocol" if isinstance(e, AuthError) else "crash"
                with self.host.lock:
                    if conn.alive:
                        detail = str(e) or type(e).__name__
                        self.host.lose(conn, why, f"its connection closed ({detail})")
        finally:
            close_socket(sock)
            with self.host.lock:
                self.open_conns -= 1

    def _admit(self, sock: socket.socket, peer: Any) -> Connection | None:
        """The handshake and the hello, both within ``handshake_s``; a peer that fails
        either is refused (logged) and None returned."""
        deadline = time.monotonic() + self.handshake_s
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            ch = Channel.server(sock, self.key, "coordinator", timeout_s=self.handshake_s)
            ch.settimeout(max(0.01, deadline - time.monotonic()))
            hello = ch.recv(MAX_MESSAGE)
        except OSError as e:
            self._refused(peer, str(e) or type(e).__name__)
            return None
        problem = check_message(hello)
        if problem is None and hello["op"] != "hello":
            problem = f"{hello['op']} before hello"
        if problem is not None:
            self._refused(peer, f"a bad hello ({problem})")
            try:
                ch.send({"op": "refused", "why": f"a bad hello ({problem})"})
            except OSError:
                pass
            return None
        # beyond every silence bound: a worker that stopped reading is lost, never a
        # writer blocked forever
        ch.settimeout(4 * self.heartbeat_s + self.handshake_s)
        with self.host.lock:
            if self.host.finished.is_set():
                return None
            return self.host.hello(ch, hello)
