"""The training loop one worker runs (every rank runs the same code)."""

from __future__ import annotations

import json
import math
import os
import time
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from farflung.comm import Comm, DistInfo
from farflung.config import Config, OptimConfig, check_batch, config_from_dict, config_to_toml
from farflung.data import SampleSet, ShardIndex, TokenStream, batch_ids, rank_slice, val_batch_ids
from farflung.model import GPT, param_groups
from farflung.parallel import make_algorithm
from farflung.train import checkpoint as ckpt
from farflung.train.metrics import StepRecord, gather_step, truncate_jsonl
from farflung.train.progress import Progress

# config keys that shape the saved state: a resume must keep them
STATE_KEYS = {
    "model": ("n_layer", "n_head", "d_model", "context", "vocab_size"),
    "parallel": ("algorithm", "codec", "error_feedback"),
}

FAULT_ENV = "FARFLUNG_FAIL_AT"  # "RANK:STEP": that rank dies at that step (fault-injection tests)


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
        self.local_batch, self.micro, self.accum = check_batch(cfg, info.world_size)
        index = ShardIndex.load(cfg.data.dir)
        self.tokenizer_path = Path(index.dir) / "tokenizer.json"
        vocab = cfg.model.vocab_size or index.vocab_size
        if vocab < index.vocab_size:
            raise ValueError(
                f"model.vocab_size = {vocab} is smaller than the tokenizer's {index.vocab_size}"
            )
        self.cfg = cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab))
        self.train_set = SampleSet(TokenStream(index, "train"), cfg.model.context)
        self.val_set = SampleSet(TokenStream(index, "val"), cfg.model.context)
        torch.manual_seed(cfg.train.seed)
        self.model = GPT(cfg.model).to(info.device)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2)
        )
        self.comm = Comm()
        self.algo = make_algorithm(
            cfg.parallel.algorithm, self.model, self.optimizer, self.comm, cfg.parallel
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
        self.fail_at = _parse_fault(os.environ.get(FAULT_ENV), info.rank)

    # -- the loop ----------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg.train
        steps_before = self.step
        t_start = time.perf_counter() - self.totals["elapsed_s"]
        self.comm.meter.snapshot(reset=True)  # set-up traffic is not a step's
        bar = Progress(cfg.steps, self.step, enabled=self.show_progress)
        try:
            while self.step < cfg.steps:
                rec = self.train_step(t_start)
                bar.update(rec, self.step)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.evaluate()
                if (
                    cfg.checkpoint_every
                    and self.step % cfg.checkpoint_every == 0
                    and self.step < cfg.steps
                ):
                    self.save()
        finally:
            bar.close()
        self.algo.close()
        self.evaluate()
        self.save()
        self.totals["elapsed_s"] = time.perf_counter() - t_start
        return self.summary(self.step - steps_before)

    def train_step(self, t_start: float) -> StepRecord:
        if self.fail_at is not None and self.step == self.fail_at:
            os._exit(17)
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.cfg.train.steps, self.cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ids = rank_slice(
            batch_ids(
                self.step, self.cfg.train.batch_size, len(self.train_set), self.cfg.train.seed
            ),
            self.info.rank,
            self.info.world_size,
        )
        loss_sum = 0.0
        for i in range(self.accum):
            x, y = self.train_set.batch(ids[i * self.micro : (i + 1) * self.micro])
            _, loss = self.model(x.to(self.info.device), y.to(self.info.device))
            (loss / self.accum).backward()
            loss_sum += loss.item()
        self.algo.sync_gradients()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.algo.after_step(self.step)
        wall = time.perf_counter() - t0
        snap = self.comm.meter.snapshot(reset=True)
        agg = gather_step(self.comm, loss_sum / self.accum, wall, wall - snap.seconds, snap)
        tokens = self.cfg.train.batch_size * self.cfg.model.context
        self.totals["tokens"] += tokens
        self.totals["train_s"] += agg["wall_s"]
        self.totals["bytes_sent"] += agg["bytes_sent"]
        self.totals["bytes_recv"] += agg["bytes_recv"]
        rec = StepRecord(
            step=self.step,
            lr=lr,
            tokens=self.totals["tokens"],
            elapsed_s=time.perf_counter() - t_start,
            **agg,
        )
        if self.is_main:
            self._append("metrics.jsonl", rec.to_json())
        return rec

    @torch.no_grad()
    def evaluate(self) -> float:
        b = self.cfg.train.batch_size
        total = torch.zeros(1, dtype=torch.float64)
        with self.algo.eval_parameters() as model:
            model.eval()
            for i in range(self.cfg.train.eval_batches):
                ids = rank_slice(
                    val_batch_ids(i, b, len(self.val_set)), self.info.rank, self.info.world_size
                )
                for j in range(0, len(ids), self.micro):
                    x, y = self.val_set.batch(ids[j : j + self.micro])
                    _, loss = model(x.to(self.info.device), y.to(self.info.device))
                    total += loss.item() * len(x)
            model.train()
        self.comm.all_reduce(total, kind="ctrl")
        self.last_val = total.item() / (b * self.cfg.train.eval_batches)
        if self.is_main:
            self._append(
                "eval.jsonl",
                json.dumps(
                    {"step": self.step, "val_loss": self.last_val, "tokens": self.totals["tokens"]}
                ),
            )
        return self.last_val

    # -- checkpoints -------------------------------------------------------------
    def save(self) -> None:
        root = self.out / "checkpoints"
        tmp = ckpt.step_dir(root, self.step).with_suffix(".tmp")
        if self.is_main:
            ckpt.begin(root, self.step)
            with self.algo.eval_parameters() as model:
                ckpt.write_model(tmp, model)
            (tmp / "config.toml").write_text(config_to_toml(self.cfg))
            (tmp / "tokenizer.json").write_bytes(self.tokenizer_path.read_bytes())
        self.comm.barrier()
        ckpt.write_rank_state(tmp, self.info.rank, self._rank_state())
        self.comm.barrier()
        if self.is_main:
            extra = {"algorithm": self.cfg.parallel.algorithm, "val_loss": self.last_val}
            ckpt.commit(
                tmp, self.step, self.info.world_size, extra, self.cfg.train.keep_checkpoints
            )
        self.comm.barrier()

    def _rank_state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "algorithm": self.algo.state_dict(),
            "rng": torch.get_rng_state(),
            "totals": dict(self.totals),
        }
        if not self.algo.replicas_identical:
            state["model"] = self.model.state_dict()
        return state

    def resume(self) -> bool:
        """Load the newest checkpoint of this run; False when there is none."""
        path = ckpt.latest_checkpoint(self.out / "checkpoints")
        if path is None:
            return False
        manifest = ckpt.read_manifest(path)
        if manifest["world_size"] != self.info.world_size:
            raise ckpt.CheckpointError(
                f"{path} was written by {manifest['world_size']} workers; resume with "
                f"--workers {manifest['world_size']}"
            )
        self._check_resumable(path)
        ckpt.load_model_weights(path, self.model)
        state = ckpt.load_rank_state(path, self.info.rank)
        if "model" in state:
            self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.algo.load_state_dict(state["algorithm"])
        torch.set_rng_state(state["rng"])
        self.step = state["step"]
        self.totals.update(state["totals"])
        self.last_val = manifest.get("val_loss")
        if self.is_main:
            truncate_jsonl(self.out / "metrics.jsonl", self.step)
            truncate_jsonl(self.out / "eval.jsonl", self.step)
        self.comm.barrier()
        return True

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
            for section in ("model", "parallel")
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
            "bytes_sent_per_step_per_rank": t["bytes_sent"]
            / max(1, self.step)
            / self.info.world_size,
            "algorithm": self.cfg.parallel.algorithm,
            "world_size": self.info.world_size,
            "params": self.model.num_params(),
            "backend": self.info.backend,
            "network": os.environ.get("FARFLUNG_NETWORK", "unshaped"),
        }
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def _append(self, name: str, line: str) -> None:
        with open(self.out / name, "a") as f:
            f.write(line + "\n")


def _parse_fault(spec: str | None, rank: int) -> int | None:
    if not spec:
        return None
    r, s = spec.split(":")
    return int(s) if int(r) == rank else None
