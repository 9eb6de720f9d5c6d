"""``farflung export-hf RUN OUT``: a run's model as a Hugging Face folder that
``transformers.AutoModelForCausalLM.from_pretrained`` (and ``AutoTokenizer``) loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from farflung.config import load_config
from farflung.data import Tokenizer
from farflung.data.tokenizer import CONFIG_FILE, EOT, TOKENIZER_FILE
from farflung.model import GPT, hf, max_positions
from farflung.train import checkpoint as ckpt


def export_hf(run: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the newest valid checkpoint of ``run`` (or that checkpoint) to ``out``;
    returns the checkpoint used."""
    found = ckpt.newest(Path(run))
    out = Path(out)
    if (out / hf.CONFIG_FILE).exists() and not force:
        raise ckpt.CheckpointError(f"{out} already holds a model; pass --force to replace it")
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
    hf.save(model, cfg, out, bos_id=tok.eot_id, eos_id=tok.eot_id)
    for name in (TOKENIZER_FILE, *ckpt.OPTIONAL_FILES):  # an imported one's own settings
        if (found / name).is_file():
            shutil.copyfile(found / name, out / name)
    if not (found / CONFIG_FILE).is_file():
        _write_tokenizer_config(out, max_positions(cfg))
    return found


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
