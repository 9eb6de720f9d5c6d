"""One worker of an elastic run (``elastic.enabled = true``).

The loop is :class:`~farflung.train.loop.Worker`'s, with four additions:

- **generations**: the coordinator names the members and their order; each
  generation gets a process group of its own (the old one is abandoned, not torn
  down: a collective waiting on a dead peer inside it never returns);
- **snapshots**: before each step that may follow a commit point, the worker keeps a
  copy of everything it would need to redo that step (model, optimizer, algorithm
  state, totals); a new generation rolls every member back to the state after the
  last committed step, and a joiner fetches that same snapshot from a donor;
- **exactly-once data**: step ``t`` always trains the global batch ``batch_ids(t)``,
  split over the members in order, so survivors take over a lost member's share;
  dropout is seeded from (seed, step, position), so a redone step is the same step;
- **votes**: once a step's contribution has been averaged (the algorithm says when:
  :meth:`~farflung.parallel.base.DataParallel.settled_step`), the worker tells the
  coordinator, with its sample ids, its metrics row and a hash of the state the
  algorithm keeps equal on every member, as the snapshot taken there holds it; the
  coordinator commits a step for the members whose hash is the majority's;
- **checked state transfer**: a joiner fetches its snapshot from the donor the
  coordinator named, with the ticket it signed (:mod:`farflung.membership.state_transfer`:
  safetensors and JSON, never pickle), restores it, and refuses it unless the
  restored state hashes to what the coordinator recorded at that commit.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from farflung.comm import Comm, DistInfo
from farflung.comm.collectives import pinned_epoch
from farflung.comm.errors import PeerLostError, Reconfigure, is_comm_failure
from farflung.config import Config
from farflung.data import batch_ids, val_batch_ids
from farflung.membership.member import Member
from farflung.membership.state_transfer import Fetched, fetch_state
from farflung.parallel import NonFiniteStep, make_algorithm
from farflung.train import checkpoint as ckpt
from farflung.train.loop import Worker, lr_at
from farflung.train.metrics import local_row


def join_group(member: Member, gen: dict[str, Any], backend: str, timeout_s: float) -> DistInfo:
    """Initialise the default process group of generation ``gen`` (abandoning the
    previous one: see the module docstring)."""
    if dist.is_initialized():
        _GRAVEYARD.append(dist.group.WORLD)
        dist.destroy_process_group()
    store = dist.TCPStore(
        member.coordinator_host,
        gen["store_port"],
        None,
        is_master=False,
        timeout=torch.distributed.constants.default_pg_timeout,
        wait_for_workers=False,
    )
    _GRAVEYARD.append(store)
    members = gen["members"]
    rank = members.index(member.id)
    prefixed = dist.PrefixStore(f"gen{gen['gen']}/", store)
    # meet first, abortably: torch's own rendezvous would wait out its whole timeout
    # for a member that has moved on to a newer generation
    prefixed.add("arrived", 1)
    member.met(gen["gen"])  # a member that never meets is evicted at the deadline
    while prefixed.add("arrived", 0) < len(members):
        if member.lost is not None:
            raise member.lost
        if member.gen is not None and member.gen["gen"] != gen["gen"]:
            raise Reconfigure(f"generation {gen['gen']} was replaced before it met")
        time.sleep(0.01)
    # meeting is bounded by the heartbeat (a member lost meanwhile must not hold the
    # others for long); collectives by parallel.timeout_s, as slow links need
    dist.init_process_group(
        backend,
        store=prefixed,
        rank=rank,
        world_size=len(members),
        timeout=timedelta(seconds=3 * member.heartbeat_s),
    )
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s))
    return DistInfo(rank, len(members), 0, 1, backend, torch.device("cpu"))


_GRAVEYARD: list[Any] = []  # abandoned groups and works: their destructors would block
_FETCHED: dict[int, dict[str, Any]] = {}  # a joiner's verified state by restart step
STATE_CAP_FACTOR = 16
"""A donor's state may be at most this many times the joiner's own parameter bytes
(plus :data:`STATE_CAP_SLACK`): model, two AdamW moments, and an algorithm's copies of
the model stay below it (cocktail, the largest, about 8x: its global model, in-flight
sync, shared moments and error buffers; tests/test_state_transfer.py measures each)."""
STATE_CAP_SLACK = 64 << 20


def state_hash(obj: Any) -> str:
    """A hash of every tensor and number in ``obj`` (dicts in key order)."""
    h = hashlib.blake2b(digest_size=16)

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(x.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())

    feed(obj)
    return h.hexdigest()


class ElasticWorker(Worker):
    """See the module docstring. ``member``: the connection to the coordinator, whose
    first generation this worker has entered already (``info``)."""

    def __init__(
        self, cfg: Config, out: Path, info: DistInfo, member: Member, gen: dict, key: str
    ) -> None:
        self.member, self.gen, self.key = member, gen, key
        self.epoch = member.gen_epoch[gen["gen"]]  # waits of this generation end with it
        self.snapshots: dict[int, dict[str, Any]] = {}
        # the shared-state hash of each snapshot, taken with it: what the vote of the
        # step before carries, and what a joiner restoring it must find
        self.snapshot_hashes: dict[int, str] = {}
        self.pending_votes: dict[int, dict[str, Any]] = {}
        self.voted = 0
        self.faults = parse_faults(os.environ.get(FAULTS_ENV, ""), member.id)
        super().__init__(cfg, out, info, show_progress=False)
        self.is_main = self.replica == 0
        self._hook_algorithm()
        self.saved_step = 0
        self._snapshot()
        self.initial = self.snapshots[1]
        if gen["restart"] != self.step + 1:  # resumed, or a joiner: not the start
            snap = self._restore_for(gen)
            self.snapshots, self.snapshot_hashes = {gen["restart"]: snap}, {}
            self.voted = self.saved_step = self.step

    def _restore_for(self, gen: dict[str, Any]) -> dict[str, Any]:
        """Restore the state to enter ``gen`` with, when this worker holds none: a
        donor's (checked against the coordinator's hash), or a checkpoint's (every
        member was lost, or the run resumes); returns it."""
        if gen.get("donor") is None:
            snap = self._load_checkpoint(gen["restart"] - 1)
            self._restore(snap)
            return snap
        if gen["restart"] in _FETCHED:  # fetched and checked for a generation replaced since
            snap = _FETCHED[gen["restart"]]
            self._restore(snap)
            return snap
        return self._restore_fetched(gen)

    def _restore_fetched(self, gen: dict[str, Any]) -> dict[str, Any]:
        """Fetch the donor's state, restore it, and keep it only if it hashes as the
        members committed it (PeerLostError otherwise)."""
        t0 = time.perf_counter()
        snap, nbytes = self._fetch(gen)
        self._restore(snap)
        try:
            self._check_fetched(gen)
        except PeerLostError:
            self._restore(self.initial)  # nothing of a refused state stays in the model
            raise
        seconds = time.perf_counter() - t0
        self.member.tell({"op": "healed", "bytes": nbytes, "seconds": seconds})
        _FETCHED.clear()
        _FETCHED[gen["restart"]] = snap  # checked: reusable if this generation is replaced
        return snap

    def _check_fetched(self, gen: dict[str, Any]) -> None:
        """The restored state hashes as the members' votes did at the commit before
        ``gen``'s restart step (see :meth:`_snapshot`); PeerLostError otherwise, so
        that the coordinator decides (another donor, or a rewind)."""
        expected = gen.get("state_hash")
        if expected is None:  # the coordinator recorded none (a resumed run's start)
            return
        got = self._shared_hash(gen["restart"] - 1)
        if got != expected:
            raise PeerLostError(
                f"the state from donor {gen.get('donor')} at {gen.get('donor_addr')} hashes "
                f"to {got}, the members committed step {gen['restart'] - 1} with {expected}: "
                "refused"
            )

    def _shared_hash(self, step: int) -> str:
        """The hash of what the algorithm keeps equal on every member, at ``step``."""
        return state_hash({"step": step, "state": self.algo.shared_state()})

    def _telemetry_group(self) -> None:
        return None  # rows travel with the votes

    # -- membership ------------------------------------------------------------------
    def _position(self) -> tuple[int, int]:
        return self.gen["members"].index(self.member.id), len(self.gen["members"])

    def enter(self, gen: dict[str, Any]) -> None:
        """Re-form the group of generation ``gen`` and roll back to its restart step."""
        self.algo.close(abort=True)
        self.gen = gen
        self.epoch = self.member.gen_epoch[gen["gen"]]
        restart = gen["restart"]
        info = join_group(self.member, gen, self.info.backend, self.cfg.parallel.timeout_s)
        self.info = info
        self.replica, self.dp = info.rank, info.world_size
        self.is_main = self.replica == 0
        with pinned_epoch(self.epoch):
            self.comm = Comm(meter=self.comm.meter)
            self.algo = make_algorithm(
                self.cfg.parallel.algorithm,
                self.model,
                self.optimizer,
                self.comm,
                self.cfg.parallel,
            )
            self.algo.setup()
        self._hook_algorithm()
        snap = self.snapshots.get(restart)
        if snap is None:
            snap = self._restore_for(gen)
        else:
            self._restore(snap)
        self.snapshots, self.snapshot_hashes = {restart: snap}, {}
        self.pending_votes = {t: v for t, v in self.pending_votes.items() if t < restart}
        self.voted = restart - 1

    def _fetch(self, gen: dict[str, Any]) -> Fetched:
        """This worker holds no state for the restart step (it is joining): the
        donor's, over a connection of its own, with the coordinator's ticket."""
        try:
            return fetch_state(
                gen["donor_addr"],
                self.key,
                gen["ticket"],
                self.cfg.parallel.timeout_s,
                max_bytes=self._state_cap(),
            )
        except (OSError, KeyError) as e:  # the donor died, refused, or sent garbage
            raise PeerLostError(
                f"fetching the state from donor {gen.get('donor')} at {gen.get('donor_addr')} "
                f"failed: {e!r}"
            ) from e

    def _state_cap(self) -> int:
        """The most state bytes this worker accepts from a donor (its model's size)."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return STATE_CAP_FACTOR * params + STATE_CAP_SLACK

    def provide(self, step: int) -> dict[str, Any] | None:
        """The snapshot for ``step``, for a joiner (the state server's thread encodes
        it as it sends: a snapshot is complete once its step is committed, which is
        when joiners are sent for it, and is never changed after, only dropped)."""
        return self.snapshots.get(step)

    def _hook_algorithm(self) -> None:
        if hasattr(self.algo, "on_result"):
            self.algo.on_result = self._on_result

    def _on_result(self, sync_index: int, result: Any) -> None:
        """A cocktail sync result, before it is applied: the snapshot of the step it
        settles needs it to redo what follows (results are reused buffers: copied),
        in the algorithm's checkpoint form."""
        snap = self.snapshots.get(self.step)  # taken at the boundary that launched it
        if snap is not None:
            avg, sent, faults, stats = copy.deepcopy(result)
            snap["algorithm"]["pending"] = [avg, sent, dataclasses.asdict(faults), stats]

    # -- snapshots ---------------------------------------------------------------------
    def _snapshot(self) -> None:
        """Keep what redoing step ``self.step + 1`` needs (when it may follow a commit),
        and the hash of its shared state: the vote of the step it settles carries that
        hash, so a joiner restoring this snapshot can check it against the commit
        (cocktail votes a step one step late: the hash is still the snapshot's)."""
        if self.step % self.algo.settle_every == 0:
            self.snapshots[self.step + 1] = self._state(self.algo.elastic_state())
            self.snapshot_hashes[self.step + 1] = self._shared_hash(self.step)

    def _state(self, algorithm: dict[str, Any]) -> dict[str, Any]:
        """A copy of everything this worker's future depends on, at this step."""
        return copy.deepcopy(
            {
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "algorithm": algorithm,
                "totals": self.totals,
                "group_size": self.dp,
            }
        )

    def _restore(self, snap: dict[str, Any]) -> None:
        snap = copy.deepcopy(snap)  # the snapshot stays intact for another rollback
        # an abandoned attempt may have left gradients behind: the redone step must not
        # add to them
        self.optimizer.zero_grad(set_to_none=True)
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.algo.load_elastic_state(snap["algorithm"], snap["group_size"] == self.dp)
        self.step = snap["step"]
        self.totals = snap["totals"]

    def _forget_committed(self) -> None:
        """Committed steps are never redone: their snapshots go (the first member
        checkpoints one first when ``train.checkpoint_every`` says so)."""
        committed = self.member.committed
        every = self.cfg.train.checkpoint_every
        for t in sorted(self.snapshots):
            step = t - 1  # the snapshot holds the state after this step
            if step > committed:
                break
            due = every and step // every > self.saved_step // every
            if self.is_main and due and 0 < step < self.cfg.train.steps:
                self._save_snapshot(self.snapshots[t])
            if t <= committed:
                del self.snapshots[t]
                self.snapshot_hashes.pop(t, None)

    def _save_snapshot(self, snap: dict[str, Any]) -> None:
        """A committed state as a one-rank checkpoint any member can resume from."""
        step = snap["step"]
        tmp = ckpt.tmp_dir(self.out / "checkpoints", step)
        ckpt.mark_present(tmp, 0)
        ckpt.write_rank_state(tmp, 0, snap)
        self._write_shared(tmp)
        extra = {"algorithm": self.cfg.parallel.algorithm, "val_loss": None, "elastic": True}
        keep = self.cfg.train.keep_checkpoints
        ckpt.commit(tmp, step, 1, [0], extra, keep, with_model=False)
        self.saved_step = step

    def _load_checkpoint(self, step: int) -> dict[str, Any]:
        """The snapshot a checkpoint of this run holds for ``step`` (0: the initial
        state, which every worker builds for itself)."""
        if step == 0:
            return self.initial
        valid, problems = ckpt.verified(self.out / "checkpoints", rank=0)
        if step not in valid:
            raise ckpt.CheckpointError(f"no intact checkpoint of step {step}: {problems}")
        return ckpt.load_rank_state(valid[step], 0)

    # -- the loop ---------------------------------------------------------------------
    def step_ids(self, step: int) -> np.ndarray:
        ids = batch_ids(step, self.cfg.train.batch_size, self.n_train, self.cfg.train.seed)
        return np.array_split(ids, self.dp)[self.replica]

    def run(self) -> dict[str, Any]:
        cfg = self.cfg.train
        self.t_start = time.perf_counter() - self.totals["elapsed_s"]
        self.comm.meter.snapshot(reset=True)
        pending: dict[str, Any] | None = None
        while True:
            try:
                if pending is not None:
                    self.enter(pending)
                    pending = None
                self.mark = time.perf_counter()
                while self.step < cfg.steps:
                    self._keep_pace()
                    self.train_step()
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                        self.evaluate()
                        self.mark = time.perf_counter()
                    self._boundary()
                if self.voted < self.step:  # the last steps settle only when waited for
                    self.algo.quiesce()
                    self._vote(self.step)
                self.member.wait_committed(cfg.steps, self.epoch)
                return self._finish()
            except Reconfigure:
                pass
            except NonFiniteStep:
                raise
            except Exception as e:  # a collective failed: a peer died or a link broke
                if not is_comm_failure(e):
                    raise
                why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                print(
                    f"farflung: worker {self.member.id}: a collective failed ({why}); "
                    "waiting for the coordinator",
                    file=sys.stderr,
                    flush=True,
                )
                self.member.fault(self.gen["gen"], why)
            pending = self.member.next_generation(self.gen["gen"])

    def _keep_pace(self) -> None:
        """Run at most ``elastic.max_lag_steps`` ahead of the last commit (each step
        ahead holds a snapshot)."""
        behind = self.step - self.cfg.elastic.max_lag_steps * self.algo.settle_every
        if behind > self.member.committed:
            self.member.wait_committed(behind, self.epoch)
        self._forget_committed()

    def train_step(self) -> None:
        t = self.step + 1
        actions = self.faults.pop(t, [])
        for action in actions:
            if action != "CORRUPT":
                inject(action)
        # dropout: the same for a redone step, whichever attempt and group size
        torch.manual_seed(self.cfg.train.seed * 1_000_003 + t * 1009 + self.replica)
        lr = lr_at(self.step, self.cfg.train.steps, self.cfg.optim) * self.algo.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ids = self.step_ids(self.step)
        loss = self._forward_backward_share(ids)
        self.step = t
        skipped = self._update(math.isfinite(loss))
        if "CORRUPT" in actions:  # after the update: nothing of it reached the others yet
            corrupt(self.algo)
        now = time.perf_counter()
        wall, self.mark = now - self.mark, now
        snap = self.comm.meter.snapshot(reset=True)
        self.totals["tokens"] += self.cfg.train.batch_size * self.cfg.model.context
        row = local_row(t, lr, self.totals["tokens"], now - self.t_start, loss, wall, snap, skipped)
        self.pending_votes[t] = {"samples": [int(i) for i in ids], "row": row}

    def _forward_backward_share(self, ids: np.ndarray) -> float:
        """Mean loss over this member's share, its gradient weighted so that the
        group's average is the global batch's mean whatever the shares' sizes."""
        micro = self.cfg.train.micro_batch_size or len(ids)
        weight = len(ids) * self.dp / self.cfg.train.batch_size
        parts = [ids[start : start + micro] for start in range(0, len(ids), micro)]
        tokens = self.token_weights(parts)  # masked targets: weights by counted tokens
        loss_sum = 0.0
        for i, part in enumerate(parts):
            x, y = self.train_set.batch(part)
            _, loss = self.model(x.to(self.info.device), y.to(self.info.device))
            if tokens is not None:
                (loss * tokens[i]).backward()
                loss_sum += loss.item() * tokens[i] * len(ids)
                continue
            scale = len(part) / len(ids)
            if weight != 1.0:
                scale *= weight
            (loss * scale).backward()
            loss_sum += loss.item() * len(part)
        return loss_sum / len(ids)

    def _boundary(self) -> None:
        """After a step: keep a snapshot for the next, vote the steps now settled."""
        self._snapshot()
        self._vote(self.algo.settled_step(self.step))

    def _vote(self, settled: int) -> None:
        if settled <= self.voted:
            return
        votes = [
            {"step": t, **self.pending_votes.pop(t)} for t in range(self.voted + 1, settled + 1)
        ]
        # the snapshot that redoes the step after ``settled``, hashed when it was taken;
        # a final step without one: the state as it is now
        votes[-1]["hash"] = self.snapshot_hashes.get(settled + 1) or self._shared_hash(settled)
        self.member.vote(self.gen["gen"], votes)
        self.voted = settled

    def drain(self) -> None:
        """No telemetry collective: rows travel with the votes."""

    @torch.no_grad()
    def evaluate(self) -> float:
        b = self.cfg.train.batch_size
        total = torch.zeros(1, dtype=torch.float64, device=self.info.device)
        with self.algo.eval_parameters() as model:
            model.eval()
            for i in range(self.cfg.train.eval_batches):
                ids = np.array_split(val_batch_ids(i, b, len(self.val_set)), self.dp)[self.replica]
                total += self._eval_loss_sum(model, ids)
            model.train()
        self.comm.all_reduce(total, kind="ctrl")
        self.last_val = total.item() / self._eval_targets(b)
        if self.step in self.pending_votes:
            self.pending_votes[self.step]["val_loss"] = self.last_val
        return self.last_val

    def _finish(self) -> dict[str, Any]:
        """Every step is committed: the final evaluation, the model, and the end."""
        val = self.evaluate()
        if self.is_main:
            self.save()
        self.totals["elapsed_s"] = time.perf_counter() - self.t_start
        summary = {"final_val_loss": val, "params": self.params, "wall_s": self.totals["elapsed_s"]}
        self.member.done(self.gen["gen"], {"summary": summary})
        self.member.wait_committed(10**18, self.epoch, until=lambda: self.member.finished)
        return summary

    def save(self) -> None:
        """The run's model and this worker's state as a one-rank checkpoint (the first
        member only: the state every member can resume from)."""
        root = self.out / "checkpoints"
        tmp = ckpt.tmp_dir(root, self.step)
        ckpt.mark_present(tmp, 0)
        # the algorithm's checkpoint form: it waits for a sync in flight and keeps it
        ckpt.write_rank_state(tmp, 0, self._state(self.algo.state_dict()))
        with_model = self._write_model(tmp, [0])
        self._write_shared(tmp)
        extra = {"algorithm": self.cfg.parallel.algorithm, "val_loss": self.last_val}
        ckpt.commit(tmp, self.step, 1, [0], extra, self.cfg.train.keep_checkpoints, with_model)


FAULTS_ENV = "FARFLUNG_FAULTS"
"""Fault injection for tests and benchmarks: ``ID:STEP:ACTION[,...]``; worker ``ID``
does ``ACTION`` to itself as it starts step ``STEP``: a signal name (``SIGKILL``,
``SIGSTOP``), ``LINKDOWN`` (its network interface goes down, in the network lab) or
``LINKFLAP<seconds>`` (down, and up again that much later); ``SLEEP<seconds>`` is a
slow step (a straggler, not a fault); ``CORRUPT`` silently changes one number of its
state as step ``STEP``'s update ends (:func:`corrupt`): its state hash disagrees with
the others' from that step on, and the coordinator evicts it."""


def parse_faults(spec: str, wid: int | None) -> dict[int, list[str]]:
    faults: dict[int, list[str]] = {}
    for item in filter(None, spec.split(",")):
        who, step, action = item.split(":")
        if int(who) == wid:
            faults.setdefault(int(step), []).append(action)
    return faults


def corrupt(algo: Any) -> None:
    """Add 1.0 to one element of the first tensor of the state ``algo`` keeps equal on
    every member (the model's first parameter when replicas are identical, the global
    model of cocktail and DiLoCo), or of the model's first parameter when nothing is
    shared (gossip): a memory error no collective notices."""
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


def inject(action: str) -> None:
    """Do ``action`` (see :data:`FAULTS_ENV`) to this process or its link: real faults."""
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
