"""The stages x dp process mesh: one data-parallel group per stage, one pipeline group
per replica, and this rank's stage of the model.

``torch.distributed.new_group`` must be entered by every rank in the same order, so
:meth:`Mesh.create` builds every stage's and every pipeline's group on every rank and
keeps its own.

Each boundary between neighbouring stages of a pipeline gets two groups of its own,
one per direction. On NCCL the point-to-point operations between two ranks run in
issue order on one stream per group: with activations and gradients on the same one,
a send waiting for its peer's receive can sit in front of the receive the peer is
waiting on (stage 0 posts "receive gradient 0" before "send activation 1"; stage 1
sends gradient 0 only after receiving activation 1: neither moves). One stream per
direction keeps each in micro-batch order on both sides, which the schedules
guarantee, so nothing waits on a message queued behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from farflung.comm import new_group
from farflung.model import GPT, GPTStage, balanced_layers
from farflung.plan.placement import StageMap


@dataclass
class Mesh:
    """Where this rank stands in the grid, and the groups it talks in."""

    stage_map: StageMap
    rank: int
    dp_group: Any
    """This stage's replicas (every data-parallel algorithm runs on it)."""
    pipe_group: Any
    """This replica's stages, in stage order (the global gradient norm for clipping)."""
    links: dict[tuple[int, str], Any]
    """(offset -1 or +1, "fwd" or "bwd") -> the group of that boundary and direction."""

    @classmethod
    def create(cls, stage_map: StageMap, rank: int) -> Mesh:
        dp = [new_group(stage_map.stage_ranks(s)) for s in range(stage_map.stages)]
        pipes = [new_group(stage_map.pipeline_ranks(r)) for r in range(stage_map.dp)]
        stage, replica = stage_map.stage_of(rank), stage_map.replica_of(rank)
        links = {}
        for r in range(stage_map.dp):
            ranks = stage_map.pipeline_ranks(r)
            for s in range(stage_map.stages - 1):
                pair = {d: new_group([ranks[s], ranks[s + 1]]) for d in ("fwd", "bwd")}
                if r == replica and s in (stage - 1, stage):
                    offset = +1 if s == stage else -1
                    links.update({(offset, d): g for d, g in pair.items()})
        return cls(stage_map, rank, dp[stage], pipes[replica], links)

    @property
    def stage(self) -> int:
        return self.stage_map.stage_of(self.rank)

    @property
    def replica(self) -> int:
        return self.stage_map.replica_of(self.rank)

    @property
    def stages(self) -> int:
        return self.stage_map.stages

    def neighbour(self, offset: int) -> int | None:
        """Global rank of the stage ``offset`` away in this replica's pipeline."""
        s = self.stage + offset
        if not 0 <= s < self.stages:
            return None
        return self.stage_map.rank_of(s, self.replica)


def stage_layers(model: GPT, stages: int, layers: list[int]) -> list[tuple[int, int]]:
    """[start, end) block ranges per stage: ``layers`` when given, else balanced by
    compute cost (:func:`~farflung.model.balanced_layers`)."""
    counts = layers or balanced_layers(model.cfg, stages)
    edges = [0]
    for c in counts:
        edges.append(edges[-1] + c)
    return list(zip(edges, edges[1:], strict=False))


def build_stage(model: GPT, stages: int, layers: list[int], stage: int) -> GPTStage:
    """This rank's stage of ``model``; the rest of the model is left to be freed."""
    start, end = stage_layers(model, stages, layers)[stage]
    return GPTStage(model, start, end)
