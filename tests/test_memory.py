"""The memory model (farflung/plan/memory.py) against what torch really keeps: autograd's
saved tensors for the activations, the tensors a real data-parallel algorithm holds for
its state; and the planner refusing a layout that does not fit."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch
from distributed import run_distributed

from farflung.comm import Comm
from farflung.config import Config, ModelConfig, ParallelConfig, PipelineConfig, TrainConfig
from farflung.model import GPT, param_groups
from farflung.model.gpt import _head, run_blocks
from farflung.parallel import make_algorithm
from farflung.plan.memory import (
    algorithm_bytes,
    block_saved_bytes,
    head_saved_per_token,
    layout_memory,
)

B, T = 2, 24  # B x T = 48: no weight matrix has a side of 48, so casts are told apart


def _saved(fn, model: torch.nn.Module, low: bool) -> tuple[int, int]:
    """(activation bytes, weight-cast bytes) autograd saves while ``fn()`` runs: every
    saved storage once, the parameters themselves left out; a saved low-precision matrix
    of a weight's size whose first side is not the token count is autocast's copy."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes = {p.numel() for p in model.parameters() if p.dim() == 2}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            cast = (
                t.dtype == torch.bfloat16
                and t.dim() == 2
                and t.shape[0] != B * T
                and t.numel() in sizes
            )
            seen[s.data_ptr()] = (s.nbytes(), cast)
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if low else contextlib.nullcontext()
    with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    acts = sum(n for n, cast in seen.values() if not cast)
    return acts, sum(n for n, cast in seen.values() if cast)


SHAPES = {
    "gpt2": {"arch": "gpt2"},
    "llama": {"arch": "llama", "ffn_hidden": 384},
    "llama-gqa": {"arch": "llama", "n_kv_head": 2, "ffn_hidden": 320},
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_block_activations_match_autograd(shape: str, precision: str) -> None:
    cfg = ModelConfig(n_layer=1, d_model=128, n_head=8, context=T, vocab_size=100, **SHAPES[shape])
    model = GPT(cfg)
    x = torch.randn(B, T, cfg.d_model, requires_grad=True)
    low = precision == "bf16"
    acts, casts = _saved(lambda: model.blocks[0](x), model, low)
    assert acts == block_saved_bytes(cfg, 2 if low else 4, B, T)
    matrices = sum(p.numel() for p in model.blocks[0].parameters() if p.dim() == 2)
    assert casts == (2 * matrices if low else 0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_head_saved_matches_autograd(arch: str, precision: str) -> None:
    cfg = ModelConfig(arch=arch, n_layer=1, d_model=128, n_head=8, context=T, vocab_size=300)
    model = GPT(cfg)
    x = torch.randn(B, T, cfg.d_model, requires_grad=True)
    targets = torch.randint(0, cfg.vocab_size, (B, T))
    low = precision == "bf16"
    acts, _ = _saved(lambda: _head(model.ln_f, model.head, x, targets), model, low)
    # two scalars (the loss's count and sum) besides the per-token tensors
    assert acts - 12 == B * T * head_saved_per_token(cfg, 2 if low else 4)


def test_a_recomputed_block_keeps_only_its_input() -> None:
    cfg = ModelConfig(arch="llama", n_layer=3, d_model=128, n_head=8, context=T, vocab_size=100)
    model = GPT(cfg)
    x = torch.randn(B, T, cfg.d_model, requires_grad=True)
    acts, _ = _saved(lambda: run_blocks(model.blocks, x, every=1), model, False)
    assert acts == 3 * B * T * cfg.d_model * 4  # the fp32 residual entering each block
    kept, _ = _saved(lambda: run_blocks(model.blocks, x, every=2), model, False)
    full = block_saved_bytes(cfg, 4, B, T)  # block 1 keeps everything, 0 and 2 inputs
    assert kept == full + 2 * B * T * cfg.d_model * 4


def _tensors(obj, skip: set[int], seen: set[int], depth: int = 0) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj``'s attributes
    (containers, farflung objects, optimizers), the ``skip`` storages left out."""
    if depth > 6 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in skip or ptr == 0:
            return 0
        skip.add(ptr)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif isinstance(obj, torch.optim.Optimizer):
        items = [obj.state]
    elif type(obj).__module__.startswith("farflung") and hasattr(obj, "__dict__"):
        items = [v for k, v in vars(obj).items() if k not in ("model", "optimizer", "params")]
    else:
        return 0
    return sum(_tensors(v, skip, seen, depth + 1) for v in items)


def _state_of(rank: int, world: int, name: str, extra: dict) -> tuple[int, int, int]:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=64, context=16, vocab_size=64)
    model = GPT(cfg)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3)
    pcfg = ParallelConfig(algorithm=name, **extra)
    algo = make_algorithm(name, model, opt, Comm(), pcfg)
    algo.setup()
    g = torch.Generator().manual_seed(rank)
    for step in range(1, 4):
        x = torch.randint(0, cfg.vocab_size, (4, 17), generator=g)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        algo.sync_gradients()
        opt.step()
        opt.zero_grad()
        algo.after_step(step)
    if hasattr(algo, "quiesce"):
        algo.quiesce()
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = _tensors(algo, skip, set())  # fills skip with the algorithm's own storages
    copies = _tensors(algo.state_dict(), skip, set())  # what a checkpoint adds
    algo.close()
    return held, copies, sum(p.numel() for p in model.parameters())


ALGORITHMS = {
    "allreduce": {},
    "compressed": {"codec": "quantize:bits=4"},
    "cocktail": {"warmup_steps": 0},
    "diloco": {"local_steps": 2, "codec": "quantize:bits=4"},
    "diloco-identity": {"local_steps": 2},
    "gossip": {"gossip_every": 1},
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_algorithm_state_matches_the_model(name: str) -> None:
    algorithm = name.split("-")[0]
    results = run_distributed(_state_of, 2, algorithm, ALGORITHMS[name])
    model = algorithm_bytes(ParallelConfig(algorithm=algorithm, **ALGORITHMS[name]), 2)
    for held, copies, numel in results:
        assert held == pytest.approx(model.persistent * numel, rel=0.01, abs=4096), name
        assert copies == pytest.approx(model.checkpoint * numel, rel=0.01, abs=4096), name


def _cfg(**train) -> Config:
    model = ModelConfig(
        arch="llama", n_layer=8, d_model=256, n_head=8, context=256, vocab_size=1000
    )
    return replace(Config(), model=model, train=replace(TrainConfig(), **train))


def test_recompute_and_precision_shrink_the_prediction() -> None:
    base = layout_memory(_cfg(precision="fp32", batch_size=16), 1, 1)[0]
    bf16 = layout_memory(_cfg(precision="bf16", batch_size=16), 1, 1)[0]
    assert bf16.activations < 0.8 * base.activations and bf16.casts > 0
    cfg = _cfg(precision="bf16", batch_size=16)
    redo = layout_memory(
        replace(cfg, model=replace(cfg.model, activation_checkpointing="blocks")), 1, 1
    )[0]
    assert redo.activations < bf16.activations / 2 and redo.static == bf16.static
    wide = replace(cfg, model=replace(cfg.model, vocab_size=50000))
    chunked = replace(wide, model=replace(wide.model, loss_chunk=256))
    head = layout_memory(wide, 1, 1)[0].activations - layout_memory(chunked, 1, 1)[0].activations
    assert head > 0.9 * 16 * 256 * 50000 * (2 + 4 + 8)  # all but one chunk's logits


def test_pipeline_schedules_hold_different_micro_batches() -> None:
    cfg = replace(
        _cfg(precision="bf16", batch_size=16), pipeline=PipelineConfig(stages=2, micro_batches=4)
    )
    one = layout_memory(cfg, 2, 1)
    gpipe = layout_memory(replace(cfg, pipeline=replace(cfg.pipeline, schedule="gpipe")), 2, 1)
    assert gpipe[0].activations == 2 * one[0].activations  # 4 in flight, not 2
    assert one[1].activations > one[0].activations / 2  # 1F1B: 1 in flight, plus the head


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_chunked_loss_equals_the_whole_and_keeps_less(arch: str) -> None:
    cfg = ModelConfig(arch=arch, n_layer=2, d_model=64, n_head=4, context=T, vocab_size=500)
    torch.manual_seed(0)
    whole = GPT(cfg)
    chunked = GPT(replace(cfg, loss_chunk=10))  # 48 tokens: chunks of 10, the last of 8
    chunked.load_state_dict(whole.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    targets = torch.randint(0, cfg.vocab_size, (B, T))
    targets[0, :5] = -100  # prompt tokens the loss leaves out
    losses = {}
    for name, model in (("whole", whole), ("chunked", chunked)):
        logits, loss = model(idx, targets)
        loss.backward()
        losses[name] = (logits, loss)
    assert losses["chunked"][0] is None and losses["whole"][0] is not None
    torch.testing.assert_close(losses["chunked"][1], losses["whole"][1], rtol=1e-6, atol=0)
    for (name, a), b in zip(whole.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # evaluation: logits as before
        assert chunked(idx, targets)[0] is not None
    x = torch.randn(B, T, cfg.d_model, requires_grad=True)
    keep, _ = _saved(lambda: _head(whole.ln_f, whole.head, x, targets), whole, False)
    less, _ = _saved(lambda: _head(chunked.ln_f, chunked.head, x, targets, 10), chunked, False)
    assert less < keep / 4  # the hidden states, not 48 tokens' log-probabilities
