"""Pipeline parallelism: the model's blocks split into stages on different workers,
each stage replicated over ``dp`` data-parallel workers (world = stages x dp)."""

from farflung.plan.placement import Slot, StageMap

__all__ = ["Slot", "StageMap"]
