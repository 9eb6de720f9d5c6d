"""The stages x dp process mesh: one data-parallel group per stage, one pipeline group
per replica, and this rank's stage of the model.

``torch.distributed.new_group`` must be entered by every rank in the same order, so
:meth:`Mesh.create` builds every stage's and every pipeline's group on every rank and
keeps its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from farflung.comm import new_group
from farflung.model import GPT, GPTStage, balanced_layers
from farflung.parallel.pipeline.placement import StageMap


@dataclass
class Mesh:
    """Where this rank stands in the grid, and the groups it talks in."""

    stage_map: StageMap
    rank: int
    dp_group: Any
    """This stage's replicas (every data-parallel algorithm runs on it)."""
    pipe_group: Any
    """This replica's stages, in stage order (the global gradient norm for clipping)."""

    @classmethod
    def create(cls, stage_map: StageMap, rank: int) -> Mesh:
        dp = [new_group(stage_map.stage_ranks(s)) for s in range(stage_map.stages)]
        pipes = [new_group(stage_map.pipeline_ranks(r)) for r in range(stage_map.dp)]
        return cls(stage_map, rank, dp[stage_map.stage_of(rank)], pipes[stage_map.replica_of(rank)])

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
