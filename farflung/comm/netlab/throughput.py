"""Measure TCP throughput between two lab hosts with plain Python sockets.

This file is also a stand-alone script (standard library only, so it starts fast
inside a namespace)::

    python throughput.py serve --bind ADDR [--port 0] --max-bytes N --timeout S
    python throughput.py send --to ADDR --port P --bytes N --timeout S

Both sides stop by themselves: after N bytes, at end of stream, or when the timeout
passes. The receiver prints one JSON line with what it counted; its rate excludes
the first chunk (which the shaper's bucket lets through at once) and the TCP
handshake, so it is the steady-state goodput (TCP payload, not wire bytes)."""

from __future__ import annotations

import argparse
import json
import select
import socket
import subprocess
import sys
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


def serve(bind: str, port: int, max_bytes: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((bind, port))
        srv.listen(1)
        print(json.dumps({"listening": srv.getsockname()[1]}), flush=True)
        srv.settimeout(max(0.01, deadline - time.monotonic()))
        received = first_len = 0
        first_at = last_at = None
        timed_out = False
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
        accepted_at = time.monotonic()
        with conn:
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


def send(to: str, port: int, nbytes: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    start = time.monotonic()
    sent = 0
    timed_out = False
    payload = memoryview(b"\x00" * _CHUNK)
    try:
        with socket.create_connection((to, port), timeout=timeout) as conn:
            while sent < nbytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                conn.settimeout(left)
                sent += conn.send(payload[: min(_CHUNK, nbytes - sent)])
            conn.shutdown(socket.SHUT_WR)
            left = deadline - time.monotonic()  # wait for the receiver to close
            if left > 0:
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
        raise TimeoutError("no answer from the throughput server")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"throughput server exited early: {err.strip()}")
    return json.loads(line)


def measure_pairs(
    lab: Any, pairs: Sequence[tuple[int, int]], nbytes: int = 4_000_000, timeout: float = 10.0
) -> list[ThroughputResult]:
    """Run one transfer of ``nbytes`` per ``(src, dst)`` pair in ``lab``, all at the same
    time, and return what each receiver measured. Nothing runs longer than
    ``timeout`` (+ a few seconds of grace, then the processes are killed)."""
    script = [sys.executable, "-S", __file__]  # -S: no site imports, fast start-up
    deadline = time.monotonic() + timeout + 5
    servers: list[subprocess.Popen] = []
    clients: list[subprocess.Popen] = []
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    try:
        ports = []
        for _, dst in pairs:
            argv = ["serve", "--bind", lab.address(dst), "--max-bytes", str(nbytes)]
            servers.append(lab.run(dst, [*script, *argv, "--timeout", str(timeout)], **pipes))
        for server in servers:
            ports.append(_read_json_line(server, deadline)["listening"])
        for (src, dst), port in zip(pairs, ports, strict=True):
            argv = ["send", "--to", lab.address(dst), "--port", str(port), "--bytes", str(nbytes)]
            clients.append(lab.run(src, [*script, *argv, "--timeout", str(timeout)], **pipes))
        results = []
        for (src, dst), server in zip(pairs, servers, strict=True):
            got = _read_json_line(server, deadline)
            results.append(
                ThroughputResult(
                    src=src,
                    dst=dst,
                    bytes=int(got["bytes"]),
                    seconds=float(got["seconds"]),
                    bits_per_s=float(got["bits_per_s"]),
                    complete=int(got["bytes"]) >= nbytes and not got["timed_out"],
                    elapsed=float(got["elapsed"]),
                )
            )
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


def measure_throughput(
    lab: Any, src: int, dst: int, nbytes: int = 4_000_000, timeout: float = 10.0
) -> ThroughputResult:
    """TCP goodput of one transfer of ``nbytes`` from host ``src`` to host ``dst``."""
    return measure_pairs(lab, [(src, dst)], nbytes, timeout)[0]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="receive one stream and report its rate")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--max-bytes", type=int, required=True)
    s.add_argument("--timeout", type=float, default=10.0)
    c = sub.add_parser("send", help="send N bytes")
    c.add_argument("--to", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--bytes", type=int, required=True)
    c.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        out = serve(a.bind, a.port, a.max_bytes, a.timeout)
    else:
        out = send(a.to, a.port, a.bytes, a.timeout)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
