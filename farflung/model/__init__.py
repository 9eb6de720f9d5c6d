"""The GPT network and its split into pipeline stages (no torch.distributed here)."""

from farflung.model.gpt import (
    GPT,
    Block,
    CausalSelfAttention,
    GPTStage,
    balanced_layers,
    block_flops,
    even_boundaries,
    generate,
    head_flops,
    param_groups,
    split_stages,
)

__all__ = [
    "GPT",
    "Block",
    "CausalSelfAttention",
    "GPTStage",
    "balanced_layers",
    "block_flops",
    "even_boundaries",
    "generate",
    "head_flops",
    "param_groups",
    "split_stages",
]
