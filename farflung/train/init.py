"""``model.init_from``: start a run from a Hugging Face folder (``hf:PATH``) or a
farflung run or checkpoint (``run:PATH``) instead of random weights.

The source decides the architecture (its fields overwrite the config's, so every
worker and the resolved ``config.toml`` agree), the weights, and the tokenizer the
data must be encoded with."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from farflung.config import Config, ConfigError, load_config, validate
from farflung.data.shards import sha256_file
from farflung.data.tokenizer import TOKENIZER_FILE

if TYPE_CHECKING:
    from torch import nn

# farflung.model.hf and farflung.train.checkpoint load torch: they are imported where a
# source is read, so that a launcher without model.init_from stays torch-free

# the user's own choices, kept when the architecture comes from elsewhere
_KEEP = ("init_from", "context", "dropout", "activation_checkpointing")


def source(cfg: Config) -> tuple[str, Path] | None:
    """("hf" | "run", path) of ``model.init_from``, or None."""
    spec = cfg.model.init_from
    if not spec:
        return None
    kind, _, path = spec.partition(":")
    if not path:
        raise ConfigError(f"model.init_from = {spec!r} names no path; allowed: hf:PATH, run:PATH")
    return kind, Path(path).expanduser()


@functools.cache
def _checkpoint(path: Path) -> Path:
    """The checkpoint ``run:PATH`` names, verified once per process (its files are
    hashed; a big model's take a while)."""
    from farflung.train import checkpoint as ckpt

    if not path.exists():
        raise ckpt.CheckpointError(f"model.init_from: {path} does not exist")
    return ckpt.newest(path)


def resolve(cfg: Config) -> Config:
    """``cfg`` with the model fields of its ``init_from`` source (unchanged without one)."""
    src = source(cfg)
    if src is None:
        return cfg
    kind, path = src
    if kind == "hf":
        from farflung.model import hf

        model = hf.model_config(hf.read_config(path), cfg.model, str(path / hf.CONFIG_FILE))
    else:
        saved = load_config(_checkpoint(path) / "config.toml").model
        limit = saved.max_positions or saved.context  # the position table's rows
        keep = {k: getattr(cfg.model, k) for k in _KEEP}
        model = replace(saved, max_positions=limit, **keep)
    out = replace(cfg, model=model)
    validate(out)  # e.g. a context longer than the source model's positions
    return out


def tokenizer_file(cfg: Config) -> Path | None:
    """The tokenizer the ``init_from`` source brings (its tokenizer.json), if any."""
    src = source(cfg)
    if src is None:
        return None
    kind, path = src
    found = (path if kind == "hf" else _checkpoint(path)) / TOKENIZER_FILE
    return found if found.is_file() else None


def data_tokenizer(cfg: Config) -> str | None:
    """What ``farflung prepare`` encodes with for this run: ``data.tokenizer``, else the
    ``init_from`` source's tokenizer, else None (train one)."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    src = source(cfg)
    if src is None:
        return None
    found = tokenizer_file(cfg)
    if found is None:
        return None
    return str(src[1] if src[0] == "hf" else found)


def check_tokenizer(cfg: Config, data_tokenizer_json: Path) -> None:
    """Refuse data encoded with another tokenizer than the one the weights learned
    (unless ``data.tokenizer`` names the one to use: the user's call then)."""
    theirs = tokenizer_file(cfg)
    if theirs is None or cfg.data.tokenizer:
        return
    if sha256_file(theirs) != sha256_file(data_tokenizer_json):
        raise ConfigError(
            f"the data in {data_tokenizer_json.parent} was encoded with another tokenizer than "
            f"model.init_from's ({theirs}); prepare it with `farflung prepare --tokenizer "
            f"{theirs.parent}` or point data.dir elsewhere"
        )


def load_weights(model: nn.Module, cfg: Config) -> None:
    """Overwrite ``model``'s (fresh) weights with the ``init_from`` source's."""
    src = source(cfg)
    if src is None:
        return
    kind, path = src
    if kind == "hf":
        from farflung.model import hf

        hf.load_weights(model, path, cfg.model)
    else:
        from farflung.train import checkpoint as ckpt

        ckpt.load_model_weights(_checkpoint(path), model)
