"""Fault injection for tests and benchmarks: one variable, one format, every worker kind.

``FARFLUNG_FAULTS=WHO:STEP:ACTION[,...]``: worker ``WHO`` (the rank of a plain or
pipeline worker, the worker id of an elastic one) does ``ACTION`` to itself at step
``STEP`` (counted from 1, the step being trained). Real faults, not simulated ones:

- as the step starts: a signal name (``SIGKILL``, ``SIGSTOP``) sent to itself;
  ``EXIT`` (the process ends at once with code :data:`EXIT_CODE`, no clean-up, as a
  crash would); ``LINKDOWN`` (its network interface goes down, in the network lab)
  or ``LINKFLAP<seconds>`` (down, and up again that much later); ``SLEEP<seconds>``
  (a slow step: a straggler, not a fault);
- in the step: ``NAN`` (its loss, and so its gradients, are NaN); ``HUGE`` (its loss
  is multiplied by :data:`HUGE_FACTOR`: finite, but under fp16 its scaled gradients
  overflow, a loss-scale event rather than a fault);
- as the step's update ends: ``CORRUPT`` (one number of the state the algorithm keeps
  equal on every member silently changes, :func:`corrupt`: a memory error no
  collective notices; the elastic coordinator evicts the member whose hash differs).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from typing import Any

import torch

FAULTS_ENV = "FARFLUNG_FAULTS"
EXIT_CODE = 17
"""What ``EXIT`` exits with (neither a farflung exit code nor a signal's)."""

HUGE_FACTOR = 1e10
"""What ``HUGE`` multiplies the loss by."""

IN_STEP = {"NAN": float("nan"), "HUGE": HUGE_FACTOR}
"""The in-step actions and what each multiplies the loss by."""

_ACTION = re.compile(r"SIG[A-Z]+|EXIT|NAN|HUGE|CORRUPT|LINKDOWN|(LINKFLAP|SLEEP)\d+(\.\d+)?")


class Faults:
    """The faults one worker injects into itself, by step."""

    def __init__(self, by_step: dict[int, list[str]] | None = None) -> None:
        self.by_step = by_step or {}

    @classmethod
    def from_env(cls, who: int | None) -> Faults:
        """Worker ``who``'s faults from :data:`FAULTS_ENV` (none when unset)."""
        return cls(parse_faults(os.environ.get(FAULTS_ENV, ""), who))

    def take(self, step: int) -> list[str]:
        """The actions due at ``step``, once: a step redone after an elastic rollback
        is not faulted again."""
        return self.by_step.pop(step, [])


def at_start(actions: list[str]) -> None:
    """Do what is due as the step starts."""
    for action in actions:
        if action not in (*IN_STEP, "CORRUPT"):
            inject(action)


def loss_factor(actions: list[str]) -> float:
    """What this step's loss is multiplied by (1.0: no in-step fault)."""
    factor = 1.0
    for action in actions:
        factor *= IN_STEP.get(action, 1.0)
    return factor


def after_update(actions: list[str], algo: Any) -> None:
    """Do what is due as the step's update ends (before anything of it is sent)."""
    if "CORRUPT" in actions:
        corrupt(algo)


def parse_faults(spec: str, who: int | None) -> dict[int, list[str]]:
    """Worker ``who``'s actions by step from a ``WHO:STEP:ACTION[,...]`` spec
    (ValueError naming the item when one is malformed)."""
    faults: dict[int, list[str]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        well_formed = len(parts) == 3 and all(p.isdigit() for p in parts[:2])
        if not well_formed or not _ACTION.fullmatch(parts[2]):
            raise ValueError(
                f"{FAULTS_ENV}: {item!r} is not WHO:STEP:ACTION (ACTION: SIGKILL, SIGSTOP, "
                "EXIT, NAN, HUGE, CORRUPT, LINKDOWN, LINKFLAP<s>, SLEEP<s>)"
            )
        if int(parts[0]) == who:
            faults.setdefault(int(parts[1]), []).append(parts[2])
    return faults


def inject(action: str) -> None:
    """Do ``action`` (one of the step-start actions) to this process or its link."""
    if action == "EXIT":
        os._exit(EXIT_CODE)
    if action.startswith("SIG"):
        os.kill(os.getpid(), signal.Signals[action])
        return
    if action.startswith("SLEEP"):  # a slow step, not a fault: heartbeats go on
        time.sleep(float(action.removeprefix("SLEEP")))
        return
    iface = os.environ.get("GLOO_SOCKET_IFNAME")
    if not iface:
        raise RuntimeError(f"fault {action} needs the network lab (GLOO_SOCKET_IFNAME)")
    subprocess.run(["ip", "link", "set", iface, "down"], check=True)
    if action.startswith("LINKFLAP"):
        seconds = float(action.removeprefix("LINKFLAP"))
        # a process of its own: this one may be gone (evicted) before the link is back
        subprocess.Popen(
            ["sh", "-c", f"sleep {seconds}; ip link set {iface} up"], start_new_session=True
        )


def corrupt(algo: Any) -> None:
    """Add 1.0 to one element of the first tensor of the state ``algo`` keeps equal on
    every member (the model's first parameter when replicas are identical, the global
    model of cocktail and DiLoCo), or of the model's first parameter when nothing is
    shared (gossip)."""
    target = _first_tensor(algo.shared_state())
    if target is None:
        target = next(algo.model.parameters())
    with torch.no_grad():
        target.view(-1)[0] += 1.0


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    for v in values:
        found = _first_tensor(v)
        if found is not None:
            return found
    return None
