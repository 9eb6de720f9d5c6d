"""Hugging Face checkpoints in and out: GPT-2 and Llama folders as ``save_pretrained``
writes them (``config.json`` plus ``model.safetensors`` or a sharded
``model.safetensors.index.json``), read and written with the ``safetensors`` package
and JSON alone: ``transformers`` is never imported here.

Weights are mapped by name. GPT-2 stores its projections as ``Conv1D`` (weight
[in, out]), which farflung's ``nn.Linear`` layers hold transposed; Llama's separate
q/k/v/o and gate/up/down projections map one to one. Anything that does not fit (an
unknown architecture or option, a missing, extra or wrongly shaped tensor) is a
:class:`HFCheckpointError` naming it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from farflung.config import ModelConfig
from farflung.model.gpt import max_positions
from farflung.model.llama import ffn_width, kv_heads

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED = ("gpt2", "llama")
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}

# (farflung name, Hugging Face name, transposed?) for block ``{i}``, then the rest
_GPT2_BLOCK = [
    ("ln_1.weight", "ln_1.weight", False),
    ("ln_1.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True),
    ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.proj.weight", "attn.c_proj.weight", True),
    ("attn.proj.bias", "attn.c_proj.bias", False),
    ("ln_2.weight", "ln_2.weight", False),
    ("ln_2.bias", "ln_2.bias", False),
    ("mlp.fc.weight", "mlp.c_fc.weight", True),
    ("mlp.fc.bias", "mlp.c_fc.bias", False),
    ("mlp.proj.weight", "mlp.c_proj.weight", True),
    ("mlp.proj.bias", "mlp.c_proj.bias", False),
]
_GPT2_REST = [
    ("wte.weight", "transformer.wte.weight", False),
    ("wpe.weight", "transformer.wpe.weight", False),
    ("ln_f.weight", "transformer.ln_f.weight", False),
    ("ln_f.bias", "transformer.ln_f.bias", False),
]
_LLAMA_BLOCK = [
    ("ln_1.weight", "input_layernorm.weight", False),
    ("attn.q.weight", "self_attn.q_proj.weight", False),
    ("attn.k.weight", "self_attn.k_proj.weight", False),
    ("attn.v.weight", "self_attn.v_proj.weight", False),
    ("attn.proj.weight", "self_attn.o_proj.weight", False),
    ("ln_2.weight", "post_attention_layernorm.weight", False),
    ("mlp.gate.weight", "mlp.gate_proj.weight", False),
    ("mlp.up.weight", "mlp.up_proj.weight", False),
    ("mlp.proj.weight", "mlp.down_proj.weight", False),
]
_LLAMA_REST = [
    ("wte.weight", "model.embed_tokens.weight", False),
    ("ln_f.weight", "model.norm.weight", False),
]
# buffers some checkpoints carry that hold no learned weights
_HARMLESS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class HFCheckpointError(ValueError):
    """A Hugging Face folder farflung cannot read, or a model it cannot write as one."""


# -- config ------------------------------------------------------------------------------


def read_config(folder: str | Path) -> dict[str, Any]:
    """The folder's ``config.json``."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise HFCheckpointError(
            f"{path}: not found; expected a Hugging Face model folder as save_pretrained "
            "writes it (config.json + model.safetensors)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFCheckpointError(f"{path}: not valid JSON ({e})") from None


def model_config(hf: dict[str, Any], base: ModelConfig, where: str = CONFIG_FILE) -> ModelConfig:
    """``base`` with the architecture fields of a Hugging Face config (``context``,
    ``dropout`` and ``init_from`` stay ``base``'s)."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise HFCheckpointError(
            f"{where}: model_type {kind!r} is not supported; allowed: {', '.join(SUPPORTED)}"
        )
    fields = _gpt2_fields(hf, where) if kind == "gpt2" else _llama_fields(hf, where)
    return replace(base, arch=kind, **fields)


def _get(hf: dict[str, Any], key: str, where: str) -> Any:
    if key not in hf:
        raise HFCheckpointError(f"{where}: no {key!r}")
    return hf[key]


def _gpt2_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise HFCheckpointError(
            f"{where}: activation_function {act!r}; allowed: {', '.join(GPT2_ACTIVATIONS)}"
        )
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise HFCheckpointError(
            f"{where}: scale_attn_by_inverse_layer_idx / scale_attn_weights = false are not "
            "supported (GPT-2's defaults are)"
        )
    d = int(_get(hf, "n_embd", where))
    return {
        "d_model": d,
        "n_layer": int(_get(hf, "n_layer", where)),
        "n_head": int(_get(hf, "n_head", where)),
        "n_kv_head": 0,
        "vocab_size": int(_get(hf, "vocab_size", where)),
        "max_positions": int(_get(hf, "n_positions", where)),
        "ffn_hidden": int(hf.get("n_inner") or 4 * d),
        "activation": GPT2_ACTIVATIONS[act],
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
    }


def _llama_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise HFCheckpointError(
            f"{where}: rope scaling {kind!r} is not supported; allowed: 'default' (no scaling)"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HFCheckpointError(f"{where}: {key} = true is not supported; allowed: false")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"{where}: hidden_act {hf['hidden_act']!r}; allowed: 'silu'")
    d, heads = int(_get(hf, "hidden_size", where)), int(_get(hf, "num_attention_heads", where))
    if hf.get("head_dim") not in (None, d // heads):
        raise HFCheckpointError(
            f"{where}: head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads "
            f"= {d // heads}; not supported"
        )
    return {
        "d_model": d,
        "n_layer": int(_get(hf, "num_hidden_layers", where)),
        "n_head": heads,
        "n_kv_head": int(hf.get("num_key_value_heads") or heads),
        "vocab_size": int(_get(hf, "vocab_size", where)),
        "max_positions": int(_get(hf, "max_position_embeddings", where)),
        "ffn_hidden": int(_get(hf, "intermediate_size", where)),
        "activation": "",
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""What an export may store its weights as, by ``--dtype`` name."""


def hf_config(
    cfg: ModelConfig, bos_id: int | None, eos_id: int | None, dtype: str = "fp32"
) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` for transformers' ``from_pretrained``."""
    name = str(EXPORT_DTYPES[dtype]).removeprefix("torch.")
    common = {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "dtype": name,
        "torch_dtype": name,  # what transformers before 4.56 reads
    }
    if cfg.arch == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": cfg.d_model,
            "intermediate_size": ffn_width(cfg),
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": kv_heads(cfg),
            "head_dim": cfg.d_model // cfg.n_head,
            "max_position_embeddings": max_positions(cfg),
            "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
            "rope_theta": cfg.rope_theta,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": cfg.dropout,
            **common,
        }
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_positions": max_positions(cfg),
        "n_inner": ffn_width(cfg),
        "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        **common,
    }


# -- weights -----------------------------------------------------------------------------


def name_map(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(farflung name, Hugging Face name, stored transposed?) for every weight."""
    if cfg.arch == "llama":
        block, rest, prefix = _LLAMA_BLOCK, _LLAMA_REST, "model.layers"
    else:
        block, rest, prefix = _GPT2_BLOCK, _GPT2_REST, "transformer.h"
    out = list(rest)
    for i in range(cfg.n_layer):
        out += [(f"blocks.{i}.{a}", f"{prefix}.{i}.{b}", t) for a, b, t in block]
    if not cfg.tie_embeddings:
        out.append(("head.weight", "lm_head.weight", False))
    return out


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFCheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / WEIGHTS_FILE
    if not single.is_file():
        raise HFCheckpointError(
            f"{folder}: neither {WEIGHTS_FILE} nor {INDEX_FILE}; farflung reads safetensors "
            "only (save with safe_serialization=True)"
        )
    with _open(single) as f:
        return dict.fromkeys(f.keys(), single)


def _open(path: Path) -> Any:
    if not path.is_file():
        raise HFCheckpointError(f"{path}: missing (listed in {INDEX_FILE})")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # the library raises its own error types for bad headers
        raise HFCheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _gpt2_aliases(names: dict[str, Path]) -> dict[str, tuple[str, Path]]:
    """Hugging Face name -> (name in the file, file). GPT-2 files are written both with
    and without the ``transformer.`` prefix (the original OpenAI upload has none)."""
    out = {}
    for name, path in names.items():
        full = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        out[full] = (name, path)
    return out


def read_weights(folder: str | Path, cfg: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """(farflung name, fp32 tensor) for every weight of ``cfg``'s model in ``folder``;
    tensors the model lacks (other than known buffers) are an error."""
    folder = Path(folder)
    files = _weight_files(folder)
    where = _gpt2_aliases(files) if cfg.arch == "gpt2" else {n: (n, p) for n, p in files.items()}
    mapping = name_map(cfg)
    wanted = {theirs for _, theirs, _ in mapping}
    if cfg.tie_embeddings:
        wanted.add("lm_head.weight")  # a tied head saved anyway is the embedding again
    extra = sorted(n for n in where if n not in wanted and not n.endswith(_HARMLESS))
    if extra:
        raise HFCheckpointError(
            f"{folder}: tensors the {cfg.arch} model has no place for: {', '.join(extra[:5])}"
            + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        )
    handles: dict[Path, Any] = {}
    with contextlib.ExitStack() as files:  # each file opened once, all closed at the end
        for ours, theirs, transposed in mapping:
            if theirs not in where:
                raise HFCheckpointError(f"{folder}: tensor {theirs!r} (for {ours}) is missing")
            stored, path = where[theirs]
            if path not in handles:
                handles[path] = files.enter_context(_open(path))
            t = handles[path].get_tensor(stored).float()
            yield ours, (t.t() if transposed else t)


def load_weights(model: nn.Module, folder: str | Path, cfg: ModelConfig) -> None:
    """Copy the folder's weights into ``model`` (built from ``cfg``), checking each
    tensor's shape."""
    params = model.state_dict()
    seen = set()
    with torch.no_grad():
        for ours, t in read_weights(folder, cfg):
            have = params[ours]
            if tuple(t.shape) != tuple(have.shape):
                hf = dict((a, b) for a, b, _ in name_map(cfg))[ours]
                raise HFCheckpointError(
                    f"{folder}: tensor {hf!r} has shape {tuple(t.shape)}, the model's {ours} "
                    f"needs {tuple(have.shape)}"
                )
            have.copy_(t)
            seen.add(ours)
    lacking = [
        n for n in params if n not in seen and not (n == "head.weight" and cfg.tie_embeddings)
    ]
    if lacking:
        raise HFCheckpointError(f"{folder}: nothing was loaded into {', '.join(lacking)}")


def save(
    model: nn.Module,
    cfg: ModelConfig,
    out: str | Path,
    bos_id: int | None = None,
    eos_id: int | None = None,
    dtype: str = "fp32",
) -> None:
    """Write ``config.json`` and ``model.safetensors`` for transformers' from_pretrained,
    the weights as ``dtype`` (``fp32``, ``bf16`` or ``fp16``: rounded to nearest)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}; allowed: {', '.join(EXPORT_DTYPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    as_dtype = EXPORT_DTYPES[dtype]
    tensors = {theirs: _stored(state[ours], t).to(as_dtype) for ours, theirs, t in name_map(cfg)}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = hf_config(cfg, bos_id, eos_id, dtype)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _stored(t: Tensor, transposed: bool) -> Tensor:
    t = t.detach().float().cpu()
    return (t.t() if transposed else t).contiguous().clone()
