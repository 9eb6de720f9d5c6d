"""Measure TCP throughput between two lab hosts with plain Python sockets.

This file is also a stand-alone script (standard library only, so it starts fast
inside a namespace)::

    python throughput.py serve --bind ADDR [--port 0] --max-bytes N --timeout S
    python throughput.py send --to ADDR --port P --bytes N --timeout S
    python throughput.py serve --bind ADDR --max-bytes N --timeout S --duplex
    python throughput.py send --to ADDR --port P --bytes N --timeout S --duplex

Both sides stop by themselves: after N bytes, at end of stream, or when the timeout
passes. The receiver prints one JSON line with what it counted; its rate excludes
the first chunk (which the shaper's bucket lets through at once) and the TCP
handshake, so it is the steady-state goodput (TCP payload, not wire bytes).

``--duplex``: one connection carries N bytes each way at the same time, as gloo's
single connection per pair of ranks does (each direction's ACKs then ride on, or
queue behind, the other direction's data); both sides print what they received."""

from __future__ import annotations

import argparse
import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_CHUNK = 1 << 16


@dataclass(frozen=True)
class ThroughputResult:
    """What the receiver counted for one transfer ``src -> dst``."""

    src: int
    dst: int
    bytes: int
    seconds: float
    bits_per_s: float  # steady state: excludes the first chunk and the handshake
    complete: bool  # all bytes arrived before the timeout
    elapsed: float = 0.0  # from the accepted connection to the last byte (all bytes)


def _receive(conn: socket.socket, max_bytes: int, deadline: float) -> dict[str, Any]:
    """Count what arrives on ``conn`` until ``max_bytes``, end of stream or ``deadline``."""
    accepted_at = time.monotonic()
    received = first_len = 0
    first_at = last_at = None
    timed_out = False
    while received < max_bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        conn.settimeout(left)
        try:
            chunk = conn.recv(min(1 << 20, max_bytes - received))
        except TimeoutError:
            timed_out = True
            break
        if not chunk:
            break
        now = time.monotonic()
        if first_at is None:
            first_at, first_len = now, len(chunk)
        last_at = now
        received += len(chunk)
    seconds = (last_at - first_at) if first_at is not None else 0.0
    elapsed = (last_at - accepted_at) if last_at is not None else 0.0
    rate = 8.0 * (received - first_len) / seconds if seconds > 0 else 0.0
    return {
        "bytes": received,
        "seconds": seconds,
        "bits_per_s": rate,
        "elapsed": elapsed,
        "timed_out": timed_out,
    }


def _send_all(conn: socket.socket, nbytes: int, deadline: float) -> tuple[int, bool]:
    """Send ``nbytes`` zeros, then half-close; returns (bytes sent, timed out)."""
    sent = 0
    payload = memoryview(b"\x00" * _CHUNK)
    while sent < nbytes:
        left = deadline - time.monotonic()
        if left <= 0:
            return sent, True
        conn.settimeout(left)
        try:
            sent += conn.send(payload[: min(_CHUNK, nbytes - sent)])
        except TimeoutError:
            return sent, True
    conn.shutdown(socket.SHUT_WR)
    return sent, False


def _duplex(conn: socket.socket, nbytes: int, deadline: float) -> dict[str, Any]:
    """Send ``nbytes`` on a thread while counting what arrives: both ways at once."""
    outcome: dict[str, Any] = {}

    def sender() -> None:
        try:
            outcome["sent"], outcome["send_timed_out"] = _send_all(conn, nbytes, deadline)
        except OSError as e:
            outcome["error"] = str(e)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    got = _receive(conn, nbytes, deadline)
    thread.join(max(0.0, deadline - time.monotonic()))
    return {**got, **outcome}


def serve(
    bind: str, port: int, max_bytes: int, timeout: float, duplex: bool = False
) -> dict[str, Any]:
    """Accept one connection and count what arrives (``duplex``: send as much back at
    the same time)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((bind, port))
        srv.listen(1)
        print(json.dumps({"listening": srv.getsockname()[1]}), flush=True)
        srv.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            return {
                "bytes": 0,
                "seconds": 0.0,
                "bits_per_s": 0.0,
                "elapsed": 0.0,
                "timed_out": True,
            }
        with conn:
            if duplex:
                return _duplex(conn, max_bytes, deadline)
            return _receive(conn, max_bytes, deadline)


def send(to: str, port: int, nbytes: int, timeout: float, duplex: bool = False) -> dict[str, Any]:
    """Connect and send ``nbytes`` (``duplex``: also count as much coming back)."""
    deadline = time.monotonic() + timeout
    start = time.monotonic()
    timed_out = False
    sent = 0
    try:
        with socket.create_connection((to, port), timeout=timeout) as conn:
            if duplex:
                return _duplex(conn, nbytes, deadline)
            sent, timed_out = _send_all(conn, nbytes, deadline)
            left = deadline - time.monotonic()  # wait for the receiver to close
            if left > 0 and not timed_out:
                conn.settimeout(left)
                while conn.recv(_CHUNK):
                    pass
    except TimeoutError:
        timed_out = True
    except OSError as e:
        return {"bytes": sent, "seconds": time.monotonic() - start, "error": str(e)}
    return {"bytes": sent, "seconds": time.monotonic() - start, "timed_out": timed_out}


def _read_json_line(proc: subprocess.Popen, deadline: float) -> dict[str, Any]:
    """One JSON line from a child's stdout, waiting at most until ``deadline``."""
    left = deadline - time.monotonic()
    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
    if not ready:
        raise TimeoutError("no answer from the throughput tool")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"throughput tool exited early: {err.strip()}")
    return json.loads(line)


def _result(src: int, dst: int, got: dict[str, Any], nbytes: int) -> ThroughputResult:
    return ThroughputResult(
        src=src,
        dst=dst,
        bytes=int(got.get("bytes", 0)),
        seconds=float(got.get("seconds", 0.0)),
        bits_per_s=float(got.get("bits_per_s", 0.0)),
        complete=int(got.get("bytes", 0)) >= nbytes and not got.get("timed_out", True),
        elapsed=float(got.get("elapsed", 0.0)),
    )


def _transfers(
    lab: Any, pairs: Sequence[tuple[int, int]], nbytes: int, timeout: float, duplex: bool
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Start a server in each ``dst`` and a client in each ``src``, all at once; return
    each pair's final JSON of the server and (duplex only) of the client. Nothing runs
    longer than ``timeout`` (+ a few seconds of grace, then the processes are killed)."""
    script = [sys.executable, "-S", __file__]  # -S: no site imports, fast start-up
    deadline = time.monotonic() + timeout + 5
    mode = ["--timeout", str(timeout)] + (["--duplex"] if duplex else [])
    servers: list[subprocess.Popen] = []
    clients: list[subprocess.Popen] = []
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    try:
        ports = []
        for _, dst in pairs:
            argv = ["serve", "--bind", lab.address(dst), "--max-bytes", str(nbytes)]
            servers.append(lab.run(dst, [*script, *argv, *mode], **pipes))
        for server in servers:
            ports.append(_read_json_line(server, deadline)["listening"])
        for (src, dst), port in zip(pairs, ports, strict=True):
            argv = ["send", "--to", lab.address(dst), "--port", str(port), "--bytes", str(nbytes)]
            clients.append(lab.run(src, [*script, *argv, *mode], **pipes))
        results = []
        for server, client in zip(servers, clients, strict=True):
            # a plain client only sends; in duplex mode it also reports what it received
            back = _read_json_line(client, deadline) if duplex else {}
            results.append((_read_json_line(server, deadline), back))
        for proc in servers + clients:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        return results
    finally:
        for proc in servers + clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for f in (proc.stdout, proc.stderr):
                if f:
                    f.close()


def measure_pairs(
    lab: Any, pairs: Sequence[tuple[int, int]], nbytes: int = 4_000_000, timeout: float = 10.0
) -> list[ThroughputResult]:
    """Run one transfer of ``nbytes`` per ``(src, dst)`` pair in ``lab``, all at the same
    time (one TCP connection each), and return what each receiver measured. Nothing
    runs longer than ``timeout`` (+ a few seconds of grace)."""
    done = _transfers(lab, pairs, nbytes, timeout, duplex=False)
    return [
        _result(src, dst, got, nbytes) for (src, dst), (got, _) in zip(pairs, done, strict=True)
    ]


def measure_throughput(
    lab: Any, src: int, dst: int, nbytes: int = 4_000_000, timeout: float = 10.0
) -> ThroughputResult:
    """TCP goodput of one transfer of ``nbytes`` from host ``src`` to host ``dst``."""
    return measure_pairs(lab, [(src, dst)], nbytes, timeout)[0]


def measure_duplex(
    lab: Any, a: int, b: int, nbytes: int = 4_000_000, timeout: float = 10.0
) -> tuple[ThroughputResult, ThroughputResult]:
    """``nbytes`` from ``a`` to ``b`` and ``nbytes`` from ``b`` to ``a`` at the same time
    over ONE TCP connection, the way gloo connects a pair of ranks (so each direction's
    ACKs share a queue with the other direction's data). Returns (a->b, b->a), each as
    measured by its receiver."""
    ((at_b, at_a),) = _transfers(lab, [(a, b)], nbytes, timeout, duplex=True)
    return _result(a, b, at_b, nbytes), _result(b, a, at_a, nbytes)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="receive one stream and report its rate")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--max-bytes", type=int, required=True)
    s.add_argument("--timeout", type=float, default=10.0)
    s.add_argument("--duplex", action="store_true", help="send as many bytes back at once")
    c = sub.add_parser("send", help="send N bytes")
    c.add_argument("--to", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--bytes", type=int, required=True)
    c.add_argument("--timeout", type=float, default=10.0)
    c.add_argument("--duplex", action="store_true", help="receive as many bytes at once")
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        out = serve(a.bind, a.port, a.max_bytes, a.timeout, a.duplex)
    else:
        out = send(a.to, a.port, a.bytes, a.timeout, a.duplex)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
