"""A decoder-only GPT and its split into pipeline stages.

``model.arch = "gpt2"`` is the GPT-2 shape: token and learned position embeddings, a
stack of pre-LayerNorm blocks (causal self-attention, then an MLP, each added to the
residual stream), a final LayerNorm and a language-model head whose weight is tied to
the token embedding. ``"llama"`` swaps in the blocks of :mod:`farflung.model.llama`
(rotary positions, so no position table), RMSNorm and, usually, an untied head.

:class:`GPTStage` cuts the block stack into contiguous layer ranges for pipeline
parallelism: stage 0 owns the embeddings, the last stage owns ``ln_f``, the head and the
loss, so only hidden states (and the targets, to the last stage) cross a link.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from farflung.config import ModelConfig
from farflung.data.loader import IGNORE_INDEX
from farflung.model.llama import LlamaBlock, RMSNorm, Rotary, ffn_width, kv_heads

INIT_STD = 0.02
"""Standard deviation of the GPT-2 weight initialisation."""


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head != 0:
            raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_head ({cfg.n_head})")
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over ``x`` of shape [B, T, d]; position t sees positions <= t only."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # [B, T, d] -> [B, H, T, d/H], the layout scaled_dot_product_attention expects.
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: d -> ffn width -> GELU -> d (GPT-2's ``gelu_new`` is
    the tanh approximation, ``activation = "gelu_tanh"``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = ffn_width(cfg)
        self.fc = nn.Linear(cfg.d_model, hidden)
        self.proj = nn.Linear(hidden, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to every position of ``x`` independently."""
        return self.drop(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """One pre-LayerNorm transformer block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        """Map hidden states [B, T, d] to hidden states of the same shape."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# Targets the loss leaves out (-100, cross_entropy's ignore_index): the data layer
# marks prompt tokens of fine-tuning data with it (docs/data.md).
IGNORE = IGNORE_INDEX


def max_positions(cfg: ModelConfig) -> int:
    """The longest sequence the model takes: ``max_positions``, or ``context``."""
    return cfg.max_positions or cfg.context


def _check_length(t: int, limit: int) -> None:
    if t > limit:
        raise ValueError(f"sequence length {t} exceeds the model's context of {limit} positions")


def run_blocks(blocks: nn.ModuleList, x: Tensor, every: int, first: int = 0) -> Tensor:
    """``x`` through ``blocks`` (block ``first + i`` of the model is ``blocks[i]``);
    with ``every`` > 0, blocks whose index is a multiple of it keep no activations for
    the backward and are run again there (torch's non-reentrant checkpoint, which
    replays the dropout masks). Without gradients nothing is recomputed."""
    recompute = every > 0 and torch.is_grad_enabled()
    for i, block in enumerate(blocks, first):
        if recompute and i % every == 0:
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


def _embed(
    wte: nn.Embedding, wpe: nn.Embedding | None, drop: nn.Module, idx: Tensor, limit: int
) -> Tensor:
    """Token ids [B, T] -> dropped-out token (+ position) embeddings [B, T, d]."""
    if idx.dim() != 2:
        raise ValueError(f"expected token ids of shape [B, T], got {tuple(idx.shape)}")
    _check_length(idx.shape[1], limit)
    x = wte(idx)
    if wpe is not None:  # llama encodes positions inside attention instead
        x = x + wpe(torch.arange(idx.shape[1], device=idx.device))
    return drop(x)


def token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the targets that count (not :data:`IGNORE`); 0, not
    NaN, when none does, so a micro-batch of prompt tokens only adds no gradient."""
    flat = targets.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, reduction="sum")
    return total / _counted(flat)


def _counted(flat: Tensor) -> Tensor:
    """How many targets count (not :data:`IGNORE`), at least 1."""
    return (flat != IGNORE).sum().clamp(min=1)


def _head(
    ln_f: nn.Module, head: nn.Linear, x: Tensor, targets: Tensor | None, chunk: int = 0
) -> tuple[Tensor | None, Tensor | None]:
    """Hidden states -> (logits [B, T, V], mean cross-entropy or None). With ``chunk``
    > 0, targets and gradients on, the loss is summed over ``chunk`` tokens at a time,
    each chunk's logits rebuilt in the backward, and no logits are returned (None)."""
    if targets is None:
        return head(ln_f(x)), None
    if chunk <= 0 or not torch.is_grad_enabled():
        logits = head(ln_f(x))
        return logits, token_loss(logits, targets)
    flat, wanted = x.reshape(-1, x.shape[-1]), targets.reshape(-1)

    def chunk_sum(h: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(head(ln_f(h)), t, reduction="sum")

    total = sum(
        checkpoint(chunk_sum, flat[i : i + chunk], wanted[i : i + chunk], use_reentrant=False)
        for i in range(0, flat.shape[0], chunk)
    )
    return None, total / _counted(wanted)


class GPT(nn.Module):
    """Decoder-only transformer language model.

    Attributes: ``wte`` (token embedding), ``wpe`` (position embedding; None for
    llama), ``drop``, ``blocks`` (an ``nn.ModuleList`` of :class:`Block` or
    :class:`~farflung.model.llama.LlamaBlock`), ``ln_f`` and ``head``, whose weight
    *is* ``wte.weight`` when ``cfg.tie_embeddings`` (GPT-2), its own otherwise.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(
                "ModelConfig.vocab_size must be > 0 to build a GPT "
                "(0 means 'take it from the tokenizer'; resolve it first)"
            )
        self.cfg = cfg
        self.max_positions = max_positions(cfg)
        every = cfg.recompute_every()
        if every is None:  # a config validated by farflung.config never gets here
            raise ValueError(
                f"ModelConfig.activation_checkpointing = {cfg.activation_checkpointing!r}; "
                "allowed: 'none', 'blocks' or 'every:K' (K >= 1)"
            )
        self.recompute_every = every
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.arch == "llama":
            self.wpe = None
            rotary = Rotary(cfg.d_model // cfg.n_head, cfg.rope_theta)
            self.blocks = nn.ModuleList(LlamaBlock(cfg, rotary) for _ in range(cfg.n_layer))
            self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        else:
            self.wpe = nn.Embedding(self.max_positions, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            # A tied head's weight is wte's; initialising it twice would waste RNG draws.
            if name == "head" and self.cfg.tie_embeddings:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Each block adds two projections to the residual stream; scaling them keeps the
        # stream's variance independent of depth (GPT-2).
        resid_std = INIT_STD / math.sqrt(2 * self.cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=resid_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=resid_std)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Token ids [B, T] -> (logits [B, T, vocab], mean cross-entropy or None); the
        logits are None where ``loss_chunk`` computed the loss without them.

        Raises ``ValueError`` when T exceeds the model's positions (:func:`max_positions`).
        """
        x = _embed(self.wte, self.wpe, self.drop, idx, self.max_positions)
        x = run_blocks(self.blocks, x, self.recompute_every)
        return _head(self.ln_f, self.head, x, targets, self.cfg.loss_chunk)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied head weight counts once).

        With ``exclude_embeddings`` the token and position embeddings are left out, the
        "non-embedding" count used by scaling laws.
        """
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.wte.weight.numel()
            if self.wpe is not None:
                total -= self.wpe.weight.numel()
            if not self.cfg.tie_embeddings:
                total -= self.head.weight.numel()
        return total


class GPTStage(nn.Module):
    """Layers ``[start, end)`` of a :class:`GPT`, runnable as one pipeline stage.

    The stage *references* the model's submodules (no copies), so training a stage
    trains the model. Stage 0 also holds ``wte``/``wpe``/``drop`` and takes token ids;
    other stages take hidden states [B, T, d]. The last stage (``end == n_layer``) also
    holds ``ln_f`` and ``head`` and returns ``(logits, loss)``; others return hidden
    states.

    Weight tying: ``head.weight`` is ``wte.weight``. In one process the first and last
    stage share that Parameter and its gradient sums both uses. A standalone last stage
    in another process needs its own copy of the embedding weight for its head (sent
    from stage 0 or loaded from a checkpoint), and keeping the two copies tied means
    summing their gradients between the first and last stage each step (or untying
    them on purpose).
    """

    def __init__(self, model: GPT, start: int, end: int) -> None:
        super().__init__()
        n_layer = len(model.blocks)
        if not 0 <= start < end <= n_layer:
            raise ValueError(
                f"stage layers [{start}, {end}) must satisfy 0 <= start < end <= {n_layer}"
            )
        self.start = start
        self.end = end
        self.n_layer = n_layer
        self.d_model = model.cfg.d_model
        self.max_positions = model.max_positions
        self.blocks = nn.ModuleList(model.blocks[start:end])
        self.recompute_every = model.recompute_every
        self.loss_chunk = model.cfg.loss_chunk
        first, last = start == 0, end == n_layer
        self.wte = model.wte if first else None
        self.wpe = model.wpe if first else None
        self.drop = model.drop if first else None
        self.ln_f = model.ln_f if last else None
        self.head = model.head if last else None

    @property
    def is_first(self) -> bool:
        """Whether this stage owns the embeddings and takes token ids."""
        return self.start == 0

    @property
    def is_last(self) -> bool:
        """Whether this stage owns ``ln_f`` and the head and computes the loss."""
        return self.end == self.n_layer

    def forward(
        self, x: Tensor, targets: Tensor | None = None
    ) -> Tensor | tuple[Tensor | None, Tensor | None]:
        """Run the stage.

        ``x`` is token ids [B, T] on the first stage, hidden states [B, T, d] elsewhere.
        Returns ``(logits, loss)`` on the last stage, hidden states [B, T, d] otherwise.
        """
        if self.is_first:
            x = _embed(self.wte, self.wpe, self.drop, x, self.max_positions)
        else:
            if x.dim() != 3 or x.shape[-1] != self.d_model:
                raise ValueError(
                    f"stage {self.start}-{self.end} expects hidden states [B, T, "
                    f"{self.d_model}], got {tuple(x.shape)}"
                )
            _check_length(x.shape[1], self.max_positions)
        if targets is not None and not self.is_last:
            raise ValueError("only the last stage takes targets")
        x = run_blocks(self.blocks, x, self.recompute_every, first=self.start)
        if self.is_last:
            return _head(self.ln_f, self.head, x, targets, self.loss_chunk)
        return x

    def extra_repr(self) -> str:
        return f"layers=[{self.start}, {self.end}), first={self.is_first}, last={self.is_last}"

    def model_state_dict(self) -> dict[str, Tensor]:
        """This stage's tensors under the whole :class:`GPT`'s names (block ``i`` of the
        stage is block ``start + i`` of the model), detached copies."""
        out = {}
        for name, t in self.state_dict().items():
            if name.startswith("blocks."):
                i, rest = name[len("blocks.") :].split(".", 1)
                name = f"blocks.{self.start + int(i)}.{rest}"
            out[name] = t.detach().clone()
        return out


def split_stages(model: GPT, boundaries: Sequence[int]) -> list[GPTStage]:
    """Cut ``model`` into ``len(boundaries) + 1`` stages sharing its modules.

    ``boundaries`` are the layer indices where stages after the first start, strictly
    increasing within ``(0, n_layer)``: with 4 layers, ``[2]`` gives [0, 2) and [2, 4).
    """
    n_layer = len(model.blocks)
    cuts = [int(b) for b in boundaries]
    if any(b <= 0 or b >= n_layer for b in cuts) or any(
        a >= b for a, b in zip(cuts, cuts[1:], strict=False)
    ):
        raise ValueError(
            f"boundaries {list(boundaries)} must be strictly increasing within (0, {n_layer})"
        )
    edges = [0, *cuts, n_layer]
    return [GPTStage(model, a, b) for a, b in zip(edges, edges[1:], strict=False)]


def even_boundaries(n_layer: int, n_stages: int) -> list[int]:
    """Boundaries that give ``n_stages`` stages with layer counts differing by at most 1.

    Earlier stages take the extra layers when ``n_layer`` does not divide evenly.
    """
    if not 1 <= n_stages <= n_layer:
        raise ValueError(f"n_stages must be in [1, n_layer={n_layer}], got {n_stages}")
    per, extra = divmod(n_layer, n_stages)
    cuts, at = [], 0
    for s in range(n_stages - 1):
        at += per + (1 if s < extra else 0)
        cuts.append(at)
    return cuts


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay matrices and embeddings, not biases or norms.

    Parameters with two or more dimensions decay; the rest do not. Each parameter
    appears exactly once (shared/tied ones too). Works on a :class:`GPT` or a
    :class:`GPTStage`.
    """
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() already yields a shared tensor once
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _sample_next(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """Last-position logits [B, V] -> next token ids [B, 1]."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Extend token ids ``idx`` [B, T] by ``max_new_tokens`` sampled tokens.

    Only the last ``max_positions`` tokens condition each step. ``temperature == 0`` picks the
    most likely token (greedy); ``top_k`` restricts sampling to the k likeliest tokens.
    The model runs in eval mode (no dropout) and is put back in its previous mode.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    was_training = model.training
    model.eval()
    try:
        context = model.max_positions
        for _ in range(max_new_tokens):
            window = idx[:, -context:]
            # Only the last position's logits matter: skip the head on the rest.
            x = _embed(model.wte, model.wpe, model.drop, window, context)
            for block in model.blocks:
                x = block(x)
            logits, _ = _head(model.ln_f, model.head, x[:, -1:, :], None)
            idx = torch.cat([idx, _sample_next(logits[:, -1, :], temperature, top_k, generator)], 1)
    finally:
        model.train(was_training)
    return idx


def _block_matrix_params(cfg: ModelConfig) -> int:
    """Weights of one block's matrices: q/k/v/output projections and the MLP."""
    d, f = cfg.d_model, ffn_width(cfg)
    kv = kv_heads(cfg) * (d // cfg.n_head)
    mlp = 3 * d * f if cfg.arch == "llama" else 2 * d * f
    return 2 * d * d + 2 * d * kv + mlp


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one block: its matrices plus norms (and, for gpt2, biases)."""
    d, f = cfg.d_model, ffn_width(cfg)
    if cfg.arch == "llama":
        return _block_matrix_params(cfg) + 2 * d
    return _block_matrix_params(cfg) + 4 * d + 3 * d + d + f + d


def block_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs of one block per token: the projections and the MLP
    (2 x multiply-adds of their weights; 2 x (4 + 2 mlp_ratio) d^2 for gpt2) plus
    attention's scores and weighted sum over the context (2 x 2 T d)."""
    return 2.0 * _block_matrix_params(cfg) + 4.0 * cfg.context * cfg.d_model


def head_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs of the language-model head per token (d x vocab multiply-adds)."""
    return 2.0 * cfg.d_model * cfg.vocab_size


def balanced_layers(cfg: ModelConfig, stages: int) -> list[int]:
    """Blocks per stage that minimise the most expensive stage, the head counted on the
    last stage (the embedding lookup costs next to nothing). Ties go to the split whose
    earlier stages hold more blocks, as :func:`even_boundaries` does."""
    n, blk, head = cfg.n_layer, block_flops(cfg), head_flops(cfg)
    if not 1 <= stages <= n:
        raise ValueError(f"stages must be in [1, n_layer={n}], got {stages}")

    @functools.cache
    def best(start: int, k: int) -> tuple[float, tuple[int, ...]]:
        """Cheapest split of blocks [start, n) into k stages (the last holds the head)."""
        if k == 1:
            return (n - start) * blk + head, (n - start,)
        choice: tuple[float, tuple[int, ...]] | None = None
        for c in range(n - start - k + 1, 0, -1):
            rest_cost, rest = best(start + c, k - 1)
            cost = max(c * blk, rest_cost)
            if choice is None or cost < choice[0] * (1 - 1e-9):
                choice = (cost, (c, *rest))
        return choice

    return list(best(0, stages)[1])
