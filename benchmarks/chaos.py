"""Chaos test of elastic training: random kills, freezes, link flaps and joins.

Runs ``configs/demo.toml`` elastically with ``--workers`` local workers, each in its own
network namespace behind ``--links`` (``--netlab``, root), twice with the same settings:

1. the undisturbed run, the reference for the final loss. Its step count is chosen so
   it lasts about ``--duration`` seconds, from a 15-step calibration run (skipped with
   ``--steps``);
2. the chaos run: once the first step is committed, every U(``--every``) seconds a
   fault of a random kind (``--kinds``, seeded by ``--seed``) hits a random live worker:

   - ``kill``: SIGKILL (the launcher restarts it as a joiner);
   - ``freeze``: SIGSTOP, SIGCONT after U(3, 10) s (evicted after ``heartbeat_s``; it
     exits on waking and the launcher starts a joiner in its place);
   - ``flap``: its namespace's interface down for U(2, 8) s, then up again;
   - ``join``: one more worker (``farflung train --join``) in a live worker's namespace
     (at most ``--workers`` + 2 live workers: past that another kind is drawn).

   No fault while fewer than 2 workers are live (running, not frozen, link up), none
   that would leave no live worker, and none in the last 15 s the run is expected to
   take (estimated from the reference run's step time).

Each kill/freeze/flap is matched to the first unmatched ``left`` event of
``events.jsonl`` decided at or after it (within ``heartbeat_s`` + 10 s, preferring the
victim's id when its process shows it, and the matching ``why``: crash for a kill,
silent otherwise). A kill is detected by any ``left``; a freeze or flap only by a
``silent`` one: a frozen worker that exits when it wakes (``why`` crash) was not
detected while frozen, and its row says ``ended_as`` crash instead. ``detection_s`` =
the event's ``at`` - the fault's time (None when undetected); ``recovery_s`` = the
first commit seen here after the event - the event's ``at`` (the coordinator's own
``recovery_s``, kept as ``coordinator_recovery_s``, times only the last generation of
a change and repeats it for every departure folded into that change).
``undetected`` counts the faults without a detection, ``ended_as_crash`` the freezes
and flaps among them that ended with the worker's exit.

JSON on the last line: ``results`` (one row per fault), ``faults`` (by kind),
``detection_p50_s``/``_p95_s``, ``recovery_p50_s``/``_max_s``,
``commits_between_faults`` (commits seen between the first fault and the last),
``longest_stall_s`` (the coordinator's, which counts the start-up
before the first step) and ``observed_stall_s`` (the longest gap between commits seen
here after the first one), ``steps_lost`` (steps redone: the largest ``steps_redone``
of each membership change, summed), ``hash_disagreements``, ``sample_violations``
(:func:`farflung.train.elastic_run.check_samples`), ``leaks`` (processes of the runs
still alive, namespaces that were not there before, the coordinator's port still
open), ``final_val_loss``/``reference_val_loss``/``loss_ratio``, ``targets``
(detection p95 <= 3 s, longest stall <= 2 x heartbeat + one step) and ``met``.

    python benchmarks/chaos.py [--workers 4] [--duration 600] [--every 5 20]
        [--kinds kill,freeze,flap,join] [--links 20mbit,5ms] [--algorithm allreduce]
        [--heartbeat 2.0] [--seed 0] [--out DIR] [--steps N]
    python benchmarks/chaos.py --resummarize results/chaos.json   # rows -> summary
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT

CONFIG = "configs/demo.toml"
CALIBRATION_STEPS = 15
QUIET_TAIL_S = 15.0  # no fault this close to the expected end
MATCH_SLACK_S = 10.0  # a left event this long after heartbeat_s still counts
EXTRA_WORKERS = 2
LAB_ENV = (
    "GLOO_SOCKET_IFNAME",
    "FARFLUNG_NETLAB_HOST",
    "FARFLUNG_NETLAB_PREFIX",
    "FARFLUNG_NETLAB_MATRIX",
    "FARFLUNG_NETWORK",
)  # joins stop at --workers + this many live workers


def say(msg: str) -> None:
    print(f"[chaos] {msg}", file=sys.stderr, flush=True)


def overrides(args: argparse.Namespace, steps: int) -> list[str]:
    sets = [
        "elastic.enabled=true",
        f"elastic.heartbeat_s={args.heartbeat}",
        "train.batch_size=12",
        f"train.steps={steps}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        f"parallel.algorithm={args.algorithm}",
    ]
    return [a for s in sets for a in ("--set", s)]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def netns_list() -> set[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat.rsplit(")", 1)[1].split()[0]


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (a.decode(errors="replace").split("=", 1) for a in raw.split(b"\0") if b"=" in a)
    return dict(pairs)


def pids_of(folders: list[Path]) -> list[int]:
    """Every process (but this one) whose argv names one of ``folders``."""
    names = [str(f) for f in folders]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        argv = cmdline(int(entry.name))
        if any(a == n or a.startswith(n + "/") for a in argv for n in names):
            found.append(int(entry.name))
    return found


def workers_of(folders: list[Path]) -> list[int]:
    """The worker processes (``python -m farflung.train ... --out F``) of ``folders``."""
    out = []
    for pid in pids_of(folders):
        argv = cmdline(pid)
        if "farflung.train" in argv and "--out" in argv:
            target = argv[argv.index("--out") + 1] if argv.index("--out") + 1 < len(argv) else ""
            if target in {str(f) for f in folders}:
                out.append(pid)
    return out


def netns_of(pid: int) -> str | None:
    r = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True)
    return r.stdout.strip() or None


def port_open(address: str, netns: str | None) -> bool:
    host, port = address.rsplit(":", 1)
    if netns is None:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except OSError:
            return False
    code = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1.0)"
    cmd = ["ip", "netns", "exec", netns, sys.executable, "-c", code, host, port]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def launch(
    out: Path, workers: int, steps: int, args: argparse.Namespace, log: Path
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "farflung.cli.main", "train", CONFIG, "--workers", str(workers)]
    cmd += ["--out", str(out), "--force", "--netlab", args.links, *overrides(args, steps)]
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
        lines = [ln for ln in lines if "socket.cpp" not in ln]  # gloo's hostname warnings
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher (it stops its workers and removes its lab), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def step_time(out: Path) -> float:
    records = read_jsonl(out / "metrics.jsonl")
    timed = records[2:] or records
    return statistics.median(r["wall_s"] for r in timed)


class Chaos:
    """The fault injector of one run; :meth:`cleanup` undoes whatever it left."""

    def __init__(self, run: Path, args: argparse.Namespace, steps: int, step_s: float):
        self.run, self.args, self.steps, self.step_s = run, args, steps, step_s
        self.rng = random.Random(args.seed)
        self.kinds = args.kinds
        self.faults: list[dict] = []
        self.frozen: dict[int, float] = {}  # pid -> when to SIGCONT it
        self.down: dict[tuple[str, str], float] = {}  # (netns, iface) -> when to bring it up
        self.joiners: list[subprocess.Popen] = []
        self.joiner_dirs: list[Path] = []
        self.logs: list[Path] = []
        self.commits: list[float] = []  # wall-clock time each commit was seen here

    def folders(self) -> list[Path]:
        return [self.run, *self.joiner_dirs]

    def live(self) -> list[int]:
        down = {ns for ns, _ in self.down}
        pids = []
        for pid in workers_of(self.folders()):
            if pid in self.frozen or proc_state(pid) in ("T", "t", "Z", "gone"):
                continue
            if netns_of(pid) in down:
                continue
            pids.append(pid)
        return pids

    def due(self, now: float) -> None:
        """SIGCONT the frozen and bring up the downed links whose time has come."""
        for pid, when in list(self.frozen.items()):
            if now >= when:
                self._cont(pid)
        for (ns, iface), when in list(self.down.items()):
            if now >= when:
                self._up(ns, iface)

    def _cont(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        self.frozen.pop(pid, None)

    def _up(self, ns: str, iface: str) -> None:
        if ns in netns_list():
            subprocess.run(["ip", "-n", ns, "link", "set", iface, "up"], capture_output=True)
        self.down.pop((ns, iface), None)

    def inject(self) -> dict | None:
        live = self.live()
        if len(live) < 2:
            return None
        kinds = list(self.kinds)
        if len(live) >= self.args.workers + EXTRA_WORKERS and len(kinds) > 1:
            kinds = [k for k in kinds if k != "join"] or kinds
        kind = self.rng.choice(kinds)
        pid = self.rng.choice(live)
        ns = netns_of(pid)
        if kind == "flap":  # takes down every worker of that namespace: keep one elsewhere
            if not ns or all(netns_of(p) == ns for p in live):
                return None
        env = environ(pid)
        rec = {"kind": kind, "t": time.time(), "pid": pid, "netns": ns}
        if "FARFLUNG_ELASTIC_ID" in env and "FARFLUNG_ELASTIC_JOIN" not in env:
            rec["id"] = int(env["FARFLUNG_ELASTIC_ID"])
        if kind == "kill":
            os.kill(pid, signal.SIGKILL)
        elif kind == "freeze":
            hold = self.rng.uniform(3, 10)
            os.kill(pid, signal.SIGSTOP)
            self.frozen[pid] = time.time() + hold
            rec["hold_s"] = round(hold, 2)
        elif kind == "flap":
            iface = env.get("GLOO_SOCKET_IFNAME")
            if not iface:
                return None
            hold = self.rng.uniform(2, 8)
            rec["t"] = time.time()
            subprocess.run(["ip", "-n", ns, "link", "set", iface, "down"], check=True)
            self.down[(ns, iface)] = time.time() + hold
            rec.update(iface=iface, hold_s=round(hold, 2))
        elif kind == "join":
            rec["pid"] = self._join(ns, env)
        self.faults.append(rec)
        held = f" for {rec['hold_s']:.1f} s" if "hold_s" in rec else ""
        say(f"{kind} -> pid {rec['pid']} ({ns}){held}")
        return rec

    def _join(self, ns: str, env: dict[str, str]) -> int:
        """One more worker (``farflung train --join``) in namespace ``ns``, with the
        lab settings ``env`` of the worker living there; its pid."""
        address = json.loads((self.run / "coordinator.json").read_text())["address"]
        folder = self.run.parent / f"{self.run.name}-join{len(self.joiner_dirs) + 1}"
        log = self.run.parent / f"{folder.name}.log"
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "farflung.cli.main"]
        cmd += ["train", CONFIG, "--out", str(folder), "--quiet", "--join", address]
        cmd += ["--key-file", str(self.run / "run.key")]  # the launcher made it
        cmd += overrides(self.args, self.steps)
        self.joiner_dirs.append(folder)
        self.logs.append(log)
        # the lab's settings of that host (the gloo interface, the delay matrix): a
        # joiner without them would offer its peers a loopback address
        lab_env = {k: v for k, v in env.items() if k in LAB_ENV}
        with open(log, "w") as f:
            self.joiners.append(
                subprocess.Popen(
                    cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **lab_env}
                )
            )
        return self.joiners[-1].pid

    def drive(self, launcher: subprocess.Popen, limit_s: float) -> tuple[bool, float]:
        """Inject faults until the run is near its end; wait for it to finish.
        Returns (finished in time, the longest gap between commits seen after the first)."""
        metrics = self.run / "metrics.jsonl"
        start = time.monotonic()
        seen, last_commit, longest = 0, None, 0.0
        next_fault, chaos_until = None, start + self.args.duration
        while launcher.poll() is None:
            now = time.monotonic()
            if now - start > limit_s:
                return False, longest
            self.due(time.time())
            n = len(read_jsonl(metrics))
            if n > seen:
                self.commits += [time.time()] * (n - seen)
                if last_commit is not None:
                    longest = max(longest, now - last_commit)
                seen, last_commit = n, now
                if next_fault is None:  # the first commit: chaos starts
                    next_fault = now + self.rng.uniform(*self.args.every)
            elif last_commit is not None:
                longest = max(longest, now - last_commit)
            if next_fault is not None and now >= next_fault:
                remaining = (self.steps - seen) * self.step_s
                if remaining > QUIET_TAIL_S and now < chaos_until:
                    self.inject()
                next_fault = now + self.rng.uniform(*self.args.every)
            for p in self.joiners:
                p.poll()
            time.sleep(0.1)
        # the last commit to the end: not a stall between commits
        return True, longest

    def cleanup(self) -> None:
        for pid in list(self.frozen):
            self._cont(pid)
        for ns, iface in list(self.down):
            self._up(ns, iface)
        for p in self.joiners:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.joiners:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def kill_leftovers(folders: list[Path]) -> None:
    pids = pids_of(folders)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def leaks(folders: list[Path], before: set[str], address: str | None, lab: set[str]) -> dict:
    time.sleep(2.0)  # processes in their last moments
    procs = pids_of(folders)
    new_ns = sorted(netns_list() - before)
    bridge = next((ns for ns in sorted(lab) if ns.endswith("br") and ns in new_ns), None)
    port = bool(address) and port_open(address, bridge)
    return {
        "processes": [" ".join(cmdline(p))[:200] for p in procs],
        "namespaces": new_ns,
        "coordinator_port_open": port,
        "count": len(procs) + len(new_ns) + int(port),
    }


def detected_by(kind: str, why: str | None) -> bool:
    """Whether a ``left`` event of this ``why`` detected a fault of this kind: a kill by
    any; a freeze or flap only by silence (a crash there is the worker exiting once it
    woke or its link came back, i.e. the fault outlasted the detection)."""
    return why is not None and (kind == "kill" or why == "silent")


def classify(row: dict) -> dict:
    """Set ``detection_s`` (and ``ended_as`` when the worker left otherwise) from the row's
    matched event: its ``why`` and ``left_after_s``."""
    row["detection_s"] = None
    if detected_by(row["kind"], row.get("why")):
        row["detection_s"] = row["left_after_s"]
    elif row.get("why") is not None:
        row["ended_as"] = row["why"]
    return row


def match(
    faults: list[dict], events: list[dict], heartbeat: float, commits: list[float]
) -> list[dict]:
    """Each kill/freeze/flap with the ``left`` event that saw it (or none), classified,
    and the time from that event to the next commit in ``commits`` (wall-clock)."""
    left = sorted((e for e in events if e["event"] == "left"), key=lambda e: e["at"])
    used: set[int] = set()
    out = []
    for f in sorted(faults, key=lambda f: f["t"]):
        if f["kind"] == "join":
            continue
        window = [
            i
            for i, e in enumerate(left)
            if i not in used and f["t"] <= e["at"] <= f["t"] + heartbeat + MATCH_SLACK_S
        ]
        want_why = "crash" if f["kind"] == "kill" else "silent"

        def rank(i: int, f: dict = f, want_why: str = want_why) -> tuple[int, int, float]:
            e = left[i]
            return (
                0 if "id" not in f or e["id"] == f["id"] else 1,
                0 if e["why"] == want_why else 1,
                e["at"],
            )

        row = {"kind": f["kind"], "t": round(f["t"], 3), "pid": f["pid"], "hold_s": f.get("hold_s")}
        if window:
            i = min(window, key=rank)
            used.add(i)
            e = left[i]
            later = [c for c in commits if c >= e["at"]]
            row.update(
                left_after_s=round(e["at"] - f["t"], 3),
                id=e["id"],
                why=e["why"],
                recovery_s=round(later[0] - e["at"], 3) if later else None,
                coordinator_recovery_s=e.get("recovery_s"),
                steps_redone=e.get("steps_redone"),
            )
        out.append(classify(row))
    return out


def summarize(rows: list[dict], kinds: list[str]) -> dict:
    """The per-fault rows' summary: what went undetected, detection and recovery times."""
    seen = [r["detection_s"] for r in rows if r["detection_s"] is not None]
    recovered = [r["recovery_s"] for r in rows if r.get("recovery_s") is not None]
    p50, p95 = percentile(seen, 0.5), percentile(seen, 0.95)
    faulty = [k for k in kinds if k != "join"]
    return {
        "undetected": {
            k: sum(r["kind"] == k and r["detection_s"] is None for r in rows) for k in faulty
        },
        "ended_as_crash": {
            k: sum(r["kind"] == k and r.get("ended_as") == "crash" for r in rows) for k in faulty
        },
        "detection_p50_s": None if p50 is None else round(p50, 3),
        "detection_p95_s": None if p95 is None else round(p95, 3),
        "detection_max_s": round(max(seen), 3) if seen else None,
        "recovery_p50_s": None if not recovered else round(percentile(recovered, 0.5), 3),
        "recovery_max_s": round(max(recovered), 3) if recovered else None,
    }


def commits_between(commits: list[float], faults: list[dict]) -> int | None:
    """Commits seen after the first fault and before the last one."""
    if not faults:
        return None
    first, last = min(f["t"] for f in faults), max(f["t"] for f in faults)
    return sum(first < c < last for c in commits)


def resummarize(path: Path) -> dict:
    """A stored result (``results`` rows, or the ``detections`` of results written before
    the rows were classified) with its rows classified and its summary recomputed. What
    such a file cannot give (recovery per fault: its run did not record commit times) is
    left None; the coordinator's figure moves to ``coordinator_recovery_s``."""
    data = json.loads(path.read_text())
    rows = data.pop("detections", None) or data["results"]
    for r in rows:
        if "left_after_s" not in r:  # an old row: detection_s was the matched event's time
            r["left_after_s"] = r.get("detection_s")
            if "coordinator_recovery_s" not in r:
                r["coordinator_recovery_s"] = r.pop("recovery_s", None)
                r["recovery_s"] = None
        classify(r)
    data["results"] = rows
    data.update(summarize(rows, data["kinds"]))
    data["resummarized"] = (
        "rows classified and summary recomputed from the stored rows by chaos.py "
        "--resummarize; recovery_s is None where the run recorded no commit times"
    )
    data["met"]["detection_p95_s"] = (
        data["detection_p95_s"] is not None
        and data["detection_p95_s"] <= data["targets"]["detection_p95_s"]
    )
    return data


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def sample_violations(run: Path) -> list[str]:
    from farflung.config import load_config
    from farflung.data import SampleSet, ShardIndex, TokenStream
    from farflung.train.elastic_run import check_samples

    cfg = load_config(run / "config.toml")
    stream = TokenStream(ShardIndex.load(ROOT / cfg.data.dir), "train")
    n = len(SampleSet(stream, cfg.model.context))
    if cfg.data.max_samples:
        n = min(n, cfg.data.max_samples)
    return check_samples(run / "samples.jsonl", cfg, n)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of chaos")
    p.add_argument("--every", type=float, nargs=2, default=[5.0, 20.0], metavar=("MIN", "MAX"))
    p.add_argument("--kinds", default="kill,freeze,flap,join")
    p.add_argument("--links", default="20mbit,5ms")
    p.add_argument("--algorithm", default="allreduce")
    p.add_argument("--heartbeat", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="folder for the runs (default: a temporary one)")
    p.add_argument("--steps", type=int, help="fixed step count (default: calibrate)")
    p.add_argument(
        "--resummarize",
        type=Path,
        metavar="JSON",
        help="print a stored result with its rows classified and its summary recomputed",
    )
    args = p.parse_args()
    if args.resummarize:
        return args
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = set(args.kinds) - {"kill", "freeze", "flap", "join"}
    if bad or not args.kinds:
        p.error(f"unknown fault kinds: {sorted(bad)}")
    return args


def finish(proc: subprocess.Popen, out: Path, log: Path, limit_s: float) -> None:
    """Wait for a run that must end well; exit 1 with its log when it does not."""
    try:
        code = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        say(f"{out.name}: no end after {limit_s:.0f} s; stopping it. Its log:\n{tail(log)}")
        raise SystemExit(1) from None
    if code != 0:
        say(f"{out.name}: exit {code}. Its log:\n{tail(log)}")
        raise SystemExit(1)


class Bench:
    """One benchmark's runs under ``root`` (calibration, reference, chaos), in order;
    :meth:`cleanup` stops whatever of them is left and removes a lab left behind."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args, self.root = args, root
        self.before = netns_list()
        self.calib, self.ref, self.run = root / "calibrate", root / "reference", root / "chaos"
        self.procs: list[subprocess.Popen] = []
        self.chaos: Chaos | None = None

    def start(self, out: Path, steps: int, log: Path) -> subprocess.Popen:
        self.procs.append(launch(out, self.args.workers, steps, self.args, log))
        return self.procs[-1]

    def calibrate(self) -> int:
        """The step count that makes the reference run last about ``--duration``."""
        args = self.args
        say(f"calibrating: {CALIBRATION_STEPS} steps, {args.workers} workers, {args.links}")
        t0 = time.monotonic()
        log = self.root / "calibrate.log"
        finish(self.start(self.calib, CALIBRATION_STEPS, log), self.calib, log, 600)
        wall = time.monotonic() - t0
        records = read_jsonl(self.calib / "metrics.jsonl")
        step_s = step_time(self.calib)
        startup = max(0.0, wall - sum(r["wall_s"] for r in records))
        steps = max(CALIBRATION_STEPS, round((args.duration - startup) / step_s))
        say(f"{step_s:.2f} s/step, {startup:.1f} s start-up: {steps} steps")
        return steps

    def reference(self, steps: int) -> dict:
        """The undisturbed run: its wall time, step time, summary and leaks."""
        say(f"reference run: {steps} steps")
        t0 = time.monotonic()
        log = self.root / "reference.log"
        finish(self.start(self.ref, steps, log), self.ref, log, 3 * self.args.duration + 600)
        wall = time.monotonic() - t0
        summary = json.loads((self.ref / "summary.json").read_text())
        step_s = step_time(self.ref)
        say(
            f"reference: {wall:.0f} s, {step_s:.2f} s/step, "
            f"val loss {summary['final_val_loss']:.4f}"
        )
        address = json.loads((self.ref / "coordinator.json").read_text())["address"]
        leaked = leaks([self.ref], self.before, address, set())
        return {"wall_s": wall, "step_s": step_s, "summary": summary, "leaks": leaked}

    def chaos_run(self, steps: int, ref: dict) -> tuple[float, float, dict]:
        """The run under faults: its duration, the longest gap between commits seen
        here, and the leaks of both runs. Prints a failure record and exits 1 when it
        does not end well."""
        args, run = self.args, self.run
        say(f"chaos run: {steps} steps, a fault every {args.every[0]:g}-{args.every[1]:g} s")
        log = self.root / "chaos.log"
        t0 = time.monotonic()
        launcher = self.start(run, steps, log)
        chaos = self.chaos = Chaos(run, args, steps, ref["step_s"])
        while not (run / "coordinator.json").is_file() and launcher.poll() is None:
            time.sleep(0.1)
        lab = netns_list() - self.before
        ok, observed_stall = chaos.drive(launcher, limit_s=3 * ref["wall_s"] + 300)
        duration = time.monotonic() - t0
        chaos.cleanup()
        if not ok or launcher.returncode != 0:
            self.fail(
                f"the chaos run did not end in {duration:.0f} s"
                if not ok
                else f"the chaos run exited {launcher.returncode}",
                steps,
            )
        coord = json.loads((run / "coordinator.json").read_text())
        chaos_leaks = leaks(chaos.folders(), self.before, coord["address"], lab)
        found = {"count": ref["leaks"]["count"] + chaos_leaks["count"]}
        found.update(reference=ref["leaks"], chaos=chaos_leaks)
        if found["count"]:
            say(f"leaks: {json.dumps(found)}")
        return duration, observed_stall, found

    def fail(self, why: str, steps: int) -> None:
        """The chaos run did not end well: what it did, as JSON; exit 1."""
        log = self.root / "chaos.log"
        say(f"{why}. Its log:\n{tail(log)}")
        failure = {
            "benchmark": "chaos",
            "ok": False,
            "error": why,
            "seed": self.args.seed,
            "workers": self.args.workers,
            "steps": steps,
            "committed": len(read_jsonl(self.run / "metrics.jsonl")),
            "faults": self.chaos.faults if self.chaos else [],
            "events": read_jsonl(self.run / "events.jsonl"),
            "log_tail": tail(log, 40),
            "out": str(self.root),
        }
        print(json.dumps(failure))
        raise SystemExit(1)

    def cleanup(self) -> None:
        if self.chaos is not None:
            self.chaos.cleanup()
        for proc in self.procs:
            stop(proc)
        folders = [self.calib, self.ref, self.run, *(self.chaos.joiner_dirs if self.chaos else [])]
        kill_leftovers(folders)
        if netns_list() - self.before:  # a lab whose launcher died: farflung removes it
            subprocess.run(
                [sys.executable, "-m", "farflung.cli.main", "netlab", "down"],
                cwd=ROOT,
                capture_output=True,
            )


def result_of(
    bench: Bench, steps: int, ref: dict, duration: float, observed_stall: float, found: dict
) -> dict:
    """The chaos run's figures, as chaos.json holds them."""
    args, run, chaos, step_s = bench.args, bench.run, bench.chaos, ref["step_s"]
    assert chaos is not None
    summary = json.loads((run / "summary.json").read_text())
    events = read_jsonl(run / "events.jsonl")
    rows = match(chaos.faults, events, args.heartbeat, chaos.commits)
    timing = summarize(rows, args.kinds)
    redone: dict[object, int] = {}
    for e in events:
        if e["event"] == "left" and e.get("member", True):
            key = e.get("gen")
            redone[key] = max(redone.get(key, 0), e.get("steps_redone") or 0)
    violations = sample_violations(run)
    stall = summary["elastic"]["longest_stall_s"]
    targets = {"detection_p95_s": 3.0, "longest_stall_s": round(2 * args.heartbeat + step_s, 3)}
    p95 = timing["detection_p95_s"]
    final, reference = summary["final_val_loss"], ref["summary"]["final_val_loss"]
    return {
        "benchmark": "chaos",
        "ok": True,
        "config": CONFIG,
        "workers": args.workers,
        "links": args.links,
        "algorithm": args.algorithm,
        "seed": args.seed,
        "every_s": args.every,
        "kinds": args.kinds,
        "steps": summary["steps"],
        "step_s": round(step_s, 3),
        "duration_s": round(duration, 1),
        "reference_duration_s": round(ref["wall_s"], 1),
        "heartbeat_s": args.heartbeat,
        "faults": {k: sum(f["kind"] == k for f in chaos.faults) for k in args.kinds},
        **timing,
        "results": rows,
        "commits_between_faults": commits_between(chaos.commits, chaos.faults),
        "membership": {k: summary["elastic"][k] for k in ("left", "joined")},
        "longest_stall_s": stall,
        "observed_stall_s": round(observed_stall, 3),
        "steps_lost": sum(redone.values()),
        "hash_disagreements": summary["elastic"]["hash_disagreements"],
        "sample_violations": len(violations),
        "sample_problems": violations[:5],
        "leaks": found["count"],
        "leak_details": found,
        "final_val_loss": final,
        "reference_val_loss": reference,
        "loss_ratio": round(final / reference, 5) if final and reference else None,
        "targets": targets,
        "met": {
            "detection_p95_s": p95 is not None and p95 <= targets["detection_p95_s"],
            "longest_stall_s": stall <= targets["longest_stall_s"],
            "observed_stall_s": observed_stall <= targets["longest_stall_s"],
        },
        "out": str(bench.root),
    }


def tell(result: dict, n_faults: int, duration: float) -> None:
    """The result in a few lines on stderr."""
    met, targets = result["met"], result["targets"]
    stall, observed = result["longest_stall_s"], result["observed_stall_s"]
    say(
        f"{n_faults} faults {result['faults']} in {duration:.0f} s, "
        f"{result['steps']} steps; undetected {result['undetected']} "
        f"(ended as crashes {result['ended_as_crash']}), "
        f"{result['commits_between_faults']} commits between the first fault and the last"
    )
    say(
        f"detection p50 {result['detection_p50_s']} s, p95 {result['detection_p95_s']} s "
        f"(target <= 3.0: {'met' if met['detection_p95_s'] else 'MISSED'})"
    )
    say(
        f"longest stall {stall} s (coordinator, incl. start-up), "
        f"{observed:.1f} s between commits seen here "
        f"(target <= {targets['longest_stall_s']}: "
        f"{'met' if met['longest_stall_s'] else 'MISSED'} / "
        f"{'met' if met['observed_stall_s'] else 'MISSED'})"
    )
    say(
        f"steps lost {result['steps_lost']}, "
        f"hash disagreements {result['hash_disagreements']}, "
        f"sample violations {result['sample_violations']}, leaks {result['leaks']}"
    )
    say(
        f"val loss {result['final_val_loss']:.4f} vs reference "
        f"{result['reference_val_loss']:.4f} (ratio {result['loss_ratio']})"
    )


def main() -> None:
    args = parse_args()
    if args.resummarize:
        print(json.dumps(resummarize(args.resummarize)))
        return
    sys.path.insert(0, str(ROOT))
    root = (args.out or Path(tempfile.mkdtemp(prefix="farflung-chaos-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, root)

    def on_term(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        steps = args.steps if args.steps is not None else bench.calibrate()
        ref = bench.reference(steps)
        duration, observed_stall, found = bench.chaos_run(steps, ref)
        result = result_of(bench, steps, ref, duration, observed_stall, found)
        tell(result, len(bench.chaos.faults) if bench.chaos else 0, duration)
        print(json.dumps(result))
    finally:
        bench.cleanup()


if __name__ == "__main__":
    main()
