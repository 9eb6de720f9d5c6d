"""A worker's side of an elastic run: its connection to the coordinator
(:mod:`farflung.membership.coordinator`); the state server joiners fetch from is
:mod:`farflung.membership.state_transfer`.

The connection has two threads of its own: a reader that applies the coordinator's
messages (a new generation, a commit, the end), and a beater that sends a beat five
times per ``heartbeat_s`` and notices when the coordinator itself falls silent.
Every change of generation moves :attr:`Member.epoch` on; collectives of an older
epoch stop waiting (see :func:`farflung.comm.collectives.set_epoch_source`)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from farflung.comm.binding import split_address
from farflung.comm.channel import AuthError, Channel, WrongKey
from farflung.comm.errors import Reconfigure
from farflung.membership.protocol import BEATS_PER_BOUND, HANDSHAKE_S, MAX_MESSAGE


class MembershipLost(RuntimeError):
    """This worker is no longer part of the run: the coordinator closed its connection
    (it was evicted, or the coordinator stopped) or fell silent. ``leave``: it was told
    to leave (a replayed log)."""

    def __init__(self, message: str, leave: bool = False) -> None:
        super().__init__(message)
        self.leave = leave


class Member:
    """Connect to the coordinator at ``address``, prove the run ``key`` and say hello.

    ``wid``: the id the launcher gave this worker (None: the coordinator picks one;
    it may pick another anyway); ``join``: enter a running job; ``step``: the step
    this worker's state is at; ``state_port``: where its state server listens (the
    coordinator pairs it with the address this connection comes from)."""

    def __init__(
        self,
        address: str,
        *,
        key: str,
        wid: int | None,
        join: bool,
        step: int,
        state_port: int,
        connect_timeout_s: float = 30.0,
    ) -> None:
        host, port = split_address(address)
        self.ch = _connect(host, port, key, connect_timeout_s)
        self.sock = self.ch.sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host = self.sock.getsockname()[0]  # this worker's address as the job sees it
        self.coordinator_host = host
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
        hello = {"op": "hello", "id": wid, "join": join, "step": step, "state_port": state_port}
        welcome = self._greet(hello, address)
        self.id, self.heartbeat_s = int(welcome["id"]), float(welcome["heartbeat_s"])
        self.ch.settimeout(None)  # silence is the beater's to judge
        self._stop = threading.Event()
        for target in (self._read_loop, self._beat_loop):
            threading.Thread(target=target, daemon=True).start()

    def _greet(self, hello: dict[str, Any], address: str) -> dict[str, Any]:
        """Send the hello; the coordinator's welcome (MembershipLost when it refuses)."""
        self.ch.settimeout(HANDSHAKE_S)
        try:
            self.ch.send(hello)
            welcome = self.ch.recv(MAX_MESSAGE)
        except OSError as e:
            raise MembershipLost(
                f"the coordinator at {address} closed the connection: {e}"
            ) from None
        if welcome.get("op") != "welcome":
            raise MembershipLost(
                f"the coordinator at {address} refused this worker: {welcome.get('why')}"
            )
        return welcome

    # -- threads ------------------------------------------------------------------
    def _read_loop(self) -> None:
        try:
            while True:
                msg = self.ch.recv(MAX_MESSAGE)
                self.last_recv = time.monotonic()
                self._apply(msg)
        except (OSError, KeyError, TypeError, ValueError):
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
            elif op == "stop":  # the coordinator ended the run (an error of its own)
                self.lost = MembershipLost(f"the coordinator stopped the run: {msg.get('why')}")
                self.epoch += 1
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
        self.ch.send(msg)

    def current_epoch(self) -> int:
        return self.epoch

    def vote(self, gen: int, votes: list[dict[str, Any]]) -> None:
        """Steps settled here (each ``{"step", ...}``), committed once every member
        has voted them."""
        self._safe_send({"op": "vote", "gen": gen, "votes": votes})

    def met(self, gen: int) -> None:
        """This worker reached generation ``gen``'s meeting (the coordinator evicts
        members that do not within its deadline)."""
        self._safe_send({"op": "met", "gen": gen})

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
        self.ch.close()


def _connect(host: str, port: int, key: str, timeout_s: float) -> Channel:
    """An authenticated channel to the coordinator, retried until ``timeout_s`` (it
    may not listen yet, or be full); a wrong key fails at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=HANDSHAKE_S)
        except OSError as e:
            last: OSError = e
        else:
            try:
                return Channel.client(sock, key, "coordinator", timeout_s=HANDSHAKE_S)
            except WrongKey as e:
                sock.close()
                raise MembershipLost(
                    f"the coordinator at {host}:{port} holds another run key than this "
                    "worker's (FARFLUNG_KEY_FILE / --key-file / FARFLUNG_RUN_KEY)"
                ) from e
            except AuthError as e:
                sock.close()
                last = e
        if time.monotonic() > deadline:
            raise MembershipLost(f"cannot reach the coordinator at {host}:{port}: {last}")
        time.sleep(0.2)
