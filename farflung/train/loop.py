"""The training loop one worker runs (every rank runs the same code)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from farflung.comm import Comm, DistInfo, new_group
from farflung.comm.dist import all_gather_json
from farflung.comm.errors import NonFiniteError
from farflung.compress import fused as fused_codecs
from farflung.config import (
    Config,
    ConfigError,
    OptimConfig,
    check_batch,
    config_from_dict,
    config_to_toml,
)
from farflung.data import SampleSet, ShardIndex, TokenStream, batch_ids, rank_slice, val_batch_ids
from farflung.model import GPT, param_groups
from farflung.parallel import NonFiniteStep, make_algorithm
from farflung.parallel.flat import grads_finite
from farflung.train import checkpoint as ckpt
from farflung.train import faults, init
from farflung.train.kernels import (
    compile_model,
    load_optimizer,
    make_optimizer,
    peak_bytes,
    to_device,
)
from farflung.train.metrics import StepRecord, aggregate, local_row, truncate_jsonl
from farflung.train.precision import LossScaler, autocast, resolve_precision
from farflung.train.progress import Progress
from farflung.train.telemetry import Telemetry

# config keys that shape the saved state: a resume must keep them
STATE_KEYS = {
    "model": (
        "arch",
        "n_layer",
        "n_head",
        "n_kv_head",
        "d_model",
        "ffn_hidden",
        "context",
        "max_positions",
        "vocab_size",
        "tie_embeddings",
    ),
    "parallel": ("algorithm", "codec", "error_feedback"),
    "pipeline": ("stages", "layers", "compression"),
}


def lr_at(step: int, total: int, o: OptimConfig) -> float:
    """Linear warm-up to ``o.lr`` then cosine decay to ``o.min_lr`` at ``o.decay_steps``
    (or ``total`` when that is 0), flat after it."""
    total = o.decay_steps or total
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, total - o.warmup_steps)
    frac = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * frac))


class Worker:
    """State and steps of one training process."""

    def __init__(self, cfg: Config, out: Path, info: DistInfo, show_progress: bool = True):
        self.cfg, self.out, self.info = cfg, Path(out), info
        self.is_main = info.rank == 0
        self.show_progress = show_progress and self.is_main
        self.local_batch, self.micro, _ = check_batch(cfg, info.world_size)
        index = ShardIndex.load(cfg.data.dir)
        # tokenizer.json, then an imported tokenizer's config and chat template
        self.tokenizer_files = index.tokenizer_files()
        init.check_tokenizer(cfg, self.tokenizer_files[0])
        vocab = cfg.model.vocab_size or index.vocab_size
        if vocab < index.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {vocab} is smaller than the tokenizer's {index.vocab_size}"
            )
        self.cfg = cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab))
        self.train_set = SampleSet(TokenStream(index, "train"), cfg.model.context)
        self.val_set = SampleSet(TokenStream(index, "val"), cfg.model.context)
        # data.max_samples: the first N samples only, so a run makes several epochs
        self.n_train = min(len(self.train_set), cfg.data.max_samples or len(self.train_set))
        # the data-parallel position: which share of each global batch this rank trains
        self.replica, self.dp = info.rank, info.world_size
        self.has_loss = True  # pipeline stages before the last compute no loss
        self.gathered_loss = math.nan
        self.comm = Comm()
        # before any algorithm builds groups of its own: a world group is entered by
        # every rank in the same order
        self.telemetry_group = self._telemetry_group()
        # the forward and backward's dtype; weights and optimizer state stay fp32
        self.precision = resolve_precision(cfg.train.precision, info.device)
        self.compute = autocast(self.precision, info.device)
        self.scaler = LossScaler(self.precision == "fp16")
        torch.manual_seed(cfg.train.seed)
        self.model = self._build_model()
        if cfg.train.compile:
            compile_model(self.model)
        fused_codecs.set_mode(cfg.parallel.compile_codecs)
        o = cfg.optim
        self.optimizer = make_optimizer(param_groups(self.model, o.weight_decay), o, info.device)
        self.algo = make_algorithm(
            cfg.parallel.algorithm, self.model, self.optimizer, self._dp_comm(), cfg.parallel
        )
        self.algo.setup()
        # dropout differs per rank, as it would with independent machines
        torch.manual_seed(cfg.train.seed * 1000 + info.rank + 1)
        self.step = 0
        self.totals = {
            "tokens": 0,
            "elapsed_s": 0.0,
            "train_s": 0.0,
            "bytes_sent": 0,
            "bytes_recv": 0,
        }
        self.last_val: float | None = None
        self.peaks: list[int] = []  # every rank's peak memory, gathered at the end
        self.faults = faults.Faults.from_env(self._fault_id())
        self.nccl = info.backend == "nccl"
        self.nonfinite_streak = 0
        telemetry_comm = Comm(self.telemetry_group, self.comm.meter)
        self.telemetry = Telemetry(
            telemetry_comm, cfg.train.log_every, self._on_record, info.device
        )

    def _fault_id(self) -> int | None:
        """Who this worker is in ``FARFLUNG_FAULTS`` (:mod:`farflung.train.faults`)."""
        return self.info.rank

    def _telemetry_group(self) -> dist.ProcessGroup | None:
        return new_group() if self.info.world_size > 1 else None

    def _build_model(self) -> torch.nn.Module:
        """The module this rank trains (the whole GPT here; a stage in a pipeline)."""
        model = self._new_model()
        self.params = model.num_params()
        return model.to(self.info.device)

    def _new_model(self) -> GPT:
        """The whole model as every rank starts it: random from the seed, or the
        weights of ``model.init_from``."""
        model = GPT(self.cfg.model)
        init.load_weights(model, self.cfg)
        return model

    def _dp_comm(self) -> Comm:
        """The Comm the data-parallel algorithm syncs over."""
        return self.comm

    def step_ids(self, step: int) -> np.ndarray:
        """Sample ids this rank's replica trains on at ``step`` (0-based)."""
        return self.share(
            batch_ids(step, self.cfg.train.batch_size, self.n_train, self.cfg.train.seed)
        )

    def share(self, ids: np.ndarray) -> np.ndarray:
        """This replica's share of a global batch (training or validation)."""
        return rank_slice(ids, self.replica, self.dp)

    # -- the loop ----------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg.train
        steps_before = self.step
        self.t_start = time.perf_counter() - self.totals["elapsed_s"]
        self.comm.meter.snapshot(reset=True)  # set-up traffic is not a step's
        self.bar = Progress(cfg.steps, self.step, enabled=self.show_progress)
        finished = False
        try:
            self.train_steps()
            self.drain()
            finished = True
        finally:
            self.bar.close()
            # on a failure, do not wait for background syncs with peers that may be gone
            self.algo.close(abort=not finished)
        self.evaluate()
        self.save()
        self.totals["elapsed_s"] = time.perf_counter() - self.t_start
        self.peaks = self._gather_peaks()
        return self.summary(self.step - steps_before)

    def _gather_peaks(self) -> list[int]:
        """Every rank's peak memory so far, in rank order (a collective)."""
        mine = peak_bytes(self.info.device)
        if self.telemetry_group is None:
            return [mine]
        return [int(v) for v in all_gather_json(mine, self.telemetry_group)]

    def train_steps(self) -> None:
        """Train up to ``train.steps``, evaluating on the way (every worker kind)."""
        cfg = self.cfg.train
        self.mark = time.perf_counter()
        while self.step < cfg.steps:
            self._before_step()
            self.train_step()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.evaluate()
                self.mark = time.perf_counter()  # no step pays for evaluation
            self._after_step()

    def _before_step(self) -> None:
        """Hook: what a worker kind does before each step (elastic: keep pace)."""

    def _after_step(self) -> None:
        """Hook: after each step and its evaluation: a checkpoint when one is due."""
        every, steps = self.cfg.train.checkpoint_every, self.cfg.train.steps
        if every and self.step % every == 0 and self.step < steps:
            self.save()
            self.mark = time.perf_counter()

    def train_step(self) -> None:
        """One optimizer step, the same for every worker kind: faults due, learning
        rate, :meth:`forward_backward` on this replica's share, :meth:`update`, and the
        step's row to :meth:`_record`. A step's wall time runs from the end of the
        previous step (or of the evaluation or checkpoint after it) to the end of this
        one, telemetry included."""
        t = self.step + 1
        actions = self.faults.take(t)
        faults.at_start(actions)
        self._seed_step(t)
        lr = lr_at(self.step, self.cfg.train.steps, self.cfg.optim) * self.algo.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ids = self.step_ids(self.step)
        loss = self.forward_backward(ids, poison=faults.loss_factor(actions))
        self.step = t
        skipped = self.update(math.isfinite(loss))
        faults.after_update(actions, self.algo)
        now = time.perf_counter()
        wall, self.mark = now - self.mark, now
        snap = self.comm.meter.snapshot(reset=True)
        # counted here, not from the gathered records, which arrive log_every steps late
        self.totals["tokens"] += self.cfg.train.batch_size * self.cfg.model.context
        elapsed = now - self.t_start
        row = local_row(
            t, lr, self.totals["tokens"], elapsed, loss, wall, snap, skipped, self.has_loss
        )
        self._record(row, ids)

    def _seed_step(self, step: int) -> None:
        """Hook: seed what is random in step ``step`` (dropout). Here nothing: the
        generator runs on from the start (or from a checkpoint's state)."""

    def _record(self, row: list[float], ids: np.ndarray) -> None:
        """A step's row (``ids``: the samples it trained): to the progress bar and the
        telemetry buffer, which gathers every rank's rows."""
        shown = aggregate([row])
        if not self.has_loss:  # the newest loss gathered from the last stage
            shown.loss = self.gathered_loss
        self.bar.update(shown, self.step)
        if self.nccl and len(self.telemetry.rows) + 1 >= self.telemetry.every:
            self.algo.quiesce()  # see DataParallel.quiesce
        self.telemetry.add(row)

    def forward_backward(self, ids: np.ndarray, poison: float = 1.0) -> float:
        """Forward and backward over sample ``ids`` (this replica's share of the step's
        global batch) in micro-batches; ``poison``: what the loss is multiplied by
        (fault injection: NaN, or a huge factor).
        Gradients are weighted so that the replicas' average is the global batch's
        mean whatever the shares' sizes; returns the loss weighted alike (the replicas'
        average of it is the global batch's mean loss)."""
        micro = self.cfg.train.micro_batch_size or len(ids)
        parts = [ids[start : start + micro] for start in range(0, len(ids), micro)]
        weights = self.token_weights(parts)  # masked targets: weights by counted tokens
        b = self.cfg.train.batch_size
        loss_sum = 0.0
        for i, part in enumerate(parts):
            x, y = self.train_set.batch(part)
            with self.compute():
                _, loss = self.model(to_device(x, self.info.device), to_device(y, self.info.device))
            if poison != 1.0:  # NaN != 1.0 too
                loss = loss * poison  # poisons the gradients too
            if weights is None:
                # a divisor: with even shares it is the accumulation count exactly
                div = b / (len(part) * self.dp)
                self.scaler.scale(loss / div).backward()
                loss_sum += loss.item() / div
            else:
                self.scaler.scale(loss * weights[i]).backward()
                loss_sum += loss.item() * weights[i]
        return loss_sum

    def token_weights(self, parts: list[np.ndarray]) -> list[float] | None:
        """For masked targets (fine-tuning data), the weight of each micro-batch's mean
        loss: its counted tokens times ``dp`` over the global batch's. The average over
        replicas of the weighted sums, of gradients and of losses alike, is then the
        global batch's mean over counted tokens, as one process on the whole batch
        computes it, however unevenly the prompts fall. None when every target counts."""
        if not self.train_set.has_mask:
            return None
        b = self.cfg.train.batch_size
        every = batch_ids(self.step, b, self.n_train, self.cfg.train.seed)
        counts = self.train_set.target_counts(every)
        total = max(1, int(counts.sum()))
        of = dict(zip(every.tolist(), counts.tolist(), strict=True))  # parts are from every
        return [sum(of[i] for i in p.tolist()) * self.dp / total for p in parts]

    def update(self, finite: bool) -> bool:
        """Sync, clip, step. Returns True when this rank did not apply the step."""
        skipped, overflow = None, False
        self.scaler.unscale(self.model.parameters())
        try:
            overflow = self._sync_gradients(finite)
            if not overflow:
                if self.cfg.optim.grad_clip > 0:
                    self._clip(self.cfg.optim.grad_clip)
                self.optimizer.step()
        except NonFiniteStep as e:
            skipped = e  # no update from this step: nothing non-finite reaches the weights
        self.scaler.update(overflow)
        self.optimizer.zero_grad(set_to_none=True)
        reported = None
        try:
            self.algo.after_step(self.step)  # every rank joins the syncs, skipped or not
        except NonFiniteStep as e:
            reported = e
        for e in (skipped, reported):
            if e is not None:
                self._nonfinite(e)
        if skipped is None and reported is None:
            self.nonfinite_streak = 0
        return skipped is not None or overflow

    def _sync_gradients(self, finite: bool) -> bool:
        """The algorithm's gradient sync; True when an fp16 step overflowed instead
        (its gradients are not finite, its loss is): a loss-scale event, not a fault.
        A gradient-averaging algorithm carries the overflow in the average, so every
        rank finds it in the same numbers and skips alike; a local-step method skips
        this rank's own step. Once the scale is down to 1 an overflow is a fault."""
        self.algo.tolerate_overflow = self.scaler.may_skip
        if not self.scaler.may_skip:
            self.algo.sync_gradients(finite)
            return False
        if self.algo.averages_gradients:
            self.algo.sync_gradients(finite)
            return not grads_finite(self.model)
        if finite and not grads_finite(self.model):
            return True
        self.algo.sync_gradients(finite)
        return False

    def _clip(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def _nonfinite(self, e: NonFiniteStep) -> None:
        """Say what happened; stop every rank at the same step when told to."""
        step, mode = self.step, self.cfg.train.on_nonfinite
        if e.local:  # only this rank knows yet; all learn it at the next sync
            print(
                f"farflung: rank {self.info.rank}: step {step}: non-finite loss or "
                "gradients; this rank skips the step",
                file=sys.stderr,
                flush=True,
            )
            return
        self.nonfinite_streak += 1
        what = "dropped the step's update" if e.dropped else "skipped a local step"
        if mode == "stop" or self.nonfinite_streak > self.cfg.train.max_nonfinite_skips:
            why = (
                "train.on_nonfinite = 'stop'"
                if mode == "stop"
                else f"{self.nonfinite_streak} steps in a row (train.max_nonfinite_skips)"
            )
            raise NonFiniteError(
                f"non-finite loss or gradients from rank(s) {e.ranks} at step {step}; "
                f"stopping ({why})",
                step,
                e.ranks,
            )
        if self.is_main:
            print(
                f"farflung: warning: step {step}: non-finite values from rank(s) {e.ranks}; "
                f"{what} (train.on_nonfinite = 'skip')",
                file=sys.stderr,
                flush=True,
            )

    def _on_record(self, rec: StepRecord) -> None:
        """An aggregated step record, on every rank: totals, and rank 0's file."""
        self.gathered_loss = rec.loss
        self.totals["train_s"] += rec.wall_s
        self.totals["bytes_sent"] += rec.bytes_sent
        self.totals["bytes_recv"] += rec.bytes_recv
        by_kind = self.totals.setdefault("bytes_by_kind", {})
        for kind, n in rec.bytes_by_kind.items():
            by_kind[kind] = by_kind.get(kind, 0) + n
        if self.is_main:
            self._append("metrics.jsonl", rec.to_json())

    def drain(self) -> None:
        """Bring telemetry up to date (all ranks: it holds a collective)."""
        if self.nccl:
            self.algo.quiesce()
        self.telemetry.drain()

    @torch.no_grad()
    def evaluate(self) -> float:
        self.drain()  # the record of this step's tokens, and a sync point anyway
        b = self.cfg.train.batch_size
        total = torch.zeros(1, dtype=torch.float64, device=self.info.device)
        with self.algo.eval_parameters() as model:
            model.eval()
            for i in range(self.cfg.train.eval_batches):
                ids = self.share(val_batch_ids(i, b, len(self.val_set)))
                with self.compute():
                    total += self._eval_loss_sum(model, ids)
            model.train()
        self.comm.all_reduce(total, kind="ctrl")
        self.last_val = total.item() / self._eval_targets(b)
        self._record_eval(self.last_val)
        return self.last_val

    def _record_eval(self, val_loss: float) -> None:
        """Hook: an evaluation's result, to ``eval.jsonl`` (the first rank)."""
        if self.is_main:
            line = {"step": self.step, "val_loss": val_loss, "tokens": self.totals["tokens"]}
            self._append("eval.jsonl", json.dumps(line))

    def _eval_loss_sum(self, model: torch.nn.Module, ids: np.ndarray) -> float:
        """Summed loss x samples (x counted targets with masked targets) over
        validation samples ``ids``."""
        total = 0.0
        for j in range(0, len(ids), self.micro):
            part = ids[j : j + self.micro]
            x, y = self.val_set.batch(part)
            _, loss = model(to_device(x, self.info.device), to_device(y, self.info.device))
            total += loss.item() * self._eval_weight(part)
        return total

    def _eval_weight(self, part: np.ndarray) -> float:
        """What a validation micro-batch's mean loss is multiplied by in the sum."""
        if self.val_set.has_mask:
            return float(self.val_set.target_counts(part).sum())
        return float(len(part))

    def _eval_targets(self, b: int) -> float:
        """What the evaluation's summed loss is divided by: samples, or counted targets."""
        n = self.cfg.train.eval_batches
        if not self.val_set.has_mask:
            return float(b * n)
        every = np.concatenate([val_batch_ids(i, b, len(self.val_set)) for i in range(n)])
        return float(max(1, self.val_set.target_counts(every).sum()))

    # -- checkpoints -------------------------------------------------------------
    def save(self, state: dict[str, Any] | None = None) -> None:
        """A checkpoint of this step: every rank writes its own state under its own
        ``--out``; one rank per filesystem (the lowest that shares it) writes the model
        and commits. ``state``: a state taken earlier (an elastic member's committed
        snapshot), checkpointed for its own step, without the model file."""
        self.drain()
        if state is None:
            self._check_finite()
        step = self.step if state is None else state["step"]
        rank, world = self._checkpoint_rank()
        tmp = ckpt.tmp_dir(self.out / "checkpoints", step)
        ckpt.mark_present(tmp, rank)
        self._checkpoint_barrier(world)
        here = ckpt.ranks_present(tmp)
        ckpt.write_rank_state(tmp, rank, self._rank_state() if state is None else state)
        self._checkpoint_barrier(world)  # every rank's state is on disk: the committer reads them
        if here[0] == rank:
            with_model = state is None and self._write_model(tmp, here)
            self._write_shared(tmp)
            extra = {
                "algorithm": self.cfg.parallel.algorithm,
                "val_loss": self.last_val if state is None else None,
                **self._checkpoint_extra(),
            }
            keep = self.cfg.train.keep_checkpoints
            ckpt.commit(tmp, step, world, here, extra, keep, with_model)
        self._checkpoint_barrier(world)

    def _check_finite(self) -> None:
        with self.algo.eval_parameters() as model:
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise NonFiniteError(
                    f"step {self.step}: the model holds non-finite weights; refusing to "
                    "checkpoint them",
                    self.step,
                    [self.info.rank],
                )

    def _checkpoint_rank(self) -> tuple[int, int]:
        """Hook: this worker's rank in its checkpoints, and how many ranks write one."""
        return self.info.rank, self.info.world_size

    def _checkpoint_barrier(self, world: int) -> None:
        if world > 1:
            self.comm.barrier()

    def _checkpoint_extra(self) -> dict[str, Any]:
        """Hook: what a worker kind adds to a checkpoint's manifest."""
        return {}

    def _write_shared(self, tmp: Path) -> None:
        """The files a checkpoint needs besides the states: the resolved config and the
        data's tokenizer files, so that it stands on its own."""
        (tmp / "config.toml").write_text(config_to_toml(self.cfg))
        for path in self.tokenizer_files:
            shutil.copyfile(path, tmp / path.name)

    def _write_model(self, tmp: Path, here: list[int]) -> bool:
        """The run's model as ``model.safetensors`` (committer only; ``here``: the ranks
        whose states are in ``tmp``); False when it could not be written here."""
        with self.algo.eval_parameters() as model:
            ckpt.write_model(tmp, model)
        return True

    def _rank_state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "algorithm": self.algo.state_dict(),
            "rng": torch.get_rng_state(),
            "totals": dict(self.totals),
            "scaler": self.scaler.state_dict(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if not self.algo.replicas_identical:
            state["model"] = self.model.state_dict()
        return state

    def resume(self) -> bool:
        """Load the newest checkpoint that every rank holds intact; False when no rank
        has one. A corrupt newer checkpoint is passed over with a warning."""
        path = self._agree_on_checkpoint()
        if path is None:
            return False
        manifest = ckpt.read_manifest(path, verify=False)
        if manifest["world_size"] != self.info.world_size:
            raise ckpt.CheckpointError(
                f"{path} was written by {manifest['world_size']} workers; resume with "
                f"--workers {manifest['world_size']}"
            )
        self._check_resumable(path)
        state = ckpt.load_rank_state(path, self.info.rank)
        self._load_model(path, state)
        load_optimizer(self.optimizer, state["optimizer"])
        self.scaler.load_state_dict(state.get("scaler"))
        self.algo.load_state_dict(state["algorithm"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = state["step"]
        self.totals.update(state["totals"])
        self.last_val = manifest.get("val_loss")
        if self.is_main:
            truncate_jsonl(self.out / "metrics.jsonl", self.step)
            truncate_jsonl(self.out / "eval.jsonl", self.step)
        self.comm.barrier()
        return True

    def _load_model(self, path: Path, state: dict[str, Any]) -> None:
        ckpt.load_model_weights(path, self.model)
        if "model" in state:
            self.model.load_state_dict(state["model"])

    def _agree_on_checkpoint(self) -> Path | None:
        """Each rank checks its own folder; all take the newest step every rank holds
        intact."""
        root = self.out / "checkpoints"
        valid, problems = ckpt.verified(root, rank=self.info.rank)
        mine = [sorted(valid), problems]
        everyone: list[Any] = [mine]
        if self.info.world_size > 1:
            everyone = all_gather_json(mine)
        if not any(steps or probs for steps, probs in everyone):
            return None  # no rank has any checkpoint: a fresh start
        for rank, (_, probs) in enumerate(everyone):
            for problem in probs:
                if self.is_main:
                    print(f"farflung: warning: rank {rank}: {problem}", file=sys.stderr)
        common = set.intersection(*(set(steps) for steps, _ in everyone))
        if not common:
            raise ckpt.CheckpointError(
                f"{root}: no checkpoint is intact on every rank ("
                + "; ".join(p for _, probs in everyone for p in probs)
                + ")"
            )
        step = max(common)
        newest = max(max(steps, default=-1) for steps, _ in everyone)
        if self.is_main and (step < newest or any(probs for _, probs in everyone)):
            print(f"farflung: warning: resuming from step {step}", file=sys.stderr)
        return valid[step]

    def _check_resumable(self, path: Path) -> None:
        """Refuse a config whose model or data-parallel state differs from the
        checkpoint's, naming the keys (the rest, e.g. train.steps, may change)."""
        saved_file = path / "config.toml"
        if not saved_file.is_file():
            return
        saved = config_from_dict(tomllib.loads(saved_file.read_text()))
        differ = [
            f"{section}.{key} = {getattr(getattr(saved, section), key)!r} in the checkpoint, "
            f"{getattr(getattr(self.cfg, section), key)!r} now"
            for section in STATE_KEYS
            for key in vars(getattr(saved, section))
            if key in STATE_KEYS[section]
            and getattr(getattr(saved, section), key) != getattr(getattr(self.cfg, section), key)
        ]
        if differ:
            raise ckpt.CheckpointError(
                f"{path} cannot continue with this config: "
                + "; ".join(differ)
                + f" (resume with the run's own config: {self.out / 'config.toml'})"
            )

    # -- output ------------------------------------------------------------------
    def write_config(self) -> None:
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(config_to_toml(self.cfg))

    def summary(self, steps_this_run: int) -> dict[str, Any]:
        t = self.totals
        summary = {
            "steps": self.step,
            "steps_this_run": steps_this_run,
            "tokens": t["tokens"],
            "final_val_loss": self.last_val,
            "tokens_per_s": t["tokens"] / t["train_s"] if t["train_s"] else 0.0,
            "wall_s": t["elapsed_s"],
            "train_s": t["train_s"],
            "bytes_sent_total": t["bytes_sent"],
            "bytes_recv_total": t["bytes_recv"],
            "bytes_sent_by_kind_total": t.get("bytes_by_kind", {}),
            "bytes_sent_per_step_per_rank": t["bytes_sent"]
            / max(1, self.step)
            / self.info.world_size,
            "algorithm": self.cfg.parallel.algorithm,
            "world_size": self.info.world_size,
            "params": self.params,
            "backend": self.info.backend,
            "network": os.environ.get("FARFLUNG_NETWORK", "unshaped"),
            "precision": self.precision,
            "loss_scale": self.scaler.state_dict() if self.scaler.enabled else None,
            "peak_bytes_per_rank": self.peaks,
        }
        summary.update(self._summary_extra())
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def _summary_extra(self) -> dict[str, Any]:
        return {}

    def _append(self, name: str, line: str) -> None:
        with open(self.out / name, "a") as f:
            f.write(line + "\n")
