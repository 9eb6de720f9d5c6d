"""The GPT network and its split into pipeline stages (no torch.distributed here)."""

from farflung.model.gpt import (
    GPT,
    Block,
    CausalSelfAttention,
    GPTStage,
    even_boundaries,
    generate,
    param_groups,
    split_stages,
)

__all__ = [
    "GPT",
    "Block",
    "CausalSelfAttention",
    "GPTStage",
    "even_boundaries",
    "generate",
    "param_groups",
    "split_stages",
]
