"""Workers forked from a warm template (farflung.train.forkserver) behave as fresh
interpreters would for the launchers: they are the launcher's own children (exit
codes, signals, a stop seen by waitpid), each in a session of its own, with exactly
the environment and arguments the launcher gave, drawing their own random numbers;
and where a fork cannot stand in (a variable read at start-up differs, ``spawn``
asked for, a template that dies), workers start as fresh interpreters instead.

The launcher side runs in a process of its own (a driver): it makes itself a child
subreaper, which this test process should not become."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli import run_cli

TESTS = Path(__file__).parent

DRIVER = """
import json, os, signal, sys, time
from pathlib import Path
from farflung.train.elastic_run import _is_stopped
import farflung.train.forkserver as fs
from farflung.train.forkserver import Forked, WorkerStarter

if os.environ.get("TEST_GPU_NODE"):  # stands in for /dev/nvidiactl
    fs._GPU_DEVICES = (os.environ["TEST_GPU_NODE"],)

folder, preload, actions, starts = sys.argv[1], sys.argv[2], sys.argv[3:5], sys.argv[5:]
base = {**os.environ, "SHARED": "yes"}
preload = [p for p in preload.split(",") if p]
starter = WorkerStarter("forkserver_child", [folder, "--flag"], base, preload)
procs, ppids = [], []
for rank, action in enumerate(actions):
    env = {**base, "RANK": str(rank), "ACTION": action}
    env.pop("SHARED")  # a worker's environment is its own, not the template's
    env.update(s.split(":", 1)[1].split("=", 1) for s in starts if s.startswith(f"{rank}:"))
    procs.append(starter.start(env))
    # whose child it is once start() returned (the worker itself may look sooner,
    # while its intermediate parent is still exiting)
    ppids.append(int(Path(f"/proc/{procs[-1].pid}/stat").read_text().rsplit(")", 1)[1].split()[1]))
template = starter._template.pid if starter._template is not None else None
starter.close()
for rank in range(len(procs)):  # until each has written what it found
    while not (Path(folder) / f"{rank}.json").exists():
        assert procs[rank].poll() is None, procs[rank].returncode
        time.sleep(0.01)
stopped = None
if actions[1] == "wait":
    os.kill(procs[1].pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while not _is_stopped(procs[1]) and time.monotonic() < deadline:
        time.sleep(0.01)
    stopped = procs[1].poll() is None and time.monotonic() < deadline
    procs[1].kill()
codes = [p.wait(timeout=60) for p in procs]
gone = template is None or not Path(f"/proc/{template}").exists()
print(json.dumps({"driver": os.getpid(), "ppids": ppids,
                  "forked": [isinstance(p, Forked) for p in procs],
                  "codes": codes, "stopped": stopped, "template_gone": gone}))
"""


def drive(tmp_path: Path, actions=("exit0", "exit7"), preload="numpy.random", env=None, starts=()):
    """Two workers through a WorkerStarter in a driver process; what the driver saw
    and what each worker wrote about itself."""
    folder = tmp_path / "facts"
    folder.mkdir()
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", DRIVER, str(folder), preload, *actions, *starts],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
    )
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.splitlines()[-1])
    facts = [json.loads((folder / f"{rank}.json").read_text()) for rank in range(2)]
    return seen, facts, r.stderr


def test_forked_workers_are_the_launchers_children_with_their_own_env(tmp_path):
    seen, facts, _ = drive(tmp_path, actions=("exit7", "wait"))
    assert seen["forked"] == [True, True]
    assert seen["codes"] == [7, -9]  # an exit code, and death by a signal
    assert seen["stopped"] is True  # a SIGSTOP is seen with waitpid(WUNTRACED)
    assert seen["template_gone"]
    assert seen["ppids"] == [seen["driver"]] * 2  # handed over to the subreaper
    for rank, f in enumerate(facts):
        assert f["sid"] == f["pid"]  # a session of its own
        assert f["argv"] == [str(tmp_path / "facts"), "--flag"]
        assert f["name"] == "__main__"
        assert f["env"]["RANK"] == str(rank) and "SHARED" not in f["env"]
        assert f["env"]["PYTHONPATH"].startswith(str(TESTS))
    assert facts[0]["draw"] != facts[1]["draw"]  # numpy drew its own entropy in each


def test_a_different_start_up_variable_gets_a_fresh_interpreter(tmp_path):
    seen, facts, _ = drive(tmp_path, starts=("1:OMP_NUM_THREADS=3",))
    assert seen["forked"] == [True, False]
    assert seen["codes"] == [0, 7]
    assert facts[1]["env"]["OMP_NUM_THREADS"] == "3"
    assert seen["ppids"] == [seen["driver"]] * 2 and facts[1]["sid"] == facts[1]["pid"]


def test_spawn_asked_for_gets_fresh_interpreters(tmp_path):
    seen, facts, _ = drive(tmp_path, env={"FARFLUNG_WORKER_START": "spawn"})
    assert seen["forked"] == [False, False]
    assert seen["codes"] == [0, 7]
    assert facts[0]["sid"] == facts[0]["pid"]


def test_a_template_that_dies_falls_back_to_fresh_interpreters(tmp_path):
    seen, facts, err = drive(tmp_path, preload="no_such_module_here")
    assert seen["forked"] == [False, False]
    assert seen["codes"] == [0, 7]
    assert "worker template failed" in err and "fresh interpreters" in err
    assert all(f["name"] == "__main__" for f in facts)


@pytest.mark.parametrize("how", ["auto", "fork"])
def test_a_gpu_machine_spawns_unless_fork_is_asked_for(tmp_path, how):
    node = tmp_path / "nvidiactl"
    node.touch()
    env = {"TEST_GPU_NODE": str(node), "FARFLUNG_WORKER_START": how}
    seen, _, _ = drive(tmp_path, env=env)
    assert seen["forked"] == ([False, False] if how == "auto" else [True, True])
    assert seen["codes"] == [0, 7]


def test_an_unknown_start_method_is_refused_before_anything_is_made(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FARFLUNG_WORKER_START", "sometimes")
    out = tmp_path / "run"
    code, _, err = run_cli("train", str(tiny / "tiny.toml"), "--workers", "2", "--out", str(out))
    assert code == 2
    assert "FARFLUNG_WORKER_START='sometimes'" in err and "'auto', 'fork', 'spawn'" in err
    assert not out.exists()
