"""Checkpoints: written atomically, verified by checksums on load, last K kept.

Layout of ``RUN/checkpoints/step_00000100/``::

    model.safetensors   the run's model (rank 0's view, what `sample` loads)
    rank0.pt ...        per-rank state: optimizer, RNG, algorithm state, counters
    config.toml         the resolved config of the run
    tokenizer.json      the tokenizer, so the checkpoint stands on its own
    manifest.json       step, world size, sha256 of every file above (written last)

All ranks write into ``step_X.tmp``; rank 0 checksums, writes the manifest and
renames the folder, so a crash mid-write never leaves a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A missing, incomplete or corrupt checkpoint; the message names the file."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(path: Path) -> Path | None:
    """``path`` may be a run folder, its ``checkpoints`` folder, or one checkpoint."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = list_checkpoints(root)
    return found[-1] if found else None


def begin(root: Path, step: int) -> Path:
    """Create the temporary folder all ranks write into (rank 0 only)."""
    tmp = step_dir(root, step).with_suffix(".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_state(tmp: Path, rank: int, state: dict[str, Any]) -> None:
    torch.save(state, tmp / f"rank{rank}.pt")


def write_model(tmp: Path, model: nn.Module) -> None:
    save_model(model, str(tmp / "model.safetensors"))


def commit(tmp: Path, step: int, world_size: int, extra: dict[str, Any], keep: int) -> Path:
    """Checksum everything, write the manifest, publish the folder, prune old ones."""
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {"step": step, "world_size": world_size, "files": files, **extra}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    final = tmp.with_suffix("")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_manifest(ckpt: Path, verify: bool = True) -> dict[str, Any]:
    """Load the manifest and check every listed file against its sha256."""
    mpath = Path(ckpt) / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST}; not a complete checkpoint")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}: corrupt manifest ({e})") from None
    if verify:
        for name, digest in manifest["files"].items():
            f = Path(ckpt) / name
            if not f.is_file():
                raise CheckpointError(f"{f}: missing from checkpoint")
            if sha256_file(f) != digest:
                raise CheckpointError(f"{f}: corrupt (sha256 does not match the manifest)")
    return manifest


def load_model_weights(ckpt: Path, model: nn.Module) -> None:
    try:
        missing, unexpected = load_model(model, str(Path(ckpt) / "model.safetensors"))
    except Exception as e:  # safetensors raises several types for bad files
        raise CheckpointError(f"{ckpt}/model.safetensors: cannot load ({e})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}/model.safetensors does not fit the model (missing {missing}, "
            f"unexpected {unexpected})"
        )


def load_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    path = Path(ckpt) / f"rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (checkpoint written by another world size?)")
    return torch.load(path, map_location="cpu", weights_only=True)
