"""A run's corpus, prepared once: by the launcher before it starts workers, or by
each node's first worker. Imports no torch, so a launcher stays light."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from farflung.config import Config
from farflung.data import INDEX_FILE, ShardIndex, prepare
from farflung.train import init


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path``; a filesystem without locks gets none."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)  # releases the GIL: heartbeats go on
        except OSError:
            pass
        yield


def ensure_data(cfg: Config, show_progress: bool = True) -> ShardIndex:
    """Prepare the configured corpus when its folder holds no index yet. A lock file in
    the folder makes processes that share it (nodes on a shared filesystem, two runs)
    prepare it once: the others wait, then find the index."""
    folder = Path(cfg.data.dir)
    if not (folder / INDEX_FILE).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with _file_lock(folder / ".prepare.lock"):
            if not (folder / INDEX_FILE).is_file():
                d = cfg.data
                prepare(
                    d.sources,
                    d.dir,
                    d.vocab_size,
                    d.val_fraction,
                    d.shard_tokens,
                    seed=cfg.train.seed,
                    progress=show_progress,
                    tokenizer=init.data_tokenizer(cfg),
                )
    return ShardIndex.load(cfg.data.dir)
