"""Tests for farflung.model: the GPT, its stage split, parameter groups and sampling."""

from __future__ import annotations

import math

import pytest
import torch

from farflung.config import ModelConfig
from farflung.model import GPT, GPTStage, even_boundaries, generate, param_groups, split_stages

VOCAB = 64


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(n_layer=4, n_head=2, d_model=32, context=16, vocab_size=VOCAB, dropout=0.0)
    fields.update(overrides)
    return ModelConfig(**fields)


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_cfg(**overrides))


def batch(b: int = 3, t: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (b, t), generator=g)
    targets = torch.randint(0, VOCAB, (b, t), generator=g)
    return idx, targets


def grads_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def test_shapes_and_loss_at_init():
    model = make_model()
    idx, targets = batch()
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, VOCAB)
    assert loss.shape == ()
    assert abs(loss.item() - math.log(VOCAB)) < 0.3
    logits2, no_loss = model(idx)
    assert no_loss is None
    assert torch.equal(logits, logits2)


def test_shorter_sequences_work():
    model = make_model()
    logits, _ = model(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, VOCAB)


def test_too_long_sequence_raises():
    model = make_model()
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_vocab_size_required():
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(tiny_cfg(vocab_size=0))


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        GPT(tiny_cfg(n_head=3))


def test_causal_masking():
    model = make_model().eval()
    idx, _ = batch(b=2)
    base, _ = model(idx)
    for t in (0, 5, 14):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % VOCAB
        out, _ = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


def test_weight_tying_and_init():
    model = make_model()
    assert model.head.weight is model.wte.weight
    assert abs(model.wte.weight.std().item() - 0.02) < 0.003
    expected = 0.02 / math.sqrt(2 * model.cfg.n_layer)
    projs = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks])
    assert abs(projs.std().item() - expected) < 0.2 * expected
    assert all(torch.all(b.mlp.fc.bias == 0) for b in model.blocks)


def test_num_params_formula():
    cfg = tiny_cfg(mlp_ratio=3)
    model = GPT(cfg)
    d, m, v, c, n = cfg.d_model, cfg.mlp_ratio, cfg.vocab_size, cfg.context, cfg.n_layer
    per_block = (4 + 2 * m) * d * d + (9 + m) * d
    assert model.num_params() == v * d + c * d + n * per_block + 2 * d
    assert model.num_params(exclude_embeddings=True) == n * per_block + 2 * d


def test_param_groups_cover_each_parameter_once():
    model = make_model()
    groups = param_groups(model, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert any(p is model.wte.weight for p in decay["params"])
    assert any(p is model.ln_f.weight for p in no_decay["params"])
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as-is


def test_determinism_under_seed():
    a, b, c = make_model(seed=5), make_model(seed=5), make_model(seed=6)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(a.wte.weight, c.wte.weight)
    idx, targets = batch()
    assert torch.equal(a(idx, targets)[1], b(idx, targets)[1])


def test_dropout_train_vs_eval():
    model = make_model(dropout=0.2)
    idx, _ = batch()
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_even_boundaries():
    assert even_boundaries(4, 1) == []
    assert even_boundaries(4, 2) == [2]
    assert even_boundaries(5, 3) == [2, 4]
    assert even_boundaries(6, 6) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        even_boundaries(4, 5)


def test_split_stages_validation():
    model = make_model()
    for bad in ([0], [4], [2, 2], [3, 1]):
        with pytest.raises(ValueError):
            split_stages(model, bad)
    with pytest.raises(ValueError):
        GPTStage(model, 2, 2)


def test_stages_share_modules():
    model = make_model()
    first, middle, last = split_stages(model, [1, 3])
    assert (first.is_first, first.is_last) == (True, False)
    assert (middle.is_first, middle.is_last) == (False, False)
    assert (last.is_first, last.is_last) == (False, True)
    assert first.blocks[0] is model.blocks[0] and last.blocks[0] is model.blocks[3]
    assert last.head.weight is first.wte.weight
    owned = [{id(p) for p in s.parameters()} for s in (first, middle, last)]
    assert set().union(*owned) == {id(p) for p in model.parameters()}
    # Only the tied embedding/head weight is held by more than one stage.
    assert owned[0] & owned[2] == {id(model.wte.weight)}
    assert not owned[0] & owned[1] and not owned[1] & owned[2]
    with pytest.raises(ValueError, match="targets"):
        first(batch()[0], batch()[1])


@pytest.mark.parametrize("boundaries", [[2], [1], [1, 3], [1, 2, 3]])
def test_stages_match_whole_model(boundaries):
    model = make_model()
    idx, targets = batch()
    ref_logits, ref_loss = model(idx, targets)
    ref_loss.backward()
    ref_grads = grads_of(model)
    model.zero_grad()

    # Run the stages as a pipeline would: each stage's input is a fresh leaf, and the
    # gradient of that leaf is what travels back to the previous stage.
    stages = split_stages(model, boundaries)
    inputs, outputs, x = [], [], idx
    for stage in stages[:-1]:
        out = stage(x)
        inputs.append(x)
        outputs.append(out)
        x = out.detach().requires_grad_(True)
    logits, loss = stages[-1](x, targets)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)

    loss.backward()
    grad = x.grad
    for stage_in, stage_out in zip(reversed(inputs), reversed(outputs), strict=True):
        stage_out.backward(grad)
        grad = stage_in.grad
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_single_stage_is_whole_model():
    model = make_model()
    (stage,) = split_stages(model, [])
    assert stage.is_first and stage.is_last
    idx, targets = batch()
    assert torch.equal(stage(idx, targets)[1], model(idx, targets)[1])


def _next_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """The whole model's logits for the token after ``ids`` (its last 16 as context)."""
    with torch.no_grad():
        return model(ids[:, -model.cfg.context :])[0][:, -1]


def test_generate_length_and_greedy():
    # untied: a tied head's argmax mostly repeats the last token, whatever the dropout
    model = make_model(dropout=0.2, tie_embeddings=False).train()
    prompt = torch.zeros(2, 3, dtype=torch.long)
    greedy = generate(model, prompt, 20, temperature=0.0)
    assert model.training  # mode restored
    assert greedy.shape == (2, 23)
    assert torch.equal(greedy[:, :3], prompt)
    # every token is the whole model's argmax after the ones before it (no dropout),
    # the last 16 once the sequence outgrows the context
    model.eval()
    for t in range(3, 23):
        assert torch.equal(greedy[:, t], _next_logits(model, greedy[:, :t]).argmax(-1)), t
    long_prompt = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    longer = generate(model, long_prompt, 4, temperature=0.0)
    assert longer.shape == (1, 24) and torch.equal(longer[:, :20], long_prompt)
    for t in range(20, 24):
        assert torch.equal(longer[:, t], _next_logits(model, longer[:, :t]).argmax(-1)), t


def test_generate_sampling_with_generator_and_top_k():
    model = make_model()
    prompt = torch.zeros(1, 1, dtype=torch.long)

    def sample(top_k: int | None) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        return generate(model, prompt, 10, temperature=1.0, top_k=top_k, generator=g)

    assert torch.equal(sample(None), sample(None))
    assert torch.equal(sample(1), generate(model, prompt, 10, temperature=0.0))
    five = sample(5)
    assert five.shape == (1, 11)
    for t in range(1, 11):  # each draw among the 5 likeliest tokens after its prefix
        top = _next_logits(model.eval(), five[:, :t]).topk(5).indices
        assert five[0, t] in top[0], t
    # without top_k the draws leave the top 5 (64 near-equal tokens: 5/64 each)
    unrestricted = sample(None)
    outside = [
        unrestricted[0, t] not in _next_logits(model, unrestricted[:, :t]).topk(5).indices[0]
        for t in range(1, 11)
    ]
    assert any(outside)


# ---- activation checkpointing: the same gradients, from blocks that really recompute


def _forward_counts(model: torch.nn.Module) -> list[int]:
    """A live list: how many times each block's forward has started (a recompute
    stops once it has what the backward needs, so it may never finish)."""
    counts = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def _step(model: GPT, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    idx, targets = batch()
    torch.manual_seed(seed)  # the dropout masks
    _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), grads_of(model)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "spec, runs", [("blocks", [2, 2, 2, 2]), ("every:2", [2, 1, 2, 1]), ("every:3", [2, 1, 1, 2])]
)
def test_recomputed_blocks_give_the_same_gradients(arch, spec, runs):
    plain = make_model(arch=arch, dropout=0.1)
    recomputed = GPT(tiny_cfg(arch=arch, dropout=0.1, activation_checkpointing=spec))
    recomputed.load_state_dict(plain.state_dict())
    counts = _forward_counts(recomputed)
    want_loss, want = _step(plain)
    got_loss, got = _step(recomputed)
    assert counts == runs  # the checkpointed blocks ran again in the backward
    assert torch.equal(got_loss, want_loss)
    assert want.keys() == got.keys()
    assert all(torch.equal(got[n], want[n]) for n in want), [
        n for n in want if not torch.equal(got[n], want[n])
    ]
    with torch.no_grad():  # nothing to recompute for: one forward each
        recomputed(batch()[0])
    assert [c - r for c, r in zip(counts, runs, strict=True)] == [1, 1, 1, 1]


def test_a_stage_recomputes_by_the_models_block_index():
    model = make_model(activation_checkpointing="every:2")
    stage = GPTStage(model, 1, 4)  # blocks 1-3: block 2 is the one recomputed
    counts = _forward_counts(model)
    hidden = torch.randn(3, 16, 32, requires_grad=True)
    logits, _ = stage(hidden)  # the last stage: (logits, loss)
    logits.sum().backward()
    assert counts == [0, 1, 2, 1]


@pytest.mark.parametrize("bad", ["every:0", "every:", "every:x", "some", ""])
def test_an_unknown_recompute_setting_names_the_key_and_the_choices(bad):
    from farflung.config import Config, ConfigError, validate

    cfg = Config()
    cfg.model.activation_checkpointing = bad
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "model.activation_checkpointing" in str(e.value)
    assert "'none', 'blocks' or 'every:K'" in str(e.value)


def test_a_model_built_from_an_unvalidated_config_refuses_an_unknown_recompute():
    with pytest.raises(ValueError, match="activation_checkpointing = 'blcoks'"):
        make_model(activation_checkpointing="blcoks")
