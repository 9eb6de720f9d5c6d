"""The GPT network (GPT-2 or Llama layout), its split into pipeline stages, and Hugging
Face checkpoints in and out (no torch.distributed here)."""

from farflung.model.gpt import (
    GPT,
    IGNORE,
    Block,
    CausalSelfAttention,
    GPTStage,
    balanced_layers,
    block_flops,
    block_params,
    even_boundaries,
    generate,
    head_flops,
    max_positions,
    param_groups,
    split_stages,
    token_loss,
)

__all__ = [
    "GPT",
    "IGNORE",
    "Block",
    "CausalSelfAttention",
    "GPTStage",
    "balanced_layers",
    "block_flops",
    "block_params",
    "even_boundaries",
    "generate",
    "head_flops",
    "max_positions",
    "param_groups",
    "split_stages",
    "token_loss",
]
