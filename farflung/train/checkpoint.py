"""Checkpoints: written atomically, verified by checksums on load, last K kept.

Layout of ``RUN/checkpoints/step_00000100/``::

    model.safetensors   the run's model (what `sample` loads)
    rank0.pt ...        per-rank state: optimizer, RNG, algorithm state, counters
    config.toml         the resolved config of the run
    tokenizer.json      the tokenizer, so the checkpoint stands on its own
    manifest.json       step, world size, the ranks held here, sha256 of every file
                        above (written last)

No shared filesystem is assumed. Every rank writes its own ``rankR.pt`` into
``step_X.tmp`` under its own ``--out``; ranks that see each other's marker files
share a filesystem, and the lowest of them (the *committer*) also writes the model,
config and tokenizer, checksums, writes the manifest and publishes the folder. With
one shared folder that is rank 0 alone; with a folder per machine, one rank per
machine. A crash mid-write never leaves a folder that looks complete, and re-saving
a step swaps folders so that one complete copy exists at every moment.

Durability: every file and the step folder are fsynced before the folder is renamed
into place, and the parent folder after the rename, before any older checkpoint is
deleted, so a power loss leaves either the new checkpoint or the old ones, never a
folder whose manifest names bytes that never reached the disk. A crashed save's
``step_X.tmp`` is removed at the next save and when a run resumes
(:func:`remove_stale_tmp`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farflung.data.shards import sha256_file
from farflung.data.tokenizer import CONFIG_FILE, TEMPLATE_FILE, TOKENIZER_FILE

if TYPE_CHECKING:
    from torch import nn

# torch is imported by the functions that read or write tensors: the elastic launcher
# lists and verifies checkpoints without loading it (seconds per launch)

MANIFEST = "manifest.json"
MANIFEST_KEYS = ("step", "world_size", "files")
_OLD = ".old"  # a published folder being replaced by a new save of the same step


class CheckpointError(RuntimeError):
    """A missing, incomplete or corrupt checkpoint; the message names the file."""


OPTIONAL_FILES = (CONFIG_FILE, TEMPLATE_FILE)
"""Shared files a checkpoint holds when the data has them (an imported tokenizer's
end-of-text token and chat template); listed and checksummed like the rest."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first. A ``step_X.old`` left by a
    crash between the two renames of a re-save stands in for its missing ``step_X``."""
    if not root.is_dir():
        return []
    found = {}
    for p in root.glob("step_*"):
        if not (p.is_dir() and (p / MANIFEST).is_file()):
            continue
        if p.suffix == "":
            found[p.name] = p
        elif p.suffix == _OLD:
            found.setdefault(p.with_suffix("").name, p)
    return [found[k] for k in sorted(found)]


def candidates(path: Path) -> list[Path]:
    """The checkpoints ``path`` names (a run, its ``checkpoints`` folder, or one
    checkpoint), oldest first."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    return list_checkpoints(root)


def step_of(ckpt: Path) -> int:
    return int(Path(ckpt).name.split("_")[1].split(".")[0])


# -- writing ---------------------------------------------------------------------------


def tmp_dir(root: Path, step: int) -> Path:
    return step_dir(root, step).with_suffix(".tmp")


def remove_stale_tmp(root: Path) -> list[Path]:
    """Delete the ``step_*.tmp`` folders under ``root``: saves that crashed
    before publishing. Their ``.rankR`` marks and files would otherwise join a later save
    of the same step. Call it only when no other save can be in flight in ``root``: at a
    commit (saves are sequential) or at start-up before any rank saves. Returns them."""
    stale = [p for p in Path(root).glob("step_*.tmp") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot sync a folder; a file must sync
        if not (e.errno == errno.EINVAL and Path(path).is_dir()):
            raise
    finally:
        os.close(fd)


def mark_present(tmp: Path, rank: int) -> None:
    """Say "rank R writes here"; ranks that see each other's marks share a folder."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / f".rank{rank}").touch()


def ranks_present(tmp: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in tmp.glob(".rank*"))


def write_rank_state(tmp: Path, rank: int, state: dict[str, Any]) -> None:
    import torch

    torch.save(state, tmp / f"rank{rank}.pt")


def write_model(tmp: Path, model: nn.Module) -> None:
    from safetensors.torch import save_model

    save_model(model, str(tmp / "model.safetensors"))


def commit(
    tmp: Path,
    step: int,
    world_size: int,
    ranks: list[int],
    extra: dict[str, Any],
    keep: int,
    with_model: bool = True,
) -> Path:
    """Checksum the shared files and ``ranks``' files, write the manifest, publish the
    folder atomically, prune old ones (committer only). ``with_model``: the folder
    holds the whole model (a pipeline's node without every stage holds none)."""
    names = ["model.safetensors"] if with_model else []
    names += ["config.toml", TOKENIZER_FILE]
    names += [n for n in OPTIONAL_FILES if (tmp / n).is_file()]
    names += [f"rank{r}.pt" for r in ranks]
    missing = [n for n in names if not (tmp / n).is_file()]
    if missing:
        raise CheckpointError(f"{tmp}: {missing} were not written")
    files = {n: sha256_file(tmp / n) for n in names}
    manifest = {"step": step, "world_size": world_size, "ranks": ranks, "files": files, **extra}
    for marker in tmp.glob(".rank*"):
        marker.unlink()
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for name in [*names, MANIFEST]:  # on the disk before the folder can look complete
        fsync_path(tmp / name)
    fsync_path(tmp)
    final = tmp.with_suffix("")
    old = final.with_suffix(_OLD)
    if final.exists():  # re-saving a step: keep one complete copy at every moment
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    fsync_path(final.parent)  # the rename is durable before anything older goes
    fsync_path(final.parent.parent)  # a first save created checkpoints/ itself
    shutil.rmtree(old, ignore_errors=True)
    for stale in list_checkpoints(final.parent)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    remove_stale_tmp(final.parent)
    return final


# -- reading ---------------------------------------------------------------------------


def read_manifest(ckpt: Path, verify: bool = True, rank: int | None = None) -> dict[str, Any]:
    """Load the manifest and check the files against their sha256: all of them, or
    only the shared ones and ``rank``'s own."""
    mpath = Path(ckpt) / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST}; not a complete checkpoint")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath}: corrupt manifest ({e})") from None
    lacking = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if lacking or not isinstance(manifest["files"], dict):
        raise CheckpointError(
            f"{mpath}: not a farflung manifest (missing {', '.join(lacking) or 'files'}); "
            f"expected keys {', '.join(MANIFEST_KEYS)}"
        )
    if verify:
        for name, digest in manifest["files"].items():
            if rank is not None and name.startswith("rank") and name != f"rank{rank}.pt":
                continue
            f = Path(ckpt) / name
            if not f.is_file():
                raise CheckpointError(f"{f}: missing from checkpoint")
            if sha256_file(f) != digest:
                raise CheckpointError(f"{f}: corrupt (sha256 does not match the manifest)")
    if rank is not None and f"rank{rank}.pt" not in manifest["files"]:
        raise CheckpointError(
            f"{ckpt} holds no state of rank {rank} (ranks here: {manifest.get('ranks')}); "
            "each machine resumes from its own --out"
        )
    return manifest


def verified(path: Path, rank: int | None = None) -> tuple[dict[int, Path], list[str]]:
    """The checkpoints under ``path`` that verify (for ``rank``), by step, and one
    line for each that does not."""
    valid, problems = {}, []
    for ckpt in candidates(path):
        try:
            read_manifest(ckpt, rank=rank)
            valid[step_of(ckpt)] = ckpt
        except CheckpointError as e:
            problems.append(str(e))
    return valid, problems


def newest(path: Path) -> Path:
    """A checkpoint folder itself, or a run folder's newest checkpoint that verifies (a
    corrupt newer one is reported and passed over)."""
    if not candidates(path):
        raise CheckpointError(f"{path}: no checkpoint found")
    valid, problems = verified(path)
    if not valid:
        raise CheckpointError("; ".join(problems))
    found = valid[max(valid)]
    for problem in problems:
        print(f"farflung: warning: {problem}; using {found.name}", file=sys.stderr)
    return found


def load_model_weights(ckpt: Path, model: nn.Module) -> None:
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(Path(ckpt) / "model.safetensors"))
    except Exception as e:  # safetensors raises several types for bad files
        raise CheckpointError(f"{ckpt}/model.safetensors: cannot load ({e})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}/model.safetensors does not fit the model (missing {missing}, "
            f"unexpected {unexpected})"
        )


def load_rank_state(ckpt: Path, rank: int, mmap: bool = False) -> dict[str, Any]:
    """Rank ``rank``'s state; ``mmap``: tensors stay in the file's pages until read (a
    reader that wants a few of them does not load the optimizer's)."""
    path = Path(ckpt) / f"rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (checkpoint written by another world size?)")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # pickle and zip errors of many kinds
        raise CheckpointError(f"{path}: cannot load ({e})") from None
