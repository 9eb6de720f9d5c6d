"""``farflung export-hf RUN OUT``: a run's model as a Hugging Face folder that
``transformers.AutoModelForCausalLM.from_pretrained`` (and ``AutoTokenizer``) loads.

``--force`` over a folder that already holds a model first removes that model's files
(:data:`MODEL_FILES`, and the shards its ``*.index.json`` lists), so that no stale
index or shard outlives it: farflung's own loader prefers an index to
``model.safetensors``. Other files in the folder (a README, the user's own) are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from farflung.config import load_config
from farflung.data import Tokenizer
from farflung.data.tokenizer import CONFIG_FILE, EOT, TOKENIZER_FILE
from farflung.model import GPT, hf, max_positions
from farflung.train import checkpoint as ckpt

_INDEXES = (hf.INDEX_FILE, "pytorch_model.bin.index.json")
MODEL_FILES = (
    *_INDEXES,
    hf.WEIGHTS_FILE,
    hf.CONFIG_FILE,
    "pytorch_model.bin",
    "generation_config.json",
    TOKENIZER_FILE,
    *ckpt.OPTIONAL_FILES,
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
"""The files of a Hugging Face model folder (weights, indexes, configs, tokenizer)
that an export replaces; a stale one would be read with the new model."""


def export_hf(run: str | Path, out: str | Path, force: bool = False, dtype: str = "fp32") -> Path:
    """Write the newest valid checkpoint of ``run`` (or that checkpoint) to ``out``, its
    weights as ``dtype`` (``fp32``, ``bf16``, ``fp16``); returns the checkpoint used."""
    found = ckpt.newest(Path(run))
    out = Path(out)
    old = old_model_files(out)
    if old and not force:
        raise ckpt.CheckpointError(
            f"{out} already holds a model ({', '.join(p.name for p in old[:4])}); "
            "pass --force to replace it"
        )
    if not (found / "model.safetensors").is_file():
        raise ckpt.CheckpointError(
            f"{found} holds no whole model (a pipeline node without every stage, or an "
            "elastic run between its saves, writes none): export a checkpoint that has "
            "model.safetensors"
        )
    cfg = load_config(found / "config.toml").model
    model = GPT(cfg)
    ckpt.load_model_weights(found, model)
    tok = Tokenizer.load(found / TOKENIZER_FILE)
    for path in old:  # only now: a failed export above leaves the old model whole
        path.unlink()
    hf.save(model, cfg, out, bos_id=tok.eot_id, eos_id=tok.eot_id, dtype=dtype)
    for name in (TOKENIZER_FILE, *ckpt.OPTIONAL_FILES):  # an imported one's own settings
        if (found / name).is_file():
            shutil.copyfile(found / name, out / name)
    if not (found / CONFIG_FILE).is_file():
        _write_tokenizer_config(out, max_positions(cfg))
    return found


def old_model_files(out: Path) -> list[Path]:
    """The files of a Hugging Face model in ``out``: :data:`MODEL_FILES` and the shards
    its indexes list (names inside ``out`` only)."""
    names = [n for n in MODEL_FILES if (out / n).is_file()]
    for index in _INDEXES:
        names += [n for n in _listed_shards(out / index) if (out / n).is_file()]
    return [out / n for n in dict.fromkeys(names)]


def _listed_shards(index: Path) -> list[str]:
    """The shard files an index names; an unreadable index names none (it is removed
    itself, its shards stay: nothing is deleted on a guess)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    named = [f for f in files if isinstance(f, str) and f == Path(f).name]
    return sorted(f for f in named if f and not f.startswith("."))


def _write_tokenizer_config(out: Path, positions: int) -> None:
    """Settings for transformers' fast tokenizer over farflung's byte-level BPE: its
    one special token ends documents and stands in for the others."""
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "model_max_length": positions,
        "clean_up_tokenization_spaces": False,
    }
    (out / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
