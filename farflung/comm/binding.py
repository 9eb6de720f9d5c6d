"""Where farflung's listeners bind: one address the user names, ports from a range.

Every listener a run opens (the coordinator, its rendezvous store, the workers' state
servers, rank 0's store in a local launch) goes through :func:`listen`, so that
``--bind`` and ``--port-range`` hold for all of them and firewall rules can be
written (docs/security.md)."""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import socket
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where a store is served: launchers stay torch-free
    import torch.distributed as dist

BIND_ENV = "FARFLUNG_BIND"
"""The address a worker's listeners bind (set by the launcher or by ``--bind``)."""
PORT_RANGE_ENV = "FARFLUNG_PORT_RANGE"
"""``LOW-HIGH``: the ports a worker's listeners may take (``--port-range``)."""


def parse_port_range(spec: str | None) -> tuple[int, int] | None:
    """``"29400-29499"`` (or one port, ``"29400"``) as ``(low, high)``; None or ``""``:
    any free port. A ValueError names what is wrong."""
    if not spec:
        return None
    low, _, high = spec.partition("-")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise ValueError(f"port range {spec!r} is not LOW-HIGH (e.g. 29400-29499)") from None
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"port range {spec!r} must satisfy 1 <= LOW <= HIGH <= 65535")
    return lo, hi


def split_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` as ``(host, port)``; a ValueError names the address otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host, int(port)


_LOW_PORT = 10000  # below: ports services commonly take


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel gives outgoing connections (Linux's default elsewhere)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on loopback that is free right now, for a listener another process
    opens a moment later (a worker's store). Drawn below the kernel's ephemeral
    range, so that no outgoing connection made in between can take it: the kernel's
    own choice (port 0) comes from that range, and on a busy machine a connection
    sometimes took the port before the worker bound it."""
    lo, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(64 if lo - _LOW_PORT > 1000 else 0):
        port = rng.randrange(_LOW_PORT, lo)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(addr: str) -> bool:
    """``addr`` is a loopback IP address (127.0.0.0/8, ::1); False for a host name."""
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def default_bind() -> str:
    """This process's bind address: ``FARFLUNG_BIND``, else every interface."""
    return os.environ.get(BIND_ENV, "") or "0.0.0.0"


def default_port_range() -> tuple[int, int] | None:
    return parse_port_range(os.environ.get(PORT_RANGE_ENV))


def listen(
    host: str | None = None,
    port: int = 0,
    port_range: tuple[int, int] | None = None,
    backlog: int = 128,
) -> socket.socket:
    """A listening TCP socket on ``host`` (None: :func:`default_bind`). ``port`` 0:
    the first free port of ``port_range`` (None: :func:`default_port_range`, and
    without one any free port). An OSError names the address when nothing is free."""
    host = default_bind() if host is None else host
    if port:
        candidates: range | list[int] = [port]
    else:
        port_range = port_range if port_range is not None else default_port_range()
        candidates = range(port_range[0], port_range[1] + 1) if port_range else [0]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    last: OSError | None = None
    for p in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, p))
            sock.listen(backlog)
            return sock
        except OSError as e:
            sock.close()
            if e.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise OSError(e.errno, f"cannot listen on {host}:{p}: {e.strerror}") from e
            last = e
    where = (
        f"{host}:{candidates[0]}"
        if len(candidates) == 1
        else (f"{host} ports {candidates[0]}-{candidates[-1]}")
    )
    raise OSError(errno.EADDRINUSE, f"no free port to listen on at {where}: {last}")


def serve_store(
    host: str | None = None,
    port: int = 0,
    port_range: tuple[int, int] | None = None,
    timeout: timedelta = timedelta(seconds=300),
) -> dist.TCPStore:
    """A TCPStore server listening only on ``host`` (torch's own would bind every
    interface). Its port is ``store.port``."""
    import torch.distributed as dist

    sock = listen(host, port, port_range)
    bound = sock.getsockname()
    fd = sock.detach()  # the store owns the descriptor from here on
    return dist.TCPStore(
        bound[0],
        bound[1],
        None,
        is_master=True,
        timeout=timeout,
        wait_for_workers=False,
        master_listen_fd=fd,
    )
