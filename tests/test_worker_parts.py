"""Parts of the workers tested alone: the one fault-injection format (every worker
kind), the owner of an elastic worker's abandoned process groups, and how the elastic
launcher tells a stopped worker (never exits by itself) from one that exited."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import weakref

import pytest

from farflung.train.elastic_run import _is_stopped
from farflung.train.elastic_worker import LeftGroups
from farflung.train.faults import EXIT_CODE, FAULTS_ENV, Faults, parse_faults


def test_faults_are_one_format_for_every_worker_kind():
    spec = "1:4:EXIT, 0:5:NAN,1:5:NAN,1:5:CORRUPT,2:3:SLEEP0.5,1:9:LINKFLAP2,0:2:SIGSTOP"
    assert parse_faults(spec, 1) == {4: ["EXIT"], 5: ["NAN", "CORRUPT"], 9: ["LINKFLAP2"]}
    assert parse_faults(spec, 0) == {5: ["NAN"], 2: ["SIGSTOP"]}
    assert parse_faults(spec, None) == {}  # an elastic worker before it has an id
    faults = Faults(parse_faults(spec, 1))
    assert faults.take(5) == ["NAN", "CORRUPT"]
    assert faults.take(5) == []  # a redone step is not faulted again
    for bad in ("1:3", "1:3:KILL", "x:3:EXIT", "1:3:SLEEP", "1:2:EXIT:4"):
        with pytest.raises(ValueError, match=FAULTS_ENV):
            parse_faults(bad, 1)


def test_exit_fault_ends_the_process_at_once_with_its_code():
    code = (
        "from farflung.train.faults import Faults, at_start\n"
        "f = Faults.from_env(3)\n"
        "for step in (1, 2, 3):\n"
        "    at_start(f.take(step))\n"
        "    print(step, flush=True)\n"
    )
    env = {**os.environ, FAULTS_ENV: "3:2:EXIT,0:1:EXIT"}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == EXIT_CODE and r.stdout.split() == ["1"]


class _Group:
    """Stands in for a process group: only its lifetime matters here."""


def test_left_groups_are_held_for_the_grace_then_freed():
    now = [0.0]
    left = LeftGroups(grace_s=15.0, clock=lambda: now[0])
    refs = []
    for t in (0.0, 10.0, 20.0):  # three generations, each left at time t
        now[0] = t
        group = _Group()
        refs.append(weakref.ref(group))
        left.current = (group,)
        del group
        left.leave()
        assert left.current == ()
    gc.collect()
    assert all(r() is not None for r in refs)  # none freed while it may be in use
    now[0] = 25.5
    assert left.release() == 2 and len(left) == 1
    gc.collect()
    assert [r() is None for r in refs] == [True, True, False]
    now[0] = 35.5
    assert left.release() == 1 and len(left) == 0
    gc.collect()
    assert refs[2]() is None


def test_a_stopped_worker_is_seen_and_an_exited_one_keeps_its_code():
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert not _is_stopped(sleeper)
        os.kill(sleeper.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not _is_stopped(sleeper):  # the stop is reported once the kernel has it
            assert time.monotonic() < deadline, "a SIGSTOPped child was never seen stopped"
            time.sleep(0.01)
        assert sleeper.poll() is None  # stopped, not gone
    finally:
        sleeper.kill()
        sleeper.wait()
    quitter = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    deadline = time.monotonic() + 30
    while not _is_stopped(quitter) and quitter.returncode is None:  # reaped here
        assert time.monotonic() < deadline, "the child never exited"
        time.sleep(0.01)
    assert quitter.poll() == 3  # the code survives the reaping
