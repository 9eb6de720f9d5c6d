"""The launcher's side of an elastic run: the coordinator, the run's files, and the
local worker processes (restarted as joiners when they crash).

Files in the run folder, written here from the coordinator's decisions:

- ``metrics.jsonl``: one record per committed step (every member's row aggregated);
- ``samples.jsonl``: per committed step, the members in order and the sample ids each
  trained (:func:`check_samples` proves them exact);
- ``events.jsonl``: one record per membership change: who left or joined, why, the
  step committed before it, how long the worker had been silent, how long recovery
  took (until the next commit), the state transferred to a joiner; a rollback when the
  members' state hashes had no majority (``diverged``); each connection refused
  (``refused``: its address and why: no run key, a bad hello, too many);
- ``run.key``: the run key (mode 0600) when none was given (``--key-file``,
  ``FARFLUNG_KEY_FILE``, ``FARFLUNG_RUN_KEY``): the local workers get its path;
- ``summary.json``: as for any run, counted from the committed steps."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from farflung.comm import free_port
from farflung.comm.binding import BIND_ENV, PORT_RANGE_ENV, parse_port_range
from farflung.comm.channel import KEY_ENV, KEY_FILE_ENV, load_key, write_key_file
from farflung.config import Config, ConfigError, config_to_toml
from farflung.data import batch_ids
from farflung.data.shards import write_json
from farflung.membership.coordinator import Coordinator
from farflung.train import checkpoint as ckpt
from farflung.train import runfolder
from farflung.train.contract import (
    COORDINATOR_ENV,
    EXIT_PEER_LOST,
    ID_ENV,
    JOIN_ENV,
    REPORT_ENV,
)
from farflung.train.forkserver import Worker, WorkerStarter
from farflung.train.launch import (
    GRACE_S,
    Placement,
    base_env,
    bind_env,
    preload_for,
    stop_processes,
    worker_env,
)
from farflung.train.metrics import aggregate, read_jsonl, truncate_jsonl
from farflung.train.progress import Progress


class RunLog:
    """Writes the run's files from the coordinator's decisions (its Handler)."""

    def __init__(self, cfg: Config, out: Path, quiet: bool = False, resume: bool = False) -> None:
        self.cfg, self.out, self.quiet = cfg, Path(out), quiet
        runfolder.mark_run(self.out)
        # resuming: the files are cut back only once the workers say where they resume
        # (the coordinator may hold no checkpoint of its own: its host runs no worker)
        self.resuming, self.started = resume, False
        (self.out / "config.toml").write_text(config_to_toml(cfg))
        self.totals = {"steps": 0, "tokens": 0, "train_s": 0.0, "sent": 0, "recv": 0}
        self.member_steps = 0  # sum over committed steps of the members that made them
        self.by_kind: dict[str, int] = {}
        self.hash_disagreements = 0
        self.last_step_time: float | None = None
        self.network = "unshaped"
        self.longest_stall_s = 0.0
        self.summary: dict[str, Any] | None = None
        self.bar: Progress | None = None

    def _append(self, name: str, record: dict[str, Any] | str) -> None:
        line = record if isinstance(record, str) else json.dumps(record)
        path = self.out / name
        try:
            with open(path, "a") as f:
                f.write(line + "\n")
        except OSError as e:  # the coordinator stops the run with this message
            raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e

    def on_start(self, step: int) -> None:
        """Generation 0 formed; its workers resume from ``step`` (0: a fresh start). A
        resumed run's files lose what was committed after ``step``, and only that."""
        if self.started:
            return
        self.started = True
        if self.resuming:
            self.resume_from(step)

    def on_commit(self, step: int, gen: int, members: list[int], votes: dict[int, dict]) -> None:
        self.on_start(step - 1)  # the first commit follows generation 0's step
        now = time.monotonic()
        if self.last_step_time is not None:  # start-up is not a stall
            self.longest_stall_s = max(self.longest_stall_s, now - self.last_step_time)
        self.last_step_time = now
        rec = aggregate([votes[i]["row"] for i in members])
        rec.tokens = step * self.cfg.train.batch_size * self.cfg.model.context
        self._append("metrics.jsonl", rec.to_json())
        self._append(
            "samples.jsonl",
            {
                "step": step,
                "gen": gen,
                "members": members,
                "samples": [votes[i]["samples"] for i in members],
            },
        )
        # the coordinator evicts members whose state hash is not the majority's
        # (events: "diverged"), or rolls the step back without a majority
        if len({votes[i]["hash"] for i in members if "hash" in votes[i]}) > 1:
            self.hash_disagreements += 1
        val = [votes[i]["val_loss"] for i in members if "val_loss" in votes[i]]
        if val:
            self._append("eval.jsonl", {"step": step, "val_loss": val[0], "tokens": rec.tokens})
        t = self.totals
        t["steps"], t["tokens"] = step, rec.tokens
        self.member_steps += len(members)
        t["train_s"] += rec.wall_s
        t["sent"] += rec.bytes_sent
        t["recv"] += rec.bytes_recv
        for k, n in rec.bytes_by_kind.items():
            self.by_kind[k] = self.by_kind.get(k, 0) + n
        if self.bar is None:
            self.bar = Progress(self.cfg.train.steps, step - 1, enabled=not self.quiet)
        self.bar.update(rec, step)

    def rewind(self) -> int:
        """Back to the newest intact checkpoint (0 when none): the files lose what was
        committed after it."""
        valid, _ = ckpt.verified(self.out / "checkpoints", rank=0)
        step = max(valid, default=0)
        self.started = True
        self.resume_from(step)
        return step

    def resume_from(self, step: int) -> None:
        """Files and totals as they were when ``step`` was committed."""
        for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
            truncate_jsonl(self.out / name, step)
        records = read_jsonl(self.out / "metrics.jsonl")
        t = self.totals
        t.update(steps=step, tokens=step * self.cfg.train.batch_size * self.cfg.model.context)
        t["train_s"] = sum(r["wall_s"] for r in records)
        t["sent"] = sum(r["bytes_sent"] for r in records)
        t["recv"] = sum(r["bytes_recv"] for r in records)
        self.by_kind = {}
        for r in records:
            for k, n in r["bytes_by_kind"].items():
                self.by_kind[k] = self.by_kind.get(k, 0) + n
        self.member_steps = sum(len(r["members"]) for r in read_jsonl(self.out / "samples.jsonl"))

    def on_event(self, record: dict[str, Any]) -> None:
        self._append("events.jsonl", record)
        if not self.quiet and record["event"] in ("refused", "diverged"):
            what = record.get("address") or "the members' states"
            why = record.get("reason") or record.get("detail")
            print(f"farflung: {record['event']}: {what}: {why}", file=sys.stderr)
        elif not self.quiet and record["event"] == "rewound":
            print(
                f"farflung: every worker was lost; resumed from step {record['to_step']}",
                file=sys.stderr,
            )
        elif not self.quiet:
            what = "left" if record["event"] == "left" else "joined"
            why = f" ({record['why']}: {record['detail']})" if what == "left" else ""
            print(
                f"farflung: worker {record['id']} {what}{why} after step {record['committed']}; "
                f"members now {record.get('members')}, recovered in {record.get('recovery_s')} s",
                file=sys.stderr,
            )

    def on_finish(self, done: dict[int, dict]) -> None:
        if self.bar is not None:
            self.bar.close()
        t, cfg = self.totals, self.cfg
        first = done[min(done)].get("summary", {})
        events = read_jsonl(self.out / "events.jsonl")
        self.summary = {
            "steps": t["steps"],
            "steps_this_run": t["steps"],
            "tokens": t["tokens"],
            "final_val_loss": first.get("final_val_loss"),
            "tokens_per_s": t["tokens"] / t["train_s"] if t["train_s"] else 0.0,
            "wall_s": first.get("wall_s", 0.0),
            "train_s": t["train_s"],
            "bytes_sent_total": t["sent"],
            "bytes_recv_total": t["recv"],
            "bytes_sent_by_kind_total": self.by_kind,
            "bytes_sent_per_step_per_rank": t["sent"] / max(1, self.member_steps),
            "algorithm": cfg.parallel.algorithm,
            "world_size": len(done),
            "params": first.get("params"),
            "backend": "gloo",
            "network": self.network,
            "precision": first.get("precision"),
            "peak_bytes_per_rank": [_peak(done[i].get("summary", {})) for i in sorted(done)],
            "elastic": {
                "membership_changes": sum(e["event"] in ("left", "joined") for e in events),
                "refused": sum(e["event"] == "refused" for e in events),
                "rollbacks": sum(e["event"] == "diverged" for e in events),
                "left": sum(e["event"] == "left" for e in events),
                "joined": sum(e["event"] == "joined" for e in events),
                "hash_disagreements": self.hash_disagreements,
                "longest_stall_s": round(self.longest_stall_s, 3),
            },
        }
        path = self.out / "summary.json"
        try:
            path.write_text(json.dumps(self.summary, indent=1) + "\n")
        except OSError as e:  # the coordinator stops the run with this message
            raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e


def check_samples(path: Path, cfg: Config, n_train: int) -> list[str]:
    """Problems with a run's sample log: a step missing or committed twice, a step
    whose members' samples are not exactly its global batch. Empty: exact."""
    problems, seen = [], set()
    for rec in read_jsonl(path):
        step = rec["step"]
        if step in seen:
            problems.append(f"step {step} committed twice")
        seen.add(step)
        got = np.sort(np.concatenate([np.asarray(s, dtype=np.int64) for s in rec["samples"]]))
        want = np.sort(batch_ids(step - 1, cfg.train.batch_size, n_train, cfg.train.seed))
        if not np.array_equal(got, want):
            problems.append(f"step {step}: the members trained other samples than its batch")
    missing = set(range(1, max(seen, default=0) + 1)) - seen
    problems += [f"step {s} never committed" for s in sorted(missing)]
    return problems


def _netns(name: str):
    if not name:
        return contextlib.nullcontext()
    from farflung.netlab import in_netns

    return in_netns(name)


def run_key(out: Path, key_file: str | None = None) -> tuple[str, dict[str, str]]:
    """The run key, and the environment that hands it to workers: ``--key-file``,
    else ``FARFLUNG_KEY_FILE`` / ``FARFLUNG_RUN_KEY`` (the workers inherit them), else
    ``out/run.key``, made (mode 0600) when it is not there yet (a resumed run keeps
    its own). A ConfigError names the file or variable that is wrong."""
    try:
        key = load_key(key_file)
        if key is not None:
            env = {KEY_FILE_ENV: str(Path(key_file).resolve())} if key_file else {}
            return key, env
        path = out / "run.key"
        key = load_key(path) if path.exists() else write_key_file(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return key, {KEY_FILE_ENV: str(path.resolve())}


def config_args(config: str, sets: list[str]) -> str:
    """``CONFIG --set K=V ...`` as a shell line: what a joining worker must train on."""
    sets = [x for x in sets if x != "elastic.enabled=true"]  # the hint says it anyway
    return " ".join(shlex.quote(a) for a in [config, *(a for x in sets for a in ("--set", x))])


def join_hint(address: str, key_env: dict[str, str], config: str = "CONFIG") -> str:
    """The command a worker elsewhere runs to join (the key passed as it is here);
    ``config``: :func:`config_args`."""
    if KEY_FILE_ENV in key_env:
        how = f"{KEY_FILE_ENV}={key_env[KEY_FILE_ENV]} "
    elif os.environ.get(KEY_FILE_ENV):
        how = f"{KEY_FILE_ENV}={os.environ[KEY_FILE_ENV]} "
    else:
        how = f"{KEY_ENV}=<the same key> "
    return f"{how}farflung train {config} --set elastic.enabled=true --join {address}"


def start_coordinator(
    cfg: Config,
    out: Path,
    workers: int,
    advertise: str,
    *,
    key: str,
    key_env: dict[str, str] | None = None,
    config: str = "CONFIG",
    bind: str = "0.0.0.0",
    port: int = 0,
    port_range: str | None = None,
    netns: str = "",
    replay: list[dict[str, Any]] | None = None,
    resume: bool = False,
    quiet: bool = False,
    network: str = "unshaped",
) -> tuple[Coordinator, str]:
    """The run's coordinator, serving from this process, writing the run's files in
    ``out``; returns it and the address workers join (``advertise:port``, also in
    ``out/coordinator.json``). It and its rendezvous store listen on ``bind``, at
    ``port`` (0: the first free one of ``port_range``, LOW-HIGH, or any)."""
    try:
        ports = parse_port_range(port_range)
    except ValueError as e:
        raise ConfigError(f"--port-range: {e}") from None
    log = RunLog(cfg, out, quiet, resume=resume)
    log.network = network
    say = (
        (lambda m: None)
        if quiet
        else (lambda m: print(f"farflung: coordinator: {m}", file=sys.stderr))
    )
    with _netns(netns):  # its sockets live where the workers reach them
        coord = Coordinator(
            workers,
            cfg.elastic.heartbeat_s,
            log,
            key=key,
            min_workers=cfg.elastic.min_workers,
            host=bind,
            port=port,
            port_range=ports,
            replay=replay,
            log=say,
            patience_s=cfg.parallel.timeout_s,
        )
    coord.start()
    address = f"{advertise}:{coord.port}"
    # atomically: joiners and tests poll for it and read it as soon as it exists
    write_json(out / "coordinator.json", {"address": address, "pid": os.getpid()})
    if not quiet:
        print(
            f"farflung: elastic run on {bind} (port {coord.port}, store {coord.store_port}); "
            f"workers join with:\n  {join_hint(address, key_env or {}, config)}",
            file=sys.stderr,
        )
    return coord, address


def launch_elastic(
    worker_args: list[str],
    workers: int,
    cfg: Config,
    out: Path,
    placement: Placement,
    quiet: bool = False,
    replay: list[dict[str, int]] | None = None,
    resume: bool = False,
    key_file: str | None = None,
    bind: str | None = None,
    port_range: str | None = None,
) -> int:
    """Run ``workers`` local workers under a coordinator in this process; a crashed
    worker is restarted as a joiner when ``elastic.respawn`` (at most ``workers``
    times each). Returns 0 once every step is committed and the members finished.
    The coordinator binds ``bind`` (default: 127.0.0.1, or the lab's coordinator
    address); the run key is :func:`run_key`'s."""
    host = placement.coordinator_addr or "127.0.0.1"
    key, key_env = run_key(out, key_file)
    coord, address = start_coordinator(
        cfg,
        out,
        workers,
        host if bind in (None, "", "0.0.0.0", "::") else bind,
        key=key,
        key_env=key_env,
        config=config_args(
            worker_args[0], [worker_args[i + 1] for i, a in enumerate(worker_args) if a == "--set"]
        ),
        bind=bind or host,
        port_range=port_range,
        replay=replay,
        resume=resume,
        quiet=quiet,
        netns=placement.coordinator_netns,
        network=placement.description,
    )
    # `kill -USR1 <launcher>`: where the membership stands
    signal.signal(
        signal.SIGUSR1, lambda *_: print(f"farflung: {coord.describe()}", file=sys.stderr)
    )
    local = _LocalWorkers(
        worker_args, workers, cfg, placement, address, replay, quiet, key_env, bind, port_range
    )
    try:
        for r in range(workers):
            local.start(r, r, join=False)
        while not coord.finished.is_set():
            code = local.check()
            if code is not None:
                return code
            time.sleep(0.1)
        local.wait(GRACE_S)
        if coord.error is not None:
            print(f"farflung: the coordinator stopped the run: {coord.error}", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        print("farflung: interrupted; stopping workers", file=sys.stderr, flush=True)
        return 130
    finally:
        local.stop()
        coord.close()
        shutil.rmtree(local.reports, ignore_errors=True)


def _is_stopped(p: Worker) -> bool:
    """Whether the child ``p`` is stopped (job control), from its parent; one that
    exited meanwhile is reaped here and its code kept where ``poll`` finds it."""
    try:
        pid, status = os.waitpid(p.pid, os.WNOHANG | os.WUNTRACED)
    except ChildProcessError:  # reaped already
        return False
    if pid == 0:
        return False
    if os.WIFSTOPPED(status):
        return True
    p.returncode = os.waitstatus_to_exitcode(status)
    return False


class _LocalWorkers:
    """An elastic run's local worker processes: started, watched, and restarted as
    joiners (a crashed one, or one a replayed log had leave) in the slot (the
    placement's namespace) of the one they replace."""

    def __init__(
        self,
        worker_args: list[str],
        workers: int,
        cfg: Config,
        placement: Placement,
        address: str,
        replay: list[dict[str, int]] | None,
        quiet: bool,
        key_env: dict[str, str],
        bind: str | None,
        port_range: str | None,
    ) -> None:
        self.worker_args, self.workers, self.cfg = worker_args, workers, cfg
        self.placement, self.address, self.quiet = placement, address, quiet
        self.key_env = key_env  # how they find the run key
        # where their own listeners bind, as the coordinator's were told
        self.listen_env = {
            **({BIND_ENV: bind} if bind else {}),
            **({PORT_RANGE_ENV: port_range} if port_range else {}),
        }
        self.reports = Path(tempfile.mkdtemp(prefix="farflung-reports-"))
        # kept for the whole run: a joiner in a crashed worker's place starts at once
        self.starter = WorkerStarter(
            "farflung.train",
            worker_args,
            {**base_env(), **key_env},
            preload_for("farflung.train"),
        )
        self.procs: dict[int, Worker] = {}
        self.slots: dict[int, int] = {}  # process key -> placement slot (its namespace)
        self.next_key = self.workers
        self.respawns = 0
        self.joins_due = sum(r["event"] == "joined" for r in replay or [])

    def start(self, key: int, slot: int, join: bool) -> None:
        place = self.placement
        extra = {
            **bind_env(place, slot),  # its state server: on loopback in a local run
            **self.listen_env,
            **place.envs[slot],
            **self.key_env,
            COORDINATOR_ENV: self.address,
            "FARFLUNG_NETWORK": place.description,
        }
        extra[REPORT_ENV] = str(self.reports)
        extra.update({JOIN_ENV: "1"} if join else {ID_ENV: str(slot)})
        env = worker_env(slot, self.workers, free_port(), place.master_addr, extra)
        self.procs[key] = self.starter.start(env, place.prefixes[slot])
        self.slots[key] = slot

    def _join(self, slot: int) -> None:
        self.start(self.next_key, slot, join=True)
        self.next_key += 1

    def check(self) -> int | None:
        """One look at the processes, restarting those that may be; the exit code to
        stop the run with (a worker's bad input or bug, or no worker left), or None."""
        for key, p in list(self.procs.items()):
            code = p.poll()
            if code is None:
                continue
            del self.procs[key]
            if code == 0:  # it left (a replayed log): its replacement joins when due
                if self.joins_due > 0:
                    self.joins_due -= 1
                    self._join(self.slots[key])
                continue
            if code > 0 and code != EXIT_PEER_LOST:  # bad input or a bug: no retry helps
                print(
                    f"farflung: worker process {key} failed (exit {code}); stopping",
                    file=sys.stderr,
                )
                return code
            if self.cfg.elastic.respawn and self.respawns < self.workers * self.workers:
                self.respawns += 1
                if not self.quiet:
                    print(
                        f"farflung: worker process {key} exited with {code}; "
                        "starting a joiner in its place",
                        file=sys.stderr,
                    )
                self._join(self.slots[key])
        if not any(p.poll() is None for p in self.procs.values()):
            print("farflung: every worker has exited before the run finished", file=sys.stderr)
            return 1
        return None

    def wait(self, seconds: float) -> None:
        """Up to ``seconds`` for the workers to exit on their own (the run finished).
        A stopped one (SIGSTOP, a frozen member the run went on without) never will:
        it is not waited for; :meth:`stop` ends it."""
        deadline = time.monotonic() + seconds
        stopped: set[int] = set()  # a stop is reported once
        while time.monotonic() < deadline:
            running = [p for p in self.procs.values() if p.poll() is None and p.pid not in stopped]
            stopped |= {p.pid for p in running if _is_stopped(p)}
            if all(p.pid in stopped or p.returncode is not None for p in running):
                return
            time.sleep(0.05)

    def stop(self) -> None:
        """End the live workers (SIGTERM, then SIGKILL after a grace)."""
        self.starter.close()
        stop_processes(list(self.procs.values()))


def _peak(summary: Any) -> int:
    """A member's reported peak memory (0 when it sent none or nonsense)."""
    v = summary.get("peak_bytes") if isinstance(summary, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0
