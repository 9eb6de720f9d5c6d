"""The Llama-family block: rotary positions, RMSNorm, SwiGLU and grouped-query attention.

Module names follow :mod:`farflung.model.gpt` (``ln_1``, ``attn``, ``ln_2``, ``mlp``,
and ``proj`` for the two projections that write into the residual stream), so that
initialisation, pipeline stages and parameter groups treat both layouts alike. The
maths follows Hugging Face's ``LlamaForCausalLM`` (non-interleaved "rotate half"
rotary embedding; RMSNorm in fp32), which the import tests check to 1e-5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from farflung.config import ModelConfig


def kv_heads(cfg: ModelConfig) -> int:
    """Key/value heads: ``n_kv_head``, or ``n_head`` when that is 0."""
    return cfg.n_kv_head or cfg.n_head


def ffn_width(cfg: ModelConfig) -> int:
    """Hidden width of the MLP: ``ffn_hidden``, or ``mlp_ratio * d_model``."""
    return cfg.ffn_hidden or cfg.mlp_ratio * cfg.d_model


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 whatever the input dtype."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dimension of ``x``."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rotary(nn.Module):
    """Cosines and sines of the rotary embedding for positions 0..T-1, shared by every
    attention layer of a model and cached for the last length and device seen."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)
        self._cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def forward(self, t: int) -> tuple[Tensor, Tensor]:
        """(cos, sin), each [T, head_dim]."""
        c = self._cache
        if c is None or c[0] != t or c[1] != self.inv_freq.device:
            pos = torch.arange(t, device=self.inv_freq.device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            c = self._cache = (t, self.inv_freq.device, emb.cos(), emb.sin())
        return c[2], c[3]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + hd/2) of ``x`` [B, H, T, hd] by the position angles."""
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + turned * sin.to(x.dtype)


class LlamaAttention(nn.Module):
    """Causal self-attention with rotary positions and ``n_kv_head`` key/value heads
    shared by groups of query heads; separate q/k/v/o projections without biases."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_head ({cfg.n_head})")
        self.n_head, self.n_kv = cfg.n_head, kv_heads(cfg)
        if self.n_head % self.n_kv:
            raise ValueError(f"n_kv_head ({self.n_kv}) must divide n_head ({self.n_head})")
        self.head_dim = cfg.d_model // cfg.n_head
        self.dropout = cfg.dropout
        kv = self.n_kv * self.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k = nn.Linear(cfg.d_model, kv, bias=False)
        self.v = nn.Linear(cfg.d_model, kv, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.rotary = rotary

    def forward(self, x: Tensor) -> Tensor:
        """Attend over ``x`` [B, T, d]; position t sees positions <= t only."""
        b, t, d = x.shape
        hd = self.head_dim
        q = self.q(x).view(b, t, self.n_head, hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.n_kv, hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_kv, hd).transpose(1, 2)
        cos, sin = self.rotary(t)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
            enable_gqa=self.n_kv != self.n_head,
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class SwiGLU(nn.Module):
    """proj(silu(gate(x)) * up(x)), without biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = ffn_width(cfg)
        self.gate = nn.Linear(cfg.d_model, hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the gated MLP to every position of ``x`` independently."""
        return self.drop(self.proj(F.silu(self.gate(x)) * self.up(x)))


class LlamaBlock(nn.Module):
    """One pre-RMSNorm Llama block."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = LlamaAttention(cfg, rotary)
        self.ln_2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor) -> Tensor:
        """Map hidden states [B, T, d] to hidden states of the same shape."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))
