"""How long torchft 0.2.0 takes to notice a lost replica and commit again without it.

Measurement behind the decision not to build farflung's elastic fault tolerance on
torchft. Runs on CPU with gloo only. Needs torchft, which is *not* a farflung
dependency; run it from a separate environment::

    python3.11 -m venv /tmp/tft
    /tmp/tft/bin/pip install torch==2.13.0      # first, so pip does not pull CUDA
    /tmp/tft/bin/pip install torchft==0.2.0
    /tmp/tft/bin/python benchmarks/torchft_detection.py [--quick]

Each trial starts a torchft ``LighthouseServer`` on localhost (``min_replicas=2``) and
3 replica groups of one process each. Every replica trains an ``nn.Linear(64, 64)``
through ``torchft.Manager`` + ``torchft.process_group.ProcessGroupGloo``: per step
``start_quorum`` (async, the default), forward/backward padded with a sleep to about
0.05 s, ``manager.allreduce`` of every gradient, ``should_commit``, optimizer step.
Each replica appends one JSON line per step attempt to its own log file.

Once all three have committed steps with 3 participants, the parent SIGKILLs (or
SIGSTOPs) replica 2 and reads the survivors' logs:

* ``recovery_s``: fault -> the later of the two survivors' first *committed* step
  with 2 participants (detection + re-quorum + PG reconfigure + one step);
* ``detect_s``: fault -> first survivor step attempt that did not commit;
* ``longest_stall_s``: largest gap between consecutive commits of a survivor
  across the fault;
* ``steps_lost``: step attempts after the fault that did not commit (max over
  survivors).

Trials: SIGKILL and SIGSTOP with torchft's defaults (the ``torchft_lighthouse`` CLI
with only ``--min_replicas 2``; Manager and ProcessGroupGloo untouched), then both
again with the knobs set to 1-3 s (lighthouse ``--heartbeat_timeout_ms 1000
--join_timeout_ms 2000``; Manager ``timeout=2s, quorum_timeout=3s,
connect_timeout=3s``; ``ProcessGroupGloo(timeout=2s)``), then SIGKILL once more with
the in-process ``torchft.coordination.LighthouseServer`` and its own defaults (its
binding fills ``join_timeout_ms`` with 100, the CLI with 60000). ``--quick`` runs
only the two short trials. Every child is SIGKILLed and the lighthouse shut down
at the end of each trial. Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

os.environ.setdefault(
    "RUST_LOG", "warn"
)  # the in-process lighthouse logs every quorum tick at info

try:
    import torch
    import torchft
    from torchft.coordination import LighthouseServer
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(
        f"torchft_detection: torchft is not importable ({exc}).\n"
        "Install it in a separate venv: python3.11 -m venv /tmp/tft && "
        "/tmp/tft/bin/pip install torch==2.13.0 && /tmp/tft/bin/pip install torchft==0.2.0, "
        "then run this script with /tmp/tft/bin/python."
    )

STEP_S = 0.05
VICTIM = 2
N_REPLICAS = 3

# torchft 0.2.0 defaults, read from the installed package (see /tmp/torchft_eval.md).
DEFAULTS = {
    # `torchft_lighthouse --help` (src/lighthouse.rs LighthouseOpt; Rust source is not in the wheel)
    "lighthouse_cli_heartbeat_timeout_ms": 5000,
    "lighthouse_cli_join_timeout_ms": 60000,
    "lighthouse_cli_quorum_tick_ms": 100,
    # torchft.coordination.LighthouseServer (pyo3 binding, src/lib.rs) fills None with
    # join_timeout_ms=100, quorum_tick_ms=100, heartbeat_timeout_ms=5000 (_torchft.pyi:64-71)
    "lighthouse_python_join_timeout_ms": 100,
    "lighthouse_min_replicas": "required, no default",
    "manager_heartbeat_interval_s": 0.1,  # manager.py:181
    "manager_timeout_s": 60,  # manager.py:169 (wrap_future, should_commit, checkpoint HTTP)
    "manager_quorum_timeout_s": 60,  # manager.py:170
    "manager_connect_timeout_s": 60,  # manager.py:171
    "process_group_gloo_timeout_s": 60,  # process_group.py:422 (ProcessGroupWrapper.__init__)
    "manager_min_replica_size": "required, no default",
    "manager_use_async_quorum": True,  # manager.py:168
    "manager_quorum_retries": 0,  # manager.py:185
    "manager_max_retries": None,  # manager.py:184 (retry should_commit failures forever)
    "checkpoint_transport": "HTTPTransport(timeout=timeout, num_chunks=0)",  # manager.py:277-281
    "env_overrides": [
        "TORCHFT_TIMEOUT_SEC",
        "TORCHFT_QUORUM_TIMEOUT_SEC",
        "TORCHFT_CONNECT_TIMEOUT_SEC",
        "TORCHFT_QUORUM_RETRIES",
    ],  # manager.py:80-87, env wins over arguments
}

SETTINGS = {
    # the production path: the torchft_lighthouse CLI with only --min_replicas
    "defaults": {
        "lighthouse_mode": "cli",
        "lighthouse": {},  # heartbeat 5000 ms, join 60000 ms, tick 100 ms
        "manager": {},  # timeout / quorum_timeout / connect_timeout 60 s
        "pg_timeout_s": 60,  # ProcessGroupGloo default
    },
    "short": {
        "lighthouse_mode": "cli",
        "lighthouse": {
            "heartbeat_timeout_ms": 1000,
            "join_timeout_ms": 2000,
            "quorum_tick_ms": 100,
        },
        "manager": {"timeout_s": 2, "quorum_timeout_s": 3, "connect_timeout_s": 3},
        "pg_timeout_s": 2,
    },
    # in-process torchft.coordination.LighthouseServer with its own defaults (join 100 ms)
    "python_lighthouse_defaults": {
        "lighthouse_mode": "python",
        "lighthouse": {},
        "manager": {},
        "pg_timeout_s": 60,
    },
}


class Lighthouse:
    """The lighthouse: the ``torchft_lighthouse`` CLI as a child process, or in-process."""

    def __init__(self, mode: str, opts: dict, log_path: Path) -> None:
        self.proc: subprocess.Popen | None = None
        self.server = None
        self._log = None
        if mode == "python":
            self.server = LighthouseServer(bind="[::]:0", min_replicas=2, **opts)
            self.port = int(self.server.address().rsplit(":", 1)[1])
            return
        exe = Path(sys.executable).parent / "torchft_lighthouse"
        exe_s = str(exe) if exe.exists() else shutil.which("torchft_lighthouse")
        if exe_s is None:
            raise RuntimeError(
                "torchft_lighthouse console script not found next to python or on PATH"
            )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [exe_s, "--bind", f"[::]:{self.port}", "--min_replicas", "2"]
        for k, v in opts.items():
            cmd += [f"--{k}", str(v)]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 15
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.shutdown()
                raise RuntimeError(f"torchft_lighthouse exited: {cmd}; see {log_path}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        self.shutdown()
        raise RuntimeError("torchft_lighthouse did not open its port within 15 s")

    @property
    def addr(self) -> str:
        return f"http://localhost:{self.port}"

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()


# --------------------------------------------------------------------------- replica


def replica_main(args: argparse.Namespace) -> None:
    from torch import nn
    from torch.distributed import TCPStore
    from torchft import Manager
    from torchft.process_group import ProcessGroupGloo

    cfg = json.loads(args.settings)
    log = open(args.log, "a", buffering=1)

    def emit(**rec: object) -> None:
        rec["t"] = time.time()
        log.write(json.dumps(rec) + "\n")

    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    # Manager connects as a TCPStore client; the replica group (1 process) owns the master.
    store = TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    pg = ProcessGroupGloo(timeout=timedelta(seconds=cfg["pg_timeout_s"]))
    mkw: dict = {}
    m = cfg["manager"]
    if "timeout_s" in m:
        mkw["timeout"] = timedelta(seconds=m["timeout_s"])
    if "quorum_timeout_s" in m:
        mkw["quorum_timeout"] = timedelta(seconds=m["quorum_timeout_s"])
    if "connect_timeout_s" in m:
        mkw["connect_timeout"] = timedelta(seconds=m["connect_timeout_s"])
    manager = Manager(
        pg=pg,
        load_state_dict=lambda sd: (
            model.load_state_dict(sd["model"]),
            opt.load_state_dict(sd["opt"]),
        ),
        state_dict=lambda: {"model": model.state_dict(), "opt": opt.state_dict()},
        min_replica_size=2,
        rank=0,
        world_size=1,
        store_addr="localhost",
        store_port=store.port,
        lighthouse_addr=args.lighthouse,
        replica_id=f"replica_{args.idx}",
        hostname="localhost",
        **mkw,
    )
    emit(event="ready")
    x = torch.randn(32, 64)
    y = torch.randn(32, 64)
    while True:
        t0 = time.time()
        try:
            manager.start_quorum()
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            pad = STEP_S - (time.time() - t0)
            if pad > 0:
                time.sleep(pad)
            works = [manager.allreduce(p.grad) for p in model.parameters()]
            for w in works:
                w.wait()
            committed = manager.should_commit()
            if committed:
                opt.step()
            err = manager.errored()
            emit(
                step=manager.current_step(),
                committed=bool(committed),
                participants=manager.num_participants(),
                dur=time.time() - t0,
                err=None if err is None else str(err.original_exception)[:200],
            )
        except Exception as exc:  # quorum timeouts etc. surface here
            emit(
                step=manager.current_step(),
                committed=False,
                participants=None,
                dur=time.time() - t0,
                exc=f"{type(exc).__name__}: {exc}"[:300],
            )
            time.sleep(0.05)


# --------------------------------------------------------------------------- parent


def read_log(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # torn last line
    return out


def lighthouse_loss(result: dict, lh: Lighthouse, logs: list[Path], observe_s: float) -> dict:
    """SIGKILL the lighthouse (all replicas healthy) and count commits for observe_s."""
    assert lh.proc is not None, "lighthouse_sigkill needs the CLI lighthouse"
    t_fault = time.time()
    os.kill(lh.proc.pid, signal.SIGKILL)
    time.sleep(observe_s)
    per = {}
    for i, log in enumerate(logs):
        allrecs = [r for r in read_log(log) if "step" in r]
        after = [r for r in allrecs if r["t"] > t_fault]
        commits = [r["t"] for r in allrecs if r["committed"]]
        last_before = max((t for t in commits if t <= t_fault), default=t_fault)
        first_bad = next((r for r in after if not r["committed"]), None)
        per[f"replica_{i}"] = {
            "commits_after_fault": sum(1 for r in after if r["committed"]),
            "failed_attempts_after_fault": sum(1 for r in after if not r["committed"]),
            "detect_s": None if first_bad is None else round(first_bad["t"] - t_fault, 3),
            "stalled_since_s": round(time.time() - last_before, 3),
            "errors": sorted(
                {(r.get("err") or r.get("exc") or "")[:160] for r in after if not r["committed"]}
                - {""}
            )[:3],
        }
    result["per_replica"] = per
    result["observe_s"] = observe_s
    result["recovery_s"] = None
    ok = [v["commits_after_fault"] for v in per.values()]
    result["steps_lost"] = None
    result["notes"] = (
        f"lighthouse SIGKILLed with all 3 replicas healthy; commits afterwards per replica {ok} "
        f"in {observe_s} s (a step whose quorum was already answered can still commit). "
        "The next quorum RPC fails after quorum_timeout; every later start_quorum re-raises "
        "that same exception (manager.py:586-587 calls .result() on the failed future), so "
        "this script's retry loop counts each re-raise as a failed attempt"
    )
    return result


def run_trial(fault: str, settings_name: str, workdir: Path, deadline_s: float) -> dict:
    cfg = SETTINGS[settings_name]
    lh = Lighthouse(
        cfg["lighthouse_mode"],
        cfg["lighthouse"],
        workdir / f"{fault}_{settings_name}_lighthouse.log",
    )
    lh_addr = lh.addr
    logs = [workdir / f"{fault}_{settings_name}_r{i}.jsonl" for i in range(N_REPLICAS)]
    errs = [open(workdir / f"{fault}_{settings_name}_r{i}.stderr", "w") for i in range(N_REPLICAS)]
    procs: list[subprocess.Popen] = []
    result: dict = {"fault": fault, "settings": {"name": settings_name, **cfg}}
    t_start = time.time()
    try:
        for i in range(N_REPLICAS):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--replica",
                        "--idx",
                        str(i),
                        "--lighthouse",
                        lh_addr,
                        "--log",
                        str(logs[i]),
                        "--settings",
                        json.dumps(cfg),
                    ],
                    stdout=errs[i],
                    stderr=subprocess.STDOUT,
                )
            )

        # warm-up: every replica has >= 10 commits with 3 participants
        def full_commits(i: int) -> int:
            return sum(
                1 for r in read_log(logs[i]) if r.get("committed") and r.get("participants") == 3
            )

        warm_deadline = time.time() + 90
        while time.time() < warm_deadline:
            if all(full_commits(i) >= 10 for i in range(N_REPLICAS)):
                break
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        else:
            result["notes"] = "warm-up never reached 10 commits with 3 participants in 90 s"
            return result
        if any(p.poll() is not None for p in procs):
            result["notes"] = f"replica exited during warm-up (rc={[p.poll() for p in procs]})"
            return result
        result["startup_s"] = round(time.time() - t_start, 2)

        pre = [r for r in read_log(logs[0]) if r.get("committed") and r.get("participants") == 3]
        durs = [r["dur"] for r in pre[-8:]]
        result["steady_step_s"] = round(sum(durs) / len(durs), 3)

        if fault == "lighthouse_sigkill":
            return lighthouse_loss(result, lh, logs, observe_s=deadline_s)

        t_fault = time.time()
        os.kill(procs[VICTIM].pid, signal.SIGKILL if fault == "sigkill" else signal.SIGSTOP)

        survivors = [i for i in range(N_REPLICAS) if i != VICTIM]

        def post(i: int) -> list[dict]:
            return [r for r in read_log(logs[i]) if "step" in r and r["t"] > t_fault]

        while time.time() - t_fault < deadline_s:
            if all(
                sum(1 for r in post(i) if r["committed"] and r["participants"] == 2) >= 5
                for i in survivors
            ):
                break
            time.sleep(0.1)

        per = {}
        for i in survivors:
            allrecs = [r for r in read_log(logs[i]) if "step" in r]
            after = [r for r in allrecs if r["t"] > t_fault]
            first_ok = next((r for r in after if r["committed"] and r["participants"] == 2), None)
            first_bad = next((r for r in after if not r["committed"]), None)
            commits = [r["t"] for r in allrecs if r["committed"]]
            last_before = max((t for t in commits if t <= t_fault), default=t_fault)
            window = [last_before] + [t for t in commits if t > t_fault][:5]
            gaps = [b - a for a, b in zip(window, window[1:], strict=False)]
            open_ended = (
                first_ok is None
            )  # no commit with 2 participants seen: stall is a lower bound
            if open_ended:
                gaps.append(time.time() - window[-1])
            per[f"replica_{i}"] = {
                "stall_is_lower_bound": open_ended,
                "recovery_s": None if first_ok is None else round(first_ok["t"] - t_fault, 3),
                "detect_s": None if first_bad is None else round(first_bad["t"] - t_fault, 3),
                "steps_lost": sum(
                    1
                    for r in after
                    if not r["committed"] and (first_ok is None or r["t"] < first_ok["t"])
                ),
                "longest_stall_s": round(max(gaps), 3) if gaps else None,
                "errors": sorted(
                    {
                        (r.get("err") or r.get("exc") or "")[:160]
                        for r in after
                        if not r["committed"]
                    }
                    - {""}
                )[:3],
            }
        rec = [v["recovery_s"] for v in per.values()]
        result["recovery_s"] = None if None in rec else max(rec)
        det = [v["detect_s"] for v in per.values() if v["detect_s"] is not None]
        result["detect_s"] = min(det) if det else None
        result["steps_lost"] = max(v["steps_lost"] for v in per.values())
        stalls = [v["longest_stall_s"] for v in per.values() if v["longest_stall_s"] is not None]
        result["longest_stall_s"] = max(stalls) if stalls else None
        result["per_survivor"] = per
        if result["recovery_s"] is None:
            result["notes"] = f"survivors did not commit with 2 participants within {deadline_s} s"
        else:
            result["notes"] = "ok"
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)  # also ends a SIGSTOPped process
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for f in errs:
            f.close()
        lh.shutdown()
        result["trial_wall_s"] = round(time.time() - t_start, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replica", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--idx", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--lighthouse", help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="only the short-timeout trials")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions of the SIGKILL/short trial")
    ap.add_argument("--keep-logs", help="copy per-replica logs into this directory")
    args = ap.parse_args()
    if args.replica:
        replica_main(args)
        return

    # SIGKILL/short is repeated: whether a survivor sees the dead peer's socket close or
    # waits out the gloo timeout depends on where in the allreduce the kill lands.
    plan = [("sigkill", "short")] * args.repeats + [("sigstop", "short")]
    if not args.quick:
        plan = (
            [("sigkill", "defaults"), ("sigstop", "defaults")]
            + plan
            + [("sigkill", "python_lighthouse_defaults"), ("lighthouse_sigkill", "short")]
        )
    trials = []
    with tempfile.TemporaryDirectory(prefix="tft_det_") as tmp:
        work = Path(tmp)
        for n, (fault, sname) in enumerate(plan):
            deadline = 70.0 if sname in ("defaults", "python_lighthouse_defaults") else 20.0
            if fault == "lighthouse_sigkill":
                deadline = 12.0
            trial_dir = work / f"t{n}"
            trial_dir.mkdir()
            r = run_trial(fault, sname, trial_dir, deadline)
            print(
                f"# {fault}/{sname}: recovery_s={r.get('recovery_s')} "
                f"detect_s={r.get('detect_s')} stall={r.get('longest_stall_s')} "
                f"lost={r.get('steps_lost')} notes={r.get('notes')}",
                file=sys.stderr,
                flush=True,
            )
            trials.append(r)
        if args.keep_logs:
            dst = Path(args.keep_logs)
            dst.mkdir(parents=True, exist_ok=True)
            for f in work.rglob("*"):
                if f.is_file():
                    (dst / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    print(
        json.dumps(
            {
                "benchmark": "torchft_detection",
                "torchft_version": getattr(torchft, "__version__", None) or _dist_version(),
                "torch_version": torch.__version__,
                "replicas": N_REPLICAS,
                "step_s_target": STEP_S,
                "victim": f"replica_{VICTIM}",
                "defaults": DEFAULTS,
                "results": trials,
            }
        )
    )


def _dist_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("torchft")
    except Exception:
        return None


if __name__ == "__main__":
    main()
