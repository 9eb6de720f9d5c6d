"""The data pipeline's engine: bounded shards, run on all cores or a Dask cluster, resumable.

Inputs are cut into shards of at most ``shard_docs`` documents and ``shard_mb``
megabytes (:func:`plan_shards`), so a worker's memory is bounded by the shard size
and not by the corpus. A stage is a function ``fn(arg, out) -> dict`` run once per
shard (:func:`run_stage`): it writes its files through ``out`` (a
:class:`ShardOutput`) and returns a small JSON-able result (counts, issues).

Resuming: each file is written under a temp name and renamed when the shard's work is
complete; then a done marker ``done/<stage>/<shard>.json`` is written (atomically)
with the sha256 of every file and a key made of the stage settings and the shard's
inputs. A shard counts as done only if its marker exists, its key matches and every
file still has its checksum, so a run killed at any point — mid-write, between the
rename and the marker, or after — redoes exactly the shards that are not intact, and
a changed setting or input file redoes the shards it affects.

Executors: ``inline`` (this process), ``process`` (a local process pool, the
default) and ``dask`` (dask.distributed: a ``LocalCluster`` or the scheduler at
``--scheduler ADDR``; the workers need farflung installed and the output folder on a
shared filesystem). The pipeline itself holds no scheduling logic beyond submitting
one task per shard.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from farflung.curate.documents import IssueLog, Piece, ReadOptions, list_pieces, read_piece
from farflung.data.corpus import Document
from farflung.data.errors import DataError
from farflung.data.shards import sha256_file, write_json

EXECUTORS = ("process", "inline", "dask")
"""Names accepted by :func:`open_executor` (``--executor``)."""

DONE_DIR = "done"
MANIFEST = "manifest.json"
FORMAT = 1
"""Version of the pipeline's on-disk layout (manifests and done markers)."""


def default_processes() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class InputShard:
    """One shard of the input: consecutive pieces of one or more files."""

    name: str
    pieces: tuple[Piece, ...]

    @property
    def docs(self) -> int:
        """Records in the shard (good and bad)."""
        return sum(p.docs for p in self.pieces)

    @property
    def nbytes(self) -> int:
        """Input bytes of the shard."""
        return sum(p.nbytes for p in self.pieces)


def plan_shards(sources: list[str], shard_docs: int, shard_mb: float) -> list[InputShard]:
    """Cut ``sources`` into shards of at most ``shard_docs`` documents and about
    ``shard_mb`` megabytes: large files split, small files packed together."""
    if shard_docs < 1 or shard_mb <= 0:
        raise DataError(f"shard size must be positive, got {shard_docs} docs, {shard_mb} MB")
    max_bytes = max(1, int(shard_mb * (1 << 20)))
    pieces = list_pieces(sources, shard_docs, max_bytes)
    groups: list[list[Piece]] = []
    docs = nbytes = 0
    for piece in pieces:
        if not groups or docs + piece.docs > shard_docs or nbytes + piece.nbytes > max_bytes:
            groups.append([])
            docs = nbytes = 0
        groups[-1].append(piece)
        docs += piece.docs
        nbytes += piece.nbytes
    if not groups:
        raise DataError(f"no input files found in {sources}")
    return [InputShard(f"{i:05d}", tuple(g)) for i, g in enumerate(groups)]


def read_shard(shard: InputShard, opts: ReadOptions, issues: IssueLog) -> Iterator[Document]:
    """The good documents of a shard, in order; bad ones go to ``issues``."""
    for piece in shard.pieces:
        yield from read_piece(piece, opts, issues)


def check_unchanged(shards: list[InputShard], what: str) -> None:
    """Raise DataError if an input file changed since ``shards`` were planned (a later
    step re-reading it would pair its documents with the wrong records)."""
    for shard in shards:
        for piece in shard.pieces:
            if not piece.version:
                continue
            try:
                stat = os.stat(piece.path)
                now = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                now = "missing"
            if now != piece.version:
                raise DataError(
                    f"{piece.path} changed (or went missing) since {what} read it: run {what} again"
                )


def shard_to_json(shard: InputShard) -> dict[str, Any]:
    """A shard as stored in a manifest (and hashed into done keys)."""
    return {"name": shard.name, "pieces": [p.__dict__ for p in shard.pieces]}


def shard_from_json(data: dict[str, Any]) -> InputShard:
    """Inverse of :func:`shard_to_json`."""
    return InputShard(data["name"], tuple(Piece(**p) for p in data["pieces"]))


# ---------------------------------------------------------------------------- outputs


class ShardOutput:
    """The files one shard task writes, under temp names until :meth:`commit`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files: list[str] = []

    def path(self, rel: str) -> Path:
        """A temp path to write ``rel`` (relative to the stage folder) to."""
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel not in self._files:
            self._files.append(rel)
        return self.path_of(rel)

    def open(self, rel: str, mode: str = "w") -> IO:
        """Open ``rel`` for writing (text mode is UTF-8)."""
        encoding = None if "b" in mode else "utf-8"
        return open(self.path(rel), mode, encoding=encoding)

    def commit(self) -> dict[str, str]:
        """Sync and rename every temp file to its final name; return name -> sha256."""
        sums = {}
        for rel in self._files:
            tmp = self.path_of(rel)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            sums[rel] = sha256_file(tmp)
            os.replace(tmp, self.root / rel)
        return sums

    def abort(self) -> None:
        """Remove the temp files of a failed task."""
        for rel in self._files:
            self.path_of(rel).unlink(missing_ok=True)

    def path_of(self, rel: str) -> Path:
        """The temp name of ``rel``."""
        final = self.root / rel
        return final.with_name(final.name + ".tmp")


@dataclass(frozen=True)
class Task:
    """One shard's work as shipped to a worker: everything in it must pickle."""

    stage: str
    name: str
    key: str
    root: str
    fn: Callable[[Any, ShardOutput], dict]
    arg: Any


def execute(task: Task) -> dict:
    """Run one task in a worker: the stage function, then commit, then the marker."""
    root = Path(task.root)
    out = ShardOutput(root)
    try:
        result = task.fn(task.arg, out)
        files = out.commit()
    except BaseException:
        out.abort()
        raise
    marker = {"format": FORMAT, "key": task.key, "files": files, "result": result}
    write_json(marker_path(root, task.stage, task.name), marker)
    return result


def marker_path(root: Path, stage: str, name: str) -> Path:
    """Where the done marker of shard ``name`` of ``stage`` lies."""
    return root / DONE_DIR / stage / f"{name}.json"


def done_files(root: Path, stage: str, names: Iterable[str]) -> dict[str, dict[str, str]]:
    """Output checksums (file -> sha256) of each shard in ``names``, read from the done
    markers of a stage that has completed; a later stage passes them on in its
    arguments, so that a rewritten input changes its key and its shards are redone."""
    return {
        name: json.loads(marker_path(root, stage, name).read_text(encoding="utf-8"))["files"]
        for name in names
    }


def done_result(root: Path, stage: str, name: str, key: str) -> dict | None:
    """The stored result of a shard whose outputs are intact, else None."""
    path = marker_path(root, stage, name)
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        if marker["format"] != FORMAT or marker["key"] != key:
            return None
        for rel, digest in marker["files"].items():
            file = root / rel
            if not file.is_file() or sha256_file(file) != digest:
                return None
        return marker["result"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def task_key(stage: str, settings: dict, arg: Any) -> str:
    """A digest of what a shard's output depends on: the stage, its settings, its input."""
    text = json.dumps([stage, settings, repr(arg)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------- running


def run_stage(
    stage: str,
    fn: Callable[[Any, ShardOutput], dict],
    items: list[tuple[str, Any]],
    root: Path,
    settings: dict,
    executor: Executor,
    progress: bool = True,
) -> dict[str, dict]:
    """Run ``fn(arg, out)`` for every ``(shard name, arg)`` not already done; return
    every shard's result by name. Failed shards do not stop the others: they are
    listed in one DataError at the end, and a rerun redoes only them."""
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    todo = []
    for name, arg in items:
        key = task_key(stage, {"fn": f"{fn.__module__}.{fn.__qualname__}", **settings}, arg)
        done = done_result(root, stage, name, key)
        if done is None:
            todo.append(Task(stage, name, key, str(root), fn, arg))
        else:
            results[name] = done
    failures = []
    bar = tqdm(
        total=len(items), initial=len(results), desc=stage, unit="shard", disable=not progress
    )
    with bar:
        for task, outcome in executor.run(todo):
            if isinstance(outcome, BaseException):
                failures.append(f"{task.name}: {type(outcome).__name__}: {outcome}")
            else:
                results[task.name] = outcome
            bar.update(1)
    _remove_stale_markers(root, stage, {name for name, _ in items})
    if failures:
        raise DataError(
            f"{stage}: {len(failures)} of {len(items)} shards failed "
            f"({'; '.join(failures[:3])}{'; ...' if len(failures) > 3 else ''}); "
            "finished shards are kept: run the same command again to redo the failed ones"
        )
    return {name: results[name] for name, _ in items}


def _remove_stale_markers(root: Path, stage: str, names: set[str]) -> None:
    """Forget shards of an earlier, different plan of the same folder."""
    folder = root / DONE_DIR / stage
    for path in folder.glob("*.json"):
        if path.stem not in names:
            path.unlink()


def remove_stale_files(folder: Path, keep: Iterable[str]) -> None:
    """Delete files in ``folder`` not named in ``keep`` (outputs of an earlier plan with
    more shards, which a reader globbing the folder would otherwise pick up)."""
    wanted = set(keep)
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and path.name not in wanted:
                path.unlink()


# ---------------------------------------------------------------------------- executors


class Executor:
    """Runs tasks, yielding ``(task, result or exception)`` as each one ends; a context
    manager that releases its workers on exit."""

    def run(self, tasks: list[Task]) -> Iterator[tuple[Task, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers (a no-op where there are none)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InlineExecutor(Executor):
    """Runs tasks one after another in this process (``--processes 1``, debugging)."""

    def run(self, tasks: list[Task]) -> Iterator[tuple[Task, Any]]:
        for task in tasks:
            try:
                yield task, execute(task)
            except Exception as exc:
                yield task, exc


class ProcessExecutor(Executor):
    """A local process pool, one task per shard, kept for the executor's lifetime."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    def run(self, tasks: list[Task]) -> Iterator[tuple[Task, Any]]:
        if not tasks:
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.processes, mp_context=_context())
        futures = {self._pool.submit(execute, task): task for task in tasks}
        try:
            for future in as_completed(futures):
                exc = future.exception()
                yield futures[future], exc if exc is not None else future.result()
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def _context() -> multiprocessing.context.BaseContext:
    """fork on Linux: a worker starts at once with this process's modules. spawn and
    forkserver re-run the ``__main__`` module in every worker, which for the farflung
    CLI imports torch (seconds per worker, more than a small shard's work). Elsewhere
    (macOS, Windows), the platform's default, as fork is unsafe or absent there."""
    if sys.platform == "linux":
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


class DaskExecutor(Executor):
    """dask.distributed: a LocalCluster of ``workers`` processes (threads with
    ``processes=False``), or the existing cluster whose scheduler is at ``address``."""

    def __init__(
        self, address: str | None = None, workers: int = 1, processes: bool = True
    ) -> None:
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError as exc:
            raise DataError(
                f"--executor dask needs dask.distributed ({exc}): pip install 'farflung[dask]'"
            ) from exc
        import logging

        self._cluster = None
        if address is None:
            self._cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=processes,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            address = self._cluster
        try:
            self.client = Client(address)
        except (OSError, TimeoutError) as exc:
            raise DataError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc

    def run(self, tasks: list[Task]) -> Iterator[tuple[Task, Any]]:
        from dask.distributed import as_completed as dask_completed

        futures = {
            self.client.submit(execute, t, key=f"{t.stage}-{t.name}-{t.key[:16]}", pure=False): t
            for t in tasks
        }
        for future in dask_completed(list(futures)):
            try:
                outcome = future.result()
            except Exception as exc:  # the task's own error, a lost worker, a cancel
                outcome = exc
            yield futures[future], outcome

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def open_executor(
    kind: str = "process", processes: int | None = None, scheduler: str | None = None
) -> Executor:
    """An executor by name; use it in a ``with`` block to release its workers.

    ``processes`` defaults to every core; ``process`` with one process runs inline.
    ``dask`` with ``scheduler`` connects to that cluster, else starts a LocalCluster.
    """
    if kind not in EXECUTORS:
        raise DataError(f"unknown executor {kind!r}: choose one of {', '.join(EXECUTORS)}")
    n = default_processes() if processes is None else processes
    if n < 1:
        raise DataError(f"--processes must be at least 1, got {n}")
    if kind == "dask":
        return DaskExecutor(scheduler, workers=n)
    if scheduler is not None:
        raise DataError("--scheduler only applies to --executor dask")
    if kind == "inline" or n == 1:
        return InlineExecutor()
    return ProcessExecutor(n)
