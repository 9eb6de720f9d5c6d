"""A worker's state, sent to a joiner: authenticated, ticketed, streamed, never pickled.

Every elastic worker runs a :class:`StateServer`. A joiner the coordinator sends to
it (a *donor*) connects with :func:`fetch_state`:

1. both sides prove the run key (:class:`~farflung.comm.channel.Channel`, role
   ``"state"``) within :data:`HANDSHAKE_S`, or the connection is closed: a stranger
   gets nothing, and nothing is built for it;
2. the joiner sends ``{"op": "fetch", "ticket": T}``; ``T`` is the coordinator's
   signature (:func:`~farflung.comm.channel.sign`, purpose ``"ticket"``) over the
   joiner's id, the generation, the restart step and the donor's id. The server
   checks the signature, that it is the donor named, and that it holds the state
   for that step;
3. one transfer at a time (another waits up to :data:`BUSY_WAIT_S`, then is told
   ``busy``): the state, encoded by :mod:`farflung.comm.tensor_tree` (safetensors
   plus a JSON skeleton), goes out in binary frames of :data:`FRAME_BYTES` read
   straight from the snapshot's tensors, so serving costs one frame of memory.

The joiner accepts at most the size it was told to (from its own model's size), reads
every frame with a timeout, and rebuilds the state without unpickling anything. That
the state is the *right* one is the joiner's next check: its hash against the one the
coordinator recorded at the commit (:mod:`farflung.train.elastic_worker`)."""

from __future__ import annotations

import collections
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from farflung.comm.binding import listen, split_address
from farflung.comm.channel import AuthError, Channel, close_socket, shutdown_socket, verify
from farflung.comm.tensor_tree import decode, encode
from farflung.membership.protocol import HANDSHAKE_S  # the coordinator's deadline too

ROLE = "state"
MAX_CONNECTIONS = 8
"""Connections served at once; more are closed on accept (a flood costs nothing)."""
BUSY_WAIT_S = 2.0
"""How long a second request waits for the transfer in progress before ``busy``."""
FRAME_BYTES = 4 << 20
REQUEST_CAP = 64 << 10  # a fetch request is a few hundred bytes
TICKET_FIELDS = ("id", "gen", "restart", "donor")


class StateTransferError(ConnectionError):
    """The donor refused, or sent something that is not a state of the size promised."""


def ticket_problem(key: str, ticket: Any, donor_id: int | None) -> str | None:
    """Why ``ticket`` does not entitle its holder to this donor's state (None: it
    does). ``donor_id``: this worker's id (None until the coordinator gave one)."""
    if not isinstance(ticket, dict):
        return "the request carries no ticket"
    fields = {k: ticket.get(k) for k in TICKET_FIELDS}
    bad = [k for k, v in fields.items() if type(v) is not int]
    if bad:
        return f"the ticket's {', '.join(bad)} are not integers"
    if not verify(key, "ticket", fields, ticket.get("mac")):
        return "the ticket is not signed by this run's coordinator"
    if donor_id is None or fields["donor"] != donor_id:
        return f"the ticket names donor {fields['donor']}, this is worker {donor_id}"
    return None


class StateServer:
    """Serves ``provide(step)`` (a snapshot tree, or None when this worker holds
    none for ``step``) to ticket holders; see the module docstring. Listens on
    ``host`` (None: ``FARFLUNG_BIND``) at a port of ``port_range`` (None:
    ``FARFLUNG_PORT_RANGE``); set :attr:`donor_id` once the coordinator has named
    this worker (requests before are refused)."""

    def __init__(
        self,
        provide: Callable[[int], Any | None],
        key: str,
        host: str | None = None,
        port_range: tuple[int, int] | None = None,
        timeout_s: float = 60.0,
        handshake_s: float = HANDSHAKE_S,
    ) -> None:
        self.provide, self.key, self.timeout_s = provide, key, timeout_s
        self.handshake_s = handshake_s
        self.donor_id: int | None = None
        self.listener = listen(host, 0, port_range)
        self.port: int = self.listener.getsockname()[1]
        self.served = self.refused = 0
        self._said = -1.0  # when a refusal was last printed
        self.refusals: collections.deque[str] = collections.deque(maxlen=64)  # the latest
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._transfer = threading.Lock()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, addr = self.listener.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                self._refuse(addr, "too many connections at once")
                close_socket(sock)
                continue
            threading.Thread(target=self._serve, args=(sock, addr), daemon=True).start()

    def _serve(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        # one deadline for the handshake and the request together: a peer sending a
        # byte at a time must not hold a slot for longer (shutdown wakes the read; the
        # descriptor is closed here, by the thread that reads it)
        timer = threading.Timer(self.handshake_s, shutdown_socket, (sock,))
        timer.start()
        try:
            ch = Channel.server(sock, self.key, ROLE, timeout_s=self.handshake_s)
            ch.settimeout(self.handshake_s)
            request = ch.recv(REQUEST_CAP)
            timer.cancel()
            ch.settimeout(self.timeout_s)
            self._answer(ch, addr, request)
        except (OSError, ValueError, TypeError) as e:  # AuthError included
            self._refuse(addr, str(e) or type(e).__name__)
        finally:
            timer.cancel()
            close_socket(sock)
            self._slots.release()

    def _answer(self, ch: Channel, addr: tuple[str, int], request: dict[str, Any]) -> None:
        ticket = request.get("ticket")
        why = "not a fetch request" if request.get("op") != "fetch" else None
        why = why or ticket_problem(self.key, ticket, self.donor_id)
        if why is not None:
            self._refuse(addr, why)
            ch.send({"op": "refused", "why": why})
            return
        if not self._transfer.acquire(timeout=BUSY_WAIT_S):
            self._refuse(addr, "busy")
            ch.send({"op": "refused", "why": "busy: another transfer is in progress"})
            return
        try:
            self._send_state(ch, addr, ticket["restart"])
        finally:
            self._transfer.release()

    def _send_state(self, ch: Channel, addr: tuple[str, int], step: int) -> None:
        snap = self.provide(step)
        if snap is None:
            why = f"worker {self.donor_id} holds no state for step {step}"
            self._refuse(addr, why)
            ch.send({"op": "refused", "why": why})
            return
        encoded = encode(snap)  # no copy: frames are read from the snapshot's tensors
        ch.send({"op": "state", "step": step, "bytes": encoded.nbytes})
        for chunk in encoded.chunks(FRAME_BYTES):
            ch.send_bytes(chunk)
        self.served += 1

    def _refuse(self, addr: tuple[str, int], why: str) -> None:
        self.refused += 1
        self.refusals.append(f"{addr[0]}:{addr[1]}: {why}")
        now = time.monotonic()
        if now - self._said >= 1.0:  # a flood must not flood the log too
            self._said = now
            print(
                f"farflung: state server: refused {addr[0]}:{addr[1]}: {why} "
                f"({self.refused} refused so far)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        close_socket(self.listener)


class Fetched(NamedTuple):
    """A state a donor served, and how many bytes it took."""

    state: dict[str, Any]
    nbytes: int


def fetch_state(
    address: str,
    key: str,
    ticket: dict[str, Any],
    timeout_s: float,
    max_bytes: int = 1 << 40,
) -> Fetched:
    """The state the donor at ``address`` (HOST:PORT) serves for ``ticket``, tensors
    rebuilt, and its size on the wire. Every read waits at most ``timeout_s``; a state
    announced larger than ``max_bytes`` is refused before anything is read. OSError on any failure
    (:class:`StateTransferError` when the donor refused or sent a bad state,
    :class:`~farflung.comm.channel.AuthError` when it does not hold the key)."""
    try:
        host, port = split_address(address)
    except ValueError as e:
        raise StateTransferError(f"the donor address: {e}") from None
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        ch = Channel.client(sock, key, ROLE, timeout_s=min(timeout_s, HANDSHAKE_S))
        ch.settimeout(timeout_s)
        ch.send({"op": "fetch", "ticket": ticket})
        data = _receive(ch, address, max_bytes)
    try:
        state = decode(data)
    except ValueError as e:
        raise StateTransferError(f"{address} sent a state that cannot be read: {e}") from None
    if not isinstance(state, dict):
        raise StateTransferError(f"{address} sent a {type(state).__name__}, not a state dict")
    return Fetched(state, len(data))


def _receive(ch: Channel, address: str, max_bytes: int) -> bytearray:
    reply = ch.recv()
    if reply.get("op") == "refused":
        raise StateTransferError(f"{address} refused: {str(reply.get('why'))[:200]}")
    n = reply.get("bytes")
    if reply.get("op") != "state" or type(n) is not int:
        raise StateTransferError(f"{address} answered {str(reply)[:200]}, not a state")
    if not 0 < n <= max_bytes:
        raise StateTransferError(f"{address} announced {n} bytes of state; at most {max_bytes}")
    buf = bytearray(n)
    got = 0
    while got < n:
        frame = ch.recv_bytes(min(FRAME_BYTES, n - got))
        if not frame:
            raise StateTransferError(f"{address} sent an empty frame at byte {got} of {n}")
        buf[got : got + len(frame)] = frame
        got += len(frame)
    return buf


__all__ = [
    "AuthError",
    "StateServer",
    "Fetched",
    "StateTransferError",
    "fetch_state",
    "ticket_problem",
]
