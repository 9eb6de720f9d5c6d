"""The training loop of one pipeline stage (``pipeline.stages > 1``).

A :class:`PipelineWorker` is a :class:`~farflung.train.loop.Worker` whose module is
one stage of the GPT: its step runs the stage's schedule (:mod:`farflung.parallel.
pipeline.runtime`), its data-parallel algorithm syncs over the stage's replicas, and
its checkpoints keep the stage's weights and AQ-SGD buffers per rank.

Every rank builds the whole GPT once from the run's seed, as a single process would,
keeps its stage and lets the rest go: initial weights then equal the single-process
run's exactly (what the exactness tests compare against). With a tied head, the last
stage holds a copy of the token embedding; the two copies' gradients are summed each
step over the first <-> last link (kind ``pp_tied``), so they stay equal under every
exact data-parallel algorithm."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from farflung.comm import Comm, DistInfo
from farflung.compress.activations import ActivationBuffer, BoundaryCodec
from farflung.config import Config
from farflung.data import SampleSet
from farflung.model import GPT
from farflung.parallel.flat import grads_finite
from farflung.parallel.pipeline.mesh import Mesh, build_stage, stage_layers
from farflung.parallel.pipeline.runtime import Boundary, MicroBatch, StageRunner
from farflung.plan.placement import StageMap
from farflung.train import checkpoint as ckpt
from farflung.train.kernels import to_device
from farflung.train.loop import Worker


class PipelineWorker(Worker):
    """One stage of one pipeline replica."""

    def __init__(
        self,
        cfg: Config,
        out: Path,
        info: DistInfo,
        show_progress: bool = True,
        placement: str | None = None,
    ) -> None:
        stages = cfg.pipeline.stages
        self.stage_map = (
            StageMap.load(placement, info.world_size, stages)
            if placement
            else StageMap.default(info.world_size, stages)
        )
        super().__init__(cfg, out, info, show_progress)
        self.runner = self._make_runner()
        self.peak_live = 0

    # -- building --------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        self.mesh = Mesh.create(self.stage_map, self.info.rank)
        self.pipe_comm = Comm(self.mesh.pipe_group, self.comm.meter)  # clip and verdict
        self.replica, self.dp = self.mesh.replica, self.stage_map.dp
        full = self._new_model()  # the single-process initialisation, then our stage
        self.params = full.num_params()
        p = self.cfg.pipeline
        self.layers = [end - start for start, end in stage_layers(full, p.stages, p.layers)]
        stage = build_stage(full, p.stages, p.layers, self.mesh.stage)
        self.has_loss = stage.is_last
        return stage.to(self.info.device)

    def _dp_comm(self) -> Comm:
        return Comm(self.mesh.dp_group, self.comm.meter)

    def _make_runner(self) -> StageRunner:
        p, m = self.cfg.pipeline, self.mesh
        prev, nxt = m.neighbour(-1), m.neighbour(+1)
        self.buffers: dict[str, ActivationBuffer] = {}
        before = after = None
        if prev is not None:
            before = Boundary(
                m.stage - 1, self._bwd_codec(), self._fwd_codec("from", prev), *self._links(-1)
            )
        if nxt is not None:
            after = Boundary(
                m.stage + 1, self._fwd_codec("to", nxt), self._bwd_codec(), *self._links(+1)
            )
        shape = (self.micro, self.cfg.model.context, self.cfg.model.d_model)
        return StageRunner(
            self.model,
            self.comm,
            m.stage,
            p.stages,
            before,
            after,
            p.schedule,
            shape,
            self.info.device,
            seed=self.cfg.train.seed,
            compute=self.compute,
        )

    def _links(self, offset: int) -> tuple[Comm, Comm]:
        """Comms for activations and for gradients across one boundary."""
        return tuple(Comm(self.mesh.links[(offset, d)], self.comm.meter) for d in ("fwd", "bwd"))

    def _raw_mode(self) -> str:
        """``pipeline.compression = "none"``'s codec: the bytes of the compute dtype
        (fp32, or bf16/fp16 under mixed precision)."""
        return {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}[self.precision]

    def _fwd_codec(self, side: str, peer: int) -> BoundaryCodec:
        p = self.cfg.pipeline
        if p.compression == "none":
            return BoundaryCodec(self._raw_mode())
        if p.compression != "aqsgd":
            return BoundaryCodec(p.compression, bits=p.fwd_bits)
        name = f"rank{self.info.rank}-{side}-rank{peer}"
        path = self.out / "aqsgd" / f"{name}.fp16"
        path.parent.mkdir(parents=True, exist_ok=True)
        c = self.cfg.model
        self.buffers[name] = ActivationBuffer(path, self.n_train, c.context, c.d_model)
        return BoundaryCodec("aqsgd", bits=p.fwd_bits, buffer=self.buffers[name])

    def _bwd_codec(self) -> BoundaryCodec:
        p = self.cfg.pipeline
        if p.compression == "none":
            return BoundaryCodec(self._raw_mode())
        if p.compression == "fp16":
            return BoundaryCodec(p.compression)
        return BoundaryCodec("quantize", bits=p.bwd_bits, rounding=p.bwd_rounding)

    # -- a step ------------------------------------------------------------------------
    def forward_backward(self, ids: np.ndarray, poison: float = 1.0) -> float:
        """The stage's schedule over this replica's share ``ids``."""
        mbs = self._micro_batches(self.train_set, ids)
        weights = self.token_weights([mb.ids for mb in mbs])
        if weights is not None:
            for mb, w in zip(mbs, weights, strict=True):
                mb.scale = mb.share = w
        self.runner.loss_scale = self.scaler.factor
        loss = self.runner.train_step(mbs, self.step, poison=poison)
        self._sum_tied_gradients()
        self.peak_live = max(self.peak_live, self.runner.stats.peak_live)
        return loss

    def _micro_batches(self, samples: SampleSet, ids: np.ndarray) -> list[MicroBatch]:
        """The step's share split into micro-batches: token ids for the first stage,
        targets for the last, sample ids for every stage."""
        first, out = self.mesh.stage == 0, []
        for j in range(0, len(ids), self.micro):
            chunk = ids[j : j + self.micro]
            x, y = samples.batch(chunk) if first or self.has_loss else (None, None)
            x = to_device(x, self.info.device) if first else None
            y = to_device(y, self.info.device) if self.has_loss else None
            out.append(MicroBatch(chunk, x, y))
        return out

    def _tied_peer(self) -> tuple[int, torch.Tensor] | None:
        """The other holder of the tied embedding and our copy, if we hold one."""
        if not self.cfg.model.tie_embeddings:
            return None
        last = self.stage_map.stages - 1
        if self.mesh.stage == 0:
            return self.stage_map.rank_of(last, self.replica), self.model.wte.weight
        if self.mesh.stage == last:
            return self.stage_map.rank_of(0, self.replica), self.model.head.weight
        return None

    def _sum_tied_gradients(self) -> None:
        """Both copies of a tied embedding get the sum of both gradients (a + b on one
        side, b + a on the other: the same bits)."""
        tied = self._tied_peer()
        if tied is None:
            return
        peer, weight = tied
        mine = weight.grad.detach().clone()
        theirs = torch.empty_like(mine)
        self.comm.exchange({peer: mine}, {peer: theirs}, kind="pp_tied")
        weight.grad.add_(theirs)

    def update(self, finite: bool) -> bool:
        """A stage alone may see non-finite numbers (a NaN in its own backward): the
        whole pipeline replica then skips together, so that the stages' later
        collectives (the clipping norm) match and the replica stays one model.

        Under fp16 the verdict has two counts, faults and overflows (non-finite
        gradients from finite losses): an overflow anywhere in the replica makes every
        stage's gradients non-finite, so that each stage's data-parallel sync and the
        loss scale decide as they do for one process (:meth:`Worker.update`)."""
        grads_ok = grads_finite(self.model)
        if self.scaler.may_skip:
            verdict = [float(not finite), float(finite and not grads_ok)]
        else:
            verdict = [float(not (finite and grads_ok))]
        counts = torch.tensor(verdict, device=self.info.device)
        self.pipe_comm.all_reduce(counts, kind="ctrl")
        faults, overflows = (counts.tolist() + [0.0])[:2]
        if overflows and not faults:
            first = next(p.grad for p in self.model.parameters() if p.grad is not None)
            first.view(-1)[0] = float("inf")
        return super().update(faults == 0)

    def _clip(self, max_norm: float) -> None:
        """Clip by the whole model's gradient norm: the stages' squared norms summed
        over this replica's pipeline (a tied copy counted once, on the first stage)."""
        tied = self._tied_peer()
        skip = tied[1] if tied is not None and self.mesh.stage != 0 else None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None and p is not skip]
        sq = torch.zeros(1, dtype=torch.float64, device=self.info.device)
        for g in grads:
            sq += g.detach().double().pow(2).sum()
        self.pipe_comm.all_reduce(sq, kind="ctrl")
        coef = max_norm / (math.sqrt(sq.item()) + 1e-6)
        if coef < 1.0:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)

    # -- evaluation ------------------------------------------------------------------
    def _eval_loss_sum(self, model: torch.nn.Module, ids: np.ndarray) -> float:
        raw = self.cfg.pipeline.compression == "none"
        codec = BoundaryCodec(self._raw_mode() if raw else "fp16")
        mbs = self._micro_batches(self.val_set, ids)
        if self.val_set.has_mask:
            for mb in mbs:
                mb.share = self._eval_weight(mb.ids)
        return self.runner.eval_forward(model, mbs, codec, codec)

    # -- checkpoints -------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        state = super()._rank_state()
        state["model"] = self.model.state_dict()
        state["aqsgd"] = {name: b.state_dict() for name, b in self.buffers.items()}
        if self.replica == 0:  # what the run's model.safetensors is assembled from
            with self.algo.eval_parameters() as model:
                state["stage_weights"] = model.model_state_dict()
        return state

    def _write_model(self, tmp: Path, here: list[int]) -> bool:
        """Assemble the whole model from replica 0 of every stage, when their states
        are on this filesystem (otherwise each node's checkpoint holds its stages'
        states only, and no model.safetensors)."""
        owners = self.stage_map.pipeline_ranks(0)
        if not all(r in here for r in owners):
            return False
        merged: dict[str, torch.Tensor] = {}
        for r in reversed(owners):  # the first stage's token embedding wins a tie
            merged.update(ckpt.load_rank_state(tmp, r, mmap=True)["stage_weights"])
        if self.cfg.model.tie_embeddings:
            merged["head.weight"] = merged["wte.weight"]
        # built on the meta device: no weights allocated beside the merged ones, and no
        # draw from the global generator (the committer's would then differ from the
        # state its checkpoint saved, and a resumed run's from the uninterrupted one)
        with torch.device("meta"):
            model = GPT(self.cfg.model)
        model.load_state_dict(merged, assign=True)
        ckpt.write_model(tmp, model)
        return True

    def _load_model(self, path: Path, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        saved = state.get("aqsgd", {})
        if set(saved) != set(self.buffers):
            raise ckpt.CheckpointError(
                f"{path}: rank {self.info.rank} holds AQ-SGD buffers {sorted(saved)}, "
                f"this run needs {sorted(self.buffers)}"
            )
        for name, buf in self.buffers.items():
            buf.load_state_dict(saved[name])

    # -- output ------------------------------------------------------------------------
    def _summary_extra(self) -> dict[str, Any]:
        p = self.cfg.pipeline
        return {
            "pipeline": {
                "stages": p.stages,
                "dp": self.dp,
                "layers": self.layers,
                "schedule": p.schedule,
                "micro_batches": p.micro_batches,
                "compression": p.compression,
                "fwd_bits": p.fwd_bits,
                "bwd_bits": p.bwd_bits,
                "tie_embeddings": self.cfg.model.tie_embeddings,
                "peak_live_micro_batches": self.peak_live,
            }
        }
