"""Run folders: the marker that makes a folder a farflung run, and the check that keeps
``--force`` from deleting anything that is not one.

``farflung train``, ``python -m farflung.train`` and ``farflung coordinator`` write
``farflung-run.json`` (farflung's version, the creation time) when they create a run
folder. ``--force`` deletes a folder only when it is a run: it holds that marker, or
it is a run of a farflung from before the marker (``config.toml`` and ``metrics.jsonl``
or ``checkpoints/``), and in both cases holds nothing but the entries farflung writes
into a run folder (:data:`RUN_FILES`). Anything else — the working directory, the home
folder, a data folder, a run folder where a user left a file of their own — is
refused with a message naming what is there, and nothing is deleted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from farflung import __version__
from farflung.config import ConfigError

RUN_MARKER = "farflung-run.json"

RUN_FILES = frozenset(
    {
        RUN_MARKER,
        "config.toml",  # the resolved config
        "metrics.jsonl",  # one record per step
        "eval.jsonl",  # validation loss
        "summary.json",  # the run's totals
        "checkpoints",  # step_X/, step_X.tmp/, step_X.old/
        "events.jsonl",  # elastic: membership changes
        "samples.jsonl",  # elastic: the samples each committed step trained
        "coordinator.json",  # elastic: the coordinator's address
        "coordinator.json.tmp",  # its atomic write, should the launcher die mid-way
        "links.json",  # --netlab / --link-model: the emulated links
        "delays.json",
        "aqsgd",  # pipeline: AQ-SGD's stored activations
        "report.png",  # `farflung report RUN --out RUN/report.png`
        "run.key",  # elastic: the run key the local launcher made
    }
)
"""Every entry farflung writes at the top of a run folder."""

_LEGACY_EVIDENCE = ("metrics.jsonl", "checkpoints")
_LISTED = 5  # entries named in a refusal


class RunFolderError(ConfigError):
    """A folder ``--force`` must not delete; the message says what it holds."""


def mark_run(out: Path) -> None:
    """Create ``out`` (if needed) and mark it as a farflung run (once)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / RUN_MARKER
    if not marker.exists():
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        marker.write_text(json.dumps({"farflung": __version__, "created": created}) + "\n")


def removal_refusal(out: Path) -> str | None:
    """Why ``out`` must not be deleted by ``--force``, or None when it is a run."""
    if out.is_symlink():
        return f"{out} is a symbolic link, not a run folder"
    if not out.is_dir():
        return f"{out} is not a folder"
    here = Path.cwd().resolve()
    where = out.resolve()
    if where in (Path.home().resolve(), Path(where.anchor)):
        return f"{out} is {where}"
    if where == here or where in here.parents:
        return f"{out} is (or holds) the working directory {here}"
    entries = sorted(p.name for p in out.iterdir())
    foreign = [n for n in entries if n not in RUN_FILES]
    if foreign:
        return f"{out} holds files farflung did not write: {_listing(foreign)}"
    marked = RUN_MARKER in entries
    legacy = "config.toml" in entries and any(n in entries for n in _LEGACY_EVIDENCE)
    if entries and not (marked or legacy):
        return f"{out} is not marked as a run (no {RUN_MARKER}); it holds {_listing(entries)}"
    return None


def check_removable(out: Path) -> None:
    """Raise RunFolderError (naming what ``out`` holds) unless ``--force`` may delete
    ``out``: a farflung run folder, or an empty one."""
    why = removal_refusal(Path(out))
    if why is not None:
        raise RunFolderError(
            f"--force deletes only a farflung run folder, and {why}; nothing was deleted: "
            "choose another --out, or remove what you do not need yourself"
        )


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    more = len(names) - _LISTED
    return f"{shown} and {more} more ({len(names)} entries)" if more > 0 else shown
