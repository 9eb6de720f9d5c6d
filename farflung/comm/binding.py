"""Where farflung's listeners bind: one address the user names, ports from a range.

Every listener a run opens (the coordinator, its rendezvous store, the workers' state
servers, rank 0's store in a local launch) goes through :func:`listen`, so that
``--bind`` and ``--port-range`` hold for all of them and firewall rules can be
written (docs/security.md)."""

from __future__ import annotations

import errno
import os
import socket
from datetime import timedelta

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
