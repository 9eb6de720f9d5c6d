"""Housekeeping of the network lab on this machine: running ``ip``/``tc``, knowing
which namespaces are farflung's and whose, checking that a lab can run here, and
removing what crashed labs left behind."""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PREFIX_PATTERN = re.compile(r"^ffl[0-9a-f]{6}$")
# every namespace farflung creates: <prefix>br (bridge), <prefix>h<i> (hosts),
# <prefix>pr (the short-lived probe of available())
NS_PATTERN = re.compile(r"^(ffl[0-9a-f]{6})(br|pr|h[0-9]{1,3})$")
STATE_DIR = Path("/run/farflung-netlab")


class NetlabError(RuntimeError):
    """Setting up or tearing down the lab failed; the message says which command."""


def run_cmd(
    argv: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetlabError(f"{' '.join(argv)}: {e}") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise NetlabError(f"{' '.join(argv)} failed ({proc.returncode}): {detail}")
    return proc


def run_batch(argv: Sequence[str], lines: Sequence[str], *, check: bool = True) -> None:
    """Run many ``ip``/``tc`` commands in one process (``-batch -``)."""
    if lines:
        run_cmd([*argv, "-batch", "-"], input="\n".join(lines) + "\n", check=check)


def list_netns() -> list[str]:
    out = run_cmd(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def start_time(pid: int) -> str | None:
    """The kernel's start time of a live ``pid`` (tells a live owner from a reused pid);
    None when there is no such process or it is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def owner_alive(prefix: str) -> bool:
    try:
        state = json.loads((STATE_DIR / f"{prefix}.json").read_text())
        pid, started = int(state["pid"]), str(state["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return start_time(pid) == started


def write_owner(prefix: str, **extra: Any) -> None:
    """Record that this process owns the namespaces named ``prefix...``."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    state = {"prefix": prefix, "pid": pid, "start_time": start_time(pid), **extra}
    (STATE_DIR / f"{prefix}.json").write_text(json.dumps(state) + "\n")


def remove_state(prefix: str) -> None:
    for suffix in (".json", ".matrix.json"):
        try:
            (STATE_DIR / f"{prefix}{suffix}").unlink()
        except FileNotFoundError:
            pass


def delete_netns(names: Sequence[str]) -> list[str]:
    """Delete namespaces by name; returns those that are gone afterwards."""
    names = [n for n in names if NS_PATTERN.match(n)]  # never anything else
    if not names:
        return []
    run_batch(["ip", "-force"], [f"netns del {n}" for n in names], check=False)
    left = set(list_netns())
    for n in names:
        if n in left:
            run_cmd(["ip", "netns", "del", n], check=False)
    left = set(list_netns())
    return [n for n in names if n not in left]


@functools.cache
def available() -> tuple[bool, str]:
    """Whether the lab can run here, and if not, why (for messages and test skips)."""
    if not sys.platform.startswith("linux"):
        return False, "the network lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return False, "the network lab needs root (ip netns, tc); run as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"'{tool}' (iproute2) not found on PATH"
    prefix = f"ffl{secrets.token_hex(3)}"
    probe = f"{prefix}pr"
    try:
        write_owner(prefix, hosts=0)  # so a concurrent netlab_down() leaves it alone
        run_cmd(["ip", "netns", "add", probe])
        run_cmd(["ip", "-n", probe, "link", "add", "ffa", "type", "veth", "peer", "name", "ffb"])
        run_cmd(["tc", "-n", probe, "qdisc", "add", "dev", "ffa", "root", "tbf", "rate", "1mbit",
              "burst", "32kb", "latency", "50ms"])  # fmt: skip
        htb = ["qdisc", "replace", "dev", "ffa", "root", "handle", "1:", "htb"]
        run_cmd(["tc", "-n", probe, *htb])
    except (NetlabError, OSError) as e:
        return False, f"cannot create a namespace with shaped veth links: {e}"
    finally:
        delete_netns([probe])
        remove_state(prefix)
    return True, "ok"


def netlab_down(*, force: bool = False) -> list[str]:
    """Remove the namespaces that earlier farflung labs left behind; returns their names.

    Only names matching :data:`NS_PATTERN` are considered. A lab whose owning process
    is still alive is left alone unless ``force``. Processes still running inside a
    removed namespace are not killed (the namespace disappears from ``ip netns list``
    and loses its links; the processes keep running until they exit)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in list_netns():
        m = NS_PATTERN.match(name)
        if m:
            groups[m.group(1)].append(name)
    removed: list[str] = []
    for prefix, names in sorted(groups.items()):
        if not force and owner_alive(prefix):
            continue
        removed += delete_netns(names)
        if not set(names) & set(list_netns()):
            remove_state(prefix)
    # state files of labs whose namespaces are already gone
    if STATE_DIR.is_dir():
        for f in STATE_DIR.glob("ffl*.json"):
            prefix = f.name.split(".", 1)[0]
            if PREFIX_PATTERN.match(prefix) and prefix not in groups and not owner_alive(prefix):
                remove_state(prefix)
    return sorted(removed)


def list_labs() -> list[dict[str, Any]]:
    """The farflung labs on this machine: ``prefix``, ``namespaces``, ``hosts`` (from the
    state file, when there is one) and ``owner_alive``."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in list_netns():
        m = NS_PATTERN.match(name)
        if m:
            groups[m.group(1)].append(name)
    labs = []
    for prefix, names in sorted(groups.items()):
        try:
            hosts = json.loads((STATE_DIR / f"{prefix}.json").read_text()).get("hosts")
        except (OSError, ValueError):
            hosts = None
        labs.append(
            {
                "prefix": prefix,
                "namespaces": sorted(names),
                "hosts": hosts,
                "owner_alive": owner_alive(prefix),
            }
        )
    return labs
