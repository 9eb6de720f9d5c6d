"""Generate text from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from farflung.config import load_config
from farflung.data import Tokenizer
from farflung.model import GPT, generate
from farflung.train import checkpoint as ckpt


def load_for_inference(path: str | Path) -> tuple[GPT, Tokenizer]:
    """Model and tokenizer from a checkpoint folder or a run folder (its newest valid
    checkpoint; a corrupt newer one is reported and passed over)."""
    found = ckpt.newest(Path(path))
    cfg = load_config(found / "config.toml")
    model = GPT(cfg.model)
    ckpt.load_model_weights(found, model)
    model.eval()
    return model, Tokenizer.load(found)  # tokenizer.json and any companions


def sample_text(
    path: str | Path,
    prompt: str,
    tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> str:
    model, tok = load_for_inference(path)
    ids = tok.encode(prompt) if prompt else [tok.eot_id]
    gen = torch.Generator().manual_seed(seed)
    out = generate(
        model, torch.tensor([ids]), tokens, temperature=temperature, top_k=top_k, generator=gen
    )
    new = out[0, len(ids) :].tolist()
    return prompt + tok.decode(new)
