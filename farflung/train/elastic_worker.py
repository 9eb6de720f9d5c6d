"""One worker of an elastic run (``elastic.enabled = true``).

The step, the evaluation and the checkpoint are :class:`~farflung.train.loop.Worker`'s
(one path for every worker kind); this worker fills its hooks and adds:

- **generations**: the coordinator names the members and their order; each
  generation gets a process group of its own (the old one is abandoned, not torn
  down at once: a collective waiting on a dead peer inside it does not return before
  its timeout; :class:`LeftGroups` frees it after that);
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
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from farflung.comm import Comm, DistInfo
from farflung.comm.collectives import pinned_epoch
from farflung.comm.dist import rank_device
from farflung.comm.errors import PeerLostError, Reconfigure, is_comm_failure
from farflung.config import Config
from farflung.membership.member import Member
from farflung.membership.state_transfer import Fetched, fetch_state
from farflung.parallel import NonFiniteStep, make_algorithm
from farflung.train import checkpoint as ckpt
from farflung.train.kernels import load_optimizer, peak_bytes
from farflung.train.loop import Worker


class LeftGroups:
    """The process groups (and store clients) of the generations this worker process
    has left, held until no collective can be running in them any more.

    A group is abandoned, not torn down, when its generation ends: a collective of
    ours waiting on a dead peer inside it never returns before its timeout, and
    freeing the group (its last reference) joins its threads, so the worker would
    block there; a peer may likewise still be waiting on us inside it. Every
    collective in a group is bounded by the group's timeout (``parallel.timeout_s``;
    meeting, by the heartbeat's), so once ``grace_s`` (more than that) has passed
    since the group was left, nothing runs in it on either side, and it is freed. The
    worker process holds one for its life: the first generation is entered before
    its worker exists."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s, self._clock = grace_s, clock
        self._held: list[tuple[float, tuple[Any, ...]]] = []
        self.current: tuple[Any, ...] = ()  # the group and store of the generation we are in

    @classmethod
    def for_run(cls, cfg: Config) -> LeftGroups:
        """Held past the longest a collective (or a meeting) of ``cfg``'s run may wait."""
        return cls(2 * cfg.parallel.timeout_s + 3 * cfg.elastic.heartbeat_s)

    def leave(self) -> None:
        """The current generation is over: hold its group and store from now."""
        if self.current:
            self._held.append((self._clock(), self.current))
        self.current = ()

    def release(self) -> int:
        """Free what was left more than ``grace_s`` ago; returns how many groups."""
        now = self._clock()
        kept = [(t, objs) for t, objs in self._held if now - t <= self.grace_s]
        freed = len(self._held) - len(kept)
        self._held = kept  # the last references: freed here
        return freed

    def __len__(self) -> int:
        return len(self._held)


def join_group(
    member: Member, gen: dict[str, Any], backend: str, timeout_s: float, left: LeftGroups
) -> DistInfo:
    """Initialise the default process group of generation ``gen``, abandoning the
    previous one to ``left`` (see :class:`LeftGroups`)."""
    if dist.is_initialized():
        left.current = (dist.group.WORLD, *left.current)
        dist.destroy_process_group()
    left.leave()
    left.release()
    store = dist.TCPStore(
        member.coordinator_host,
        gen["store_port"],
        None,
        is_master=False,
        timeout=torch.distributed.constants.default_pg_timeout,
        wait_for_workers=False,
    )
    left.current = (store,)
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
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(rank, len(members), 0, 1, backend, rank_device(backend, local_rank))


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
        self,
        cfg: Config,
        out: Path,
        info: DistInfo,
        member: Member,
        gen: dict,
        key: str,
        left: LeftGroups,
    ) -> None:
        self.member, self.gen, self.key, self.left = member, gen, key, left
        self.epoch = member.gen_epoch[gen["gen"]]  # waits of this generation end with it
        self.snapshots: dict[int, dict[str, Any]] = {}
        # the shared-state hash of each snapshot, taken with it: what the vote of the
        # step before carries, and what a joiner restoring it must find
        self.snapshot_hashes: dict[int, str] = {}
        self.pending_votes: dict[int, dict[str, Any]] = {}
        self.voted = 0
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

    def _fault_id(self) -> int | None:
        return self.member.id

    # -- membership ------------------------------------------------------------------
    def _position(self) -> tuple[int, int]:
        return self.gen["members"].index(self.member.id), len(self.gen["members"])

    def enter(self, gen: dict[str, Any]) -> None:
        """Re-form the group of generation ``gen`` and roll back to its restart step."""
        self.algo.close(abort=True)
        self.gen = gen
        self.epoch = self.member.gen_epoch[gen["gen"]]
        restart = gen["restart"]
        timeout_s = self.cfg.parallel.timeout_s
        info = join_group(self.member, gen, self.info.backend, timeout_s, self.left)
        self.info = info
        self.replica, self.dp = info.rank, info.world_size
        self.is_main = self.replica == 0
        snap = self.snapshots.get(restart)
        if snap is None and gen.get("donor") is None:
            snap = self._load_checkpoint(restart - 1)
        if snap is not None:
            # the algorithm's setup sends the first member's weights to the others: a
            # worker starting the run afresh in this generation restores nothing after
            # it and must get the restart state, not what this member trained since
            self.model.load_state_dict(snap["model"])
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
        if snap is None:
            snap = self._restore_for(gen)  # from the donor
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
                "scaler": self.scaler.state_dict(),
            }
        )

    def _restore(self, snap: dict[str, Any]) -> None:
        snap = copy.deepcopy(snap)  # the snapshot stays intact for another rollback
        # an abandoned attempt may have left gradients behind: the redone step must not
        # add to them
        self.optimizer.zero_grad(set_to_none=True)
        self.model.load_state_dict(snap["model"])
        load_optimizer(self.optimizer, snap["optimizer"])
        self.scaler.load_state_dict(snap.get("scaler"))
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
                self.save(self.snapshots[t])  # a one-rank checkpoint without the model file
                self.saved_step = step
            if t <= committed:
                del self.snapshots[t]
                self.snapshot_hashes.pop(t, None)

    def _checkpoint_rank(self) -> tuple[int, int]:
        """One rank's checkpoint (the first member writes it): the state any member,
        in a group of any size, resumes from."""
        return 0, 1

    def _checkpoint_extra(self) -> dict[str, Any]:
        return {"elastic": True}

    def _rank_state(self) -> dict[str, Any]:
        # the algorithm's checkpoint form: it waits for a sync in flight and keeps it
        return self._state(self.algo.state_dict())

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
    def share(self, ids: np.ndarray) -> np.ndarray:
        """The members split every batch in order, as evenly as it goes: survivors
        take over a lost member's share."""
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
                self.train_steps()
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

    def _before_step(self) -> None:
        """Run at most ``elastic.max_lag_steps`` ahead of the last commit (each step
        ahead holds a snapshot)."""
        behind = self.step - self.cfg.elastic.max_lag_steps * self.algo.settle_every
        if behind > self.member.committed:
            self.member.wait_committed(behind, self.epoch)
        self._forget_committed()

    def _seed_step(self, step: int) -> None:
        # dropout: the same for a redone step, whichever attempt and group size
        torch.manual_seed(self.cfg.train.seed * 1_000_003 + step * 1009 + self.replica)

    def _record(self, row: list[float], ids: np.ndarray) -> None:
        """Rows travel with the step's vote, with the samples it trained."""
        self.pending_votes[self.step] = {"samples": [int(i) for i in ids], "row": row}

    def _after_step(self) -> None:
        self._boundary()

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

    def _record_eval(self, val_loss: float) -> None:
        """The result travels with the step's vote (the coordinator logs it)."""
        if self.step in self.pending_votes:
            self.pending_votes[self.step]["val_loss"] = val_loss

    def _finish(self) -> dict[str, Any]:
        """Every step is committed: the final evaluation, the model, and the end."""
        val = self.evaluate()
        if self.is_main:
            self.save()
        self.totals["elapsed_s"] = time.perf_counter() - self.t_start
        summary = {
            "final_val_loss": val,
            "params": self.params,
            "wall_s": self.totals["elapsed_s"],
            "precision": self.precision,
            "peak_bytes": peak_bytes(self.info.device),
        }
        self.member.done(self.gen["gen"], {"summary": summary})
        self.member.wait_committed(10**18, self.epoch, until=lambda: self.member.finished)
        return summary
