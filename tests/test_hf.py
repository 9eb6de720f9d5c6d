"""Hugging Face checkpoints in and out, checked against transformers itself: the
imported model's logits equal transformers' for GPT-2 and Llama (GQA), whole and split
into pipeline stages, and an exported folder loads with ``from_pretrained``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from farflung.config import ModelConfig
from farflung.model import GPT, hf, split_stages

transformers = pytest.importorskip("transformers")  # a dev dependency, never needed at run time

VOCAB, TOL = 96, 1e-5


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights far from transformers' small initialisation, so that sharp attention
    and large activations expose any mismatch (rotary layout, GELU variant, ...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and (
                "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            ):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))


def _gpt2(folder: Path, **kw) -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=48, **kw
    )
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    _randomise(ref, 1)
    ref.save_pretrained(folder)
    return ref


def _llama(folder: Path, **kw) -> torch.nn.Module:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
    )
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **kw})).eval()
    _randomise(ref, 2)
    ref.save_pretrained(folder)
    return ref


def _import(folder: Path, context: int = 32) -> GPT:
    cfg = hf.model_config(hf.read_config(folder), ModelConfig(context=context))
    model = GPT(cfg).eval()
    hf.load_weights(model, folder, cfg)
    return model


def _tokens(t: int = 32, b: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(7))


def _max_diff(model: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x)[0] - ref(x).logits).abs().max().item()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def imported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = (_gpt2 if request.param == "gpt2" else _llama)(folder)
    return request.param, folder, ref, _import(folder)


def test_logits_match_transformers(imported):
    arch, _, ref, model = imported
    assert model.cfg.arch == arch
    with torch.no_grad():
        logits = ref(_tokens()).logits
    assert logits.std() > 1.0  # the check below would be weak on near-uniform outputs
    assert _max_diff(model, ref, _tokens()) <= TOL


def test_two_stages_match_transformers(imported):
    _, _, ref, model = imported
    first, last = split_stages(model, [1])
    x = _tokens()
    with torch.no_grad():
        logits, _ = last(first(x))
        assert (logits - ref(x).logits).abs().max().item() <= TOL


def test_export_round_trip_loads_with_from_pretrained(imported, tmp_path):
    arch, _, ref, model = imported
    hf.save(model, model.cfg, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(ref)
    assert _max_diff(model, back, _tokens()) <= TOL


def test_native_llama_exports(tmp_path):
    """A farflung-initialised Llama (not imported) with its own shapes."""
    cfg = ModelConfig(
        arch="llama", n_layer=2, n_head=4, n_kv_head=1, d_model=32, ffn_hidden=72, context=16
    )
    cfg = ModelConfig(**{**cfg.__dict__, "vocab_size": VOCAB, "tie_embeddings": False})
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    _randomise(model, 3)
    hf.save(model, cfg, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.num_key_value_heads == 1
    assert _max_diff(model, back, _tokens(16)) <= TOL


def test_tied_llama_and_untied_gpt2(tmp_path):
    ref = _llama(tmp_path / "l", tie_word_embeddings=True)
    model = _import(tmp_path / "l")
    assert model.head.weight is model.wte.weight
    assert _max_diff(model, ref, _tokens()) <= TOL
    ref = _gpt2(tmp_path / "g", tie_word_embeddings=False)
    model = _import(tmp_path / "g")
    assert model.head.weight is not model.wte.weight
    assert _max_diff(model, ref, _tokens()) <= TOL


def test_sharded_checkpoint(tmp_path):
    ref = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=48)
    ).eval()
    _randomise(ref, 4)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / hf.INDEX_FILE).is_file()
    assert _max_diff(_import(tmp_path), ref, _tokens()) <= TOL


def test_openai_layout_without_prefix_and_with_buffers(tmp_path):
    """The original GPT-2 upload: no ``transformer.`` prefix, causal-mask buffers."""
    ref = _gpt2(tmp_path)
    state = load_file(tmp_path / hf.WEIGHTS_FILE)
    renamed = {k.removeprefix("transformer."): v for k, v in state.items()}
    renamed["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 48, 48))
    save_file(renamed, tmp_path / hf.WEIGHTS_FILE, metadata={"format": "pt"})
    assert _max_diff(_import(tmp_path), ref, _tokens()) <= TOL


def test_errors_name_what_is_wrong(tmp_path):
    _llama(tmp_path)
    state = load_file(tmp_path / hf.WEIGHTS_FILE)
    bad = dict(state)
    bad["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 48)
    save_file(bad, tmp_path / hf.WEIGHTS_FILE)
    with pytest.raises(
        hf.HFCheckpointError, match=r"model.layers.1.self_attn.k_proj.weight.*\(16, 48\)"
    ):
        _import(tmp_path)
    bad = {k: v for k, v in state.items() if k != "model.norm.weight"}
    save_file(bad, tmp_path / hf.WEIGHTS_FILE)
    with pytest.raises(hf.HFCheckpointError, match="'model.norm.weight'.*missing"):
        _import(tmp_path)
    save_file(
        {**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(48)},
        tmp_path / hf.WEIGHTS_FILE,
    )
    with pytest.raises(hf.HFCheckpointError, match="q_proj.bias"):
        _import(tmp_path)
    config = json.loads((tmp_path / hf.CONFIG_FILE).read_text())
    (tmp_path / hf.CONFIG_FILE).write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(hf.HFCheckpointError, match="model_type 'mamba'.*allowed: gpt2, llama"):
        _import(tmp_path)
    scaled = {**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}
    (tmp_path / hf.CONFIG_FILE).write_text(json.dumps(scaled))
    with pytest.raises(hf.HFCheckpointError, match="rope scaling 'llama3'"):
        _import(tmp_path)
    with pytest.raises(hf.HFCheckpointError, match="config.json: not found"):
        _import(tmp_path / "nowhere")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_export_round_trips(imported, tmp_path, dtype):
    """``export-hf --dtype``: the stored weights are the fp32 masters rounded; transformers
    loads them, and their logits are the masters-rounded model's; imported again (as
    ``model.init_from`` does) they come back as those rounded values, in fp32."""
    arch, _, _, model = imported
    hf.save(model, model.cfg, tmp_path, dtype=dtype)
    want = hf.EXPORT_DTYPES[dtype]
    stored = load_file(str(tmp_path / hf.WEIGHTS_FILE))
    assert {t.dtype for t in stored.values()} == {want}
    assert json.loads((tmp_path / hf.CONFIG_FILE).read_text())["dtype"] == str(want)[6:]
    rounded = GPT(model.cfg).eval()
    rounded.load_state_dict({k: v.to(want).float() for k, v in model.state_dict().items()})
    assert any(
        not torch.equal(a, b)
        for a, b in zip(rounded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert _max_diff(rounded, back, _tokens()) <= TOL
    again = _import(tmp_path)
    for name, t in again.state_dict().items():
        assert t.dtype == torch.float32
        assert torch.equal(t, rounded.state_dict()[name]), name
